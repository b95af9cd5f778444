"""The one-shot grid: every mask x reset point x (ticket, controls), independent retrainings (no edges).

Task ids (m000_r00_ticket, ...), seeds and files are those of lthmpi.experiment.Task, so run directories made
before the task graph resume unchanged. The static scheduler's unit (`group`) is the mask.
"""
from __future__ import annotations

from ..graph import Task


class OneShot:
    name = "oneshot"

    def enabled(self, cfg) -> bool:
        # prune.method = "imp" runs chains instead (kinds/imp.py); stability.only: the stability pairs alone
        return not cfg.imp and not (cfg.stability.enabled and cfg.stability.only)

    def tasks(self, exp) -> list[Task]:
        return [Task(t.id, self.name, cost=exp.cost(t), group=t.mask, spec=t) for t in exp.tasks()]

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        return exp.run_task(task.spec, progress=progress, write=write)


KIND = OneShot()
