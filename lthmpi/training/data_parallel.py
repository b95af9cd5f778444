"""The data-parallel backend: the replicas of a subgroup each take rows rank::size of every global batch,
and their gradients are summed through a reducer between the two compiled halves of a step, so the
global batch, and with it the mathematics, does not change with the subgroup's size.

A reducer is anything with `rank`, `size`, `allreduce_sum(numpy array) -> numpy array` and
`all_equal(value) -> bool` (lthmpi/parallel/mpi.py's MpiReducer over mpi4py; a test's stand-in in one process).
"""
from __future__ import annotations

import numpy as np

from .dense import DenseBackend


class DataParallelBackend(DenseBackend):
    """Dense steps with gradients summed across the replicas; evaluation split between them."""

    def __init__(self, steps, batches, every: int, eval_batch: int, reducer, digest):
        super().__init__(steps, batches, every, eval_batch)
        self.reducer, self.digest = reducer, digest

    def train(self, t: int, n: int, lrs: np.ndarray) -> float:
        tf, red, s = self.tf, self.reducer, self.steps
        share = (red.rank, red.size)
        per_step = getattr(self.batches, "per_step", False)  # from disk: each step's share of rows, no more
        x, y, idx = (None, None, None) if per_step else self.batches.train_feed(t, n, share)
        total = 0.0
        for i in range(n):
            xi, yi, rows = self.batches.train_feed(t + i, 1, share) if per_step else (x, y, idx[i:i + 1])
            flat = s.shard_gradients(xi, yi, tf.constant(rows[0]), tf.constant(t + i, tf.int64)).numpy()
            summed = red.allreduce_sum(flat)
            s.apply_flat(tf.constant(summed), tf.constant(lrs[i]))
            total += float(summed[-1])
        self._average_statistics()
        return total

    def _average_statistics(self):
        """Average the non-trainable statistics (batch-norm moving mean and variance) over the subgroup.

        Each replica normalises with its own shard's batch statistics, so their moving averages drift
        apart; the update is linear, so averaging them once per block equals averaging every step. Every
        replica then evaluates, and early-stops, on the same model."""
        stats = [v for v in self.steps.model.non_trainable_variables if "float" in str(v.dtype)]
        if not stats:
            return
        flat = np.concatenate([np.ravel(v.numpy()) for v in stats]).astype(np.float32)
        mean = self.reducer.allreduce_sum(flat) / np.float32(self.reducer.size)
        offset = 0
        for v in stats:
            n = int(np.prod(v.shape))
            v.assign(mean[offset:offset + n].reshape(v.shape))
            offset += n

    def evaluate(self, split: str) -> tuple[float, float]:
        """Each replica evaluates its own share of the rows and the subgroup sums the totals, so evaluation
        scales with the subgroup as training does; every replica gets the same sums, and so takes the same
        early-stopping decisions."""
        x, _ = self.batches.split(split)
        n, red = int(x.shape[0]), self.reducer
        sums = red.allreduce_sum(self.sums(split, n * red.rank // red.size, n * (red.rank + 1) // red.size))
        return float(sums[0]) / n, float(sums[1]) / n

    def replicas(self) -> tuple[int, bool]:
        """How many replicas trained, and whether their weights agree bit for bit."""
        return self.reducer.size, self.reducer.all_equal(self.digest())
