"""python -m lthmpi.analysis RUN_DIR [RUN_DIR ...] [--out DIR] [--json] [--csv] [--tolerance 0.005] [--weak]
   python -m lthmpi.analysis model RUN_DIR [...]   (the scaling model, see scaling_cli.py)
   python -m lthmpi.analysis efficiency P1_RUN_DIR RUN_DIR [...]   (E(P) on training and wall time, and the
                                                   wall-time bound of each run's serial phases)

Without --json: prints the key tables, writes the figures and report.md to --out (default
./analysis_out/<name of the first run dir>). --json alone prints the JSON summary (one object for one run,
a list for several) and writes nothing. --csv writes OUT/tasks.csv (one row per retraining), and
OUT/stability.csv (one row per stability pair and alpha) for runs with stability pairs, and prints the
path (to stderr when --json keeps stdout for the JSON). Errors: one line "lthmpi.analysis: error: ...",
exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

PROG = "lthmpi.analysis"


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Science tables and figures, scaling figures and "
                                "report.md from finished lthmpi runs (read-only on the runs).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory (or its results.h5); several: "
                   "replicates (same config, other seed) are pooled, the same work at other rank counts gives speed-up")
    p.add_argument("--out", metavar="DIR", help="output directory (default ./analysis_out/<first run dir name>)")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout; alone it writes no files")
    p.add_argument("--csv", action="store_true", help="write OUT/tasks.csv, one row per retraining")
    p.add_argument("--tolerance", type=float, default=0.005, metavar="T",
                   help="winning ticket: early-stop accuracy >= dense - T (a fraction: 0.005 = 0.5 pp; default 0.005)")
    p.add_argument("--weak", action="store_true", help="the runs are a weak-scaling series (work grows with P)")
    return p


def fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "model":  # the scaling model: python -m lthmpi.analysis model --help
        from .scaling_cli import main as model_main

        return model_main(argv[1:], *([f"{prog} model"] if prog else []))
    if argv and argv[0] == "efficiency":
        return efficiency_main(argv[1:], f"{prog or PROG} efficiency")
    args = parser(prog or PROG).parse_args(argv)
    if not 0 <= args.tolerance < 1:
        return fail(f"--tolerance {args.tolerance} must be a fraction in [0, 1), e.g. 0.005 for 0.5 percentage points")
    from . import AnalysisError, dumps, load_runs, summaries, write_csv

    try:
        results = load_runs(args.runs)
    except AnalysisError as e:
        return fail(str(e))
    first = os.path.abspath(args.runs[0])
    name = os.path.basename(os.path.dirname(first) if first.endswith(".h5") else first.rstrip("/"))
    out = args.out or os.path.join("analysis_out", name)
    try:
        if args.json:
            s = summaries(results, args.weak, args.tolerance)
            print(dumps(s[0] if len(s) == 1 else s))
        if args.csv:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, "tasks.csv")
            n = write_csv(results, path)
            print(f"wrote {path} ({n} rows)", file=sys.stderr if args.json else sys.stdout)
            if any(r.get("stability") for r in results):
                from .stability import write_csv as write_stability_csv

                path = os.path.join(out, "stability.csv")
                n = write_stability_csv(results, path)
                print(f"wrote {path} ({n} rows: one per pair and alpha)", file=sys.stderr if args.json else sys.stdout)
        if not args.json:
            from .report import analyse

            command = "python -m lthmpi.analysis " + shlex.join(argv)
            done = analyse(results, out, args.tolerance, args.weak, command)
            print(done["text"])
            print(f"wrote {done['report']} and {len(done['files']) - 1} figures in {out}")
    except OSError as e:
        return fail(f"cannot write to {out}: {e.strerror or e}; choose another --out")
    return 0


def efficiency_main(argv: list[str], prog: str) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Strong-scaling efficiency of each RUN_DIR against the "
                                "P = 1 run, on the training phase and on wall time, next to the wall-time "
                                "efficiency that the run's own serial phases allow.")
    p.add_argument("ref", metavar="P1_RUN_DIR", help="the same work on one rank")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = p.parse_args(argv)
    from . import AnalysisError, load_runs
    from .scaling import efficiency_lines, work_key

    try:
        ref, *runs = load_runs([args.ref, *args.runs])
    except AnalysisError as e:
        return fail(str(e))
    other = [r["path"] for r in runs if work_key(r) != work_key(ref)]
    if other:
        return fail(f"{other[0]} is not the same experiment as {args.ref} (configs differ outside `parallel`)")
    print("\n".join(efficiency_lines(ref, runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
