"""Training batches read from a prepared file on disk, a few steps ahead, in a background thread.

When the training set does not fit in memory (data.in_memory = false) its images stay in the prepared file
(DiskArray, read with pread): ranks on one host then share one copy, the kernel's page cache, and rows never
read take no memory at all. The trainer asks for the batches of iterations [t, t + n) by the same function
of (seed, iteration) that indexes the in-memory arrays, so the data order, and the results, are the same;
this reader gathers those rows (only this replica's share of each batch, for a data-parallel subgroup) while
the compiled step trains on the previous ones. The images stay uint8 until the step normalises them.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

AHEAD_BYTES = 256 << 20  # at most this much of gathered batches waits ahead of the step


class DiskArray:
    """A read-only (N, ...) array stored contiguously in a file, read row by row with pread.

    Unlike a memory map, rows read are copied into the process and the file's pages stay only in the
    kernel's page cache: shared by every rank on the host, evicted under memory pressure, and not counted in
    any rank's resident memory (run/bench_data.py measures both). Indexing takes an int, a slice with step 1
    or an integer array, as numpy's does."""

    def __init__(self, path: str, offset: int, shape: tuple, dtype):
        self.path, self.offset = path, int(offset)
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _read(self, out: np.ndarray, first: int) -> np.ndarray:
        """Fill `out` (contiguous rows) from row `first` on."""
        view, pos = memoryview(out.reshape(-1).view(np.uint8)), self.offset + first * self.row_bytes
        while len(view):
            got = os.preadv(self._fd, [view], pos)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {pos} (file truncated?)")
            view, pos = view[got:], pos + got
        return out

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._read(np.empty(self.shape[1:], self.dtype), i)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("DiskArray slices take step 1")
            return self._read(np.empty((max(0, stop - start), *self.shape[1:]), self.dtype), start)
        rows = np.asarray(key)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise IndexError("DiskArray takes an int, a slice or a 1-D integer array")
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows out of range for {n} rows")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for j, i in enumerate(rows):
            self._read(out[j], int(i))
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # readers whose thread may still run: close_all() ends them


def close_all():
    """Close every open reader (an interrupted process, before it exits: no thread left reading)."""
    for reader in list(_OPEN):
        reader.close()


class DiskBatches:
    """Batches of iterations, gathered from `x` (N, ...) and `y` (N,) by `indices(start, stop)` -> (n, B)."""

    def __init__(self, x, y, indices, share: tuple[int, int] = (0, 1), ahead: int = 64):
        self.x, self.y = x, np.asarray(y)
        self._indices = indices
        self.rank, self.size = share
        rows = len(self._indices(0, 1)[0, self.rank::self.size])
        self.ahead = max(2, min(ahead, AHEAD_BYTES // max(1, rows * x[0].nbytes)))
        self._ready: dict[int, tuple] = {}
        self._cursor = self._horizon = 0  # the worker gathers iterations [cursor, horizon)
        self._inflight: int | None = None  # the iteration being gathered now
        self._generation = 0  # bumped on a jump, so that a batch gathered for the old position is dropped
        self._error: BaseException | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="lthmpi-batches", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    def gather(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Iteration t's rows (this replica's share of its batch): uint8 images, int32 labels."""
        rows = self._indices(t, t + 1)[0, self.rank::self.size]
        return self.x[rows], self.y[rows].astype(np.int32)

    def _work(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._cursor < self._horizon)
                if self._closed:
                    return
                t, generation = self._cursor, self._generation
                self._cursor, self._inflight = t + 1, t
            try:
                batch = self.gather(t)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._inflight = None
                if generation == self._generation:
                    self._ready[t] = batch
                self._cv.notify_all()

    def block(self, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Iterations [t, t + n) as (n, rows, ...) images and (n, rows) labels; starts gathering what follows."""
        with self._cv:
            for old in [i for i in self._ready if i < t]:
                del self._ready[old]
            if not (t in self._ready or t == self._inflight or t == self._cursor):
                self._ready.clear()  # a jump (a new task, a reset point): start over from t
                self._generation += 1
                self._cursor = t
            self._horizon = t + n + self.ahead
            self._cv.notify_all()
            out = []
            for i in range(t, t + n):
                self._cv.wait_for(lambda i=i: i in self._ready or self._error is not None)
                if self._error is not None:
                    raise self._error
                out.append(self._ready.pop(i))
        return np.stack([b[0] for b in out]), np.stack([b[1] for b in out])

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)


class DiskSource:
    """The trainer's batch source for a training set left on disk (data.in_memory = false).

    `train_feed(t, n, share)` returns the rows of iterations [t, t + n) (this replica's share of each batch)
    and indices into them, as the in-memory source returns the whole split and indices into it; the compiled
    steps gather either the same way. `per_step`: conv nets, one compiled call a step, ask for one step's rows
    at a time rather than a block's. `whole_splits` False: evaluation reads a split in pieces."""

    per_step = True
    whole_splits = False

    def __init__(self, data, order, ahead: int = 64, pad: int = 1):
        """`pad`: feeds of 2 or more steps are padded to this many (zero rows), so that a compiled block of
        steps sees one shape (Dense nets: eval_every); the padding steps are never run. One-step feeds (one
        compiled call a step: conv nets, data-parallel replicas) are not padded."""
        self.data, self.order, self.ahead, self.pad = data, order, ahead, pad
        self._reader: DiskBatches | None = None

    def set_order(self, order):
        """Train in another batch order (a stability pair's copy B): the reader gathering ahead is restarted."""
        self.order = order
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def train_feed(self, t: int, n: int, share: tuple[int, int] = (0, 1)):
        if self._reader is None or (self._reader.rank, self._reader.size) != tuple(share):
            if self._reader is not None:
                self._reader.close()
            self._reader = DiskBatches(self.data.x_train, self.data.y_train, self.order.block, share, self.ahead)
        xb, yb = self._reader.block(t, n)
        rows, m = xb.shape[1], max(n, self.pad if n > 1 else 1)
        x = np.zeros((m * rows, *xb.shape[2:]), xb.dtype)
        y = np.zeros(m * rows, np.int32)
        x[:n * rows], y[:n * rows] = xb.reshape(n * rows, *xb.shape[2:]), yb.reshape(-1)
        return x, y, np.arange(n * rows, dtype=np.int32).reshape(n, rows)

    def split(self, name: str):
        """(x, y) of a split: x on disk (sliced by the caller, a piece at a time), y in memory."""
        return getattr(self.data, f"x_{name}"), np.ascontiguousarray(getattr(self.data, f"y_{name}"), np.int32)

    def numpy(self, name: str):
        return getattr(self.data, f"x_{name}"), getattr(self.data, f"y_{name}")
