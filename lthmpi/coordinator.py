"""The phases of a run, written once over a communicator (lthmpi.comm): one process or P MPI ranks.

    check + lock -> build -> parent -> masks -> graph of tasks -> gather -> merge

Rank 0 refuses a wrong or busy run directory before any work, trains (or loads) the parent and cuts the
masks; the other ranks read both from the run directory. Every enabled experiment kind (lthmpi/kinds/)
contributes tasks to one graph; a scheduler runs only ready tasks: `static` and `lpt` plan per-rank lists
(each task waits until its dependencies' files are on disk), `dynamic` hands ready tasks out on request,
critical path first. Every rank, rank 0 included, trains. With more ranks than units of work, ranks form
data-parallel subgroups whose members average gradients over their own communicator.

Under `dynamic`, rank 0 answers requests from a thread of its own (where the MPI library allows threads), so
a worker that finishes a task gets its next one at once instead of waiting for rank 0's training block.

Failures: an error at the start that every rank sees alike (bad data, unknown model) is said once by rank 0
and every rank exits cleanly; any later exception on any rank ends the whole job (abort) after one line
naming the rank. SIGTERM or SIGINT (mpirun forwards both) makes every rank unwind, dropping its task in
flight, and exit 128 + signal number. With one rank, exceptions and interrupts propagate to the caller.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

from . import faults, kinds
from .comm import SelfComm
from .config import Config, ConfigError
from .errors import describe_error, interrupt_code, interrupt_line, report_error, resume_line
from .schedule import groups_for, plan, use_subgroups
from .store import RunDir

log = logging.getLogger("lthmpi")

TAG_REQUEST, TAG_TASK = 11, 12
POLL_S = 0.01  # sleep between polls of the disk, a message or a thread
STOP_GRACE_S = 15.0  # interrupted: how long a rank waits for the others to stop before it aborts them


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


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


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


# -- agreeing on the start ------------------------------------------------------------------------------

class _StartupFailed(Exception):
    """Every rank knows the start failed and rank 0 has said why: exit with `code`, no abort."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def agree(comm, fn):
    """Run fn() on every rank; if it fails on any, rank 0 prints one line and every rank raises _StartupFailed.
    One rank alone: fn's exception propagates (the caller reports it)."""
    if comm.size == 1:
        return fn()
    try:
        value, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - reported once, below
        value = None
        line, code, bug = describe_error(e)
        if bug:
            import traceback

            traceback.print_exc()
        failure = (comm.rank, comm.host, line, code)
    comm.barrier()  # sleep, not spin, while the slowest rank finishes
    failures = [f for f in comm.allgather(failure) if f is not None]
    if not failures:
        return value
    if comm.rank == 0:
        r, h, line, code = failures[0]
        same = len(failures) == comm.size and len({f[2] for f in failures}) == 1
        print(f"lthmpi: error: {line}" if same else f"lthmpi: error: rank {r} on {h}: {line}", file=sys.stderr,
              flush=True)
    raise _StartupFailed(max(f[3] for f in failures))


def same_config(comm, resolve) -> Config:
    """The config every rank resolved itself; a rank that cannot read it, or reads another one, is named."""
    cfg = agree(comm, resolve)
    if comm.size == 1:
        return cfg
    texts = comm.allgather(cfg.to_toml())

    def compare():
        if texts[comm.rank] != texts[0]:
            raise ConfigError("this rank resolved another config than rank 0 (a config file that differs "
                              "between hosts?): give every rank the same --config and --set")

    agree(comm, compare)
    return cfg


def _abort(comm, e: BaseException):
    """One line on stderr naming the rank and the error (traceback in the rank's log), then end every rank."""
    log.error("rank %d failed", comm.rank, exc_info=e)
    line, code, bug = describe_error(e)
    where = next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)
    if bug and where:
        line += f" (traceback in {where})"
    print(f"lthmpi: error: rank {comm.rank} on {comm.host} failed: {line}", file=sys.stderr, flush=True)
    comm.abort(code)


# -- entry points ---------------------------------------------------------------------------------------

