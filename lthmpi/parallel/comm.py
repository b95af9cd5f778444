"""The communicator the coordinator is written against, and its one-rank implementation (no MPI at all).

`mpi.py` (this package) implements the same interface over mpi4py; the coordinator cannot tell them apart. Every
method that waits sleeps between polls (a blocking MPICH call spins a core and defers signals), so waiting
ranks of an oversubscribed host leave its cores to the ranks that train.

A Reducer sums a flat gradient buffer over a data-parallel subgroup (`MaskedTrainer.set_reducer`); another
backend (NCCL, Gloo, ...) would implement Reducer and `Comm.reducer` and nothing else.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Protocol

import numpy as np


class Reducer(Protocol):
    rank: int
    size: int

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray: ...

    def all_equal(self, value) -> bool: ...


class Comm(Protocol):
    """What the coordinator needs from a group of ranks."""
    rank: int
    size: int
    host: str
    watch: Any                                              # None, or called while waiting (parallel/liveness.py)
    guard: Any                                              # None, or around a reducer's blocking collectives (idem)

    def barrier(self) -> None: ...                          # all ranks reach it; sleeps while waiting
    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def gather(self, obj: Any, root: int = 0) -> list | None: ...
    def allgather(self, obj: Any) -> list: ...
    def send(self, obj: Any, dest: int, tag: int) -> None: ...
    def recv(self, source: int, tag: int) -> Any: ...       # sleeps while waiting
    def poll(self, tag: int) -> tuple[int, Any] | None: ...  # a pending message with `tag` from anyone, or None
    def split(self, color: int, key: int) -> "Comm": ...
    def reducer(self) -> Reducer: ...
    def node_slot(self): ...                                  # devices.NodeSlot of this rank, None alone
    def library(self) -> str: ...
    def threads_ok(self) -> bool: ...                       # may a second thread of this process communicate?
    def free(self) -> None: ...
    def abort(self, code: int) -> None: ...                 # end every rank of the job now
    def stop_together(self, code: int, grace_s: float, said) -> None: ...  # interrupted: exit with the others


class SelfReducer:
    """One replica: the sum is the buffer itself."""
    rank, size = 0, 1

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return np.array(buf, copy=True)

    def all_equal(self, value) -> bool:
        return True


class SelfComm:
    """The one-rank communicator: a process running the experiment alone, no MPI imported."""
    rank, size = 0, 1
    watch = guard = None  # no peer to watch (parallel/liveness.py)

    def __init__(self):
        self.host = socket.gethostname()

    def barrier(self):
        pass

    def bcast(self, obj, root=0):
        return obj

    def gather(self, obj, root=0):
        return [obj]

    def allgather(self, obj):
        return [obj]

    def send(self, obj, dest, tag):
        raise RuntimeError("a one-rank communicator has no other rank to send to")

    def recv(self, source, tag):
        raise RuntimeError("a one-rank communicator has no other rank to receive from")

    def poll(self, tag):
        return None

    def split(self, color, key):
        return self

    def reducer(self):
        return SelfReducer()

    def node_slot(self):
        return None

    def library(self) -> str:
        return "none"

    def threads_ok(self) -> bool:
        return True

    def free(self):
        pass

    def abort(self, code: int):
        sys.stderr.flush()
        os._exit(code)

    def stop_together(self, code, grace_s, said):
        said()
