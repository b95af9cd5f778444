"""Analysis of finished runs: science tables and figures, scaling figures, report.md.

`python -m lthmpi.analysis RUN_DIR [RUN_DIR ...]` (see __main__.py). Results are opened read-only through
lthmpi.results.load; everything produced goes to the output directory, never into a run directory unless
--out names it. Modules: science (tables), scaling (figures of merit), plots (matplotlib), report (markdown).
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from ..results import TASK_COLUMNS, load, summary_json
from ..store import StoreError
from . import scaling


class AnalysisError(RuntimeError):
    """A problem with the runs given to the analysis, phrased as one line."""


def load_runs(paths: list[str]) -> list[dict]:
    """Load each run directory (or results.h5 path); AnalysisError for a missing, unfinished or corrupt one."""
    out = []
    for p in paths:
        if not os.path.exists(p):
            raise AnalysisError(f"no such run directory or results file: {p}")
        try:
            out.append(load(p))
        except StoreError as e:
            raise AnalysisError(str(e)) from None
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise AnalysisError(f"results of {p} are unreadable or corrupt ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return out


def plain(v):
    """JSON-ready: NaN and infinities become None, numpy scalars and arrays become Python values."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return plain(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def scaling_summary(results: list[dict], weak: bool = False) -> list[dict]:
    """Per run: its profile (ranks, phases, busy time per rank, imbalance) and its scaling series or None."""
    profiles = [scaling.profile(r) for r in results]
    per_run = [dict(p) for p in profiles]
    for group in scaling.scaling_groups(results, weak):
        s = scaling.series([profiles[i] for i in group], weak)
        for i in group:
            per_run[i]["series"] = s
    return per_run


def summaries(results: list[dict], weak: bool = False, tolerance: float = 0.005) -> list[dict]:
    """lthmpi.results.summary_json of each run, with a `scaling` key and, for runs with stability pairs, a
    `stability` key (every pair's curve and barrier, and the earliest stable k per sparsity); JSON-safe."""
    from . import stability

    sc = scaling_summary(results, weak)
    out = []
    for r, s in zip(results, sc):
        extra = {"scaling": s}
        if r.get("stability"):
            extra["stability"] = {"pairs": stability.summary(r),
                                  "earliest_stable": stability.earliest_stable(stability.pairs(r), r, tolerance)}
        out.append(plain(summary_json(r) | extra))
    return out


def dumps(obj) -> str:
    return json.dumps(plain(obj), indent=1, allow_nan=False)


def write_csv(results: list[dict], path: str) -> int:
    """One row per retraining of every run: the task columns, then the run directory. Returns the row count."""
    cols = list(TASK_COLUMNS)
    extra = list(dict.fromkeys(k for r in results for t in r["tasks"] for k in t if k not in cols))
    cols += extra
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + ["run_dir"])
        for r in results:
            run_dir = os.path.dirname(os.path.abspath(r["path"]))
            for t in r["tasks"]:
                w.writerow([_csv_cell(t.get(c)) for c in cols] + [run_dir])
                n += 1
    return n


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return v
