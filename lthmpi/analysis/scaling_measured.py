"""Measured runs set against the scaling model (`lthmpi.analysis model`, scaling_cli.py): a run's results as a
RunProfile, ``--calibrate`` (what the model learns from runs at other P) and ``--check`` (honest predictions
of runs it never saw). scaling_cli.py's docstring says how a measured run maps onto the model."""
from __future__ import annotations

import math
import os

from ..parallel.scheduling import step_cost


class ModelCliError(RuntimeError):
    """A problem phrased as one line for the user."""


def with_warmup(profile, row: dict, cores, warmup: float) -> dict:
    from .scaling_model import predict, task_time_factor

    row = dict(row, phases=dict(row["phases"]), warmup=0.0)
    if row["P"] >= 2 and warmup > 0:
        add = warmup * task_time_factor(profile, row["P"], cores)
        row["warmup"] = add
        row["makespan"] += add
        row["phases"]["training"] += add
        row["wall"] += add
        wall1 = predict(profile, 1, row["scheduler"], cores)["wall"]
        row["speedup"] = wall1 / row["wall"]
        row["efficiency"] = row["speedup"] / row["P"]
    return row


def load_one(path: str) -> dict:
    from . import AnalysisError, load_runs

    try:
        return load_runs([path])[0]
    except AnalysisError as e:
        raise ModelCliError(str(e)) from None


def scheduler_of(res: dict) -> str:
    """The scheduler a run used: provenance (the MPI path records it), else its config; serial runs: lpt."""
    s = res["provenance"].get("schedule") or res["config"].get("parallel", {}).get("schedule") or "lpt"
    return str(s)


def parent_dp_of(res: dict) -> bool:
    """Whether a run trained its parent data-parallel: the provenance's record of what ``auto`` resolved to,
    else the config's true/false (on one rank the parent is never data-parallel)."""
    from .scaling import ranks_of

    recorded = res["provenance"].get("parent_data_parallel")
    if recorded is not None:
        return bool(recorded)
    value = res["config"].get("parallel", {}).get("parent_data_parallel", False)
    if ranks_of(res) < 2 or value is False:
        return False
    if value is True:
        return True
    raise ModelCliError(f"{_run_dir(res['path'])}: parallel.parent_data_parallel = {value!r} and the run does not record "
                        f"what it resolved to (provenance parent_data_parallel)")


def profile_from_results(res: dict, cores: int | None = None, overhead: float | None = None,
                         dp_efficiency: float | None = None):
    """A scaling_model.RunProfile from one loaded results dict (lthmpi.results.load)."""
    from .scaling import rank_busy, ranks_of, session_tasks
    from .scaling_model import RunProfile

    if parent_dp_of(res):
        raise ModelCliError(f"{_run_dir(res['path'])} trained its parent data-parallel over {ranks_of(res)} ranks: profile a "
                            f"run whose parent trained on one rank (the model needs that time; give the data-parallel "
                            f"run to --calibrate to measure the parent's efficiency)")
    tasks = res["tasks"]
    if not tasks:
        raise ModelCliError(f"{res.get('path', 'the run')} has no tasks to model")
    durations = [float(t["seconds"]) for t in tasks]
    costs = [float(t.get("iterations") or 0) * step_cost(str(t.get("kernels") or "dense"), float(t.get("remaining") or 1.0))
             for t in tasks]  # as the run's LPT estimated them
    if not all(math.isfinite(d) and d >= 0 for d in durations):
        raise ModelCliError(f"{res.get('path', 'the run')}: a task has no valid `seconds`")
    if not any(c > 0 for c in costs):
        costs = list(durations)
    groups = [int(t["mask"]) for t in tasks]
    timing = res["timing"]
    phases = {k: float(timing[k]) for k in ("startup", "parent", "masks", "distribution", "gather") if k in timing}
    named = sum(float(v) for k, v in timing.items() if k not in ("total", "start_time") and isinstance(v, (int, float)))
    if "total" in timing:
        phases["gather"] = phases.get("gather", 0.0) + max(0.0, float(timing["total"]) - named)
    if overhead is None:
        mine, _ = session_tasks(res)
        busy = rank_busy(mine)
        training = float(timing.get("training", math.nan))
        if busy and math.isfinite(training):
            r = max(busy, key=busy.get)  # the rank that set the training phase (busy includes any warm-up)
            n = sum(1 for t in mine if int(t["rank"]) == r)
            overhead = max(0.0, (training - busy[r]) / n) if n else 0.0
        else:
            overhead = 0.0
    index = {t["task_id"]: i for i, t in enumerate(tasks)}
    deps = [tuple(index[d] for d in str(t.get("deps") or "").split(",") if d in index) for t in tasks]
    return RunProfile(durations, costs, phases, ranks=ranks_of(res), cores=cores, task_groups=groups,
                      overhead_per_task=float(overhead), data_parallel_efficiency=dp_efficiency,
                      task_deps=deps if any(deps) else None)


def _same_work(res: dict, res_ref: dict, option: str) -> None:
    from .scaling import work_key

    if work_key(res) != work_key(res_ref):
        raise ModelCliError(f"{option} {_run_dir(res['path'])} is not the same work as {_run_dir(res_ref['path'])} "
                            f"(their configs differ outside the `parallel` section)")


def _seconds_per_unit(profile) -> float:
    """Seconds per iteration of a profile's tasks, one rank per core (oversubscription divided out)."""
    from .scaling_model import oversubscription

    cost = sum(profile.task_costs)
    return sum(profile.task_durations) / cost / oversubscription(profile.ranks, profile.cores) if cost > 0 else math.nan


