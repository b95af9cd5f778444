"""The summary of run/strong_scaling.sh with --parent-dp or --pair-bound: the parent phase, E(P) and the model.

    .venv/bin/python run/strong_summary.py --walltimes DIR/walltimes.tsv --p1 DIR/p1 [--model DIR/model.json]
                                           [--pair DIR/p1-pair-a DIR/p1-pair-b] RUN_DIR [RUN_DIR ...]

For p1, the pair (two independent one-rank runs of p1's work started together side by side) and every RUN_DIR
(the same work on P ranks, e.g. p2-parent-dp and p2-parent-serial): where the parent trained (data-parallel
over the P ranks or on rank 0, from the provenance), the parent phase's time (the run's /timing `parent`:
training the dense parent, plus what the other ranks do meanwhile) and its speed-up against p1, the training
phase and E_train, the wall time (launch to exit, walltimes.tsv) and E_wall = t(p1) / (P t), and E_wall over the
pair's ceiling E_pair = t(p1) / max(t pair); then the scaling model's predictions of each run (`lthmpi.analysis
model --json` fitted on p1, its `check` rows): the run's recorded total and parent phase against predicted.
Reads the runs' results.h5 only.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys


def name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def signed(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.1f}%"


def ratio(a, b) -> float:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else math.nan


def walltimes(path: str) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["run"]: float(row["wall_seconds"]) for row in csv.DictReader(f, delimiter="\t")}


def summary(p1: str, runs: list[str], pair: list[str], walls: dict[str, float], model: dict | None) -> str:
    from lthmpi.analysis import load_runs
    from lthmpi.analysis.scaling import ranks_of
    from lthmpi.analysis.scaling_measured import parent_dp_of
    from lthmpi.tables import text_table

    ref, *rest = load_runs([p1, *pair, *runs])
    pairs, others = rest[:len(pair)], rest[len(pair):]

    def phase(res, key):
        return float(res["timing"].get(key, math.nan))

    t1, parent1, train1 = walls.get(name(p1), math.nan), phase(ref, "parent"), phase(ref, "training")
    e_pair = min((ratio(t1, walls.get(name(p))) for p in pair), default=math.nan)
    head = ["run", "P", "parent", "parent s", "S_parent", "training s", "E_train", "wall s", "E_wall"]
    head += ["E_wall / E_pair"] if pairs else []
    body = []
    for path, res in zip([p1, *pair, *runs], [ref, *pairs, *others]):
        p = ranks_of(res)
        wall = walls.get(name(path), math.nan)
        e_wall = ratio(t1, p * wall)
        where = "data-parallel" if parent_dp_of(res) else "rank 0"
        body.append([name(path), p, where, fmt(phase(res, "parent")), fmt(ratio(parent1, phase(res, "parent"))),
                     fmt(phase(res, "training")), fmt(ratio(train1, p * phase(res, "training")), ".3f"), fmt(wall),
                     fmt(e_wall, ".3f")])
        if pairs:
            body[-1].append(fmt(ratio(e_wall, e_pair), ".3f") if p > 1 else "-")
    lines = ["parent phase and efficiency against p1 (parent, training: the runs' recorded phases; wall: launch to "
             "exit, walltimes.tsv; E = t(p1) / (P t), S_parent = parent(p1) / parent):", text_table(head, body)]
    if pairs:
        e_train = min(ratio(train1, phase(r, "training")) for r in pairs)
        e_total = min(ratio(phase(ref, "total"), phase(r, "total")) for r in pairs)
        lines.append(f"ceiling of E(2), two independent one-rank runs side by side ({', '.join(name(p) for p in pair)}): "
                     f"E_pair = t(p1) / max(t pair) = {fmt(e_pair, '.3f')} on wall time (launch to exit), "
                     f"{fmt(e_total, '.3f')} on the recorded totals, {fmt(e_train, '.3f')} on the training phase")
    rows = {name(r["run"]): r for r in (model or {}).get("check") or []}
    if rows:
        total1 = phase(ref, "total")
        head = ["run", "P", "parent", "total s", "predicted s", "error", "E_wall", "E_wall pred.", "parent s",
                "parent pred. s", "error", "S_parent", "S_parent pred.", "e used", "e measured"]
        body = [[n, r["P"], "data-parallel" if r["parent_data_parallel"] else "rank 0", fmt(r["measured"]),
                 fmt(r["predicted"]), signed(r["error_pct"]), fmt(ratio(total1, r["P"] * r["measured"]), ".3f"),
                 fmt(ratio(total1, r["P"] * r["predicted"]), ".3f"), fmt(r["measured_parent"]),
                 fmt(r["predicted_parent"]), signed(r["parent_error_pct"]), fmt(ratio(parent1, r["measured_parent"])),
                 fmt(ratio(parent1, r["predicted_parent"])), fmt(r["parent_efficiency"], ".3g"),
                 fmt(r["measured_parent_efficiency"], ".3f")]
                for n, r in ((name(p), rows.get(name(p))) for p in runs) if r]
        lines += ["", f"the scaling model fitted on {name(p1)} against each run (model.txt): total = the run's recorded "
                      f"wall time, which the model predicts, E_wall on it; e = the parent's parallel efficiency, "
                      f"used = assumed by the model, measured = one-rank parent at P / (P x parent):",
                  text_table(head, body)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR", help="the same work on P > 1 ranks")
    ap.add_argument("--p1", required=True, metavar="RUN_DIR", help="the P = 1 run")
    ap.add_argument("--walltimes", required=True, metavar="TSV", help="run/strong_scaling.sh's walltimes.tsv")
    ap.add_argument("--model", metavar="JSON", help="lthmpi.analysis model --json output with --check of the runs")
    ap.add_argument("--pair", nargs=2, default=[], metavar="RUN_DIR", help="the two runs side by side")
    args = ap.parse_args(argv)
    model = None
    if args.model:
        with open(args.model) as f:
            model = json.load(f)
    from lthmpi.analysis import AnalysisError

    try:
        print(summary(args.p1, args.runs, args.pair, walltimes(args.walltimes), model))
    except AnalysisError as e:
        print(f"strong_summary.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
