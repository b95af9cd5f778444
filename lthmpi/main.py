"""Command line: parse, resolve the config, and hand over to one rank or to the MPI coordinator.

    python -m lthmpi.main [--config FILE.toml] [--set section.key=value ...] [--run-dir DIR]
    mpirun -np P python -m lthmpi.main [same options]
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from .config import ConfigError, help_text, resolve

EXIT_USAGE = 2
EXIT_FAILURE = 1

MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lthmpi.main",
        description="Lottery-ticket experiment with late resetting: parent run, M masks x N reset points, controls.",
        epilog="config keys and their defaults (set with --set key=value or in a TOML file):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with the config sections (default: built-in defaults)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override one key, value read as TOML (e.g. --set 'prune.remaining=[0.5, 0.2]'); repeatable")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/<dataset>_<model>_<config hash>)")
    p.add_argument("--describe", action="store_true",
                   help="print the model's layers and parameter count for the dataset's shape, then exit (no data read)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return p


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in MPI_ENV)


def describe(cfg) -> str:
    from .data import KNOWN_SHAPES
    from .models import build_model, describe as describe_model
    from .runtime import configure_tensorflow

    if cfg.data.dataset not in KNOWN_SHAPES:
        raise ConfigError(f"--describe needs a dataset of known shape ({', '.join(sorted(KNOWN_SHAPES))}), "
                          f"not {cfg.data.dataset!r}")
    shape, classes = KNOWN_SHAPES[cfg.data.dataset]
    configure_tensorflow(1)
    model = build_model(cfg.model.name, shape, classes, cfg.seed)
    return f"{cfg.model.name} on {cfg.data.dataset} {shape}, {classes} classes\n" + describe_model(model)


def main(argv=None) -> int:
    t_start = time.time()
    args = parser().parse_args(argv)
    try:
        cfg = resolve(args.config, args.sets)
        if args.describe:
            print(describe(cfg))
            return 0
        run_dir = args.run_dir or os.path.join("runs", cfg.default_run_name())
        if launched_by_mpi():
            from .parallel import run_parallel

            return run_parallel(cfg, run_dir, t_start=t_start, quiet=args.quiet)
        from .driver import run_serial
        from .runtime import auto_threads

        path = run_serial(cfg, run_dir, auto_threads(1, cfg.parallel.threads), t_start=t_start, quiet=args.quiet)
        if not args.quiet:
            from .results import format_table, load

            print(format_table(load(path)))
        print(f"results: {path}")
        return 0
    except KeyboardInterrupt:
        print("lthmpi: interrupted; finished tasks are on disk, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a non-zero exit
        return report_error(e)


def is_user_error(e: BaseException) -> bool:
    """Errors a user can fix from the message alone: no traceback for these."""
    from .store import StoreError

    kinds = [ConfigError, StoreError]
    # Only an imported module can have raised its error: importing lthmpi.models here would import
    # TensorFlow (seconds, and its C++ log lines on stderr) just to report a config error.
    for module, name in (("lthmpi.data", "DataError"), ("lthmpi.models", "ModelError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(kinds))


def report_error(e: BaseException) -> int:
    """One clear line for the errors a user can fix; a traceback only for bugs."""
    if is_user_error(e):
        print(f"lthmpi: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        print(f"lthmpi: error: {os.strerror(e.errno)}{where}; finished tasks are kept, free space or fix "
              f"permissions and rerun to resume", file=sys.stderr)
        return EXIT_FAILURE
    import traceback

    traceback.print_exc()
    print(f"lthmpi: error: {type(e).__name__}: {e}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