def main(resolve, run_dir: str | None, t_start: float, quiet: bool = False, comm=None,
         allow_mixed: bool = False) -> int:
    """The command line's entry: `resolve()` gives the Config (every rank calls it); run_dir None = the
    default. `comm` None = one process, no MPI. Prints the table and the results path on rank 0.
    `allow_mixed`: resume a directory whose tasks ran on other threads or kernels (Experiment.check_rerun)."""
    comm = comm or SelfComm()
    try:
        cfg = same_config(comm, resolve)
        run_dir = run_dir or default_run_dir(cfg)
        path = execute(cfg, run_dir, comm, t_start, quiet, allow_mixed=allow_mixed)
        if comm.rank == 0:
            if not quiet:
                from .results import format_table, load

                print(format_table(load(path)))
            print(f"results: {path}")
        return 0
    except _StartupFailed as e:
        return e.code
    except KeyboardInterrupt as e:
        if comm.size == 1:
            raise
        log.warning("rank %d interrupted (%s); its task in flight is dropped", comm.rank, interrupt_line(e))
        line = resume_line(e)
        comm.stop_together(interrupt_code(e), STOP_GRACE_S, lambda: print(line, file=sys.stderr, flush=True))
        return 1
    except Exception as e:  # noqa: BLE001 - one rank alone reports it; one failing rank of many ends every rank
        if comm.size == 1:
            return report_error(e)
        _abort(comm, e)
        return 1
    except BaseException as e:  # noqa: BLE001
        if comm.size > 1:
            _abort(comm, e)
        raise
    finally:
        if run_dir:
            RunDir(run_dir).unlock()


def run_serial(cfg: Config, run_dir: str, threads: int, t_start: float | None = None, quiet: bool = False,
               allow_mixed: bool = False) -> str:
    """The whole run in this process (tests, notebooks): returns the results path; errors propagate."""
    try:
        return execute(cfg, run_dir, SelfComm(), t_start, quiet, threads, allow_mixed)
    finally:
        RunDir(run_dir).unlock()


def execute(cfg: Config, run_dir: str, comm, t_start: float | None, quiet: bool, threads: int | None = None,
            allow_mixed: bool = False):
    """The phases, once. Returns the results path on rank 0, None on the others."""
    from .runtime import auto_threads

    rank, size = comm.rank, comm.size
    fault = faults.set_fault(rank)
    t_start = comm.bcast(t_start, root=0)
    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    slot = comm.node_slot()
    if threads is None:
        threads = auto_threads(slot.local_size if slot else 1, cfg.parallel.threads)
    with timer.phase("startup"):
        def refuse_early():  # another experiment's directory, or one in use: before seconds of imports
            if rank == 0 and os.path.exists(run.config_path):
                run.check_config(cfg)
                run.lock()
                check_finished(run)  # a damaged task file, named now rather than at the merge

        def build():
            # Read the data and build the model before the directory is made: a config that fails there
            # (unknown model, missing data, reset point past the end) must not leave a config.toml that
            # would refuse the corrected rerun in the same --run-dir.
            from .experiment import Experiment

            return Experiment(cfg, run.path, rank=rank, threads=threads, slot=slot)

        def create():
            if rank == 0:
                exp.check_rerun(allow_mixed)  # finished tasks trained on other threads or kernels: refused
                run.create(cfg)
                setup_logging(run.path, rank, verbose=not quiet)

        def shared():  # the others read what rank 0 writes there
            if rank != 0:
                run.check_seen(cfg)

        agree(comm, refuse_early)
        exp = agree(comm, build)
        agree(comm, create)
        agree(comm, shared)
        if rank != 0:
            setup_logging(run.path, rank, verbose=False)
    if size > 1:
        log.info("%d ranks, %d TF threads per rank, hosts %s", size, threads, sorted(set(comm.allgather(comm.host))))

    with timer.phase("parent"):
        if cfg.parallel.parent_data_parallel and size > 1 and not exp.parent_done():
            exp.trainer.set_reducer(comm.reducer())
            exp.train_parent(write=(rank == 0))
            exp.trainer.set_reducer(None)
        elif rank == 0:
            exp.train_parent()
        else:
            exp.trainer.warm_up()  # compile while rank 0 trains the parent, not in the first task
        comm.barrier()
        if rank != 0 or exp.checkpoints is None:
            exp.load_parent()
    with timer.phase("masks"):
        if rank == 0:
            exp.compute_masks()
        comm.barrier()
        if rank != 0:
            exp.load_masks()

    with timer.phase("distribution"):
        graph = kinds.build_graph(exp)
        done = {t.id for t in graph.tasks if os.path.exists(run.task_path(t.id))}
        todo = [t for t in graph.tasks if t.id not in done]
        schedule = cfg.parallel.schedule
        layout = _Layout(comm, exp, graph, todo, done, schedule)
        mine = layout.plan_for_me(graph, todo) if schedule != "dynamic" else []
        if rank == 0:
            layout.say(graph, todo, done)
        if schedule != "dynamic" and layout.is_leader and not mine:
            log.info("rank %d has no task; it waits for the others", rank)

    records = []
    with timer.phase("training"):
        bar = progress_bar(len(graph), "retrainings", enabled=(rank == 0 and not quiet))
        bar.update(len(done))
        watch = _DiskProgress(run, bar, len(done)) if rank == 0 else None
        poll = watch.poll if watch else None
        if schedule == "dynamic":
            records = _dynamic(exp, comm, layout, graph, todo, done, poll)
        else:
            for task in mine:
                _wait_for_inputs(run, task, poll)
                records.append(run_one(exp, task, layout.is_leader, poll))
        comm.barrier()
        if watch:
            watch.finish(len(graph))
        bar.close()
        layout.close()

    with timer.phase("gather"):
        if rank == 0:
            fault.at("gather")
        gathered = comm.gather(records, root=0)
        hosts = comm.gather(comm.host, root=0)
    if rank != 0:
        return None
    flat = [r for lst in gathered for r in lst]
    missing = [t.id for t in graph.tasks if not os.path.exists(run.task_path(t.id))]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks have no result after training (first: {missing[0]})")
    if size > 1:
        log.info("gathered %d new task results from %d ranks", len({r["task_id"] for r in flat}), size)
    from .results import merge, provenance

    prov = provenance(size, hosts, threads, comm.library())
    prov.update(schedule=schedule, subgroups=layout.n_workers != size, workers=layout.n_workers)
    return merge(run, [t.id for t in graph.tasks], timer.as_attrs(), prov, during=lambda: fault.at("merge"),
                 deps={t.id: t.deps for t in graph.tasks if t.deps})


