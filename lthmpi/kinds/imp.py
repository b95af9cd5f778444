"""IMP chains as an experiment kind: one graph task per level, reset point and control (lthmpi/imp.py says
what a level does). Level l's ticket depends on level l - 1's ticket of its chain, whose final weights give
m_l; level l's controls need m_l too, so they depend on that same task and are leaves; level 1 depends on
nothing (the masks phase wrote m_1). The L levels of a chain are the run's critical path, so the scheduler
starts them first and the controls fill idle ranks. The static scheduler's unit is a chain's tickets;
each control is a unit of its own."""
from __future__ import annotations

from .. import imp
from ..graph import Task


class Imp:
    name = "imp"

    def enabled(self, cfg) -> bool:
        return cfg.imp and not (cfg.stability.enabled and cfg.stability.only)  # only: the stability pairs alone

    def tasks(self, exp) -> list[Task]:
        out = []
        for t in exp.tasks():
            dep = imp.depends_on(t)
            group = f"chain{t.reset}" if t.control is None else None  # a control is a unit of its own
            out.append(Task(t.id, self.name, deps=(dep.id,) if dep else (), cost=exp.cost(t), group=group, spec=t))
        return out

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        return exp.run_task(task.spec, progress=progress, write=write)


KIND = Imp()
