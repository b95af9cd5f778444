"""Predict the wall time of a run on P ranks from one measured run, and the classic scaling laws.

The model follows the engine's phases (the names of ``PhaseTimer`` in ``parallel/phases.py``):

    T(P) = startup(P) + parent + masks + distribution(P) + makespan(P) + gather(P)

* ``startup(P)``: per-rank import and model build. Ranks start concurrently, so on its own core a rank
  pays about the same whatever P is; when P ranks share ``cores`` cores it grows by max(1, P / cores)
  (importing TensorFlow is CPU-bound: 20 ranks on 2 cores spend a minute importing).
* ``parent`` and ``masks``: the serial part (Amdahl's f). ``masks`` is constant. The parent trains on one
  rank, or, with ``parent_efficiency`` e set, data-parallel over all P ranks (``parallel.parent_data_parallel``):
  parent(P) / (P e) for P >= 2, e being the parallel efficiency S/P of that phase, the number a run measures
  directly (one-rank parent time over P times the data-parallel one). The parent's gradient traffic is in e.
* ``distribution(P)``, ``gather(P)``: collectives, a + b log2(P) (tree algorithms).
* Calibration: ``startup`` (per core, i.e. divided by the oversubscription), ``parent``, ``distribution``
  and ``gather`` are all fitted as a + b log2(P) by least squares over the profiled run and the runs in
  ``phase_points`` (b clipped at 0: noise must not predict phases that get faster with more ranks); with
  one measurement the phase is constant. Ranks that start together contend for the filesystem and the
  page cache while importing, and rank 0 trains the parent while the others compile: both grow with P on
  real machines (16-core Xeon: start-up 10.2 s at P = 1, 16.5 s at P = 16).
* ``makespan(P)``: the measured task durations replayed with ``schedule.simulate`` under the chosen
  scheduler, i.e. the schedule the engine really runs; a task graph (``task_deps``) is replayed with
  ``schedule.simulate_graph``, only ready tasks, critical path first. The critical-path bound (the
  non-training phases plus the longest chain of task durations) is printed next to the prediction: no
  number of ranks, under any scheduler, does better. Durations are first normalised to one rank per
  core (divided by the measured run's oversubscription max(1, ranks / cores)) and then scaled by the
  target's max(1, P / cores), and by the contention factor (``contention``): how much slower a task runs
  when P ranks are busy at once, each on a core of its own (shared caches and memory bandwidth, clocks
  that drop as more cores work; 1.06 to 1.17 on the Xeon). The oversubscription factor is applied over
  the whole makespan: pessimistic at the tail, where ranks that finished free their cores. Thread counts
  per rank are not modelled.
* More ranks than units of work (tasks; masks for ``static``): the extra ranks idle, unless
  ``data_parallel_efficiency`` e is set on the profile; then ranks form subgroups (``groups_for``) and a
  subgroup of s ranks trains a task 1 + e (s - 1) times faster. Gradient traffic is folded into e.

Speedup is T(1) / T(P) from the same model (same ``cores``), so it is the model's own, not the
measured one; efficiency is speedup / P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..parallel.scheduling import SCHEDULERS, groups_for, imbalance, simulate, simulate_graph

PHASES = ("startup", "parent", "masks", "distribution", "training", "gather")
LOG_PHASES = ("startup", "parent", "distribution", "gather")
PER_CORE_PHASES = ("startup",)  # CPU-bound: fitted per core, scaled by the oversubscription


@dataclass
class RunProfile:
    """What one measured run tells the model.

    ``task_durations`` (s) and ``task_costs`` (iterations) per task, in task order; ``phases`` the phase
    times in seconds as rank 0 measured them (``startup``, ``parent``, ``masks``, ``distribution``,
    ``gather``; ``training`` is ignored, the model rebuilds it from the tasks); ``ranks`` and ``cores``
    the run's P and core count (None: every rank had its own core). ``task_groups``: the mask of each
    task, for the static scheduler (default: each task its own mask). ``phase_points``: further
    (P, seconds) measurements per phase (of ``LOG_PHASES``, as measured, oversubscription included), for
    the a + b log2 P fits. ``contention_points``: (P, r), a run of the same tasks on P ranks took r times
    this run's seconds per iteration, oversubscription divided out. ``parent_efficiency``: the parent trains
    data-parallel over all P ranks at this parallel efficiency (None: on one rank; ``phases['parent']`` is
    always a one-rank parent's time). ``independent``: tasks share nothing
    while training (the engine's case); False makes the training phase serial, the sum of durations.
    """
    task_durations: list[float]
    task_costs: list[float]
    phases: dict[str, float]
    ranks: int = 1
    cores: int | None = None
    task_groups: list | None = None
    independent: bool = True
    phase_points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    overhead_per_task: float = 0.0
    data_parallel_efficiency: float | None = None
    contention_points: list[tuple[int, float]] = field(default_factory=list)
    task_deps: list[tuple[int, ...]] | None = None
    parent_efficiency: float | None = None

    def __post_init__(self):
        if len(self.task_durations) != len(self.task_costs):
            raise ValueError(f"{len(self.task_durations)} durations but {len(self.task_costs)} costs")
        if self.task_groups is not None and len(self.task_groups) != len(self.task_durations):
            raise ValueError("task_groups must give one group per task")
        if self.ranks < 1:
            raise ValueError("ranks must be >= 1")
        if self.task_deps is not None and len(self.task_deps) != len(self.task_durations):
            raise ValueError("task_deps must give one tuple of dependencies per task")
        if self.parent_efficiency is not None and not 0 < self.parent_efficiency <= 1:
            raise ValueError(f"parent_efficiency must lie in (0, 1], not {self.parent_efficiency}")


def oversubscription(p: int, cores: int | None) -> float:
    """How much slower each rank runs when p CPU-bound ranks share ``cores`` cores (None: own cores)."""
    return 1.0 if cores is None else max(1.0, p / float(cores))


def fit_log(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of t = a + b log2(P) by least squares; constant (b = 0) with < 2 distinct P or b < 0."""
    pts = [(int(p), float(t)) for p, t in points]
    if not pts:
        return 0.0, 0.0
    xs = np.array([math.log2(p) for p, _ in pts])
    ys = np.array([t for _, t in pts])
    if len(set(xs.tolist())) < 2:
        return float(ys.mean()), 0.0
    b, a = np.polyfit(xs, ys, 1)
    if b < 0:
        return float(ys.mean()), 0.0
    return float(a), float(b)


def phase_law(profile: RunProfile, name: str) -> tuple[float, float]:
    """(a, b) of phase ``name`` = a + b log2 P from the profiled run and its ``phase_points`` (per core for
    ``PER_CORE_PHASES``)."""
    pts = list(profile.phase_points.get(name, []))
    if name in profile.phases:
        pts.append((profile.ranks, profile.phases[name]))
    if name in PER_CORE_PHASES:
        pts = [(p, t / oversubscription(p, profile.cores)) for p, t in pts]
    return fit_log(pts)


def contention_law(profile: RunProfile) -> tuple[float, float]:
    """(a, b) of r(P) = a + b log2 P, a task's seconds per iteration on P busy ranks over the profiled run's."""
    return fit_log([(profile.ranks, 1.0), *profile.contention_points])


def _phase_model(profile: RunProfile, P: int, cores: int | None) -> dict[str, float]:
    out = {}
    for name in PHASES:
        if name == "training":
            continue
        if name not in LOG_PHASES:
            out[name] = profile.phases.get(name, 0.0)
            continue
        a, b = phase_law(profile, name)
        out[name] = (a + b * math.log2(P)) * (oversubscription(P, cores) if name in PER_CORE_PHASES else 1.0)
    out["parent"] = parent_time(out["parent"], P, profile.parent_efficiency)
    return out


def parent_time(one_rank: float, P: int, efficiency: float | None) -> float:
    """The parent phase on P ranks: its one-rank time, or that over P e when trained data-parallel at efficiency e."""
    return one_rank / (P * efficiency) if efficiency is not None and P > 1 else one_rank


def contention(profile: RunProfile, P: int) -> float:
    """How much longer a task takes on P busy ranks than in the profiled run (1 without calibration):
    r(P) / r(profile.ranks) of ``contention_law`` (b clipped at 0, as for the phases)."""
    if not profile.contention_points:
        return 1.0
    a, b = contention_law(profile)
    return (a + b * math.log2(P)) / (a + b * math.log2(profile.ranks))


def task_time_factor(profile: RunProfile, P: int, cores: int | None) -> float:
    """A profiled task's duration on P ranks over its measured duration: oversubscription and contention."""
    return (oversubscription(P, cores) / oversubscription(profile.ranks, profile.cores)) * contention(profile, P)


def _schedule(profile: RunProfile, P: int, scheduler: str, cores: int | None):
    """The training phase on P ranks: (schedule, workers, subgroup sizes)."""
    n = len(profile.task_durations)
    factor = task_time_factor(profile, P, cores)
    durations = [d * factor for d in profile.task_durations]
    if not profile.independent:
        plan = [list(range(n))] + [[] for _ in range(P - 1)]  # one after another
        sched = simulate(plan, durations, P, profile.overhead_per_task)
        sched.extra["critical_path"] = sum(durations)
        return sched, P, [1] * P
    groups = profile.task_groups
    graph = profile.task_deps and any(profile.task_deps)
    units = (len(set(groups)) if (scheduler == "static" and groups is not None)
             else graph_width(profile.task_deps) if graph else n)  # the coordinator's units (_Layout)
    e = profile.data_parallel_efficiency
    if e is not None and P > units and units > 0:
        colors = groups_for(P, units)
        sizes = [colors.count(c) for c in range(max(colors) + 1)]
        speeds = [1.0 + e * (s - 1) for s in sizes]
    else:
        sizes, speeds = [1] * P, None
    workers = len(sizes)
    if graph:
        sched = simulate_graph(scheduler, durations, profile.task_deps, workers, profile.overhead_per_task,
                               costs=profile.task_costs, groups=groups, speeds=speeds)
    else:
        sched = simulate(scheduler, durations, workers, profile.overhead_per_task,
                         costs=profile.task_costs, groups=groups, speeds=speeds)
        sched.extra["critical_path"] = max(durations, default=0.0) / max(speeds or [1.0])
    return sched, workers, sizes


def graph_width(deps: Sequence[Sequence[int]]) -> int:
    """Tasks that can run at once (lthmpi.parallel.graph.Graph.width): IMP's chains, each with its level's controls."""
    from ..parallel.graph import Graph, Task

    return Graph([Task(str(i), "sim", tuple(str(d) for d in ds)) for i, ds in enumerate(deps)]).width()


def predict(profile: RunProfile, P: int, scheduler: str, cores: int | None = None) -> dict:
    """Modelled wall time of the profiled study on P ranks (``cores`` at the target; None: own cores).

    Returns wall, speedup (vs the model at P = 1), efficiency, makespan, imbalance of the training
    phase, workers (subgroups or ranks that train), idle (workers without a task), the phase times, and
    bound: the wall time with the training phase at its critical path (the longest chain of tasks).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (choose one of {', '.join(SCHEDULERS)})")
    if int(P) != P or P < 1:
        raise ValueError(f"P must be a positive integer, got {P!r}")

    def wall_at(p):
        phases = _phase_model(profile, p, cores)
        sched, workers, sizes = _schedule(profile, p, scheduler, cores)
        phases["training"] = sched.makespan
        return sum(phases.values()), phases, sched, workers

    wall, phases, sched, workers = wall_at(P)
    wall1 = wall_at(1)[0]
    speedup = wall1 / wall if wall > 0 else float("nan")
    cp = sched.extra["critical_path"]
    return dict(P=P, scheduler=scheduler, wall=wall, speedup=speedup, efficiency=speedup / P,
                makespan=sched.makespan, imbalance=imbalance(sched.busy), workers=workers,
                idle=sum(1 for lst in sched.per_rank if not lst), phases=phases, critical_path=cp,
                bound=wall - sched.makespan + cp)


def parent_efficiency_for(profile: RunProfile, P: int, scheduler: str, target: float,
                          cores: int | None = None) -> float | None:
    """The lowest parent efficiency e at which the model's E(P) reaches ``target``; None where no e <= 1 does.

    Why: the seed study's E(20) with a data-parallel parent rests on an assumed e; this says how low e may
    fall before the conclusion changes. E(P) >= target <=> wall(P) <= T(1) / (P target), and wall(P) =
    rest(P) + parent(P) / (P e), so e >= parent(P) / (P (T(1) / (P target) - rest(P))).
    """
    if P < 2:
        return None
    one = replace(profile, parent_efficiency=None)
    row = predict(one, P, scheduler, cores)
    wall1 = row["wall"] * row["speedup"]
    room = wall1 / (P * target) - (row["wall"] - row["phases"]["parent"])
    if room <= 0:
        return None
    e = row["phases"]["parent"] / (P * room)
    return e if e <= 1 else None


def predict_many(profile: RunProfile, ranks: Sequence[int],
                 schedulers: Sequence[str] = SCHEDULERS, cores: int | None = None) -> list[dict]:
    """``predict`` for every (P, scheduler), P-major: rows for a table or a scaling plot."""
    return [predict(profile, p, s, cores) for p in ranks for s in schedulers]


def amdahl_fit(ps: Sequence[int], times: Sequence[float]) -> tuple[float, float]:
    """(serial fraction f, T1) of T(P) = T1 (f + (1 - f) / P), by linear least squares in 1/P.

    T(P) = a + b / P with a = T1 f and b = T1 (1 - f), so the fit is exact and unique with >= 2 distinct
    P. f is not clipped: f < 0 or > 1 says the data do not follow Amdahl (superlinear, or slowdown).
    """
    ps = np.asarray(ps, dtype=float)
    ts = np.asarray(times, dtype=float)
    if len(ps) != len(ts) or len(set(ps.tolist())) < 2:
        raise ValueError("amdahl_fit needs times at two or more distinct P")
    A = np.stack([np.ones_like(ps), 1.0 / ps], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, ts, rcond=None)
    t1 = a + b
    return float(a / t1), float(t1)


def karp_flatt(speedup: float, p: int) -> float:
    """Experimentally determined serial fraction e = (1/S - 1/p) / (1 - 1/p); undefined (nan) at p = 1.

    Constant e over p points to a serial part; e growing with p points to overheads that grow with p.
    """
    if p <= 1:
        return float("nan")
    return (1.0 / speedup - 1.0 / p) / (1.0 - 1.0 / p)


def gustafson(serial_fraction: float, p: int) -> float:
    """Scaled speedup p - f (p - 1): the work grows with p (more masks/resets), the serial part does not."""
    return p - serial_fraction * (p - 1)


def synthetic_profile(M: int, N: int, epochs: float, epoch_seconds: float,
                      reset_epochs: Sequence[float] | None = None, parent_seconds: float | None = None,
                      startup_seconds: float = 0.0, controls: int = 0, full_length: bool = False,
                      masks_seconds: float = 0.0, distribution_seconds: float = 0.0,
                      gather_seconds: float = 0.0, iterations_per_epoch: int = 1, chains: bool = False) -> RunProfile:
    """A study that was not run: M masks x N reset points (x (1 + controls)), each training T - k epochs.

    For what-if questions such as the seed study (M = 20 masks, reset epochs 5..40 of 150). Default reset
    points: N evenly spaced over 0 .. epochs / 4. ``full_length`` trains T epochs from every reset (the
    option of the design). The parent defaults to T epochs. Costs are in iterations. ``chains``: the M
    masks are M IMP levels (docs/imp.md), one chain per reset point: level m's ticket and controls wait for
    level m - 1's ticket of the same chain; the static scheduler's unit is a chain's tickets, each control alone.
    """
    if reset_epochs is None:
        reset_epochs = [0.0] if N == 1 else list(np.linspace(0.0, epochs / 4.0, N))
    reset_epochs = [float(k) for k in reset_epochs]
    if len(reset_epochs) != N:
        raise ValueError(f"N = {N} but {len(reset_epochs)} reset epochs")
    if any(k < 0 or k >= epochs for k in reset_epochs):
        raise ValueError("reset epochs must lie in [0, epochs)")
    durations, costs, groups, deps = [], [], [], []
    ticket: dict[tuple[int, int], int] = {}  # (level, chain) -> index of its ticket task
    for m in range(M):
        for j, k in enumerate(reset_epochs):
            ep = epochs if full_length else epochs - k
            ticket[m, j] = len(durations)
            for c in range(1 + controls):
                durations.append(ep * epoch_seconds)
                costs.append(ep * iterations_per_epoch)
                groups.append(((j, m, c) if c else j) if chains else m)
                deps.append((ticket[m - 1, j],) if chains and m else ())
    phases = dict(startup=startup_seconds,
                  parent=epochs * epoch_seconds if parent_seconds is None else parent_seconds,
                  masks=masks_seconds, distribution=distribution_seconds, gather=gather_seconds)
    return RunProfile(durations, costs, phases, ranks=1, cores=None, task_groups=groups,
                      task_deps=deps if chains else None)


def extrapolate_durations(profile: RunProfile, task_costs: Sequence[float],
                          task_groups: Sequence | None = None) -> RunProfile:
    """The profile of another task list (e.g. more masks or resets), durations from the measured ones.

    Fits duration = a + b cost over the measured tasks (a: per-task fixed part, the evaluations and the
    write; b: seconds per iteration); with a single distinct cost, duration proportional to cost.
    Phases, ranks and cores are kept.
    """
    c = np.asarray(profile.task_costs, dtype=float)
    d = np.asarray(profile.task_durations, dtype=float)
    if len(c) == 0:
        raise ValueError("the profile has no tasks to extrapolate from")
    if len(set(c.tolist())) >= 2:
        b, a = np.polyfit(c, d, 1)
        if a < 0:  # no negative fixed cost: fall back to proportional
            a, b = 0.0, d.sum() / c.sum()
    else:
        a, b = 0.0, d.sum() / c.sum()
    new = [float(a + b * x) for x in task_costs]
    return RunProfile(new, [float(x) for x in task_costs], dict(profile.phases), profile.ranks,
                      profile.cores, None if task_groups is None else list(task_groups), profile.independent,
                      {k: list(v) for k, v in profile.phase_points.items()}, profile.overhead_per_task,
                      profile.data_parallel_efficiency, list(profile.contention_points),
                      parent_efficiency=profile.parent_efficiency)
