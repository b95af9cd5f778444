"""Command line: parse, resolve the config, and hand over to one rank, the MPI coordinator or a shard
(lthmpi/parallel/).

    python -m lthmpi.main [--config FILE.toml] [--set section.key=value ...] [--run-dir DIR]
    mpirun -np P python -m lthmpi.main [same options]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

from .config import ConfigError, help_text
from .errors import (describe_error, exit_interrupted, install_signal_handlers, interrupt_code, report_error,
                     resume_line)
from .parallel.launcher import launched_by_mpi, mpi_rank_from_env
from .validation import resolve


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
                   help="print the model's layers, parameter count and memory for the dataset's shape and the "
                        "per-layer densities of every mask, then exit (no data read, no weight drawn)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    jobs = p.add_argument_group("job arrays (no MPI; docs/clusters.md)")
    jobs.add_argument("--shard", metavar="I/N", help="run share I of N (0-based) of the tasks as one process, in a "
                      "run directory shared with the other shards; 'auto': I and N from SLURM_ARRAY_TASK_*; "
                      "'setup': only the parent and the masks (a first job before the array)")
    jobs.add_argument("--merge", action="store_true",
                      help="build RUN_DIR/results.h5 once every task is done; names the missing tasks otherwise")
    p.add_argument("--allow-mixed-kernels", action="store_true", dest="allow_mixed",
                   help="resume a run directory whose finished tasks were trained with another parallel.threads or "
                        "on other kernels (parallel.sparse_below) than this run would use; refused without it")
    return p




def main(argv=None, prog: str = "python -m lthmpi.main", signals: bool | None = None) -> int:
    """`signals`: turn SIGTERM/SIGINT into Interrupted (default: when run as the command line, argv None)."""
    t_start = time.time()
    args = parser(prog).parse_args(argv)
    signals = argv is None if signals is None else signals  # the command line, not a test calling main() in-process
    if signals:
        install_signal_handlers()
    try:
        if args.describe:
            cfg = resolve(args.config, args.sets)
            if not (launched_by_mpi() and mpi_rank_from_env() != 0):  # under mpirun, once
                from .describe import describe

                print(describe(cfg))
            return 0
        if args.shard or args.merge:
            return shard_main(args, t_start)
        from .parallel.coordinator import main as coordinate

        comm = None
        if launched_by_mpi():
            from .parallel.mpi import world

            comm = world()
        # Every rank reads the config inside the start-up, so a rank that cannot (a file missing on its
        # host) is named by rank 0 instead of ending the job in silence.
        return coordinate(lambda: resolve(args.config, args.sets), args.run_dir, t_start=t_start, quiet=args.quiet,
                          comm=comm, allow_mixed=args.allow_mixed)
    except KeyboardInterrupt as e:
        print(resume_line(e), file=sys.stderr)
        if signals:
            exit_interrupted(interrupt_code(e))
        return interrupt_code(e)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a non-zero exit
        if launched_by_mpi() and mpi_rank_from_env() != 0:
            return describe_error(e)[1]  # every rank read the same config: rank 0 says it, once
        return report_error(e)


@contextlib.contextmanager
def _unlocked_after(run_dir: str):
    """The run lock a shard or a merge took, dropped when it ends, as the coordinator drops its own: the process
    (a notebook, a test) may go on to another step on the same directory."""
    from .store import RunDir

    try:
        yield
    finally:
        RunDir(run_dir).unlock()


def shard_main(args, t_start: float) -> int:
    """--shard I/N and --merge: one process each, never under mpirun."""
    from .parallel.phases import default_run_dir

    if args.shard and args.merge:
        raise ConfigError("--shard and --merge are two steps: run the shards, then merge once")
    if launched_by_mpi():
        raise ConfigError(f"{'--shard' if args.shard else '--merge'} runs without MPI: start each shard as a process "
                          f"of its own (e.g. an element of a SLURM job array), not under mpirun")
    from .parallel import shards

    if args.merge:
        cfg = resolve(args.config, args.sets) if args.config or args.sets else None
        if cfg is None and not args.run_dir:
            raise ConfigError("--merge needs the run directory: --run-dir DIR (or the shards' --config/--set)")
        run_dir = args.run_dir or default_run_dir(cfg)
        with _unlocked_after(run_dir):
            path = shards.merge_run(cfg, run_dir, t_start)
        if not args.quiet:
            from .results import format_table, load

            print(format_table(load(path)))
        print(f"results: {path}")
        return 0
    share = shards.parse_shard(args.shard)
    cfg = resolve(args.config, args.sets)
    run_dir = args.run_dir or default_run_dir(cfg)
    with _unlocked_after(run_dir):
        did = shards.run_shard(cfg, run_dir, share, t_start, quiet=args.quiet, allow_mixed=args.allow_mixed)
    who = f"shard {share[0]}/{share[1]}: trained {len(did['trained'])} tasks" if share else "parent and masks ready"
    print(f"{who}; {did['done']} of {did['total']} tasks done in {run_dir}"
          + ("; merge with --merge" if did["done"] == did["total"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
