"""Scaling figures of merit from the timings in one or more results files (pure functions, no plotting).

Definitions (P = number of MPI ranks, from provenance["ranks"]; T(P) = timing["total"], the wall time of
the whole run from launch to merged results):

- strong scaling (same work, more ranks): speed-up S(P) = T(P0) / T(P) and efficiency E = S·P0 / P,
  relative to the run with the fewest ranks P0 (normally P0 = 1, when S and E are the textbook ones).
- Amdahl's law T(P) = T1·(f + (1 − f)/P) is fitted by linear least squares in time, T(P) = a + b/P,
  giving the serial fraction f = a/(a + b) and the fitted one-rank time T1 = a + b. It needs no P = 1
  run, only two or more distinct P. f < 0 means super-linear behaviour and is reported as it is.
- Karp–Flatt experimentally determined serial fraction e(P) = (1/S − 1/P) / (1 − 1/P), for P > 1,
  only when the reference run has P0 = 1.
- weak scaling (flag --weak: the work grows with P): the work of a run is W = parent iterations + the
  sum of all retraining iterations (every iteration has the same batch size, so iterations measure work).
  The scaled speed-up is the ratio of throughputs, S_w(P) = (T(P0)/W(P0)) / (T(P)/W(P)), i.e. the time
  the reference run would need for this run's work over this run's time; with P0 = 1, W(P) = P·W(1) and
  constant time it equals P. Weak efficiency E_w = S_w·P0/P. Gustafson's law S_w = P − s(P − 1) gives a serial fraction
  s(P) = (P − S_w)/(P − 1) per P and a least-squares s over all P > 1.
- load imbalance of the retraining phase = max over workers of busy time / mean busy time, where a worker's
  busy time is the sum of (end_time − start_time) of the tasks it ran in this session. Workers are the
  ranks that train tasks (subgroup leaders when ranks form data-parallel subgroups, provenance["workers"]);
  a worker that ran nothing counts as busy 0. Tasks that ended before this session started (done by an
  earlier, interrupted run and skipped on resume) are left out of the timeline and of the imbalance.
- idle time before a task = its start_time − the end_time of the task its rank ran before it (for a rank's
  first task: − the start of the training phase). It is what a worker spends waiting for its next task
  (the dynamic scheduler's round trip to rank 0, or a task's inputs under a task graph), plus the few
  milliseconds of setting up the task.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from . import scaling_model as _model
from ..parallel import scheduling as _schedule

PHASES = ("startup", "parent", "masks", "distribution", "training", "gather")


# -- the laws (Amdahl, Karp–Flatt and Gustafson are the cost model's: one implementation in the project) --
def speedup(t_ref: float, t_p: float) -> float:
    return t_ref / t_p if t_p > 0 else math.nan


def efficiency(s: float, p: float, p_ref: float = 1) -> float:
    return s * p_ref / p if p > 0 else math.nan


def karp_flatt(s: float, p: float) -> float:
    """Experimentally determined serial fraction e = (1/S − 1/P) / (1 − 1/P); NaN for P ≤ 1 or no S."""
    if not s or not math.isfinite(s):
        return math.nan
    return _model.karp_flatt(s, p)


def amdahl_fit(ps, times) -> tuple[float, float]:
    """Least-squares (serial fraction f, T1) of T(P) = T1·(f + (1 − f)/P); NaN, NaN with < 2 distinct P."""
    ps = np.asarray(ps, dtype=float)
    ts = np.asarray(times, dtype=float)
    ok = np.isfinite(ts) & (ps > 0)
    try:
        return _model.amdahl_fit(ps[ok], ts[ok])
    except ValueError:
        return math.nan, math.nan


def gustafson(s: float, p):
    """Gustafson's scaled speed-up P − s·(P − 1) for serial fraction s (P may be an array)."""
    return _model.gustafson(s, np.asarray(p, dtype=float))


def amdahl_speedup(f: float, p) -> np.ndarray:
    """Amdahl's predicted speed-up 1 / (f + (1 − f)/P)."""
    p = np.asarray(p, dtype=float)
    return 1.0 / (f + (1.0 - f) / p)


