"""The MPI coordinator: the only module that imports mpi4py.

Rank 0 validates the run directory, trains (or loads) the parent and cuts the masks; the other ranks
read both from the run directory once. The task list is then split by a scheduler (static, lpt) or
handed out on request (dynamic); every rank, rank 0 included, trains. With more ranks than units of
work, ranks form data-parallel subgroups (comm.Split) whose members average gradients with Allreduce.
Any exception on any rank ends the whole job with MPI Abort after one line naming the rank and error;
an error at the start that every rank sees alike (bad data, unknown model) is said once by rank 0 and all
ranks exit cleanly. SIGTERM or SIGINT (a scheduler's time limit, Ctrl-C; mpirun forwards both) makes
every rank unwind, dropping its task in flight, and exit 128 + signal number.
Ranks that wait (for the parent, for the others) sleep between polls instead of spinning in MPI, so that
the waiting ranks of an oversubscribed host leave its cores to the ranks that train, and a signal is
handled while waiting.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from .config import Config, ConfigError
from .driver import PhaseTimer, check_finished, progress_bar, run_one, set_fault, setup_logging
from .schedule import assign_lpt, assign_static, groups_for, use_subgroups
from .store import RunDir

log = logging.getLogger("lthmpi")

TAG_REQUEST, TAG_TASK = 11, 12
POLL_S = 0.01  # sleep between tests of a pending barrier or message
STOP_GRACE_S = 15.0  # interrupted: how long a rank waits for the others to stop before it aborts them


def _wait(comm):
    """A barrier that sleeps while it waits (a blocking MPICH Barrier spins a core and defers signals)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(POLL_S)


def _recv(comm, source: int, tag: int):
    req = comm.irecv(source=source, tag=tag)
    while True:
        done, msg = req.test()
        if done:
            return msg
        time.sleep(POLL_S / 2)


