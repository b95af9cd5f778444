"""The one-shot grid: every mask x reset point x (ticket, controls), independent retrainings (no edges).

Task ids (m000_r00_ticket, ...), seeds and files are those of run directories made before the task graph, so
they resume unchanged. The static scheduler's unit (`group`) is the mask.
"""
from __future__ import annotations

from ..parallel.graph import Task
from .retraining import Retraining, cost, run_grid_task, start_weights


class OneShot:
    name = "oneshot"

    def enabled(self, cfg) -> bool:
        # prune.method = "imp" runs chains instead (kinds/imp.py); stability.only: the stability pairs alone
        return not cfg.imp and not (cfg.stability.enabled and cfg.stability.only)

    def specs(self, exp) -> list[Retraining]:
        controls = [None, *exp.cfg.reset.controls]
        return [Retraining(m, r, c) for m in range(len(exp.cfg.remaining_fractions()))
                for r in range(len(exp.reset_iterations)) for c in controls]

    def tasks(self, exp) -> list[Task]:
        return [Task(s.id, self.name, group=s.mask, spec=s,
                     cost=cost(exp, exp.reset_iterations[s.reset], exp.remaining[s.mask] if exp.remaining else 1.0))
                for s in self.specs(exp)]

    def start(self, exp, spec: Retraining) -> tuple[dict, dict]:
        """θ_k ⊙ m (the late reset), or its control."""
        k = exp.reset_iterations[spec.reset]
        return start_weights(exp, k, exp.masks[spec.mask], spec.control, spec.seed(exp.cfg.seed))

    def run_spec(self, exp, spec: Retraining, progress=None, write: bool = True) -> dict:
        transfer = getattr(exp, "transfer", None)  # a transferred ticket's provenance goes into every result row
        return run_grid_task(exp, spec, lambda: exp.masks[spec.mask], self.name, progress, write,
                             **(transfer.provenance if transfer is not None else {}))

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        return self.run_spec(exp, task.spec, progress, write)


KIND = OneShot()