def gustafson_serial_fraction(scaled_speedup: float, p: float) -> float:
    """The s for which Gustafson's law gives `scaled_speedup` at P (NaN for P ≤ 1)."""
    return (p - scaled_speedup) / (p - 1.0) if p > 1 else math.nan


def gustafson_fit(ps, scaled) -> float:
    """Least-squares serial fraction s of S_w(P) = P − s(P − 1) over the runs with P > 1."""
    ps = np.asarray(ps, dtype=float)
    ss = np.asarray(scaled, dtype=float)
    ok = (ps > 1) & np.isfinite(ss)
    if not ok.any():
        return math.nan
    x = ps[ok] - 1.0
    return float(np.sum((ps[ok] - ss[ok]) * x) / np.sum(x * x))


# -- one run -----------------------------------------------------------------------------------------
def _provenance_list(v):
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return [v]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def run_name(path: str) -> str:
    """A run's name: its directory's name (the results file's directory for a results.h5 path)."""
    path = path.rstrip("/")
    if path.endswith(".h5"):
        path = os.path.dirname(path)
    return os.path.basename(path) or path


def ranks_of(res: dict) -> int:
    return int(res["provenance"].get("ranks", 1) or 1)


def workers_of(res: dict) -> int:
    """How many ranks train tasks independently (subgroup leaders with subgroups, else all ranks)."""
    return int(res["provenance"].get("workers", ranks_of(res)) or ranks_of(res))


def session_tasks(res: dict) -> tuple[list[dict], int]:
    """The tasks run in this session (with start/end times), and how many were done by an earlier run."""
    t0 = res["timing"].get("start_time")
    mine, earlier = [], 0
    for t in res["tasks"]:
        s, e = t.get("start_time"), t.get("end_time")
        if s is None or e is None or not (math.isfinite(s) and math.isfinite(e)):
            earlier += 1
        elif t0 is not None and e < t0:
            earlier += 1
        else:
            mine.append(t)
    return mine, earlier


def rank_busy(tasks: list[dict]) -> dict[int, float]:
    """Busy seconds per rank: the sum of end_time − start_time of its tasks."""
    busy: dict[int, float] = {}
    for t in tasks:
        busy[int(t["rank"])] = busy.get(int(t["rank"]), 0.0) + float(t["end_time"]) - float(t["start_time"])
    return dict(sorted(busy.items()))


def training_start(res: dict) -> float | None:
    """When the training phase began: the launch plus every phase before it."""
    t = res["timing"]
    if t.get("start_time") is None or t.get("training") is None:
        return None
    return float(t["start_time"]) + sum(float(t.get(p, 0.0)) for p in PHASES[:PHASES.index("training")])


def idle_before(tasks: list[dict], start: float | None = None) -> dict[str, float]:
    """Per task id: seconds its rank sat idle before it (see the module's definition). A rank's first task
    counts from `start` (the training phase's), or not at all without one."""
    out: dict[str, float] = {}
    by_rank: dict[int, list[dict]] = {}
    for t in tasks:
        by_rank.setdefault(int(t["rank"]), []).append(t)
    for lst in by_rank.values():
        prev = start
        for t in sorted(lst, key=lambda t: float(t["start_time"])):
            if prev is not None:
                out[t["task_id"]] = max(0.0, float(t["start_time"]) - prev)
            prev = float(t["end_time"])
    return out


def imbalance(busy, workers: int | None = None) -> float:
    """max busy / mean busy over `workers` workers (those absent from `busy` count as 0); NaN if none ran."""
    values = list(busy.values()) if isinstance(busy, dict) else list(busy)
    if not values:
        return math.nan  # nothing ran in this session
    values += [0.0] * max(0, (workers or 0) - len(values))
    return _schedule.imbalance(values)


def phases(timing: dict) -> dict[str, float]:
    """Wall seconds per phase in run order, plus "other" (total minus the phases, e.g. the merge)."""
    out = {p: float(timing[p]) for p in PHASES if p in timing}
    out.update({k: float(v) for k, v in timing.items()
                if k not in out and k not in ("total", "start_time") and isinstance(v, (int, float))})
    if "total" in timing:
        other = float(timing["total"]) - sum(out.values())
        if other > 1e-3:
            out["other"] = other
    return out


