"""The `lthmpi` command: one name for what a user runs, each subcommand the same as its `python -m` entry point.

    lthmpi run       = python -m lthmpi.main              (also under mpirun: mpirun -np 4 lthmpi run ...)
    lthmpi analysis  = python -m lthmpi.analysis
    lthmpi model     = python -m lthmpi.analysis model    (the scaling model; alias: scaling)
    lthmpi prepare   = python -m lthmpi.data prepare
"""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _run(argv):
    from .main import main

    return main(argv, prog="lthmpi run", signals=True)


def _analysis(argv):
    from .analysis.__main__ import main

    return main(argv, prog="lthmpi analysis")


def _model(argv):
    from .analysis.scaling_cli import main

    return main(argv, prog="lthmpi model")


def _prepare(argv):
    from .data.__main__ import main

    # `lthmpi prepare --help` shows prepare's own options, not the one-command group above it
    return main(["prepare", *argv], prog="lthmpi", signals=True)


COMMANDS = {
    "run": (_run, "run an experiment: parent, masks, retrainings (python -m lthmpi.main)"),
    "analysis": (_analysis, "tables, figures and report.md from finished runs (python -m lthmpi.analysis)"),
    "model": (_model, "the scaling model: predicted wall time on P ranks (python -m lthmpi.analysis model)"),
    "prepare": (_prepare, "turn raw dataset files into one prepared HDF5 file (python -m lthmpi.data prepare)"),
}
ALIASES = {"scaling": "model"}


def parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    p = argparse.ArgumentParser(
        prog="lthmpi", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Lottery Ticket Hypothesis experiments with late resetting, spread over MPI ranks.",
        epilog="commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
        + "\n\n`lthmpi COMMAND --help` shows a command's options. Manual: docs/index.md.")
    p.add_argument("--version", action="version", version=f"lthmpi {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=[*COMMANDS, *ALIASES], help="one of: "
                   + ", ".join(COMMANDS) + " (scaling = model)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="the command's own options")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not argv:
        p.error(f"give a COMMAND ({', '.join(COMMANDS)}); `lthmpi --help` says what each does")
    args = p.parse_args(argv)
    run, _ = COMMANDS[ALIASES.get(args.command, args.command)]
    return run(args.args)


if __name__ == "__main__":
    sys.exit(main())
