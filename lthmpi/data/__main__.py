"""`python -m lthmpi.data prepare ...`: turn raw dataset files into one prepared HDF5 file.

Run it once before a parallel job so that every rank loads finished arrays instead of decoding and
checking the raw files itself; point the config's data.prepared at the output. An image tree
(`--dataset imagefolder`) can be prepared under `mpirun -np P`: every rank decodes its share, and the
file does not depend on P. `verify FILE` reads a prepared file once and checks all its checksums.
"""
from __future__ import annotations

import argparse
import sys
import types

from ..config import NORMALIZATIONS, DataConfig
from .prepare import prepare, settings_of, verify_prepared
from .readers import DATASETS, DataError


def _parser(prog: str = "python -m lthmpi.data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Dataset tools of lthmpi.")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="read, split and normalise a dataset into one HDF5 file",
                        description="Read a dataset's raw files, hold out the validation set, keep "
                                    "a subset, normalise, and write one checksummed HDF5 file that "
                                    "data.prepared can point at. An image tree (imagefolder) is "
                                    "streamed as uint8 with its statistics, by every rank under mpirun.")
    pp.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset name")
    pp.add_argument("--dir", default="",
                    help="data directory (or .npz file); default: $LTHMPI_DATA_DIR/<dataset> or "
                         "the system location")
    default = DataConfig()  # the defaults of data.* in a config, so that the default file fits the default config
    pp.add_argument("--subset", type=int, default=default.subset,
                    help="keep the first N training examples after the split (0 = all)")
    pp.add_argument("--validation", type=int, default=default.validation,
                    help="hold out the last N training examples for validation (default: data.validation's "
                         "default, %(default)s)")
    pp.add_argument("--normalize", choices=NORMALIZATIONS, default=default.normalize,
                    help="scale: divide by the value range; standardize: per-channel mean/std of "
                         "the training part")
    pp.add_argument("--image-size", type=int, default=default.image_size,
                    help="imagefolder only: images are cropped to a centred square and resized to N x N")
    pp.add_argument("--out", required=True, help="the HDF5 file to write (replaced atomically)")
    vp = sub.add_parser("verify", help="check every checksum of a prepared file",
                        description="Read a prepared file once and check the checksums of all its arrays "
                                    "(training from disk, data.in_memory = false, does not).")
    vp.add_argument("file", help="the prepared HDF5 file")
    return p


def _summary(out: str, ds) -> str:
    if isinstance(ds, dict):
        return (f"wrote {out}: imagefolder train {ds['train']}, val {ds['val']}, test {ds['test']}, input "
                f"({ds['size']}, {ds['size']}, 3) uint8, {ds['classes']} classes, decoded by {ds['ranks']} rank(s)")
    return (f"wrote {out}: {ds.name} train {len(ds.y_train)}, val {len(ds.y_val)}, "
            f"test {len(ds.y_test)}, input {ds.input_shape}, {ds.num_classes} classes")


def main(argv=None, prog: str = "python -m lthmpi.data", signals: bool = False) -> int:
    from ..errors import install_signal_handlers, interrupt_code, interrupt_line
    from ..parallel.launcher import launched_by_mpi

    args = _parser(prog).parse_args(argv)
    if args.command == "verify":
        try:
            ds = verify_prepared(args.file)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.file}: every checksum matches ({ds.name}, train {len(ds.y_train)})")
        return 0
    cfg = types.SimpleNamespace(dataset=args.dataset, dir=args.dir, subset=args.subset,
                                validation=args.validation, normalize=args.normalize, prepared="",
                                image_size=args.image_size)
    comm = None
    if argv is None or signals:  # the command line, not a test calling main() in its own process
        install_signal_handlers()
    if launched_by_mpi():
        from ..parallel.mpi import world

        comm = world()
    rank = comm.rank if comm else 0
    from ..faults import set_fault

    fault = set_fault(rank)  # LTHMPI_FAULT=...:prepare, for the interruption tests
    try:
        if cfg.dataset == "imagefolder":  # streamed by every rank (stream_prepare imports prepare, not back)
            from .readers import resolve_dir
            from .stream_prepare import prepare_images

            ds = prepare_images(settings_of(cfg), resolve_dir("imagefolder", str(cfg.dir or "")), args.out,
                                comm, lambda: fault.at("prepare"))
        else:
            ds = prepare(cfg, args.out)
    except DataError as e:
        if rank == 0:  # every rank raised the same line
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if comm is not None:
            comm.settle()
        if rank == 0:
            print(f"{interrupt_line(e)}: nothing written", file=sys.stderr)
        return interrupt_code(e)
    except Exception as e:  # noqa: BLE001 - under mpirun one rank's failure must end every rank
        if comm is None or comm.size == 1:
            raise
        print(f"error: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        comm.abort(1)
    if rank == 0:
        print(_summary(args.out, ds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
