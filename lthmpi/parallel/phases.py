"""The phases of a run, written once for the MPI coordinator (coordinator.py) and the job-array shards
(shards.py): start-up, parent, masks, one task, merge.

Both pass a communicator (comm.py); a shard passes the one-rank SelfComm, so for it every `agree` is a plain
call and every barrier nothing. Rank 0 refuses a wrong or busy run directory before any work, trains (or
loads) the parent and cuts the masks; the other ranks read both from the run directory, and meanwhile train
the tasks that need only a checkpoint of the parent as rank 0 reaches it (make_parent, train_early).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from .. import faults, kinds
from ..store import RunDir
from .startup import agree

log = logging.getLogger("lthmpi")


class PhaseTimer:
    """Wall seconds per named phase, for the scaling analysis."""

    def __init__(self, t_start: float | None = None):
        self.t0 = t_start if t_start is not None else time.time()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.monotonic()  # durations: immune to the wall clock being set
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t

    def as_attrs(self) -> dict:
        return {**self.seconds, "total": time.time() - self.t0, "start_time": self.t0}


def setup_logging(run_dir: str, rank: int, verbose: bool = True, name: str | None = None):
    """RUN_DIR/logs/<name>.log (default rank<r>), and INFO lines on stderr when `verbose`."""
    name = name or f"rank{rank}"
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    # A full or read-only disk must give one clear error line, not a "--- Logging error ---" traceback per
    # log line: failed log writes are dropped (the error itself is reported by whoever writes results).
    logging.raiseExceptions = False
    root = logging.getLogger("lthmpi")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    fh = logging.FileHandler(os.path.join(run_dir, "logs", f"{name}.log"))
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    root.addHandler(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.INFO)  # per-task lines are DEBUG: in the rank's log file only
        sh.setFormatter(logging.Formatter("lthmpi: %(message)s"))
        root.addHandler(sh)
    root.propagate = False


def default_run_dir(cfg) -> str:
    """runs/<dataset>_<model>_<hash>; a directory named by the hash of older versions (every field, defaults
    too) is found and resumed when it exists and the current name does not."""
    path = os.path.join("runs", cfg.default_run_name())
    legacy = cfg.default_run_name(legacy=True)
    if not os.path.exists(path) and legacy and os.path.isdir(os.path.join("runs", legacy)):
        return os.path.join("runs", legacy)
    return path


def check_finished(run: RunDir) -> int:
    """Read every task file already on disk (checksums verified): a damaged one stops the run at its start,
    named in one line, instead of at the merge after hours of training. Returns how many there are."""
    done = sorted(run.done_tasks())
    for tid in done:
        run.read_task(tid)
    return len(done)


def startup(cfg, run: RunDir, comm, threads: int, slot=None, allow_mixed: bool = False, quiet: bool = False,
            shard: tuple[int, str] | None = None):
    """Check the directory, build the Experiment, create the directory; returns the Experiment.

    Over `comm` (rank 0 writes, the others check what it wrote), holding RUN_DIR/lock exclusively; or, with
    `shard` = (index, log name), as one job-array shard holding it shared with the other shards."""
    rank = shard[0] if shard else comm.rank

    def refuse_early():  # another experiment's directory, or one in use: before seconds of imports
        if comm.rank == 0 and os.path.exists(run.config_path):
            run.check_config(cfg)
            if not shard:
                run.lock()
                check_finished(run)  # a damaged task file, named now rather than at the merge

    def build():
        # Read the data and build the model before the directory is made: a config that fails there
        # (unknown model, missing data, reset point past the end) must not leave a config.toml that
        # would refuse the corrected rerun in the same --run-dir.
        from ..experiment import Experiment

        return Experiment(cfg, run.path, rank=rank, threads=threads, slot=slot)

    def create():
        if comm.rank == 0:
            exp.check_rerun(allow_mixed)  # finished tasks trained on other threads or kernels: refused
            run.create(cfg, shared=bool(shard))
            exp.settle_conv_step()
            setup_logging(run.path, rank, verbose=not quiet, name=shard[1] if shard else None)
            log.info(size_line(exp))  # the run's first line: an absurd network is seen before it trains
            if exp.conv_step_line():
                log.info(exp.conv_step_line())
            if shard:
                check_finished(run)

    def shared():  # the others read what rank 0 writes there
        if comm.rank != 0:
            run.check_seen(cfg)

    agree(comm, refuse_early)
    exp = agree(comm, build)
    # A CPU conv net's step form (parallel.conv_step): rank 0 chooses it (recorded, cached, or timed while the
    # others wait), records it in the directory, and every rank trains in it, so that replicas agree bit for
    # bit and a run does not mix forms.
    agree(comm, lambda: exp.choose_conv_step() if comm.rank == 0 else None)
    agree(comm, create)
    form = exp.trainer.conv_step if comm.rank == 0 else None
    exp.trainer.use_conv_step(comm.bcast(form) if comm.size > 1 else form)
    agree(comm, shared)
    if comm.rank != 0:
        setup_logging(run.path, rank, verbose=False)
    return exp


def size_line(exp) -> str:
    """The model this run trains: its parameter count and the memory of its weights and optimizer slots."""
    from ..describe import memory_line

    return f"{exp.cfg.model.name} on {exp.cfg.data.dataset} {exp.data.input_shape}: " + memory_line(
        exp.cfg, exp.model.count_params(), sum(exp.sizes.values()))


def make_parent(exp, comm, records: list | None = None, poll=None) -> bool:
    """Rank 0 trains the dense parent (or loads it), all ranks data-parallel where parallel.parent_data_parallel
    resolves so (scheduling.use_parent_data_parallel). Otherwise the others train meanwhile the tasks that read
    only a parent checkpoint (kinds.early_graph: the dense stability pairs), each once rank 0 has written its
    checkpoint to a file of its own, until the parent ends (train_early; their records are appended to
    `records`), or, without such tasks, compile. Then every rank reads its checkpoints. Returns what the
    setting resolved to, for the provenance."""
    from ..models import has_convolutions
    from .scheduling import use_parent_data_parallel

    rank, size = comm.rank, comm.size
    setting = exp.cfg.parallel.parent_data_parallel
    data_parallel = use_parent_data_parallel(setting, has_convolutions(exp.trainer.model), size)
    early = []  # with one rank, or every rank on the parent, nobody is idle: the order of today
    if size > 1 and not data_parallel and not exp.parent_done():
        early = kinds.early_graph(exp).early()
    if rank == 0 and size > 1 and not exp.parent_done():
        why = (": parallel.parent_data_parallel = auto keeps a model without convolutions on one rank (its ~1 ms steps "
               "are shorter than an Allreduce); set it to true to force it") if setting == "auto" else ""
        log.info(f"parent trained data-parallel over {size} ranks" if data_parallel else f"parent trained on rank 0{why}")
        if early:
            log.info("%d tasks that need only a parent checkpoint go to ranks 1-%d while it trains", len(early), size - 1)
    if data_parallel and not exp.parent_done():
        exp.trainer.set_reducer(comm.reducer())
        exp.train_parent(write=(rank == 0))
        exp.trainer.set_reducer(None)
    elif rank == 0:
        exp.train_parent(early={t.checkpoint for t in early})
    elif early:
        got = train_early(exp, comm, early, poll)
        if records is not None:
            records += got
    else:
        exp.trainer.warm_up()  # compile while rank 0 trains the parent, not in the first task
    comm.barrier()
    if rank == 0:
        exp.run.remove_checkpoints()  # parent.h5 holds them all, and no rank reads them any more
    if rank != 0 or exp.checkpoints is None:
        exp.load_parent()
    return data_parallel


def train_early(exp, comm, early: list, poll=None) -> list:
    """A rank idle while rank 0 trains the parent (ranks 1..P-1): its share of `early` (Graph.early(): tasks that
    read only a parent checkpoint, by checkpoint then priority; dealt round-robin over the idle ranks, so each
    rank knows its share without a message), each started once its checkpoint file is complete on disk. Stops
    at the parent's end (parent.h5 written): what is left goes to the task graph, like any task not done. A
    task's result does not depend on when or where it runs; one already done (a rerun) is skipped."""
    records = []
    for task in early[comm.rank - 1::comm.size - 1]:
        while not (exp.run.checkpoint_done(task.checkpoint) or exp.parent_done()):
            if poll:
                poll()
            time.sleep(0.02)
        if exp.parent_done():
            break
        if os.path.exists(exp.run.task_path(task.id)):
            continue
        exp.load_checkpoint(task.checkpoint)
        records.append(run_one(exp, task, poll=poll))
    return records


