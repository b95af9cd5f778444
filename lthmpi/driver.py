"""The experiment as one rank runs it alone: parent, masks, every task, merge; with phase timings.

The MPI coordinator (parallel.py) reuses the pieces; this path needs no MPI at all.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from .config import Config
from .store import RunDir

log = logging.getLogger("lthmpi")


class PhaseTimer:
    """Wall seconds per named phase, for the scaling analysis."""

    def __init__(self, t_start: float | None = None):
        self.t0 = t_start if t_start is not None else time.time()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t

    def as_attrs(self) -> dict:
        return {**self.seconds, "total": time.time() - self.t0, "start_time": self.t0}


def setup_logging(run_dir: str, rank: int, verbose: bool = True):
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    # A full or read-only disk must give one clear error line, not a "--- Logging error ---" traceback per
    # log line: failed log writes are dropped (the error itself is reported by whoever writes results).
    logging.raiseExceptions = False
    root = logging.getLogger("lthmpi")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    fh = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    root.addHandler(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.INFO)  # per-task lines are DEBUG: in the rank's log file only
        sh.setFormatter(logging.Formatter("lthmpi: %(message)s"))
        root.addHandler(sh)
    root.propagate = False


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


class FaultInjection:
    """For the fault tests, one small mechanism: LTHMPI_FAULT=KIND:RANK:WHERE.

    WHERE is N (rank RANK's N-th task, 1-based, after its first training block) or a named point of the run:
    `gather` (rank 0 with every task on disk, before the gather), `merge` (results.h5 half-written) or
    `prepare` (`python -m lthmpi.data prepare` of an image tree, after the rank's first images are written).
    KIND: `raise` (an exception), `kill` (SIGKILL: a dead node), `nan` (the task's weights become NaN, so it
    diverges; tasks only), `wait` (pause until SIGUSR1, at most 10 minutes, logging "injected fault: waiting",
    so that a test can signal the run or change its disk mid-task; mpirun forwards SIGUSR1)."""

    KINDS = ("raise", "kill", "nan", "wait")
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
        if self.kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
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
            deadline = time.time() + 600
            while not resumed and time.time() < deadline:
                time.sleep(0.05)
            signal.signal(signal.SIGUSR1, previous)
            return
        raise RuntimeError(f"injected fault in {where}")


FAULT = FaultInjection(-1, "")


def set_fault(rank: int) -> FaultInjection:
    global FAULT
    FAULT = FaultInjection(rank)
    return FAULT


def run_one(exp, task, write: bool = True, poll=None) -> dict:
    """Retrain one task (a rank's unit of work), with the fault hook and a DEBUG line "task <id> done in"."""
    t0 = time.time()
    fault = FAULT
    fault.task_started()

    def progress(n):
        fault.in_task(exp)
        if poll:
            poll()

    attrs = exp.run_task(task, progress=progress, write=write)
    log.debug("task %s done in %.1f s (early-stop accuracy %.4f)", task.id, time.time() - t0,
              attrs.get("early_stop_accuracy", float("nan")))
    if poll:
        poll()
    return dict(task_id=task.id, rank=exp.rank, start=t0, end=time.time())


def check_finished(run: RunDir) -> int:
    """Read every task file already on disk (checksums verified): a damaged one stops the run at its start,
    named in one line, instead of at the merge after hours of training. Returns how many there are."""
    done = sorted(run.done_tasks())
    for tid in done:
        run.read_task(tid)
    return len(done)


def run_serial(cfg: Config, run_dir: str, threads: int, t_start: float | None = None, quiet: bool = False,
               allow_mixed: bool = False) -> str:
    from .experiment import Experiment
    from .results import merge, provenance
    from .store import hostname

    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    fault = set_fault(0)
    try:
        with timer.phase("startup"):
            if os.path.exists(run.config_path):
                run.check_config(cfg)  # refuse another experiment's directory before any work,
                run.lock()  # and a directory in use, before seconds of imports,
                check_finished(run)  # and a damaged task file
            # Read the data and build the model before the directory is made: a config that fails there
            # (unknown model, missing data, reset point past the end) must not leave a config.toml that
            # would refuse the corrected rerun in the same --run-dir.
            exp = Experiment(cfg, run.path, rank=0, threads=threads)
            exp.check_rerun(allow_mixed)
            run.create(cfg)
            setup_logging(run.path, 0, verbose=not quiet)
            tasks = exp.tasks()
            done = sum(exp.is_done(t) for t in tasks)
        with timer.phase("parent"):
            exp.train_parent()
        with timer.phase("masks"):
            exp.compute_masks()
        if done:
            log.info("resuming: %d of %d tasks already complete on disk", done, len(tasks))
        with timer.phase("training"), progress_bar(len(tasks), "retrainings", enabled=not quiet) as bar:
            bar.update(done)
            for task in tasks:
                if exp.is_done(task):
                    continue
                run_one(exp, task)
                bar.update(1)
        with timer.phase("gather"):
            fault.at("gather")
        timing = timer.as_attrs()
        return merge(run, [t.id for t in tasks], timing, provenance(1, [hostname()], threads),
                     during=lambda: fault.at("merge"))
    finally:
        run.unlock()
