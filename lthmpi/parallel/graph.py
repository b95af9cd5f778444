"""Tasks and their dependencies: the ready set and the critical path. Pure: no MPI, no TensorFlow, no disk.

Every experiment kind (lthmpi/kinds/) hands the coordinator a list of `Task` values; the coordinator runs
them as one `Graph`. A flat grid (the one-shot experiment) is the graph without edges.

A Task is a value: it can be written to disk and sent between ranks (it is pickled by mpi4py), and a rank
is only who runs it. Its fields:
  id     unique, also the file name of its result (RUN_DIR/tasks/<id>.h5); stable across runs, so a rerun
         recognises what is complete on disk
  kind   the name of the kind that made it and that runs it (lthmpi.kinds.registry)
  deps   ids of the tasks whose results it reads (they finish before it starts)
  cost   estimated relative cost (e.g. iterations x cost of a step); only ratios matter
  group  the `static` scheduler's unit: tasks of one group go to one rank (default: the task alone)
  spec   the kind's own picklable description of the work (the one-shot grid and IMP: kinds/retraining.Retraining)
  checkpoint  the parent's checkpoint (an iteration) that is all the task reads, when it needs nothing else
         of the parent (neither its end nor the masks) and has no deps: it is ready as soon as that checkpoint
         is on disk, while the parent still trains (the dense stability pairs at k); None = after the masks

Priority (who runs first among ready tasks): the longest remaining path through the graph (the task's cost
plus the costliest chain of tasks that depend on it, the critical path), then its own cost, then its place
in the list the kinds made. On a graph without edges that is "longest first", today's LPT/dynamic order.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterable


class GraphError(ValueError):
    """A malformed task graph (duplicate id, unknown dependency, cycle): a bug in a kind, said in one line."""


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    deps: tuple = ()
    cost: float = 1.0
    group: Any = None
    spec: Any = None
    checkpoint: int | None = None

    @property
    def unit(self):
        """The static scheduler's unit: the group, else the task itself."""
        return self.id if self.group is None else self.group


class Graph:
    """An acyclic graph of tasks, checked on construction; tasks keep the order they were given in."""

    def __init__(self, tasks: Iterable[Task]):
        self.tasks = list(tasks)
        self.by_id: dict[str, Task] = {}
        for t in self.tasks:
            if t.id in self.by_id:
                raise GraphError(f"two tasks have the id {t.id!r}: task ids must be unique")
            self.by_id[t.id] = t
        self.index = {t.id: i for i, t in enumerate(self.tasks)}
        self.children: dict[str, list[str]] = {t.id: [] for t in self.tasks}
        for t in self.tasks:
            for d in dict.fromkeys(t.deps):
                if d not in self.by_id:
                    raise GraphError(f"task {t.id!r} depends on {d!r}, which is not a task of this run")
                self.children[d].append(t.id)
        self.topological = self._topological()
        self.position = {t.id: i for i, t in enumerate(self.topological)}  # a task comes after its dependencies
        self.path: dict[str, float] = {}
        for t in reversed(self.topological):
            self.path[t.id] = float(t.cost) + max((self.path[c] for c in self.children[t.id]), default=0.0)

    def _topological(self) -> list[Task]:
        """Kahn's algorithm, taking the earliest-listed ready task first; a cycle is named."""
        missing = {t.id: len(set(t.deps)) for t in self.tasks}
        heap = [self.index[i] for i, n in missing.items() if n == 0]
        heapq.heapify(heap)
        out = []
        while heap:
            t = self.tasks[heapq.heappop(heap)]
            out.append(t)
            for c in self.children[t.id]:
                missing[c] -= 1
                if missing[c] == 0:
                    heapq.heappush(heap, self.index[c])
        if len(out) != len(self.tasks):
            raise GraphError(f"the task graph has a cycle through {self._cycle(missing)}")
        return out

    def _cycle(self, missing: dict) -> str:
        left = {i for i, n in missing.items() if n > 0}
        start = min(left, key=self.index.get)
        seen, at = [], start
        while at not in seen:
            seen.append(at)
            at = next(d for d in self.by_id[at].deps if d in left)
        loop = seen[seen.index(at):] + [at]
        return " -> ".join(reversed(loop))

    def __len__(self) -> int:
        return len(self.tasks)

    def priority(self, t: Task) -> tuple:
        """Sort key, smallest first: critical path, then cost, then list order."""
        return (-self.path[t.id], -float(t.cost), self.index[t.id])

    def ready(self, done: set, running: Iterable[str] = ()) -> list[Task]:
        """Tasks not done nor running whose dependencies are all done, highest priority first."""
        busy = set(running)
        out = [t for t in self.tasks if t.id not in done and t.id not in busy and all(d in done for d in t.deps)]
        return sorted(out, key=self.priority)

    def early(self) -> list[Task]:
        """The tasks that need only a parent checkpoint (Task.checkpoint), in the order they become ready: by
        checkpoint, then priority. What idle ranks may train while the parent trains."""
        out = [t for t in self.tasks if t.checkpoint is not None and not t.deps]
        return sorted(out, key=lambda t: (t.checkpoint, self.priority(t)))

    def critical_path(self) -> float:
        """The cost of the costliest chain: no schedule on any number of ranks finishes sooner."""
        return max(self.path.values(), default=0.0)

    def width(self, done: set = frozenset()) -> int:
        """How many tasks not done could run at once, counted by depth (tasks at the same distance from the
        done ones): the units of work that ranks can share. A graph without edges: every task not done."""
        depth: dict[str, int] = {}
        for t in self.topological:
            if t.id not in done:
                depth[t.id] = 1 + max((depth[d] for d in t.deps if d in depth), default=0)
        counts: dict[int, int] = {}
        for d in depth.values():
            counts[d] = counts.get(d, 0) + 1
        return max(counts.values(), default=0)
