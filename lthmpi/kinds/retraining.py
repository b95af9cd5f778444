"""One retraining, written once for every kind that retrains (oneshot.py, imp.py, stability.py).

Start from the parent's weights at k under a mask (pruned weights zeroed, biases at their values at k), or a
control's start (random_mask: same per-layer counts at random positions; random_reinit: fresh values), a
fresh or restored optimizer, train [k, end), and one result row with every provenance field (device,
precision, determinism, threads, kernels) and durations on the monotonic clock. Knows no other kind.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..parallel.scheduling import step_cost
from ..criteria import invert
from ..fileio import StoreError
from ..pruning import fraction_remaining, random_masks
from ..results import TaskResult

log = logging.getLogger("lthmpi")

# a control's code seeds its draw; layer_shuffle is random_mask under its PaI name (the same code, the same draw)
CONTROL_CODES = {None: 0, "random_reinit": 1, "random_mask": 2, "layer_shuffle": 2, "invert": 4}


@dataclass(frozen=True, order=True)
class Retraining:
    """A grid retraining: mask index, reset-point index, and control (None = the ticket itself); for IMP the
    level (1 …, 0 = a one-shot task), whose mask index is level - 1 (kinds/imp.py). Its id names its result
    file and its seed draws its controls: both are those of run directories made before, unchanged."""
    mask: int
    reset: int
    control: str | None = None
    level: int = 0

    @property
    def id(self) -> str:
        head = f"l{self.level:02d}" if self.level else f"m{self.mask:03d}"
        return f"{head}_r{self.reset:02d}_{self.control or 'ticket'}"

    def seed(self, base: int) -> list[int]:
        return [base, self.mask, self.reset, CONTROL_CODES[self.control]]


def end_iteration(exp, k: int) -> int:
    """Where a retraining from k ends: T (reset.length = "remaining") or k + T ("full")."""
    return exp.total if exp.cfg.reset.length == "remaining" else k + exp.total


def cost(exp, k: int, remaining: float) -> float:
    """Estimated relative cost: iterations to train, times the cost of a step on the kernels its mask trains on
    (every evaluation interval ends in the same evaluations)."""
    return float(end_iteration(exp, k) - k) * step_cost(exp.trainer.kernels_for(remaining), remaining)


def start_weights(exp, k: int, mask: dict | None, control: str | None = None, seed=None) -> tuple[dict, dict | None]:
    """Weights and mask a retraining starts from: θ_k ⊙ m (a transferred ticket: the source's weights at its reset
    point), or a control of it drawn from `seed`: random_mask / layer_shuffle (the per-layer counts at random
    positions), invert (the lowest-scoring weights at the same per-layer counts), random_reinit."""
    transfer = getattr(exp, "transfer", None)
    weights = dict(transfer.weights if transfer is not None and mask is not None else exp.checkpoints[k])
    if control in ("random_mask", "layer_shuffle"):
        mask = random_masks(mask, seed)
    elif control == "invert":
        if getattr(exp, "scores", None) is None:
            raise StoreError(f"the invert control needs the criterion's scores, but {exp.run.masks_path} has none; "
                             f"delete it to recompute the masks with them")
        mask = invert(mask, exp.scores)
    elif control == "random_reinit":
        from ..models import fresh_init

        fresh = fresh_init(exp.model, int(np.random.default_rng(seed).integers(2**31)))
        weights = dict(exp.checkpoints[0])
        weights.update({v.path: a for v, a in zip(exp.model.trainable_variables, fresh)})
    if mask is None:
        return weights, None
    return {p: (w * mask[p] if p in mask else w) for p, w in weights.items()}, mask


def retrain(exp, weights: dict, keep: dict | None, k: int, end: int, restore: bool, progress=None,
            order_seed: int | None = None, **row) -> tuple[dict, dict]:
    """Train [k, end) from `weights` under the mask `keep` (None = dense); the optimizer restored as saved at k when
    `restore`, fresh otherwise. Returns the result's attributes (TaskResult's columns from `row` and the
    training, with the replicas' agreement) and its curves (per evaluation, per epoch)."""
    tr = exp.trainer
    tr.set_weights(weights)
    tr.set_masks(keep)
    tr.reset_optimizer(exp.optimizer_states.get(k) if restore else None)
    t0, m0 = time.time(), time.monotonic()  # wall times say when (across ranks); the monotonic clock how long
    h = tr.fit(k, end, progress=progress, order_seed=order_seed)
    t1, seconds = time.time(), time.monotonic() - m0
    diverged = h.diverged or not finite(tr.get_weights())  # a finite loss can hide non-finite weights
    result = TaskResult(remaining=1.0 if keep is None else fraction_remaining(keep), reset_iteration=k,
                        final_accuracy=h.final_accuracy, early_stop_iteration=h.early_stop_iteration,
                        early_stop_accuracy=h.early_stop_accuracy, best_val_loss=h.best_val_loss,
                        iterations=end - k, diverged=diverged, seconds=seconds, start_time=t0, end_time=t1,
                        rank=exp.rank, host=exp.host, threads=tr.threads, kernels=tr.kernels, conv_step=tr.conv_step,
                        device=exp.placement.label, precision=exp.cfg.train.precision,
                        deterministic=exp.deterministic, **row)
    attrs = dict(asdict(result), replicas=h.replicas, replicas_identical=h.replicas_identical)
    series = {"evals": _columns(h.evals, ("iteration", "train_loss", "val_loss", "val_accuracy")),
              "epochs": _columns(h.epochs, ("epoch", "iteration", "train_loss", "val_loss", "val_accuracy",
                                            "test_accuracy"))}
    return attrs, series


def finite(weights: dict) -> bool:
    """Every floating-point weight is finite (no NaN, no inf)."""
    return all(np.isfinite(w).all() for w in weights.values() if np.asarray(w).dtype.kind == "f")


def _columns(rows: list, names) -> dict:
    return {n: np.asarray([r[n] for r in rows], dtype=np.float64) for n in names}


def run_grid_task(exp, spec: Retraining, load_mask, kind: str, progress=None, write: bool = True,
                  before_write=None, diverged_line: str = "", **extra) -> dict:
    """A grid retraining (one-shot or IMP) from its reset point under the mask `load_mask()` gives (read only
    when the task is not done yet), durable on disk before returning.
    `before_write(final_weights, attrs)` runs before the result file is written (IMP: the next level's mask);
    `diverged_line` is what the log says when the training diverged (loss or weights not finite).

    A data-parallel replica other than its subgroup's leader trains in lockstep but writes nothing."""
    if write and os.path.exists(exp.run.task_path(spec.id)):
        return exp.run.read_task(spec.id)[0]
    cfg = exp.cfg
    k = exp.reset_iterations[spec.reset]
    weights, mask = start_weights(exp, k, load_mask(), spec.control, spec.seed(cfg.seed))
    restore = cfg.reset.optimizer_state == "restore" and spec.control != "random_reinit"
    attrs, series = retrain(exp, weights, mask, k, end_iteration(exp, k), restore, progress, task_id=spec.id,
                            mask=spec.mask, target_remaining=cfg.remaining_fractions()[spec.mask],
                            reset=cfg.reset.points[spec.reset], control=spec.control or "", kind=kind)
    attrs.update(extra)
    if write:
        if before_write:
            before_write(exp.trainer.get_weights(), attrs)
        exp.run.write_task(spec.id, attrs, series)
    if attrs["diverged"]:
        log.warning(diverged_line or f"task {spec.id} diverged (loss or weights not finite); recorded as diverged")
    return attrs
