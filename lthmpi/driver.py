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


def run_serial(cfg: Config, run_dir: str, threads: int, t_start: float | None = None, quiet: bool = False) -> str:
    from .experiment import Experiment
    from .results import merge, provenance
    from .runtime import configure_tensorflow
    from .store import hostname

    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    with timer.phase("startup"):
        if os.path.exists(run.config_path):
            run.check_config(cfg)  # refuse another experiment's directory before any work
        configure_tensorflow(threads)
        # Read the data and build the model before the directory is made: a config that fails there
        # (unknown model, missing data, reset point past the end) must not leave a config.toml that
        # would refuse the corrected rerun in the same --run-dir.
        exp = Experiment(cfg, run.path, rank=0)
        run.create(cfg)
        setup_logging(run.path, 0, verbose=not quiet)
    with timer.phase("parent"):
        exp.train_parent()
    with timer.phase("masks"):
        exp.compute_masks()
    tasks = exp.tasks()
    done = sum(exp.is_done(t) for t in tasks)
    if done:
        log.info("resuming: %d of %d tasks already complete on disk", done, len(tasks))
    with timer.phase("training"), progress_bar(len(tasks), "retrainings", enabled=not quiet) as bar:
        bar.update(done)
        for task in tasks:
            if exp.is_done(task):
                continue
            exp.run_task(task)
            bar.update(1)
    with timer.phase("gather"):
        pass
    timing = timer.as_attrs()
    path = merge(run, [t.id for t in tasks], timing, provenance(1, [hostname()], threads))
    return path