def calibrate(profile, res_ref: dict, runs: list[dict], cores) -> dict:
    """Teach the profile how the run grows with P from runs of the same work on other P (in place).

    Each run adds its start-up, parent, distribution and gather times to ``phase_points`` (the model fits
    a + b log2 P through them and the profiled run's) and its seconds per iteration over the profiled
    run's, both per core, to ``contention_points``. A run whose parent was data-parallel measures the
    parent's efficiency instead (the one-rank parent at its P over P times its parent); their mean becomes
    ``parent_efficiency`` unless one was given. Returns the fitted coefficients, for the printout.
    """
    from .scaling_model import LOG_PHASES, contention_law, phase_law

    ref_rate = _seconds_per_unit(profile)
    from .scaling import ranks_of, workers_of

    dp_parents = []
    for res in runs:
        _same_work(res, res_ref, "--calibrate")
        if workers_of(res) != ranks_of(res):
            raise ModelCliError(f"--calibrate {_run_dir(res['path'])} trained in data-parallel subgroups "
                                f"({workers_of(res)} of {ranks_of(res)} ranks led one): its task times are not one "
                                f"rank's; calibrate on runs with parallel.subgroups = false")
        dp = parent_dp_of(res)
        res_one = res if not dp else dict(res, provenance=dict(res["provenance"], parent_data_parallel=False))
        other = profile_from_results(res_one, cores)
        for name in LOG_PHASES:
            if name in other.phases and not (dp and name == "parent"):
                profile.phase_points.setdefault(name, []).append((other.ranks, other.phases[name]))
        if dp and "parent" in other.phases:
            dp_parents.append((other.ranks, other.phases["parent"]))
        rate = _seconds_per_unit(other)
        if math.isfinite(rate) and ref_rate > 0:
            profile.contention_points.append((other.ranks, rate / ref_rate))
    fits = {name: phase_law(profile, name) for name in LOG_PHASES}
    fits["task_time"] = contention_law(profile)
    a, b = fits["parent"]
    measured = [(p, (a + b * math.log2(p)) / (p * t)) for p, t in dp_parents if t > 0]
    if measured and profile.parent_efficiency is None:
        profile.parent_efficiency = min(1.0, sum(e for _, e in measured) / len(measured))
    return dict(runs=[_run_dir(r["path"]) for r in runs], ranks=[int(p) for p, _ in profile.contention_points],
                task_time_ratio=[float(r) for _, r in profile.contention_points],
                fits={k: dict(a=a, b=b) for k, (a, b) in fits.items()},
                parent_efficiency_measured=[dict(P=int(p), efficiency=float(e)) for p, e in measured])


def describe_calibration(cal: dict, ref_ranks: int) -> str:
    f = cal["fits"]
    ratios = ", ".join(f"{r:.3f} at P = {p}" for p, r in zip(cal["ranks"], cal["task_time_ratio"]))

    def law(name, unit):
        return f"{f[name]['a']:.3g} + {f[name]['b']:.3g} log2 P{unit}"

    dp = "".join(f"; parent data-parallel at P = {m['P']}: efficiency {m['efficiency']:.3f} (measured)"
                 for m in cal.get("parent_efficiency_measured", []))
    return (f"calibrated on {len(cal['runs'])} run(s) at P = {', '.join(map(str, cal['ranks']))}: seconds per "
            f"iteration {ratios} (against P = {ref_ranks}), fitted {law('task_time', '')}; "
            f"startup per core {law('startup', ' s')}; parent (one rank) {law('parent', ' s')}; "
            f"distribution {law('distribution', ' s')}; gather {law('gather', ' s')}{dp}")


def check(profile, res_ref: dict, checks: list[dict], cores, warmup: float = 0.0) -> list[dict]:
    """For each measured run: P, scheduler, measured and predicted wall / training / parent time, error %.

    A run whose parent was data-parallel is predicted so, at the profile's ``parent_efficiency``, and the
    efficiency it measured (the model's one-rank parent at its P over P times its
    parent) is reported next to the one the model used.
    """
    from dataclasses import replace

    from .scaling import ranks_of
    from .scaling_model import predict

    rows = []
    for res in checks:
        _same_work(res, res_ref, "--check")
        P, sched = ranks_of(res), scheduler_of(res)
        dp = parent_dp_of(res)
        e = profile.parent_efficiency if dp else None
        if dp and e is None:
            raise ModelCliError(f"--check {_run_dir(res['path'])} trained its parent data-parallel: give --parent-efficiency "
                                f"or a --calibrate run that measured it")
        prof = replace(profile, parent_efficiency=e)
        pred = with_warmup(prof, predict(prof, P, sched, cores), cores, warmup)
        measured = float(res["timing"].get("total", math.nan))
        m_train = float(res["timing"].get("training", math.nan))
        m_parent = float(res["timing"].get("parent", math.nan))
        one_rank = predict(replace(profile, parent_efficiency=None), P, sched, cores)["phases"]["parent"]
        rows.append(dict(run=_run_dir(res["path"]), P=P, scheduler=sched, measured=measured, predicted=pred["wall"],
                         error_pct=_err(pred["wall"], measured), measured_training=m_train,
                         predicted_training=pred["makespan"], training_error_pct=_err(pred["makespan"], m_train),
                         parent_data_parallel=dp, measured_parent=m_parent, predicted_parent=pred["phases"]["parent"],
                         parent_error_pct=_err(pred["phases"]["parent"], m_parent), parent_efficiency=e,
                         measured_parent_efficiency=(one_rank / (P * m_parent) if dp and m_parent > 0 else None)))
    return rows


def _run_dir(path: str) -> str:
    return os.path.dirname(path) if path.endswith(".h5") else path


def _err(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas if meas and math.isfinite(meas) and meas > 0 else math.nan