def work_iterations(res: dict) -> int:
    """Training iterations of the run: the parent's plus every retraining's."""
    parent = res["parent"].get("iterations") or 0
    return int(parent) + int(sum(int(t.get("iterations") or 0) for t in res["tasks"]))


def profile(res: dict) -> dict:
    """Everything the scaling figures need from one run, JSON-ready."""
    mine, earlier = session_tasks(res)
    busy = rank_busy(mine)
    idle = list(idle_before(mine, training_start(res)).values())
    workers = workers_of(res)
    hosts = _provenance_list(res["provenance"].get("hosts", []))
    threads = res["provenance"].get("threads_per_rank")
    cores, per_host = res["provenance"].get("cores_per_host"), res["provenance"].get("ranks_per_host")
    oversubscribed = bool(cores and per_host and int(per_host) * int(threads or 1) > int(cores))
    return dict(run=res.get("path", ""), name=run_name(res.get("path", "")), ranks=ranks_of(res), workers=workers, hosts=hosts,
                threads=int(threads) if threads is not None else None, oversubscribed=oversubscribed,
                total_seconds=float(res["timing"].get("total", math.nan)), phases=phases(res["timing"]),
                busy_seconds={str(k): v for k, v in busy.items()}, imbalance=imbalance(busy, workers),
                tasks=len(res["tasks"]), tasks_this_session=len(mine), tasks_from_earlier_run=earlier,
                work_iterations=work_iterations(res), idle_per_task_mean=float(np.mean(idle)) if idle else math.nan,
                idle_per_task_max=max(idle, default=math.nan))


# -- several runs ------------------------------------------------------------------------------------
def work_key(res: dict) -> str:
    """The runs' identity for strong scaling: the config without its `parallel` section."""
    cfg = {k: v for k, v in res["config"].items() if k != "parallel"}
    return json.dumps(cfg, sort_keys=True)


def scaling_groups(results: list[dict], weak: bool = False) -> list[list[int]]:
    """Indices of runs that form one scaling series: all of them for weak scaling, else same work."""
    if weak:
        return [list(range(len(results)))] if results else []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        groups.setdefault(work_key(r), []).append(i)
    return list(groups.values())


def series(profiles: list[dict], weak: bool = False) -> dict | None:
    """Speed-up, efficiency, Karp–Flatt and the Amdahl (or Gustafson) fit over runs at several P.

    None with fewer than two distinct rank counts. Several runs at the same P: the fastest is kept
    (the usual convention for timing noise), the others are listed in `repeats`. The series holds the
    runs at the most common thread count per rank; a run with other threads (e.g. one process letting
    TF use every core, the baseline a user without MPI would run) is a `baselines` entry, compared
    with T(1) but never used as T(1).
    """
    counts: dict = {}
    for pr in profiles:
        counts[pr.get("threads")] = counts.get(pr.get("threads"), 0) + 1
    threads = sorted(counts, key=lambda t: (-counts[t], t if t is not None else 0))[0] if counts else None
    # more ranks x threads than cores on a host is not strong scaling: shown beside the series, not fitted
    others = [pr for pr in profiles if pr.get("threads") != threads or pr.get("oversubscribed")]
    profiles = [pr for pr in profiles if pr.get("threads") == threads and not pr.get("oversubscribed")]
    by_p: dict[int, dict] = {}
    repeats = []
    for pr in profiles:
        p = pr["ranks"]
        if p in by_p:
            slow, fast = sorted([by_p[p], pr], key=lambda x: x["total_seconds"])[::-1]
            repeats.append(slow["run"])
            by_p[p] = fast
        else:
            by_p[p] = pr
    if len(by_p) < 2:
        return None
    ps = sorted(by_p)
    ref = by_p[ps[0]]
    p0, t0, w0 = ps[0], ref["total_seconds"], ref["work_iterations"]
    rows = []
    for p in ps:
        pr = by_p[p]
        t = pr["total_seconds"]
        row = dict(ranks=p, run=pr["run"], seconds=t, imbalance=pr["imbalance"], work_iterations=pr["work_iterations"])
        if weak:
            s = (t0 / w0) / (t / pr["work_iterations"]) if t > 0 and w0 and pr["work_iterations"] else math.nan
            row.update(scaled_speedup=s, efficiency=efficiency(s, p, p0),
                       gustafson_serial_fraction=gustafson_serial_fraction(s, p) if p0 == 1 else math.nan)
        else:
            s = speedup(t0, t)
            row.update(speedup=s, efficiency=efficiency(s, p, p0),
                       karp_flatt=karp_flatt(s, p) if p0 == 1 else math.nan)
        rows.append(row)
    out = dict(kind="weak" if weak else "strong", reference_ranks=p0, threads_per_rank=threads, rows=rows,
               repeats=repeats)
    out["baselines"] = [dict(run=pr["run"], name=pr["name"], ranks=pr["ranks"], threads=pr.get("threads"),
                             oversubscribed=bool(pr.get("oversubscribed")),
                             seconds=pr["total_seconds"], speedup=speedup(t0, pr["total_seconds"]))
                        for pr in others] if not weak else []
    if weak:
        out["gustafson_serial_fraction"] = (gustafson_fit([r["ranks"] for r in rows], [r["scaled_speedup"] for r in rows])
                                            if p0 == 1 else math.nan)
    else:
        f, t1 = amdahl_fit([r["ranks"] for r in rows], [r["seconds"] for r in rows])
        out.update(amdahl_serial_fraction=f, amdahl_t1_seconds=t1)
    return out


