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
import math
import os
from dataclasses import asdict

from ..fileio import StoreError
from ..parallel.graph import Task
from ..pruning import fraction_remaining, imp_counts, imp_step
from ..results import TaskResult
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


def stopped_at(run, spec: Retraining) -> str:
    """The id of the diverged ticket that stopped the task's chain before it ("" when its chain goes on): the
    task it depends on diverged, or was itself stopped by a diverged level before it."""
    dep = depends_on(spec)
    if dep is None:
        return ""
    attrs = run.read_task(dep.id)[0]
    return str(attrs.get("upstream", "") or "") or (dep.id if attrs.get("diverged") else "")


def diverged_line(cfg, spec: Retraining) -> str:
    """The one line a diverged level logs: what diverged, and what happens to its chain."""
    head = (f"IMP level {spec.level} of chain {spec.reset} (reset {cfg.reset.points[spec.reset]}, task {spec.id}) "
            f"diverged (loss or weights not finite); recorded as diverged")
    if spec.control is not None or spec.level >= cfg.prune.levels:
        return head
    return (f"{head}: its chain stops here, no level-{spec.level + 1} mask is cut from its weights, and levels "
            f"{spec.level + 1}-{cfg.prune.levels} of the chain are recorded as diverged upstream, untrained")


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
        if write and os.path.exists(exp.run.task_path(spec.id)):
            return exp.run.read_task(spec.id)[0]
        upstream = stopped_at(exp.run, spec)
        if upstream:
            return self.skip(exp, spec, upstream, write)

        def next_mask(final_weights, attrs):  # the next level's mask is on disk before this level counts as done
            if not attrs["diverged"]:  # NaN sorts after the pruned positions: a mask cut from it is not nested
                write_next_mask(exp.run, exp.cfg, spec, mask_of(exp.run, spec), final_weights)

        return run_grid_task(exp, spec, lambda: mask_of(exp.run, spec), self.name, progress, write,
                             before_write=next_mask, diverged_line=diverged_line(exp.cfg, spec), level=spec.level)

    def skip(self, exp, spec: Retraining, upstream: str, write: bool) -> dict:
        """The result of a task whose chain stopped at the diverged ticket `upstream`: nothing trained, no mask,
        `diverged` true and `upstream` naming where, so that the merge and the analysis count it as diverged."""
        cfg = exp.cfg
        row = TaskResult(task_id=spec.id, mask=spec.mask, remaining=exp.remaining[spec.mask] if exp.remaining else math.nan,
                         target_remaining=cfg.remaining_fractions()[spec.mask], reset=cfg.reset.points[spec.reset],
                         reset_iteration=exp.reset_iterations[spec.reset], control=spec.control or "", diverged=True,
                         seconds=0.0, rank=exp.rank, host=exp.host, kind=self.name, upstream=upstream)
        attrs = dict(asdict(row), level=spec.level)
        if write:
            exp.run.write_task(spec.id, attrs, {})
        log.debug("IMP task %s not trained: its chain stopped at %s", spec.id, upstream)
        return attrs

    def run(self, exp, task: Task, progress=None, write: bool = True) -> dict:
        return self.run_spec(exp, task.spec, progress, write)


KIND = Imp()
