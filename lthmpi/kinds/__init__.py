"""Experiment kinds: each contributes tasks to the run's graph and runs its own tasks.

The coordinator (lthmpi/parallel/coordinator.py) knows no kind: after the parent and the masks exist it asks every
enabled kind for its tasks, runs the union as one lthmpi.parallel.graph.Graph, and hands each task back to the kind
named in `task.kind`. A kind is an object with

    name: str                                    the value of `task.kind` for its tasks
    enabled(cfg) -> bool                         whether this experiment has tasks of this kind
    tasks(exp) -> list[parallel.graph.Task]      its tasks, given the experiment (exp.cfg, exp.checkpoints,
                                                 exp.masks or exp.mask(i, chain), exp.reset_iterations;
                                                 retraining.cost estimates one); called on every rank after
                                                 the masks phase, so it must be deterministic, and ids must
                                                 not change between runs (they name the result files a
                                                 rerun skips)
    run(exp, task, progress, write) -> dict      do the work (retraining.retrain trains one subnetwork);
                                                 when `write`, write the result file
                                                 RUN_DIR/tasks/<task.id>.h5 whole (exp.run.write_task,
                                                 atomic) before returning; return the result's attributes
                                                 (lthmpi.results.TaskResult columns plus any of the kind's
                                                 own; a task that trains records `threads` and `kernels`,
                                                 one that does not leaves `threads` 0, so a rerun's
                                                 mixed-kernels check skips it). `progress(n)` is called
                                                 after each training block (fault hooks, the progress
                                                 bar, rank 0 serving requests); `write` is False on the
                                                 non-leading ranks of a data-parallel subgroup, which
                                                 train in lockstep and write nothing.
    early(exp) -> list[Task]                     optional: those of its tasks that read only a parent
                                                 checkpoint (Task.checkpoint set, no deps), the same values
                                                 tasks() gives; called before the masks exist, on ranks
                                                 idle while the parent trains (phases.make_parent)

A task's dependencies are finished, and their files complete, before it starts; it reads their outputs from
the run directory (exp.run.read_task(dep_id), or files of its own kind under exp.run.path). A task is done
when its result file exists: that is how a rerun resumes mid-graph and how ranks (and independent
processes sharing the directory) see each other's progress. A kind's module imports no other kind and not
lthmpi.experiment: what it needs of the experiment comes through `exp`.

To add a kind: write lthmpi/kinds/<name>.py defining KIND = <your kind object>, and add "<name>" to
MODULES below. Tests may register kinds of their own with register().
"""
from __future__ import annotations

import importlib

from ..parallel.graph import Graph, GraphError

MODULES = ("oneshot", "imp", "stability")

_REGISTRY: dict = {}


def register(kind) -> None:
    """Add a kind (tests, plugins): later calls with the same name replace the earlier kind."""
    _REGISTRY[kind.name] = kind


def registry() -> dict:
    for m in MODULES:
        kind = importlib.import_module(f"{__name__}.{m}").KIND
        _REGISTRY.setdefault(kind.name, kind)
    return _REGISTRY


def enabled(cfg) -> list:
    return [k for k in registry().values() if k.enabled(cfg)]


def build_graph(exp) -> Graph:
    """The run's task graph: every enabled kind's tasks, in registry order."""
    tasks = []
    for kind in enabled(exp.cfg):
        for t in kind.tasks(exp):
            if t.kind != kind.name:
                raise GraphError(f"kind {kind.name!r} made task {t.id!r} of kind {t.kind!r}")
            tasks.append(t)
    return Graph(tasks)


def early_graph(exp) -> Graph:
    """The tasks that need only a parent checkpoint (Task.checkpoint), from the kinds that have such tasks (an
    optional `early(exp)`, called before the masks exist): idle ranks train them while the parent trains."""
    tasks = []
    for kind in enabled(exp.cfg):
        for t in getattr(kind, "early", lambda exp: [])(exp):
            if t.kind != kind.name or t.checkpoint is None or t.deps:
                raise GraphError(f"kind {kind.name!r} made early task {t.id!r} that is not of its kind, or needs "
                                 f"more than a parent checkpoint")
            tasks.append(t)
    return Graph(tasks)


def run_task(exp, task, progress=None, write: bool = True) -> dict:
    return registry()[task.kind].run(exp, task, progress, write)
