"""Iterative magnitude pruning (IMP) with late rewinding: the chains of levels, their tasks and their masks.

For each reset point k a chain of levels l = 1 … L. Level l trains θ_k ⊙ m_l; m_1 prunes `prune.imp_rate` of
the parent's final weights, and m_{l+1} prunes `imp_rate` of m_l's survivors by the magnitude of the weights
level l ended with (pruning.imp_step). So a level depends on the level before it in its chain, and the
controls of level l (random re-init, random mask: both need m_l) on the task that produced m_l: they are leaves.

A level's task writes m_{l+1} to the run directory *before* its own result file, so a finished level always
has its successor's mask on disk, and a rerun after a kill resumes the chain without retraining it. Level l of
every chain is Task(mask=l - 1, reset=r, control, level=l): the mask index is the level's, so the analysis
reads an IMP run as the grid of levels × reset points (the fraction left per level is the same in every chain).
Knows nothing of MPI.
"""
from __future__ import annotations

import logging
import os

from .pruning import fraction_remaining, imp_counts, imp_step

log = logging.getLogger("lthmpi")


def tasks(cfg, n_resets: int, task_type) -> list:
    """Every level of every chain with its controls, level by level: a list in which no task comes before
    the task it depends on (a single process can run it in order)."""
    controls = [None, *cfg.reset.controls]
    return [task_type(lv - 1, r, c, level=lv) for lv in range(1, cfg.prune.levels + 1) for r in range(n_resets)
            for c in controls]


def depends_on(task):
    """The task whose final weights gave this task's mask (the level before, in its chain); None for level 1,
    whose mask comes from the parent."""
    if task.level <= 1:
        return None
    return type(task)(task.level - 2, task.reset, None, level=task.level - 1)


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


def mask_of(run, task) -> dict:
    """m_l of the task's chain, as its predecessor (or the masks phase) wrote it."""
    path = run.chain_mask_path(task.reset, task.level)
    if not os.path.exists(path):
        from .store import StoreError

        raise StoreError(f"IMP mask {path} (level {task.level} of chain {task.reset}) is missing although the task "
                         f"that makes it is scheduled before this one; delete the chain's task files from level "
                         f"{task.level - 1} on to retrain them")
    return run.read_chain_mask(task.reset, task.level)[0]


def write_next_mask(run, cfg, task, mask: dict, final_weights: dict) -> None:
    """After a ticket's training: m_{l+1} from its final weights (nothing after the last level)."""
    if task.control is not None or task.level >= cfg.prune.levels:
        return
    p = cfg.prune
    prunable = {k: final_weights[k] for k in mask}
    nxt = imp_step(prunable, mask, p.imp_rate, p.scope, p.layer_rates)
    run.write_chain_mask(task.reset, task.level + 1, nxt, _attrs(cfg, task.reset, task.level + 1, nxt))
    log.debug("IMP chain %d: level %d mask keeps %.4f", task.reset, task.level + 1, fraction_remaining(nxt))
