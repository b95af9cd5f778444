"""Where a block of training batches comes from: the batch order, and the source of the rows.

The fast path (docs/performance.md) keeps a split in memory as one tensor and hands it, with a (K, B) block of row
indices, to one compiled call that gathers each batch itself. A source that streams from disk plugs in at
`train_feed`: it returns the rows of the block (x, y) and indices into them (docs/trainer.md), as
lthmpi.data.disk_batches.DiskSource does for a prepared file left on disk (docs/data.md).
"""
from __future__ import annotations

import numpy as np


class BatchOrder:
    """Deterministic per-epoch shuffles: the batches of iteration t depend only on (seed, t)."""

    def __init__(self, n_train: int, batch_size: int, seed: int):
        self.n, self.batch, self.seed = n_train, batch_size, seed
        self.per_epoch = n_train // batch_size
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            self._cache[e] = perm[: self.per_epoch * self.batch].reshape(self.per_epoch, self.batch).astype(np.int32)
        return self._cache[e]

    def block(self, start: int, stop: int) -> np.ndarray:
        """Indices of iterations [start, stop) as a (stop - start, batch) array."""
        parts, t = [], start
        while t < stop:
            e, j = divmod(t, self.per_epoch)
            take = min(stop - t, self.per_epoch - j)
            parts.append(self._epoch(e)[j: j + take])
            t += take
        return np.concatenate(parts) if parts else np.zeros((0, self.batch), np.int32)


class InMemoryBatches:
    """The splits held as tensors (passed as arguments to the compiled calls, never captured as constants:
    XLA would embed them in the program) and the batch order over the training split."""

    def __init__(self, tf, data, batch_size: int, seed: int):
        self.data = data
        self.order = BatchOrder(len(data.x_train), batch_size, seed)
        self.x = {s: tf.convert_to_tensor(getattr(data, f"x_{s}")) for s in ("train", "val", "test")}
        self.y = {s: tf.convert_to_tensor(getattr(data, f"y_{s}").astype(np.int32)) for s in ("train", "val", "test")}

    def set_order(self, order: BatchOrder):
        """Train in another batch order (a stability pair's copy B) until it is set back."""
        self.order = order

    def train_feed(self, t: int, n: int, share: tuple[int, int] = (0, 1)):
        """(x, y, idx) for iterations [t, t + n): step i trains on rows idx[i] of x and y (a data-parallel
        replica's share of each batch: rows rank::size)."""
        rank, size = share
        idx = self.order.block(t, t + n)
        return self.x["train"], self.y["train"], idx if size == 1 else idx[:, rank::size]

    def split(self, name: str):
        """(x, y) of an evaluation split ("val", "test"; "train" too)."""
        return self.x[name], self.y[name]

    def numpy(self, name: str):
        """A split as numpy arrays (for kernels outside TensorFlow)."""
        return getattr(self.data, f"x_{name}"), getattr(self.data, f"y_{name}")
