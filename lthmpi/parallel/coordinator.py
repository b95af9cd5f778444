"""The run over a communicator (comm.py): one process or P MPI ranks.

    check + lock -> build -> parent -> masks -> graph of tasks -> gather -> merge

The phases themselves are phases.py's (shared with the job-array shards). Every enabled experiment kind
(lthmpi/kinds/) contributes tasks to one graph; a scheduler runs only ready tasks: `static` and `lpt` plan
per-rank lists (each task waits until its dependencies' files are on disk), `dynamic` hands ready tasks out on
request, critical path first (dispatch.py). Every rank, rank 0 included, trains. With more ranks than units of
work, ranks form data-parallel subgroups whose members average gradients over their own communicator.

Failures (startup.py): an error at the start that every rank sees alike is said once by rank 0 and every rank
exits cleanly; any later exception on any rank ends the whole job (abort) after one line naming the rank.
SIGTERM or SIGINT (mpirun forwards both) makes every rank unwind, dropping its task in flight, and exit
128 + signal number. With one rank, exceptions and interrupts propagate to the caller.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from .. import faults, kinds
from ..config import Config
from ..errors import interrupt_code, interrupt_line, report_error, resume_line
from ..store import RunDir
from . import liveness
from .comm import SelfComm
from .dispatch import run_dynamic
from .phases import PhaseTimer, default_run_dir, make_masks, make_parent, merge, run_one, startup
from .scheduling import groups_for, plan, use_subgroups
from .startup import StartupFailed, abort, same_config

log = logging.getLogger("lthmpi")

POLL_S = 0.01  # sleep between polls of the disk
STOP_GRACE_S = 15.0  # interrupted: how long a rank waits for the others to stop before it aborts them


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


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
                from ..results import format_table, load

                print(format_table(load(path)))
            print(f"results: {path}")
        return 0
    except StartupFailed as e:
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
        abort(comm, e)
        return 1
    except BaseException as e:  # noqa: BLE001
        if comm.size > 1:
            abort(comm, e)
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
    from ..runtime import auto_threads

    fault = faults.set_fault(comm.rank)
    t_start = comm.bcast(t_start, root=0)
    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    slot = comm.node_slot()
    if threads is None:
        threads = auto_threads(slot.local_size if slot else 1, cfg.parallel.threads)
    with timer.phase("startup"):
        exp = startup(cfg, run, comm, threads, slot, allow_mixed, quiet)
    # daemon threads: on an error they end with us; a replica frozen in a data-parallel step ends the job from there
    alive = liveness.start(run.path, comm, cfg.parallel.peer_timeout, lost=lambda e: abort(comm, e))
    path = _phases(cfg, run, comm, exp, timer, threads, fault, quiet)
    if alive:
        alive.stop()
    return path


def _phases(cfg: Config, run: RunDir, comm, exp, timer: PhaseTimer, threads: int, fault, quiet: bool):
    """After the start-up: parent, masks, graph, training, gather, merge."""
    rank, size = comm.rank, comm.size
    if size > 1:
        log.info("%d ranks, %d TF threads per rank, hosts %s", size, threads, sorted(set(comm.allgather(comm.host))))

    records = []  # this rank's tasks: those trained while the parent trains (the dense stability pairs), then the graph's
    before = set(run.done_tasks()) if rank == 0 else set()  # done by an earlier run, not early in this one
    with timer.phase("parent"):
        parent_data_parallel = make_parent(exp, comm, records, getattr(comm, "watch", None))
    with timer.phase("masks"):
        make_masks(exp, comm)

    with timer.phase("distribution"):
        graph = kinds.build_graph(exp)
        done = {t.id for t in graph.tasks if os.path.exists(run.task_path(t.id))}
        todo = [t for t in graph.tasks if t.id not in done]
        schedule = cfg.parallel.schedule
        layout = _Layout(comm, exp, graph, todo, done, schedule)
        mine = layout.plan_for_me(graph, todo) if schedule != "dynamic" else []
        if rank == 0:
            layout.say(graph, todo, done, before)
        if schedule != "dynamic" and layout.is_leader and not mine:
            log.info("rank %d has no task; it waits for the others", rank)

    with timer.phase("training"):
        bar = progress_bar(len(graph), "retrainings", enabled=(rank == 0 and not quiet))
        bar.update(len(done))
        watch = _DiskProgress(run, bar, len(done)) if rank == 0 else None

        def poll():  # while waiting, and after each training block: the progress bar, and the peers' liveness
            peers = getattr(comm, "watch", None)
            if peers is not None:
                peers()
            if watch:
                watch.poll()
        if schedule == "dynamic":
            records += run_dynamic(exp, comm, layout, graph, todo, done, poll)
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
    from ..results import provenance

    prov = provenance(size, hosts, threads, comm.library())
    prov.update(schedule=schedule, subgroups=layout.n_workers != size, workers=layout.n_workers,
                parent_data_parallel=parent_data_parallel)
    return merge(run, [t.id for t in graph.tasks], {t.id: t.deps for t in graph.tasks if t.deps}, timer.as_attrs(),
                 prov, during=lambda: fault.at("merge"))


class _Layout:
    """Who trains: one worker per rank, or data-parallel subgroups (a worker = a subgroup, led by its lowest
    rank) when ranks outnumber the units of work that can run at once."""

    def __init__(self, comm, exp, graph, todo, done, schedule):
        from ..models import has_convolutions

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

    def say(self, graph, todo, done, before=frozenset()):
        size = self.comm.size
        if self.schedule == "dynamic":
            idle, who = max(0, self.n_workers - len(todo)), ""
        else:
            empty = [self.leaders[i] for i, lst in enumerate(self.plan or []) if not lst]
            idle, who = len(empty), " (ranks " + ", ".join(map(str, empty)) + ")"
        earlier = done & set(before)
        if earlier:
            log.info("resuming: %d of %d tasks already complete on disk", len(earlier), len(graph))
        if done - earlier:
            log.info("%d tasks trained while the parent trained", len(done - earlier))
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