# -- strong-scaling efficiency against the bound of the serial phases ---------------------------------
PARALLEL_PHASES = ("distribution", "training")


def efficiency_against_bound(ref: dict, run: dict) -> dict:
    """E(P) of `run` against the P = 1 run `ref`, on wall time and on the training phase, and the wall-time
    efficiency that `run`'s own serial phases allow.

    Serial part S = the run's wall time outside its distribution and training phases (start-up, parent,
    masks, gather, merge): it does not shrink with P. Were the P = 1 run's parallel part W1 = T1 - S1 divided
    perfectly, `run` would take S_P + W1 / P, so its wall-time efficiency is at most
    bound = T1 / (P (S_P + W1 / P)). `wall_vs_bound` = E_wall / bound is 1 for a perfect training phase."""
    p = ranks_of(run)
    t1, tp = float(ref["timing"]["total"]), float(run["timing"]["total"])
    train1, trainp = float(ref["timing"]["training"]), float(run["timing"]["training"])
    s1 = t1 - sum(float(ref["timing"].get(k, 0.0)) for k in PARALLEL_PHASES)
    sp = tp - sum(float(run["timing"].get(k, 0.0)) for k in PARALLEL_PHASES)
    bound = t1 / (p * (sp + (t1 - s1) / p))
    e_wall = t1 / (p * tp)
    return dict(ranks=p, wall_1=t1, wall_p=tp, training_1=train1, training_p=trainp, serial_1=s1, serial_p=sp,
                e_training=train1 / (p * trainp), e_wall=e_wall, bound=bound, wall_vs_bound=e_wall / bound)


def efficiency_lines(ref: dict, runs: list[dict]) -> list[str]:
    """The table run/strong_scaling.sh prints: training-phase E(P), wall-time E(P) and its bound."""
    out = [f"{'run':<28} {'P':>3} {'T1 s':>8} {'TP s':>8} {'serial1 s':>9} {'serialP s':>9} {'E_train':>8} "
           f"{'E_wall':>7} {'bound':>7} {'E_wall/bound':>12}"]
    for r in runs:
        e = efficiency_against_bound(ref, r)
        out.append(f"{run_name(r.get('path', '')):<28} {e['ranks']:>3} {e['wall_1']:>8.2f} {e['wall_p']:>8.2f} "
                   f"{e['serial_1']:>9.2f} {e['serial_p']:>9.2f} {e['e_training']:>8.3f} {e['e_wall']:>7.3f} "
                   f"{e['bound']:>7.3f} {e['wall_vs_bound']:>12.3f}")
    return out