def make_masks(exp, comm):
    """Rank 0 cuts the masks from the parent's final weights (or loads them); the others read them."""
    if comm.rank == 0:
        exp.compute_masks()
    comm.barrier()
    if comm.rank != 0:
        exp.load_masks()


def run_one(exp, task, write: bool = True, poll=None) -> dict:
    """Run one task of any kind (a rank's unit of work), with the fault hooks and a DEBUG line "task <id> done
    in". The record says when it ran and on which rank."""
    t0, m0 = time.time(), time.monotonic()
    fault = faults.FAULT
    fault.task_started()

    def progress(n):
        fault.in_task(exp)
        if poll:
            poll()

    attrs = kinds.run_task(exp, task, progress=progress, write=write)
    log.debug("task %s done in %.1f s (early-stop accuracy %.4f)", task.id, time.monotonic() - m0,
              attrs.get("early_stop_accuracy", float("nan")))
    if poll:
        poll()
    return dict(task_id=task.id, rank=exp.rank, start=t0, end=time.time())


def merge(run: RunDir, graph_ids: list[str], deps: dict, timing: dict, provenance: dict, during=None) -> str:
    """results.h5 from the task files of the graph (ids in graph order, task id -> its dependencies)."""
    from ..results import merge as merge_files

    return merge_files(run, graph_ids, timing, provenance, during=during, deps=deps)
