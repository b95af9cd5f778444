"""The communicator over MPI (comm.py's interface): the only module that imports mpi4py.

Waits sleep between tests of a pending request instead of blocking in MPI: a blocking MPICH call spins a core
(on an oversubscribed host, one that a training rank needs) and defers Python's signal handlers.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np

POLL_S = 0.01  # sleep between tests of a pending barrier or message


class MpiReducer:
    """Sums a flat gradient buffer over a subgroup with one Allreduce per step: blocking (MPICH's Iallreduce,
    polled, is no faster on idle cores and up to twice as slow on busy ones: run/bench_allreduce.py), so a
    replica that freezes would hold this rank in it for ever; `guard` (liveness.StallGuard, None when peers are
    not watched) watches them meanwhile."""

    def __init__(self, comm, guard=None):
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.guard = guard or contextlib.nullcontext()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(buf)
        with self.guard:
            self.comm.Allreduce(buf, out, op=MPI.SUM)
        return out

    def all_equal(self, value) -> bool:
        with self.guard:
            return len(set(self.comm.allgather(value))) == 1


class MpiComm:
    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.host = MPI.Get_processor_name()
        self._stop = None
        self.watch = None  # called while waiting: raises when a peer is gone (parallel/liveness.py)
        self.guard = None  # around the blocking collectives of data-parallel steps (liveness.StallGuard)

    def barrier(self):
        req = self.comm.Ibarrier()
        while not req.Test():
            self._check()
            time.sleep(POLL_S)

    def _check(self):
        if self.watch is not None:
            self.watch()

    def _meet(self):
        """Before a blocking collective, with peers watched: every rank meets in the polled barrier first, so that
        a dead peer ends the wait there (liveness.py) instead of leaving this rank inside MPI for ever."""
        if self.watch is not None:
            self.barrier()

    def bcast(self, obj, root=0):
        self._meet()
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root=0):
        self._meet()
        return self.comm.gather(obj, root=root)

    def allgather(self, obj):
        self._meet()
        return self.comm.allgather(obj)

    def send(self, obj, dest, tag):
        self.comm.send(obj, dest=dest, tag=tag)

    def recv(self, source, tag):
        req = self.comm.irecv(source=source, tag=tag)
        while True:
            done, msg = req.test()
            if done:
                return msg
            self._check()
            time.sleep(POLL_S / 2)

    def poll(self, tag):
        status = self.MPI.Status()
        if not self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=tag, status=status):
            return None
        src = status.Get_source()
        return src, self.comm.recv(source=src, tag=tag)

    def split(self, color, key):
        self._meet()
        sub = MpiComm(self.comm.Split(color, key))
        sub.watch, sub.guard = self.watch, self.guard  # its members are among the watched peers
        return sub

    def reducer(self):
        return MpiReducer(self.comm, self.guard)

    def node_slot(self):
        """Where this rank sits on its host (devices.NodeSlot: its GPU follows from it). Collective."""
        from ..devices import NodeSlot

        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        slot = NodeSlot(local.Get_rank(), local.Get_size(),
                        tuple(local.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))))
        local.Free()
        return slot

    def library(self) -> str:
        return self.MPI.Get_library_version().splitlines()[0].strip()

    def threads_ok(self) -> bool:
        return self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE

    def free(self):
        if self.comm != self.MPI.COMM_WORLD:
            self.comm.Free()

    def abort(self, code: int):
        sys.stderr.flush()
        time.sleep(1.0)  # let mpirun forward the last line: MPI_Abort kills the forwarding proxies at once
        if threading.current_thread() is not threading.main_thread() and not self.threads_ok():
            os._exit(code)  # the stall guard, while the main thread is in MPI: a rank gone non-zero ends the job
        self.comm.Abort(code)

    def prepare_stop(self):
        """A duplicate of the world for stop_together: its barriers cannot match one pending on the world."""
        self._stop = self.comm.Dup()

    def settle(self, seconds: float = 15.0) -> bool:
        """Interrupted (outside the coordinator: `lthmpi.data prepare`): wait at most `seconds` until every rank
        has unwound, so that no rank's exit makes mpirun kill another still cleaning up. True when all arrived."""
        req = self._stop.Ibarrier()
        deadline = time.monotonic() + seconds
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def stop_together(self, code: int, grace_s: float, said):
        """Interrupted: this rank has unwound. If every rank stops within grace_s, rank 0 says so (`said()`) and
        all exit with `code`; else the ranks that did not hear it are aborted."""
        req = self._stop.Ibarrier()
        deadline = time.monotonic() + grace_s
        while not req.Test():
            if time.monotonic() > deadline:
                print(f"lthmpi: rank {self.rank} interrupted, the others did not stop; aborting them", file=sys.stderr,
                      flush=True)
                self.comm.Abort(code)
            time.sleep(POLL_S)
        if self.rank == 0:
            said()
        req = self._stop.Ibarrier()  # no rank exits (which makes mpirun kill the rest) before rank 0 has said it
        deadline = time.monotonic() + grace_s
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not MPI_Finalize: requests interrupted mid-wait are still pending


def world() -> MpiComm:
    comm = MpiComm()
    comm.prepare_stop()
    return comm


def node_shared_array(shape, dtype):
    """One array per host in an MPI-3 shared-memory window (MPI_Win_allocate_shared over the host's ranks): the
    host's first rank allocates it, every rank of the host gets a numpy view of the same memory. Returns
    (array, is_owner, window, host communicator); free the window when done. run/bench_data.py measures this
    against reading the prepared file through the page cache (docs/data.md)."""
    from mpi4py import MPI

    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    win = MPI.Win.Allocate_shared(nbytes if local.Get_rank() == 0 else 0, dtype.itemsize, comm=local)
    buf, _ = win.Shared_query(0)
    return np.ndarray(shape, dtype, buffer=buf), local.Get_rank() == 0, win, local