class _Layout:
    """Who trains: one worker per rank, or data-parallel subgroups (a worker = a subgroup, led by its lowest
    rank) when ranks outnumber the units of work that can run at once."""

    def __init__(self, comm, exp, graph, todo, done, schedule):
        from .models import has_convolutions

        self.comm, self.exp, self.schedule = comm, exp, schedule
        size = comm.size
        self.units = len({t.unit for t in graph.tasks}) if schedule == "static" else graph.width(done)
        self.split = size > self.units and use_subgroups(exp.cfg.parallel.subgroups,
                                                         has_convolutions(exp.trainer.model))
        self.colors = groups_for(size, max(1, self.units)) if self.split else list(range(size))
        self.group = comm.split(self.colors[comm.rank], comm.rank) if size > 1 else comm
        self.leaders = [r for r in range(size) if self.colors[r] != (self.colors[r - 1] if r else -1)]
        self.is_leader = self.group.rank == 0
        self.n_workers = len(self.leaders)
        self.plan = None
        if self.group.size > 1:
            exp.trainer.set_reducer(self.group.reducer())

    def plan_for_me(self, graph, todo) -> list:
        p = None
        if self.comm.rank == 0:
            p = [[t.id for t in lst] for lst in plan(graph, todo, self.schedule, self.n_workers)]
        self.plan = p = self.comm.bcast(p, root=0)
        return [graph.by_id[i] for i in p[self.colors[self.comm.rank]]]

    def say(self, graph, todo, done):
        size = self.comm.size
        if self.schedule == "dynamic":
            idle, who = max(0, self.n_workers - len(todo)), ""
        else:
            empty = [self.leaders[i] for i, lst in enumerate(self.plan or []) if not lst]
            idle, who = len(empty), " (ranks " + ", ".join(map(str, empty)) + ")"
        if done:
            log.info("resuming: %d of %d tasks already complete on disk", len(done), len(graph))
        if size == 1:
            return
        groups = (f"data-parallel subgroups of {sorted({self.colors.count(c) for c in set(self.colors)})} ranks"
                  if self.n_workers != size else "one rank each")
        log.info("%s schedule: %d tasks over %d workers (%s)%s", self.schedule, len(todo), self.n_workers, groups,
                 f"; {idle} workers have no task and wait{who}" if idle > 0 else "")
        if size > self.units and not self.split and self.exp.cfg.parallel.subgroups == "auto":
            log.info("parallel.subgroups = auto: no data-parallel subgroups for a model without convolutions "
                     "(its ~1 ms steps are shorter than a subgroup's Allreduce); set it to true to force them")

    def close(self):
        if self.group is not self.comm:
            self.group.free()
        self.exp.trainer.set_reducer(None)


