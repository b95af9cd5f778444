"""Iterative magnitude pruning (IMP) with late rewinding: the chains of levels, their masks and their tasks.

For each reset point k a chain of levels l = 1 … L. Level l trains θ_k ⊙ m_l; m_1 prunes `prune.imp_rate` of
the parent's final weights, and m_{l+1} prunes `imp_rate` of m_l's survivors by the magnitude of the weights
level l ended with (pruning.imp_step). So a level's ticket depends on the ticket before it in its chain, and
the controls of level l (random re-init, random mask: both need m_l) on the task that produced m_l: they are
leaves. The L levels of a chain are the run's critical path, so the scheduler starts them first and the
controls fill idle ranks. The static scheduler's unit is a chain's tickets; each control is a unit of its own.

A level's task writes m_{l+1} to the run directory *before* its own result file, so a finished level always
has its successor's mask on disk, and a rerun after a kill resumes the chain without retraining it. Level l of
every chain is Retraining(mask=l - 1, reset=r, control, level=l): the mask index is the level's, so the
analysis reads an IMP run as the grid of levels × reset points (the fraction left per level is the same in
every chain).
"""
from __future__ import annotations

import logging
import os

from ..fileio import StoreError
from ..parallel.graph import Task
from ..pruning import fraction_remaining, imp_counts, imp_step
from .retraining import Retraining, cost, run_grid_task, start_weights

log = logging.getLogger("lthmpi")


def depends_on(spec: Retraining) -> Retraining | None:
    """The ticket whose final weights gave this task's mask (the level before, in its chain); None for level 1,
    whose mask comes from the parent."""
    if spec.level <= 1:
        return None
    return Retraining(spec.level - 2, spec.reset, None, level=spec.level - 1)


def ticket(level: int, reset: int) -> Retraining:
    """Level `level`'s ticket of chain `reset` (whose mask a stability pair of that level starts from)."""
    return Retraining(level - 1, reset, None, level=level)


def planned_fractions(cfg, sizes: dict) -> list[float]:
    """Fraction of prunable weights left after each level, exact from the layer sizes alone."""
    p = cfg.prune
    total = sum(sizes.values())
    return [sum(c.values()) / total for c in imp_counts(sizes, p.levels, p.imp_rate, p.scope, p.layer_rates)]


def _attrs(cfg, reset: int, level: int, mask: dict) -> dict:
    return dict(level=level, reset=cfg.reset.points[reset], remaining=fraction_remaining(mask),
                target_remaining=cfg.remaining_fractions()[level - 1], imp_rate=cfg.prune.imp_rate)


def write_first_masks(run, cfg, final_weights: dict, n_resets: int) -> None:
    """m_1 (from the parent's final weights), the same for every chain, kept once per chain."""
    todo = [r for r in range(n_resets) if not os.path.exists(run.chain_mask_path(r, 1))]
    if not todo:
        return
    p = cfg.prune
    m1 = imp_step(final_weights, None, p.imp_rate, p.scope, p.layer_rates)
    for r in todo:
        run.write_chain_mask(r, 1, m1, _attrs(cfg, r, 1, m1))


def mask_of(run, spec: Retraining) -> dict:
    """m_l of the task's chain, as its predecessor (or the masks phase) wrote it."""
    path = run.chain_mask_path(spec.reset, spec.level)
    if not os.path.exists(path):
        raise StoreError(f"IMP mask {path} (level {spec.level} of chain {spec.reset}) is missing although the task "
                         f"that makes it is scheduled before this one; delete the chain's task files from level "
                         f"{spec.level - 1} on to retrain them")
    return run.read_chain_mask(spec.reset, spec.level)[0]


def write_next_mask(run, cfg, spec: Retraining, mask: dict, final_weights: dict) -> None:
    """After a ticket's training: m_{l+1} from its final weights (nothing after the last level)."""
    if spec.control is not None or spec.level >= cfg.prune.levels:
        return
    p = cfg.prune
    prunable = {k: final_weights[k] for k in mask}
    nxt = imp_step(prunable, mask, p.imp_rate, p.scope, p.layer_rates)
    run.write_chain_mask(spec.reset, spec.level + 1, nxt, _attrs(cfg, spec.reset, spec.level + 1, nxt))
    log.debug("IMP chain %d: level %d mask keeps %.4f", spec.reset, spec.level + 1, fraction_remaining(nxt))


class Imp:
    name = "imp"

    def enabled(self, cfg) -> bool:
        return cfg.imp and not (cfg.stability.enabled and cfg.stability.only)  # only: the stability pairs alone

    def specs(self, exp) -> list[Retraining]:
        """Every level of every chain with its controls, level by level: no task comes before the task it
        depends on (a single process can run them in order)."""
        controls = [None, *exp.cfg.reset.controls]
        return [Retraining(lv - 1, r, c, level=lv) for lv in range(1, exp.cfg.prune.levels + 1)
                for r in range(len(exp.reset_iterations)) for c in controls]

    def tasks(self, exp) -> list[Task]:
        out = []
        for s in self.specs(exp):
            dep = depends_on(s)
            group = f"chain{s.reset}" if s.control is None else None  # a control is a unit of its own
            c = cost(exp, exp.reset_iterations[s.reset], exp.remaining[s.mask] if exp.remaining else 1.0)
            out.append(Task(s.id, self.name, deps=(dep.id,) if dep else (), cost=c, group=group, spec=s))
        return out

    def start(self, exp, spec: Retraining) -> tuple[dict, dict]:
        """θ_k ⊙ m_l of the spec's chain and level, or its control."""
        k = exp.reset_iterations[spec.reset]
        return start_weights(exp, k, mask_of(exp.run, spec), spec.control, spec.seed(exp.cfg.seed))

    def run_spec(self, exp, spec: Retraining, progress=None, write: bool = True) -> dict:
        def next_mask(final_weights):  # the next level's mask is on disk before this level counts as done
            write_next_mask(exp.run, exp.cfg, spec, mask_of(exp.run, spec), final_weights)

        return run_grid_task(exp, spec, lambda: mask_of(exp.run, spec), self.name, progress, write,
                             before_write=next_mask, level=spec.level)

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        return self.run_spec(exp, task.spec, progress, write)


KIND = Imp()
