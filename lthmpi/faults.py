"""Fault injection for the fault tests (tests/test_faults.py, run/fault_battery.sh): LTHMPI_FAULT=KIND:RANK:WHERE.

Kept out of the coordinator so that production code carries only three calls into it: a task started, a
training block ended, a named point reached. Unset, every hook is a no-op.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("lthmpi")


class FaultInjection:
    """For the fault tests, one small mechanism: LTHMPI_FAULT=KIND:RANK:WHERE.

    WHERE is N (rank RANK's N-th task, 1-based, after its first training block) or a named point of the run:
    `gather` (rank 0 with every task on disk, before the gather), `merge` (results.h5 half-written) or
    `prepare` (`python -m lthmpi.data prepare` of an image tree, after the rank's first images are written).
    KIND: `raise` (an exception), `kill` (SIGKILL: a dead node), `stop` (SIGSTOP: a frozen node, which no
    launcher notices), `nan` (the task's weights become NaN, so it
    diverges; tasks only), `wait` (pause until SIGUSR1, at most 10 minutes, logging "injected fault: waiting",
    so that a test can signal the run or change its disk mid-task; mpirun forwards SIGUSR1)."""

    KINDS = ("raise", "kill", "stop", "nan", "wait")
    POINTS = ("gather", "merge", "prepare")

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("LTHMPI_FAULT", "") if spec is None else spec
        self.kind, self.rank, self.where, self.count = None, -1, None, 0
        if spec:
            try:
                kind, r, where = spec.split(":")
                self.rank = int(r)
                self.where = int(where) if where.isdigit() else where
            except ValueError:
                raise ValueError(f"LTHMPI_FAULT={spec!r} must be KIND:RANK:N or KIND:RANK:POINT") from None
            if kind not in self.KINDS or not (isinstance(self.where, int) or self.where in self.POINTS) or \
                    (kind == "nan" and not isinstance(self.where, int)):
                raise ValueError(f"LTHMPI_FAULT={spec!r}: KIND is one of {', '.join(self.KINDS)}, the last field "
                                 f"a task number or one of {', '.join(self.POINTS)} (nan: a task number)")
            self.kind = kind
        self.active = self.kind is not None and self.rank == rank

    def task_started(self):
        self.count += 1

    def in_task(self, exp=None):
        """Called after each training block of a task."""
        if self.active and self.where == self.count:
            self._fire(f"task {self.count}", exp)

    def at(self, point: str):
        if self.active and self.where == point:
            self._fire(point, None)

    def _fire(self, where: str, exp):
        if self.kind in ("kill", "stop"):
            import signal

            os.kill(os.getpid(), signal.SIGKILL if self.kind == "kill" else signal.SIGSTOP)
            return  # stop: continued (SIGCONT), it goes on
        if self.kind == "nan" and exp is not None:
            for v in exp.trainer.model.trainable_variables:
                v.assign(v * float("nan"))
            return
        if self.kind == "wait":
            import signal

            resumed = []
            previous = signal.signal(signal.SIGUSR1, lambda *_: resumed.append(1))
            log.warning("injected fault: waiting in %s until SIGUSR1", where)
            for h in log.handlers:
                h.flush()
            self.active = False  # once
            deadline = time.monotonic() + 600
            while not resumed and time.monotonic() < deadline:
                time.sleep(0.05)
            signal.signal(signal.SIGUSR1, previous)
            return
        raise RuntimeError(f"injected fault in {where}")


FAULT = FaultInjection(-1, "")


def set_fault(rank: int) -> FaultInjection:
    global FAULT
    FAULT = FaultInjection(rank)
    return FAULT