class _StartupFailed(Exception):
    """Every rank knows the start failed and rank 0 has said why: exit with `code`, no Abort."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _agree(comm, rank: int, host: str, fn):
    """Run fn() on every rank; if it fails on any, rank 0 prints one line and every rank raises _StartupFailed."""
    from .main import describe_error

    try:
        value, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - reported once, below
        value = None
        line, code, bug = describe_error(e)
        if bug:
            import traceback

            traceback.print_exc()
        failure = (rank, host, line, code)
    _wait(comm)  # sleep, not spin, while the slowest rank finishes
    failures = [f for f in comm.allgather(failure) if f is not None]
    if not failures:
        return value
    if rank == 0:
        r, h, line, code = failures[0]
        same = len(failures) == comm.Get_size() and len({f[2] for f in failures}) == 1
        print(f"lthmpi: error: {line}" if same else f"lthmpi: error: rank {r} on {h}: {line}", file=sys.stderr,
              flush=True)
    raise _StartupFailed(max(f[3] for f in failures))


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
    from .main import describe_error

    log.error("rank %d failed", rank, exc_info=e)
    line, code, bug = describe_error(e)
    where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
    if bug and where:
        line += f" (traceback in {where})"
    print(f"lthmpi: error: rank {rank} on {host} failed: {line}", file=sys.stderr, flush=True)
    time.sleep(1.0)  # let mpirun forward the line: MPI_Abort kills the forwarding proxies at once
    comm.Abort(code)


def _stop(comm, stop_comm, rank: int, e: KeyboardInterrupt):
    """Interrupted (SIGTERM, SIGINT): this rank has unwound (its task in flight dropped, temporaries removed).
    If every rank stops within STOP_GRACE_S, exit together; else abort the ranks that did not hear it."""
    from .main import interrupt_code, interrupt_line

    code = interrupt_code(e)
    log.warning("rank %d interrupted (%s); its task in flight is dropped", rank, interrupt_line(e))
    req = stop_comm.Ibarrier()  # its own communicator: cannot match a barrier pending on COMM_WORLD
    deadline = time.time() + STOP_GRACE_S
    while not req.Test():
        if time.time() > deadline:
            print(f"lthmpi: rank {rank} interrupted, the others did not stop; aborting them", file=sys.stderr,
                  flush=True)
            comm.Abort(code)
        time.sleep(POLL_S)
    if rank == 0:
        print(f"lthmpi: {interrupt_line(e)}; finished tasks are on disk, rerun the same command to resume",
              file=sys.stderr, flush=True)
    req = stop_comm.Ibarrier()  # no rank exits (which makes mpirun kill the rest) before rank 0 has said it
    deadline = time.time() + STOP_GRACE_S
    while not req.Test() and time.time() < deadline:
        time.sleep(POLL_S)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not MPI_Finalize: requests interrupted mid-wait are still pending


def _same_config(comm, rank: int, host: str, resolve):
    """The config every rank resolved itself; a rank that cannot read it, or reads another one, is named."""
    cfg = _agree(comm, rank, host, resolve)
    texts = comm.allgather(cfg.to_toml())

    def compare():
        if texts[rank] != texts[0]:
            raise ConfigError(f"this rank resolved another config than rank 0 (a config file that differs "
                              f"between hosts?): give every rank the same --config and --set")

    _agree(comm, rank, host, compare)
    return cfg


def run_parallel(resolve, run_dir: str | None, t_start: float, quiet: bool = False, allow_mixed: bool = False) -> int:
    """The MPI entry point: `resolve()` gives the Config (every rank calls it); run_dir None = the default."""
    from mpi4py import MPI

    from .main import default_run_dir

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = MPI.Get_processor_name()
    stop_comm = comm.Dup()
    try:
        cfg = _same_config(comm, rank, host, resolve)
        run_dir = run_dir or default_run_dir(cfg)
        return _run(cfg, run_dir, t_start, quiet, comm, rank, size, host, allow_mixed)
    except _StartupFailed as e:
        return e.code
    except KeyboardInterrupt as e:
        if size == 1:
            raise
        _stop(comm, stop_comm, rank, e)
        return 1
    except BaseException as e:  # noqa: BLE001 - one failing rank must end every rank
        if size == 1:
            raise
        _abort(comm, rank, host, e)
        return 1
    finally:
        if run_dir:
            RunDir(run_dir).unlock()


def _run(cfg, run_dir, t_start, quiet, comm, rank, size, host, allow_mixed=False) -> int:
    from mpi4py import MPI

    from .devices import NodeSlot
    from .results import merge, provenance
    from .runtime import auto_threads

    fault = set_fault(rank)
    t_start = comm.bcast(t_start, root=0)
    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    threads = auto_threads(local.Get_size(), cfg.parallel.threads)
    slot = NodeSlot(local.Get_rank(), local.Get_size(), tuple(local.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))))
    local.Free()
    with timer.phase("startup"):
        def refuse_early():  # another experiment's directory, or one in use: before seconds of imports
            if rank == 0 and os.path.exists(run.config_path):
                run.check_config(cfg)
                run.lock()
                check_finished(run)  # a damaged task file, named now rather than at the merge

        def build():
            from .experiment import Experiment

            if cfg.imp and size > 1:  # until the task-graph coordinator (issue 19) runs the chains in order
                raise ConfigError("prune.method = \"imp\" runs on one process for now (its chains need the task-"
                                  "graph coordinator): run it without mpirun")

            return Experiment(cfg, run.path, rank=rank, threads=threads, slot=slot)

        def create():  # only once the data and model are known good: no config.toml a rerun would trip on
            if rank == 0:
                exp.check_rerun(allow_mixed)
                run.create(cfg)
                setup_logging(run.path, rank, verbose=not quiet)

        def shared():  # the others read what rank 0 writes there
            if rank != 0:
                run.check_seen(cfg)

        _agree(comm, rank, host, refuse_early)
        exp = _agree(comm, rank, host, build)
        _agree(comm, rank, host, create)
        _agree(comm, rank, host, shared)
        if rank != 0:
            setup_logging(run.path, rank, verbose=False)
    log.info("%d ranks, %d TF threads per rank, hosts %s", size, threads, sorted(set(comm.allgather(host))))

    with timer.phase("parent"):
        if cfg.parallel.parent_data_parallel and size > 1 and not exp.parent_done():
            exp.trainer.set_reducer(make_reducer(cfg, comm))
            exp.train_parent(write=(rank == 0))
            exp.trainer.set_reducer(None)
        elif rank == 0:
            exp.train_parent()
        else:
            exp.trainer.warm_up()  # compile while rank 0 trains the parent, not in the first task
        _wait(comm)
        if rank != 0 or exp.checkpoints is None:
            exp.load_parent()
    with timer.phase("masks"):
        if rank == 0:
            exp.compute_masks()
        _wait(comm)
        if rank != 0:
            exp.load_masks()

    with timer.phase("distribution"):
        tasks = exp.tasks()
        todo = [t for t in tasks if not exp.is_done(t)]
        schedule = cfg.parallel.schedule
        units = len(cfg.remaining_fractions()) if schedule == "static" else len(todo)
        from .models import has_convolutions

        split = size > units and use_subgroups(cfg.parallel.subgroups, has_convolutions(exp.trainer.model))
        colors = groups_for(size, max(1, units)) if split else list(range(size))
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
            if schedule == "dynamic":
                idle, who = max(0, n_workers - len(todo)), ""
            else:
                empty = [leaders[i] for i, lst in enumerate(plan or []) if not lst]
                idle, who = len(empty), " (ranks " + ", ".join(map(str, empty)) + ")"
            if len(tasks) != len(todo):
                log.info("resuming: %d of %d tasks already complete on disk", len(tasks) - len(todo), len(tasks))
            groups = (f"data-parallel subgroups of {sorted({colors.count(c) for c in set(colors)})} ranks"
                      if n_workers != size else "one rank each")
            log.info("%s schedule: %d tasks over %d workers (%s)%s", schedule, len(todo), n_workers, groups,
                     f"; {idle} workers have no task and wait{who}" if idle > 0 else "")
            if size > units and not split and cfg.parallel.subgroups == "auto":
                log.info("parallel.subgroups = auto: no data-parallel subgroups for a model without convolutions "
                         "(its ~1 ms steps are shorter than a subgroup's Allreduce); set it to true to force them")
        if schedule != "dynamic" and is_leader and not mine:
            log.info("rank %d has no task; it waits for the others", rank)

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
                records.append(run_one(exp, task, is_leader, poll))
        _wait(comm)
        if watch:
            watch.finish(len(tasks))
        bar.close()
        group.Free()

    with timer.phase("gather"):
        if rank == 0:
            fault.at("gather")
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
    path = merge(run, [t.id for t in tasks], timing, prov, during=lambda: fault.at("merge"))
    if not quiet:
        from .results import format_table, load

        print(format_table(load(path)))
    print(f"results: {path}")
    return 0


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
            records.append(run_one(exp, task, is_leader, serve_and_poll))
        while stopped < len(others):
            serve_and_poll()
            time.sleep(0.05)
        return records
    while True:
        if is_leader:
            comm.send(None, dest=0, tag=TAG_REQUEST)
            got = _recv(comm, 0, TAG_TASK)
            task = None if got is None else type(todo[0])(*got)
        else:
            task = None
        if group.Get_size() > 1:
            task = group.bcast(task, root=0)
        if task is None:
            return records
        records.append(run_one(exp, task, is_leader, None))


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


class WorldComm:
    """COMM_WORLD for the jobs outside the coordinator (`python -m lthmpi.data prepare` under mpirun): rank,
    size, bcast and allgather from rank 0's view, and barriers that poll, so that a SIGTERM arriving while a
    rank waits is raised in Python and the rank unwinds (removing its temporary files)."""

    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._stop = self.comm.Dup()  # settle()'s own communicator: cannot match a pending barrier

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    @staticmethod
    def _wait(req, deadline: float = float("inf")) -> bool:
        while not req.Test():
            if time.time() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def barrier(self):
        self._wait(self.comm.Ibarrier())

    def settle(self, seconds: float = STOP_GRACE_S) -> bool:
        """Interrupted: wait (at most `seconds`) until every rank has unwound, so that no rank's exit makes
        mpirun kill another still cleaning up. True when all arrived."""
        return self._wait(self._stop.Ibarrier(), time.time() + seconds)

    def abort(self, code: int):
        time.sleep(1.0)  # let mpirun forward the rank's last line first
        self.comm.Abort(code)


def world_comm() -> WorldComm:
    return WorldComm()
