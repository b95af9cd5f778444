"""`python -m lthmpi.data prepare ...`: turn raw dataset files into one prepared HDF5 file.

Run it once before a parallel job so that every rank loads finished arrays instead of decoding and
checking the raw files itself; point the config's data.prepared at the output.
"""
from __future__ import annotations

import argparse
import sys
import types

from .prepare import NORMALIZE, prepare
from .readers import DATASETS, DataError


def _parser(prog: str = "python -m lthmpi.data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Dataset tools of lthmpi.")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="read, split and normalise a dataset into one HDF5 file",
                        description="Read a dataset's raw files, hold out the validation set, keep "
                                    "a subset, normalise, and write one checksummed HDF5 file that "
                                    "data.prepared can point at.")
    pp.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset name")
    pp.add_argument("--dir", default="",
                    help="data directory (or .npz file); default: $LTHMPI_DATA_DIR/<dataset> or "
                         "the system location")
    pp.add_argument("--subset", type=int, default=0,
                    help="keep the first N training examples after the split (0 = all)")
    pp.add_argument("--validation", type=int, default=0,
                    help="hold out the last N training examples for validation")
    pp.add_argument("--normalize", choices=NORMALIZE, default="scale",
                    help="scale: divide by the value range; standardize: per-channel mean/std of "
                         "the training part")
    pp.add_argument("--out", required=True, help="the HDF5 file to write (replaced atomically)")
    return p


def main(argv=None, prog: str = "python -m lthmpi.data") -> int:
    args = _parser(prog).parse_args(argv)
    cfg = types.SimpleNamespace(dataset=args.dataset, dir=args.dir, subset=args.subset,
                                validation=args.validation, normalize=args.normalize, prepared="")
    try:
        ds = prepare(cfg, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {ds.name} train {len(ds.y_train)}, val {len(ds.y_val)}, "
          f"test {len(ds.y_test)}, input {ds.input_shape}, {ds.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
