"""The fit loop, one for every backend: training blocks between evaluation boundaries, the history, the best
weights (early stopping), checkpoints at reset points, progress. What a step computes is the backend's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class History:
    """What one training run measured; iterations are global (counted from the parent's start)."""
    start: int
    end: int
    evals: list = field(default_factory=list)  # dicts: iteration, train_loss, val_loss, val_accuracy
    epochs: list = field(default_factory=list)  # dicts: epoch, iteration, train_loss, val_loss, val_accuracy, test_accuracy
    best_iteration: int = -1
    best_val_loss: float = math.inf
    early_stop_accuracy: float = math.nan
    final_accuracy: float = math.nan
    diverged: bool = False
    replicas: int = 1  # data-parallel replicas that trained it
    replicas_identical: bool = True  # their trainable weights agreed bit for bit at the end

    @property
    def early_stop_iteration(self) -> int:
        """Iterations trained (since this run's start) when the validation loss was lowest."""
        return self.best_iteration - self.start if self.best_iteration >= 0 else -1


def boundaries(start: int, end: int, every: int, per_epoch: int, checkpoints) -> list[int]:
    """The iterations in (start, end] after which the loop evaluates: every `every`, each epoch's end, each
    checkpoint, and `end`."""
    b = set(range((start // every + 1) * every, end, every))
    b |= set(range((start // per_epoch + 1) * per_epoch, end, per_epoch))
    return sorted(b | {c for c in checkpoints if start < c <= end} | {end})


def fit(backend, schedule, start: int, end: int, every: int, per_epoch: int, checkpoints=(),
        progress=None, on_checkpoint=None) -> History:
    """Train iterations [start, end) on `backend` at `schedule`'s learning rates; evaluate every `every`
    iterations and at epoch ends, keep the best weights (lowest validation loss), report checkpoints:
    `progress(n)` after each block of n iterations, `on_checkpoint(t)` with the model's state at t."""
    progress = progress or (lambda n: None)
    on_checkpoint = on_checkpoint or (lambda t: None)
    h = History(start=start, end=end)
    ckpts = {c for c in checkpoints if start <= c <= end}
    backend.begin()
    try:
        if start in ckpts:
            on_checkpoint(start)
        _train(backend, schedule, h, every, per_epoch, ckpts, progress, on_checkpoint)
        last = h.epochs[-1] if h.epochs else None
        if last is not None and last["iteration"] == end and not h.diverged:
            h.final_accuracy = last["test_accuracy"]  # measured at the last boundary already
        else:
            _, h.final_accuracy = backend.evaluate("test")
        h.replicas, h.replicas_identical = backend.replicas()
        if h.best_iteration >= 0:
            h.early_stop_accuracy = backend.best_test_accuracy()
        backend.sync()
    finally:
        backend.end()
    return h


def _train(backend, schedule, h: History, every: int, per_epoch: int, ckpts: set, progress, on_checkpoint):
    t, epoch_loss, epoch_n, seg_loss, seg_n = h.start, 0.0, 0, 0.0, 0
    for b in boundaries(h.start, h.end, every, per_epoch, ckpts):
        while t < b:
            n = min(b - t, every)
            seg_loss += backend.train(t, n, schedule.rates(t, n))
            seg_n += n
            t += n
            progress(n)
        if not math.isfinite(seg_loss):
            h.diverged = True
            return
        epoch_loss, epoch_n = epoch_loss + seg_loss, epoch_n + seg_n
        val_loss, val_acc = backend.evaluate("val")
        record = dict(iteration=b, train_loss=seg_loss / max(1, seg_n), val_loss=val_loss, val_accuracy=val_acc)
        h.evals.append(record)
        seg_loss, seg_n = 0.0, 0
        if not math.isfinite(val_loss):
            h.diverged = True
            return
        if val_loss < h.best_val_loss:
            h.best_val_loss, h.best_iteration = val_loss, b
            backend.keep_best()
        if b % per_epoch == 0 or b == h.end:
            _, test_acc = backend.evaluate("test")
            h.epochs.append(dict(epoch=b / per_epoch, iteration=b, train_loss=epoch_loss / max(1, epoch_n),
                                 val_loss=val_loss, val_accuracy=val_acc, test_accuracy=test_acc))
            epoch_loss, epoch_n = 0.0, 0
        if b in ckpts:
            backend.sync()
            on_checkpoint(b)