def _wait_for_inputs(run: RunDir, task, poll=None):
    """Sleep until every dependency's result file is on disk (written by whichever rank ran it)."""
    while not all(os.path.exists(run.task_path(d)) for d in task.deps):
        if poll:
            poll()
        time.sleep(POLL_S * 5)


# -- dynamic: ready tasks handed out on request -----------------------------------------------------------

WAIT = "wait"  # no task is ready yet, but some are still to come


class Dispatcher:
    """Rank 0's book of the dynamic schedule: which tasks are done, running, still to hand out. Thread-safe."""

    def __init__(self, graph, todo, done):
        self.graph, self.lock = graph, threading.Lock()
        self.done, self.running, self.left = set(done), set(), {t.id for t in todo}

    def take(self):
        """The ready task of highest priority (and mark it running), WAIT, or None when all are handed out."""
        with self.lock:
            if not self.left:
                return None
            ready = self.graph.ready(self.done, self.running)
            ready = [t for t in ready if t.id in self.left]
            if not ready:
                return WAIT
            t = ready[0]
            self.left.discard(t.id)
            self.running.add(t.id)
            return t

    def finished(self, task_id: str | None):
        if task_id is not None:
            with self.lock:
                self.running.discard(task_id)
                self.done.add(task_id)


class Server:
    """Rank 0 answers the other workers' requests: each request says which task the worker finished; the
    answer is its next task, or None (stop). A request that finds no ready task waits until one is."""

    def __init__(self, comm, dispatcher: Dispatcher, workers: list[int]):
        self.comm, self.dispatcher = comm, dispatcher
        self.waiting: list[int] = []
        self.active = set(workers)
        self.thread = None
        self.error: BaseException | None = None

    def serve(self):
        """Answer what has arrived; never blocks."""
        while True:
            got = self.comm.poll(TAG_REQUEST)
            if got is None:
                break
            src, finished = got
            self.dispatcher.finished(finished)
            self.waiting.append(src)
        still = []
        for src in self.waiting:
            task = self.dispatcher.take()
            if task is WAIT:
                still.append(src)
                continue
            self.comm.send(task, dest=src, tag=TAG_TASK)
            if task is None:
                self.active.discard(src)
        self.waiting = still

    @property
    def over(self) -> bool:
        return not self.active

    def start_thread(self):
        def loop():
            try:
                while not self.over:
                    self.serve()
                    time.sleep(POLL_S)
            except BaseException as e:  # noqa: BLE001 - the main thread re-raises it
                self.error = e

        self.thread = threading.Thread(target=loop, name="lthmpi-dispatch", daemon=True)
        self.thread.start()

    def check(self):
        if self.error is not None:
            raise self.error


def _dynamic(exp, comm, layout, graph, todo, done, poll) -> list:
    """Ready tasks, critical path first, to whichever worker asks; a subgroup asks via its leader."""
    records = []
    group, rank = layout.group, comm.rank
    if rank == 0:
        dispatcher = Dispatcher(graph, todo, done)
        server = Server(comm, dispatcher, [r for r in layout.leaders if r != 0])
        threaded = comm.size > 1 and comm.threads_ok()
        if threaded:
            server.start_thread()

        def between():  # after each training block of rank 0's own tasks
            if threaded:
                server.check()
            else:
                server.serve()
            if poll:
                poll()

        while True:
            task = dispatcher.take()
            while task is WAIT:
                between()
                time.sleep(POLL_S)
                task = dispatcher.take()
            if group.size > 1:
                task = group.bcast(task, root=0)
            if task is None:
                break
            records.append(run_one(exp, task, layout.is_leader, between))
            dispatcher.finished(task.id)
        while not server.over:
            between()
            time.sleep(POLL_S)
        if threaded:
            server.thread.join()
            server.check()
        return records
    finished = None
    while True:
        task = None
        if layout.is_leader:
            comm.send(finished, dest=0, tag=TAG_REQUEST)
            task = comm.recv(0, TAG_TASK)
        if group.size > 1:
            task = group.bcast(task, root=0)
        if task is None:
            return records
        records.append(run_one(exp, task, layout.is_leader, None))
        finished = task.id


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
