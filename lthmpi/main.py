"""Command line: parse, resolve the config, and hand over to one rank or to the MPI coordinator.

    python -m lthmpi.main [--config FILE.toml] [--set section.key=value ...] [--run-dir DIR]
    mpirun -np P python -m lthmpi.main [same options]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from .config import ConfigError, help_text, resolve

EXIT_USAGE = 2
EXIT_FAILURE = 1

MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def parser(prog: str = "python -m lthmpi.main") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
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
    p.add_argument("--allow-mixed-kernels", action="store_true", dest="allow_mixed",
                   help="resume a run directory whose finished tasks were trained with another parallel.threads or "
                        "on other kernels (parallel.sparse_below) than this run would use; refused without it")
    return p


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in MPI_ENV)


def mpi_rank_from_env() -> int:
    """This process's rank as the launcher says it (before MPI is initialised), 0 when not launched so."""
    for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT: raised in the main thread so that Python unwinds (atomic writes remove their
    temporaries) instead of dying where it stands."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_signal_handlers():
    """SIGTERM (a scheduler's time limit, `kill`) and SIGINT (Ctrl-C) raise Interrupted once; while the
    process unwinds, further ones are ignored (the unwinding is short and bounded)."""
    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def interrupt_code(e: KeyboardInterrupt) -> int:
    return 128 + getattr(e, "signum", signal.SIGINT)


def interrupt_line(e: KeyboardInterrupt) -> str:
    return f"interrupted by {signal.Signals(getattr(e, 'signum', signal.SIGINT)).name}"


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


def default_run_dir(cfg) -> str:
    """runs/<dataset>_<model>_<hash>; a directory named by the hash of older versions (every field, defaults
    too) is found and resumed when it exists and the current name does not."""
    path = os.path.join("runs", cfg.default_run_name())
    legacy = cfg.default_run_name(legacy=True)
    if not os.path.exists(path) and legacy and os.path.isdir(os.path.join("runs", legacy)):
        return os.path.join("runs", legacy)
    return path


def main(argv=None, prog: str = "python -m lthmpi.main", signals: bool | None = None) -> int:
    """`signals`: turn SIGTERM/SIGINT into Interrupted (default: when run as the command line, argv None)."""
    t_start = time.time()
    args = parser(prog).parse_args(argv)
    if argv is None if signals is None else signals:  # the command line, not a test calling main() in-process
        install_signal_handlers()
    try:
        if launched_by_mpi() and not args.describe:
            from .parallel import run_parallel

            # Every rank reads the config inside the MPI start-up, so a rank that cannot (a file missing
            # on its host) is named by rank 0 instead of ending the job in silence.
            return run_parallel(lambda: resolve(args.config, args.sets), args.run_dir, t_start=t_start,
                                quiet=args.quiet, allow_mixed=args.allow_mixed)
        cfg = resolve(args.config, args.sets)
        if args.describe:
            if not (launched_by_mpi() and mpi_rank_from_env() != 0):  # under mpirun, once
                print(describe(cfg))
            return 0
        run_dir = args.run_dir or default_run_dir(cfg)
        from .driver import run_serial
        from .runtime import auto_threads

        path = run_serial(cfg, run_dir, auto_threads(1, cfg.parallel.threads), t_start=t_start, quiet=args.quiet,
                          allow_mixed=args.allow_mixed)
        if not args.quiet:
            from .results import format_table, load

            print(format_table(load(path)))
        print(f"results: {path}")
        return 0
    except KeyboardInterrupt as e:
        print(f"lthmpi: {interrupt_line(e)}; finished tasks are on disk, rerun the same command to resume",
              file=sys.stderr)
        return interrupt_code(e)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a non-zero exit
        if launched_by_mpi() and mpi_rank_from_env() != 0:
            return describe_error(e)[1]  # every rank read the same config: rank 0 says it, once
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


def describe_error(e: BaseException) -> tuple[str, int, bool]:
    """(one line after "lthmpi: error: ", exit status, whether it is a bug that deserves a traceback)."""
    from .store import disk_errno

    if is_user_error(e):
        return str(e), EXIT_USAGE, False
    code = disk_errno(e)
    if code is not None:
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return (f"{os.strerror(code)}{where}; finished tasks are kept: free space or fix the disk or its "
                f"permissions and rerun the same command to resume"), EXIT_FAILURE, False
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}", EXIT_FAILURE, True


def report_error(e: BaseException) -> int:
    """One clear line for the errors a user can fix; a traceback only for bugs."""
    line, code, bug = describe_error(e)
    if bug:
        import traceback

        traceback.print_exc()
    print(f"lthmpi: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
