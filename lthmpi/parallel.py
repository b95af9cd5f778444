"""The MPI coordinator: the only module that imports mpi4py.

Rank 0 validates the run directory, trains (or loads) the parent and cuts the masks; the other ranks
read both from the run directory once. The task list is then split by a scheduler (static, lpt) or
handed out on request (dynamic); every rank, rank 0 included, trains. With more ranks than units of
work, ranks form data-parallel subgroups (comm.Split) whose members average gradients with Allreduce.
Any exception on any rank ends the whole job with MPI Abort after one line naming the rank and error.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from .config import Config
from .driver import PhaseTimer, progress_bar, setup_logging
from .schedule import assign_lpt, assign_static, groups_for
from .store import RunDir

log = logging.getLogger("lthmpi")

TAG_REQUEST, TAG_TASK = 11, 12


class MpiReducer:
    """Sums a flat gradient buffer over a subgroup with one Allreduce per step."""

    def __init__(self, comm):
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        return out

    def all_equal(self, value) -> bool:
        return len(set(self.comm.allgather(value))) == 1


class HorovodReducer:
    """Horovod as the gradient-averaging backend, where it is installed (it is not on TF >= 2.16)."""

    def __init__(self, comm):
        try:
            import horovod.tensorflow as hvd
        except ImportError:
            from .config import ConfigError
            raise ConfigError("parallel.backend = 'horovod' but Horovod is not installed "
                              "(it builds only with TF 2.12 + Keras 2; use backend = 'mpi4py')") from None
        hvd.init(comm=comm)
        self.hvd, self.size, self.rank = hvd, hvd.size(), hvd.rank()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return self.hvd.allreduce(buf, op=self.hvd.Sum).numpy()

    def all_equal(self, value) -> bool:
        return len(set(self.hvd.allgather_object(value))) == 1


def make_reducer(cfg: Config, comm):
    return HorovodReducer(comm) if cfg.parallel.backend == "horovod" else MpiReducer(comm)


def _abort(comm, rank: int, host: str, e: BaseException):
    """One line on stderr naming the rank and the error (traceback in the rank's log), then end every rank."""
    from .main import is_user_error

    log.error("rank %d failed", rank, exc_info=e)
    where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
    detail = f"{e}" if is_user_error(e) else f"{type(e).__name__}: {e}" + (f" (traceback in {where})" if where else "")
    print(f"lthmpi: error: rank {rank} on {host} failed: {detail}", file=sys.stderr, flush=True)
    comm.Abort(2 if is_user_error(e) else 1)


def run_parallel(cfg: Config, run_dir: str, t_start: float, quiet: bool = False) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = MPI.Get_processor_name()
    try:
        return _run(cfg, run_dir, t_start, quiet, comm, rank, size, host)
    except BaseException as e:  # noqa: BLE001 - one failing rank must end every rank
        if size == 1:
            raise
        _abort(comm, rank, host, e)
        return 1


def _run(cfg, run_dir, t_start, quiet, comm, rank, size, host) -> int:
    from mpi4py import MPI

    from .results import merge, provenance
    from .runtime import auto_threads, configure_tensorflow

    global _fault
    _fault = FaultInjection(rank)
    t_start = comm.bcast(t_start, root=0)
    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    threads = auto_threads(local.Get_size(), cfg.parallel.threads)
    local.Free()
    with timer.phase("startup"):
        error = None
        if rank == 0:
            try:
                run.create(cfg)
            except Exception as e:  # noqa: BLE001 - a user error is reported once, by rank 0
                error = e
        error = comm.bcast(error, root=0)
        if error is not None:
            if rank == 0:
                raise error
            return 2
        setup_logging(run.path, rank, verbose=(rank == 0 and not quiet))
        configure_tensorflow(threads)
        from .experiment import Experiment

        exp = Experiment(cfg, run.path, rank=rank)
        comm.Barrier()
    log.info("%d ranks, %d TF threads per rank, hosts %s", size, threads, sorted(set(comm.allgather(host))))

    with timer.phase("parent"):
        if cfg.parallel.parent_data_parallel and size > 1 and not exp.parent_done():
            exp.trainer.set_reducer(make_reducer(cfg, comm))
            exp.train_parent(write=(rank == 0))
            exp.trainer.set_reducer(None)
        elif rank == 0:
            exp.train_parent()
        comm.Barrier()
        if rank != 0 or exp.checkpoints is None:
            exp.load_parent()
    with timer.phase("masks"):
        if rank == 0:
            exp.compute_masks()
        comm.Barrier()
        if rank != 0:
            exp.load_masks()

    with timer.phase("distribution"):
        tasks = exp.tasks()
        todo = [t for t in tasks if not exp.is_done(t)]
        schedule = cfg.parallel.schedule
        units = len(cfg.remaining_fractions()) if schedule == "static" else len(todo)
        colors = groups_for(size, max(1, units)) if cfg.parallel.subgroups else list(range(size))
        group = comm.Split(colors[rank], rank)
        leaders = [r for r in range(size) if colors[r] != (colors[r - 1] if r else -1)]
        is_leader = group.Get_rank() == 0
        n_workers = len(leaders)
        if group.Get_size() > 1:
            exp.trainer.set_reducer(make_reducer(cfg, group))
        mine: list = []
        if schedule != "dynamic":
            plan = None
            if rank == 0:
                costs = [exp.cost(t) for t in todo]
                plan = (assign_static(todo, n_workers) if schedule == "static"
                        else assign_lpt(todo, costs, n_workers))
                plan = [[(t.mask, t.reset, t.control) for t in lst] for lst in plan]
            plan = comm.bcast(plan, root=0)
            mine = [type(tasks[0])(*x) for x in plan[colors[rank]]] if todo else []
        if rank == 0:
            idle = n_workers - (len(todo) if schedule == "dynamic" else sum(1 for lst in (plan or []) if lst))
            if len(tasks) != len(todo):
                log.info("resuming: %d of %d tasks already complete on disk", len(tasks) - len(todo), len(tasks))
            groups = (f"data-parallel subgroups of {sorted({colors.count(c) for c in set(colors)})} ranks"
                      if n_workers != size else "one rank each")
            log.info("%s schedule: %d tasks over %d workers (%s)%s", schedule, len(todo), n_workers, groups,
                     f"; {idle} workers have no task and wait" if idle > 0 else "")

    records = []
    with timer.phase("training"):
        bar = progress_bar(len(tasks), "retrainings", enabled=(rank == 0 and not quiet))
        bar.update(len(tasks) - len(todo))
        watch = _DiskProgress(run, bar, len(tasks) - len(todo)) if rank == 0 else None
        poll = watch.poll if watch else None
        if schedule == "dynamic":
            records = _dynamic(exp, comm, group, rank, colors, leaders, todo, poll)
        else:
            for task in mine:
                records.append(_run_one(exp, task, is_leader, poll))
        if watch:
            comm.Barrier()
            watch.finish(len(tasks))
        else:
            comm.Barrier()
        bar.close()
        group.Free()

    with timer.phase("gather"):
        gathered = comm.gather(records, root=0)
        hosts = comm.gather(host, root=0)
    if rank != 0:
        return 0
    flat = [r for lst in gathered for r in lst]
    missing = [t.id for t in tasks if not exp.is_done(t)]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks have no result after training (first: {missing[0]})")
    log.info("gathered %d new task results from %d ranks", len({r["task_id"] for r in flat}), size)
    timing = timer.as_attrs()
    prov = provenance(size, hosts, threads, MPI.Get_library_version().splitlines()[0].strip())
    prov.update(schedule=schedule, subgroups=n_workers != size, workers=n_workers)
    path = merge(run, [t.id for t in tasks], timing, prov)
    if not quiet:
        from .results import format_table, load

        print(format_table(load(path)))
    print(f"results: {path}")
    return 0


class FaultInjection:
    """For the fault tests: LTHMPI_FAULT=KIND:RANK:N makes rank RANK fail in its N-th task (1-based),
    after its first training block; KIND is `raise` (an exception) or `kill` (SIGKILL, as a dead node)."""

    def __init__(self, rank: int):
        spec = os.environ.get("LTHMPI_FAULT", "")
        self.kind, self.rank, self.nth, self.count = None, -1, 0, 0
        if spec:
            kind, r, n = spec.split(":")
            if kind not in ("raise", "kill"):
                raise ValueError(f"LTHMPI_FAULT kind {kind!r} must be raise or kill")
            self.kind, self.rank, self.nth = kind, int(r), int(n)
        self.active = self.kind is not None and self.rank == rank

    def task_started(self):
        self.count += 1

    def check(self):
        if self.active and self.count == self.nth:
            if self.kind == "kill":
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault in task {self.count}")


_fault: FaultInjection | None = None


def _run_one(exp, task, write: bool, poll) -> dict:
    t0 = time.time()
    fault = _fault or FaultInjection(-1)
    fault.task_started()

    def progress(n):
        fault.check()
        if poll:
            poll()

    attrs = exp.run_task(task, progress=progress, write=write)
    log.debug("task %s done in %.1f s (early-stop accuracy %.4f)", task.id, time.time() - t0,
             attrs.get("early_stop_accuracy", float("nan")))
    if poll:
        poll()
    return dict(task_id=task.id, rank=exp.rank, start=t0, end=time.time())


def _dynamic(exp, comm, group, rank, colors, leaders, todo, poll) -> list:
    """Rank 0 hands out tasks, longest first, between its own training steps; a subgroup asks via its leader."""
    records = []
    queue = sorted(todo, key=lambda t: (-exp.cost(t), t.id))
    is_leader = group.Get_rank() == 0
    if rank == 0:
        stopped = 0
        others = [r for r in leaders if r != 0]

        def serve():
            nonlocal stopped
            from mpi4py import MPI
            status = MPI.Status()
            while comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
                src = status.Get_source()
                comm.recv(source=src, tag=TAG_REQUEST)
                task = queue.pop(0) if queue else None
                comm.send(None if task is None else (task.mask, task.reset, task.control), dest=src, tag=TAG_TASK)
                stopped += task is None

        def serve_and_poll():
            serve()
            if poll:
                poll()

        while True:
            serve()
            task = queue.pop(0) if queue else None
            task = group.bcast(task, root=0) if group.Get_size() > 1 else task
            if task is None:
                break
            records.append(_run_one(exp, task, is_leader, serve_and_poll))
        while stopped < len(others):
            serve_and_poll()
            time.sleep(0.05)
        return records
    while True:
        if is_leader:
            comm.send(None, dest=0, tag=TAG_REQUEST)
            got = comm.recv(source=0, tag=TAG_TASK)
            task = None if got is None else type(todo[0])(*got)
        else:
            task = None
        if group.Get_size() > 1:
            task = group.bcast(task, root=0)
        if task is None:
            return records
        records.append(_run_one(exp, task, is_leader, None))


class _DiskProgress:
    """Rank 0's progress bar counts finished task files on disk: no messages between ranks."""

    def __init__(self, run: RunDir, bar, done: int):
        self.run, self.bar, self.shown, self.last = run, bar, done, 0.0

    def poll(self):
        now = time.time()
        if now - self.last < 2.0:
            return
        self.last = now
        self.finish(len(self.run.done_tasks()))

    def finish(self, done: int):
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done
