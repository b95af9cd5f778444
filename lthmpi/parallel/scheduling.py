"""Task assignment as pure functions: static, LPT and dynamic schedules, their replay, and subgroups.

Nothing here knows MPI or TensorFlow: a task is any value, a rank is an index. ``coordinator.py`` uses the
assignments to split the real work; ``analysis/scaling_model.py`` uses ``simulate`` to replay measured task
durations on another number of ranks. Keeping both on the same functions means the model predicts the
schedule that the engine actually runs.

Why three schedulers: retrainings from late reset point k train T - k epochs, so tasks differ in cost.
* ``static`` is the design card's scatter: whole masks (each with all its reset points and controls)
  dealt round-robin. Simple, and a mask's tasks stay on one rank, but unbalanced once p does not divide
  the number of masks.
* ``lpt`` (longest processing time first) cuts finer, to single tasks, and places them by estimated
  cost; its makespan is within 4/3 of the optimum (Graham 1969) and needs no traffic while training.
* ``dynamic`` hands tasks out at run time, longest first, to whichever rank is free: it absorbs costs
  that the estimate got wrong, at the price of one request/reply per task.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Callable, Sequence

SCHEDULERS = ("static", "lpt", "dynamic")


@dataclass
class Schedule:
    """A replayed schedule: per rank the (task index, start, end) it ran, its busy time, and the makespan."""
    per_rank: list[list[tuple[int, float, float]]]
    busy: list[float]
    makespan: float
    extra: dict = field(default_factory=dict)

    @property
    def imbalance(self) -> float:
        return imbalance(self.busy)


def _check_ranks(n_ranks: int) -> None:
    if int(n_ranks) != n_ranks or n_ranks < 1:
        raise ValueError(f"n_ranks must be a positive integer, got {n_ranks!r}")


def assign_static(tasks: list, n_ranks: int, group_key: Callable = lambda t: t.mask) -> list[list]:
    """Whole groups (masks) round-robin over ranks: the i-th mask in mask order goes to rank i % n_ranks.

    A mask travels with all its reset points and controls, as the design card scatters it. Masks are
    taken in sorted key order (first appearance if keys do not sort), so with the full task list mask i
    lands on rank i % n_ranks; on a resume, masks already complete do not leave holes. Tasks keep their
    input order within a rank. Ranks without a mask get an empty list.
    """
    _check_ranks(n_ranks)
    keys: list = []
    seen: set = set()
    for t in tasks:
        k = group_key(t)
        if k not in seen:
            seen.add(k)
            keys.append(k)
    try:
        keys = sorted(keys)
    except TypeError:
        pass
    rank_of = {k: i % n_ranks for i, k in enumerate(keys)}
    out: list[list] = [[] for _ in range(n_ranks)]
    for t in tasks:
        out[rank_of[group_key(t)]].append(t)
    return out


def list_schedule(graph, todo: list, n_ranks: int) -> list[list]:
    """LPT on a task graph (graph.py): each task, highest priority (critical path, then cost) among
    those whose dependencies are placed, onto the rank where it can start first (ties -> lowest rank), with
    the tasks' estimated costs. Tasks not in `todo` are complete. On a graph without edges this is exactly
    `assign_lpt` (longest first onto the least-loaded rank). Each rank's list is in order of planned start,
    so running every list in order, each task waiting for its dependencies, never deadlocks."""
    _check_ranks(n_ranks)
    left = {t.id for t in todo}
    end: dict[str, float] = {}
    free = [0.0] * n_ranks
    out: list[list] = [[] for _ in range(n_ranks)]
    waiting = sorted(todo, key=graph.priority)
    while waiting:
        t = next(t for t in waiting if all(d not in left or d in end for d in t.deps))
        waiting.remove(t)
        after = max((end[d] for d in t.deps if d in end), default=0.0)
        r = min(range(n_ranks), key=lambda i: (max(free[i], after), i))
        end[t.id] = free[r] = max(free[r], after) + float(t.cost)
        out[r].append(t)
    return out


def plan(graph, todo: list, scheduler: str, n_ranks: int) -> list[list] | None:
    """Per-rank task lists for `static` (whole groups round-robin, each rank's list in graph order) and `lpt`
    (list_schedule); None for `dynamic`, which hands tasks out while running."""
    if scheduler == "static":
        ordered = sorted(todo, key=lambda t: graph.position[t.id])
        return assign_static(ordered, n_ranks, group_key=lambda t: t.unit)
    if scheduler == "lpt":
        return list_schedule(graph, todo, n_ranks)
    if scheduler == "dynamic":
        return None
    raise ValueError(f"unknown scheduler {scheduler!r} (choose one of {', '.join(SCHEDULERS)})")


def step_cost(kernels: str, remaining: float) -> float:
    """Relative cost of one training step: 1 on dense kernels; on sparse kernels (lthmpi/sparse.py), which
    multiply only the kept weights, about 0.1 + 1.6 x the fraction kept (LeNet-300-100 on one core:
    0.13 at 2%, 0.23 at 5%, 0.43 at 20%, 0.6 at 30% of a dense step), so LPT does not mistake a task at
    2% for one at 30%."""
    if kernels != "sparse":
        return 1.0
    return min(1.0, 0.1 + 1.6 * max(0.0, float(remaining)))


def lpt_order(costs: Sequence[float]) -> list[int]:
    """Task indices by cost, longest first; ties by original index, so the order is deterministic."""
    return sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))


def assign_lpt(tasks: list, costs: list[float], n_ranks: int) -> list[list]:
    """Longest processing time first: each task, longest first, onto the least-loaded rank (ties -> lowest).

    Costs are estimates (iterations to train); only their ratios matter. Within a rank tasks run in the
    order they were placed, i.e. longest first.
    """
    _check_ranks(n_ranks)
    if len(costs) != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {len(costs)} costs")
    heap = [(0.0, r) for r in range(n_ranks)]  # (load, rank): pops least load, then lowest rank
    out: list[list] = [[] for _ in range(n_ranks)]
    for i in lpt_order(costs):
        load, r = heapq.heappop(heap)
        out[r].append(tasks[i])
        heapq.heappush(heap, (load + float(costs[i]), r))
    return out


def simulate(plan, durations: Sequence[float], n_ranks: int, overhead_per_task: float = 0.0,
             dynamic: bool = False, *, costs: Sequence[float] | None = None,
             groups: Sequence | None = None, speeds: Sequence[float] | None = None) -> Schedule:
    """Replay known task durations on ``n_ranks`` ranks and return the schedule it gives.

    ``plan`` is one of:
      * a list of ``n_ranks`` lists of task indices (a static or LPT assignment; ``dynamic=False``);
      * a flat list of task indices, the order in which a coordinator hands tasks out (``dynamic=True``):
        each goes to the rank that becomes free first (ties -> lowest rank);
      * a scheduler name from ``SCHEDULERS``: the assignment is made here, as ``coordinator.py`` would make
        it: ``static`` deals ``groups`` (group key per task, default: each task its own group),
        ``lpt`` and ``dynamic`` order by ``costs`` (default: the durations themselves), longest first.
    ``overhead_per_task`` is added before every task (dispatch latency of the dynamic scheduler, or
    per-task setup). ``speeds`` (optional, per rank) divides a task's duration on that rank, e.g. for
    subgroups that train data-parallel.
    """
    _check_ranks(n_ranks)
    n = len(durations)
    speeds = [1.0] * n_ranks if speeds is None else [float(s) for s in speeds]
    if len(speeds) != n_ranks or min(speeds) <= 0:
        raise ValueError("speeds must give one positive number per rank")
    if isinstance(plan, str):
        if plan not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {plan!r} (choose one of {', '.join(SCHEDULERS)})")
        c = list(durations) if costs is None else list(costs)
        if plan == "static":
            key = (lambda i: i) if groups is None else (lambda i: groups[i])
            plan = assign_static(list(range(n)), n_ranks, group_key=key)
        elif plan == "lpt":
            plan = assign_lpt(list(range(n)), c, n_ranks)
        else:
            plan, dynamic = lpt_order(c), True

    per_rank: list[list[tuple[int, float, float]]] = [[] for _ in range(n_ranks)]
    busy = [0.0] * n_ranks
    seen: list[int] = []
    if dynamic:
        heap = [(0.0, r) for r in range(n_ranks)]  # (free at, rank)
        for i in plan:
            free, r = heapq.heappop(heap)
            start = free + overhead_per_task
            end = start + float(durations[i]) / speeds[r]
            per_rank[r].append((i, start, end))
            busy[r] += end - free
            heapq.heappush(heap, (end, r))
            seen.append(i)
    else:
        if len(plan) != n_ranks:
            raise ValueError(f"plan has {len(plan)} rank lists for {n_ranks} ranks")
        for r, lst in enumerate(plan):
            t = 0.0
            for i in lst:
                start = t + overhead_per_task
                t = start + float(durations[i]) / speeds[r]
                per_rank[r].append((i, start, t))
                seen.append(i)
            busy[r] = t
    if sorted(seen) != list(range(n)):
        raise ValueError("the plan must run every task exactly once")
    makespan = max((lst[-1][2] for lst in per_rank if lst), default=0.0)
    return Schedule(per_rank, busy, makespan)


def simulate_graph(scheduler: str, durations: Sequence[float], deps: Sequence[Sequence[int]], n_ranks: int,
                   overhead_per_task: float = 0.0, *, costs: Sequence[float] | None = None,
                   groups: Sequence | None = None, speeds: Sequence[float] | None = None) -> Schedule:
    """``simulate`` for tasks with dependencies (``deps[i]``: indices of the tasks task i waits for), as the
    coordinator runs them: ``static``/``lpt`` plan per-rank lists (``plan``) that each rank runs in order,
    a task starting once its rank is free and its inputs are done; ``dynamic`` gives the earliest-free
    rank the highest-priority task ready at that moment. Priorities and plans use ``costs`` (default: the
    durations). ``extra["critical_path"]`` is the longest chain of durations (at the fastest speed): no
    number of ranks finishes sooner. On tasks without dependencies this gives ``simulate``'s schedules."""
    from .graph import Graph, Task

    _check_ranks(n_ranks)
    n = len(durations)
    c = list(durations) if costs is None else list(costs)
    speeds = [1.0] * n_ranks if speeds is None else [float(v) for v in speeds]
    graph = Graph([Task(str(i), "sim", tuple(str(d) for d in deps[i]), float(c[i]),
                        None if groups is None else groups[i]) for i in range(n)])
    end: dict[int, float] = {}
    per_rank: list[list[tuple[int, float, float]]] = [[] for _ in range(n_ranks)]
    busy = [0.0] * n_ranks

    def place(i: int, r: int, free: float) -> float:
        start = max(free, max((end[d] for d in deps[i]), default=0.0)) + overhead_per_task
        end[i] = start + float(durations[i]) / speeds[r]
        per_rank[r].append((i, start, end[i]))
        busy[r] += end[i] - start + overhead_per_task
        return end[i]

    if scheduler in ("static", "lpt"):
        lists = [[int(t.id) for t in lst] for lst in plan(graph, graph.tasks, scheduler, n_ranks)]
        free = [0.0] * n_ranks
        while any(lists):
            for r, lst in enumerate(lists):
                while lst and all(d in end for d in deps[lst[0]]):
                    free[r] = place(lst.pop(0), r, free[r])
    elif scheduler == "dynamic":
        # Events in time order; a task joins `waiting` (by the time its inputs are done) once all of them are
        # placed, and `ready` (by priority) once a rank's clock reaches that time: O(log n) a step, where
        # rescanning every task at each step made the seed study's 1000-rank IMP graphs take seconds each.
        dependents: list[list[int]] = [[] for _ in range(n)]
        left = [len(set(deps[i])) for i in range(n)]
        for i in range(n):
            for d in set(deps[i]):
                dependents[d].append(i)
        waiting = [(0.0, i) for i in range(n) if not left[i]]
        heapq.heapify(waiting)
        ready: list[tuple[tuple, int]] = []
        ends: list[float] = []  # every end so far, sorted: a rank with nothing ready waits for the next one
        heap = [(0.0, r) for r in range(n_ranks)]
        placed = 0
        while placed < n:
            t, r = heapq.heappop(heap)
            while waiting and waiting[0][0] <= t:
                i = heapq.heappop(waiting)[1]
                heapq.heappush(ready, (graph.priority(graph.tasks[i]), i))
            if ready:
                i = heapq.heappop(ready)[1]
                placed += 1
                e = place(i, r, t)
                bisect.insort(ends, e)
                for j in dependents[i]:
                    left[j] -= 1
                    if not left[j]:
                        heapq.heappush(waiting, (max(end[d] for d in deps[j]), j))
                heapq.heappush(heap, (e, r))
            else:  # nothing ready yet: this rank waits for the next running task to finish
                k = bisect.bisect_right(ends, t)
                if k == len(ends):
                    raise ValueError("the graph has tasks that can never be ready (a dependency cycle)")
                heapq.heappush(heap, (ends[k], r))
    else:
        raise ValueError(f"unknown scheduler {scheduler!r} (choose one of {', '.join(SCHEDULERS)})")
    makespan = max((lst[-1][2] for lst in per_rank if lst), default=0.0)
    fastest = max(speeds)
    path = Graph([Task(str(i), "sim", tuple(str(d) for d in deps[i]), float(durations[i]) / fastest)
                  for i in range(n)]).critical_path()
    return Schedule(per_rank, busy, makespan, extra={"critical_path": path})


def imbalance(busy: Sequence[float]) -> float:
    """max busy / mean busy: 1.0 is perfect balance, p means one rank did all the work."""
    if len(busy) == 0:
        raise ValueError("imbalance of no ranks")
    mean = sum(busy) / len(busy)
    return 1.0 if mean == 0 else max(busy) / mean


def groups_for(n_ranks: int, n_units: int) -> list[int]:
    """Subgroup colour (for ``comm.Split``) of each rank.

    With more ranks than units of work (masks for static, tasks otherwise) the surplus ranks would idle;
    instead ranks form ``n_units`` contiguous, near-equal subgroups (the first ``n_ranks % n_units`` one
    rank larger), each training one task data-parallel: 5 ranks, 2 units -> [0, 0, 0, 1, 1]. Contiguous
    colours keep a subgroup on as few hosts as possible when ranks are placed host by host. With no more
    ranks than units every rank is its own group: [0, 1, ..., n_ranks - 1].
    """
    _check_ranks(n_ranks)
    n_units = max(1, int(n_units))
    if n_ranks <= n_units:
        return list(range(n_ranks))
    base, extra = divmod(n_ranks, n_units)
    colors: list[int] = []
    for g in range(n_units):
        colors += [g] * (base + (1 if g < extra else 0))
    return colors


def use_subgroups(setting: bool | str, has_convolutions: bool) -> bool:
    """Whether ranks beyond the units of work form data-parallel subgroups; `auto` says yes for conv nets.

    A data-parallel step is one Python call and one Allreduce (4-8 ms here), while a Dense-only net's
    fused step takes ~1 ms: a subgroup of 2 trained a LeNet-300-100 task 4x slower than one rank alone,
    and Conv-2 (0.3 s steps) 1.14x faster (docs/performance.md, "Data-parallel subgroups")."""
    return has_convolutions if setting == "auto" else bool(setting)


def use_parent_data_parallel(setting: bool | str, has_convolutions: bool, size: int) -> bool:
    """Whether all ranks train the parent data-parallel: never on one rank; `auto` by the rule of
    `use_subgroups`, since the parent's step is a retraining's step (the Allreduce pays for a conv net's, not
    for a Dense-only net's millisecond one), and the ranks would otherwise wait for it (Amdahl's serial part)."""
    return size > 1 and use_subgroups(setting, has_convolutions)
