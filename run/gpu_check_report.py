"""The report of run/gpu_check.sh: every task's device, ms per step of each grid (GPU against CPU), accuracies.

    .venv/bin/python run/gpu_check_report.py RUN_DIR [RUN_DIR ...]

A run directory's name says its grid: <model>_<device>_<k>pergpu (as run/gpu_check.sh names them); any other
name is reported under its own name. Reads results.h5 only.
"""
from __future__ import annotations

import os
import re
import statistics
import sys

NAME = re.compile(r"^(?P<model>.+)_(?P<device>cpu|gpu)_(?P<per>\d+)pergpu$")


def grid_of(path: str) -> tuple[str, str, str]:
    m = NAME.match(os.path.basename(os.path.normpath(path)))
    return (m["model"], m["device"], m["per"]) if m else (os.path.basename(path), "?", "?")


def report(paths: list[str]) -> str:
    from lthmpi.results import load

    lines, summary = [], {}
    for path in paths:
        res = load(path)
        model, device, per = grid_of(path)
        lines.append(f"{path}: {len(res['tasks'])} tasks")
        ms, acc = [], []
        for t in sorted(res["tasks"], key=lambda t: t["task_id"]):
            step = 1e3 * t["seconds"] / max(1, int(t["iterations"]))
            ms.append(step)
            acc.append(t["final_accuracy"])
            lines.append(f"  {t['task_id']:24s} rank {t['rank']:2d}  device {t.get('device', '?'):8s} "
                         f"{t.get('precision', '?'):15s} {step:8.2f} ms/step  accuracy {t['final_accuracy']:.4f}")
        summary[(model, per, device)] = (statistics.median(ms), statistics.mean(acc), len(ms))
    lines += ["", f"{'model':14s} {'ranks/GPU':>9s} {'device':>6s} {'ms/step':>9s} {'x CPU':>6s} {'accuracy':>9s}"]
    for (model, per, device), (ms, acc, n) in sorted(summary.items()):
        cpu = summary.get((model, per, "cpu"))
        ratio = f"{ms / cpu[0]:6.2f}" if cpu and device != "cpu" else "      "
        lines.append(f"{model:14s} {per:>9s} {device:>6s} {ms:9.2f} {ratio} {acc:9.4f}   (median / mean of {n} tasks)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(report(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
