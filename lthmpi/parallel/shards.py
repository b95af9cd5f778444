"""Job-array shards: independent single-process jobs (no MPI) that share one run directory.

    python -m lthmpi.main --shard I/N [--config ...] --run-dir DIR    share I of N (0-based), e.g. a SLURM array element
    python -m lthmpi.main --shard auto ...                            I and N from SLURM_ARRAY_TASK_ID / _COUNT / _MIN
    python -m lthmpi.main --merge --run-dir DIR                       results.h5 once every task is done

Where a run without --shard holds RUN_DIR/lock exclusively (one run per directory), shards hold it shared:
side by side with each other, never with such a run. Instead of a rank 0 that coordinates:
- the parent and the masks are made once, under the flock RUN_DIR/claims/setup: the first shard there
  makes them, the others wait on that flock and then read them (a shard that dies meanwhile drops the flock,
  and the next one makes them);
- the first shard of N deals the task graph into N shares (parallel.schedule `lpt`, or `static`; `dynamic`
  means `lpt` here) and records them (RUN_DIR/shards/shares-of-<N>.json), which every shard then reads (costs
  are host-local facts), and runs its share in order;
- a task is claimed before it runs (an flock on RUN_DIR/claims/<task id>, not waited for, naming its holder)
  and skipped when its result file exists, so no two shards train it; its result is written only while the
  claim still names this process; the kernel drops the claim of a process that dies, so a rerun of that
  shard (or any other) takes it over and removes its temporaries;
- a task whose inputs are not on disk yet waits for them; an input of another share that nobody holds is
  run by the waiting shard itself, so a dead or not yet started shard cannot stall a chain.
Each shard writes RUN_DIR/shards/<I>-of-<N>.json (its phases and tasks) when its share is done, and logs to
RUN_DIR/logs/shard<I>.log; --merge builds results.h5 from the task files with those timings.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time

from .. import faults, kinds
from ..config import Config, ConfigError
from ..fileio import StoreError, atomic_path
from ..store import RunDir, read_holder, release
from .comm import SelfComm
from .phases import PhaseTimer, check_finished, make_masks, make_parent, merge, run_one, startup
from .scheduling import plan

log = logging.getLogger("lthmpi")

POLL_S = 0.5  # between looks at the disk while waiting for another shard's task
SAY_S = 30.0  # between log lines saying whom a waiting shard waits for
MERGE_WAIT_S = 120.0  # --merge waits this long for shards still ending (Slurm releases it before they are gone)


def parse_shard(text: str, env=None) -> tuple[int, int] | None:
    """"I/N" (0 <= I < N); "auto": a SLURM job array's element, counted from SLURM_ARRAY_TASK_MIN in steps of
    SLURM_ARRAY_TASK_STEP (so --array=1-8 and --array=0-14:2 both give shards 0..N-1); "setup": None (the
    parent and the masks only, a first job before the array)."""
    env = os.environ if env is None else env
    if text == "setup":
        return None
    if text == "auto":
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        except (KeyError, ValueError):
            raise ConfigError("--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT: run it as an "
                              "element of a SLURM job array (sbatch --array), or give --shard I/N") from None
        index, off = divmod(task - first, step)
        if off or not 0 <= index < count:
            raise ConfigError(f"--shard auto: array element {task} is not one of {count} evenly spaced elements "
                              f"from {first} in steps of {step}; use a range such as --array=0-{count - 1}, "
                              f"or give --shard I/N")
        return index, count
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} must be I/N (share I of N, 0 <= I < N, e.g. 0/4), auto or setup") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: I must be in 0..N-1 (e.g. 0/{max(n, 1)} ... {max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def shares(cfg: Config, graph, count: int) -> list[list]:
    """The N shares of the whole graph, the same in every shard whatever is already done."""
    return plan(graph, list(graph.tasks), "static" if cfg.parallel.schedule == "static" else "lpt", count)


def recorded_shares(run: RunDir, cfg: Config, graph, count: int) -> list[list]:
    """The N shares as the first shard of N dealt them, recorded in RUN_DIR/shards/shares-of-<N>.json (call it
    holding the "setup" claim). Task costs depend on facts of the host (compiled C kernels, GPUs, streamed
    data) and on parallel.* keys outside the run's identity: shards that dealt for themselves could leave a
    task in nobody's share."""
    path = os.path.join(run.path, "shards", f"shares-of-{count}.json")
    run.remove_temporaries_of(path)
    try:
        with open(path) as f:
            ids = json.load(f)["shares"]
    except FileNotFoundError:
        ids = [[t.id for t in share] for share in shares(cfg, graph, count)]
        _write_json(path, dict(shares=ids))
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"{path} is unreadable ({e}); delete it (the next shard deals the shares again)") from None
    if sorted(i for share in ids for i in share) != sorted(graph.by_id) or len(ids) != count:
        raise StoreError(f"{path} does not hold this run's {len(graph)} tasks in {count} shares; delete it "
                         f"(the next shard deals the shares again)")
    return [[graph.by_id[i] for i in share] for share in ids]


def _record_path(run: RunDir, index: int, count: int) -> str:
    return os.path.join(run.path, "shards", f"{index}-of-{count}.json")


def _graph_path(run: RunDir) -> str:
    return os.path.join(run.path, "shards", "graph.json")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f)


def run_shard(cfg: Config, run_dir: str, share: tuple[int, int] | None, t_start: float | None = None,
              quiet: bool = False, allow_mixed: bool = False) -> dict:
    """Run share (I, N) in this process, or with None only make the parent and the masks. Returns what it did:
    trained (task ids), done and total (tasks of the graph). `allow_mixed`: as the coordinator's."""
    from ..runtime import auto_threads

    index, count = share or (0, 0)
    faults.set_fault(index)
    timer = PhaseTimer(t_start)
    run = RunDir(run_dir)
    one = SelfComm()
    with timer.phase("startup"):
        exp = startup(cfg, run, one, auto_threads(1, cfg.parallel.threads), allow_mixed=allow_mixed, quiet=quiet,
                      shard=(index, f"shard{index}" if share else "setup"))
    with contextlib.ExitStack() as setup:  # the parent, the masks and the shares, made once
        with timer.phase("parent"):  # waiting for the shard that trains it included
            setup.enter_context(run.hold("setup"))
            for path in (run.parent_path, run.masks_path, _graph_path(run)):
                run.remove_temporaries_of(path)
            make_parent(exp, one)
        with timer.phase("masks"):
            make_masks(exp, one)
        with timer.phase("distribution"):
            graph = kinds.build_graph(exp)
            if not os.path.exists(_graph_path(run)):  # for --merge, which then needs neither data nor model
                _write_json(_graph_path(run), dict(tasks=[t.id for t in graph.tasks],
                                                   deps={t.id: list(t.deps) for t in graph.tasks if t.deps}))
            mine = recorded_shares(run, cfg, graph, count)[index] if share else []
            done = run.done_tasks()
    trained: list[str] = []
    if share:
        log.info("shard %d/%d: %d of the %d tasks, %d of them already done", index, count, len(mine), len(graph),
                 sum(t.id in done for t in mine))
        record = dict(shard=index, shards=count, host=exp.host, pid=os.getpid(), threads=exp.trainer.threads,
                      tasks=[t.id for t in mine], trained=trained, finished=False)
        _write_json(_record_path(run, index, count), record)  # --merge names the shard of a missing task
        with timer.phase("training"):
            _run_share(exp, run, graph, mine, trained)
        _write_json(_record_path(run, index, count), dict(record, finished=True, **timer.as_attrs()))
    return dict(trained=trained, done=len(run.done_tasks() & set(graph.by_id)), total=len(graph))


def _run_share(exp, run: RunDir, graph, mine: list, trained: list):
    """Until every task of `mine` has its file: claim the next one and run it, or wait for inputs (saying
    every SAY_S seconds which tasks it waits for and who holds them)."""
    exp.run.before_write = exp.run.claim_is_mine  # a result is written only under this process's own claim
    said = time.monotonic()
    while True:
        done = run.done_tasks()
        left = [t for t in mine if t.id not in done]
        if not left:
            return
        got = _claim_next(run, graph, left, done)
        if got is None:
            if time.monotonic() - said >= SAY_S:
                log.info("waiting for %s", _holders(run, left, done))
                said = time.monotonic()
            time.sleep(POLL_S)
            continue
        task, fd = got
        try:
            if os.path.exists(run.task_path(task.id)):  # finished by its holder since we looked
                continue
            run.remove_temporaries_of(run.task_path(task.id))
            run_one(exp, task)
            trained.append(task.id)
        finally:
            release(fd)


def _holders(run: RunDir, left: list, done: set) -> str:
    """"task a (held by host:pid since ...), task b (held by nobody)" for the inputs this shard waits on."""
    waits = sorted({d for t in left for d in t.deps if d not in done})[:4] or [t.id for t in left[:4]]
    return ", ".join(f"task {d} (held by {read_holder(run.claim_path(d)) or 'nobody yet'})" for d in waits)


def _claim_next(run: RunDir, graph, left: list, done: set):
    """(task, claim fd) for the next task this shard may run, or None (wait): its own ready tasks in share
    order; else, for its tasks that wait on inputs, an unclaimed ready input from another share."""
    own = [t for t in left if all(d in done for d in t.deps)]
    needed: dict[str, object] = {}
    stack = [d for t in left if t not in own for d in t.deps]
    while stack:
        d = stack.pop()
        if d not in done and d not in needed:
            needed[d] = graph.by_id[d]
            stack.extend(graph.by_id[d].deps)
    theirs = sorted((t for t in needed.values() if all(d in done for d in t.deps)), key=graph.priority)
    for task in own + [t for t in theirs if t not in left]:
        fd = run.claim(task.id)
        if fd is not None:
            return task, fd
    return None


def merge_run(cfg: Config | None, run_dir: str, t_start: float | None = None) -> str:
    """results.h5 of a run whose tasks the shards have trained; refuses, naming them and their shards, while
    any is missing. Reads the task ids the shards recorded (no data, no model); builds the graph otherwise."""
    from ..results import provenance

    run = RunDir(run_dir)
    saved = run.load_config()
    if cfg is not None:
        run.check_config(cfg)
    run.lock(wait_s=MERGE_WAIT_S)  # exclusive: not while shards are still working here
    timer = PhaseTimer(t_start)
    records = _records(run)
    ids, deps = _graph_ids(run) or _build_graph_ids(cfg or saved, run)
    check_finished(run)
    done = run.done_tasks()
    missing = [i for i in ids if i not in done]
    if missing:
        owner = {t: f"{r['shard']}/{r['shards']}" for r in records for t in r.get("tasks", [])}
        shards = sorted({owner.get(m, "?") for m in missing})
        which = (f"rerun shard {', '.join(shards)}" if "?" not in shards else
                 "some are in shards that never started: run every shard (--shard I/N)")
        raise StoreError(f"{len(missing)} of {len(ids)} tasks have no result yet ({', '.join(missing[:8])}"
                         f"{', ...' if len(missing) > 8 else ''}); {which} with the same --config/--set and "
                         f"--run-dir, then merge again")
    hosts = [r["host"] for r in records]
    prov = provenance(max(1, len({r["shard"] for r in records})), hosts, records[0]["threads"] if records else 0,
                      "none (job-array shards)")
    prov.update(schedule="shards", shards=max([r["shards"] for r in records], default=1), parent_data_parallel=False)
    path = merge(run, ids, deps, _timing(records, timer), prov)
    shutil.rmtree(run.claims_dir, ignore_errors=True)  # every task is done: no shard will claim again
    return path


def _graph_ids(run: RunDir) -> tuple[list[str], dict] | None:
    """(task ids in graph order, task id -> its dependencies) as the shards recorded them."""
    try:
        with open(_graph_path(run)) as f:
            graph = json.load(f)
        return list(graph["tasks"]), {k: tuple(v) for k, v in graph.get("deps", {}).items()}
    except (OSError, ValueError, KeyError):
        return None


def _build_graph_ids(cfg: Config, run: RunDir) -> tuple[list[str], dict]:
    """The task ids from the graph itself (shards that never got as far as recording them): data and model."""
    from ..experiment import Experiment

    if not (os.path.exists(run.parent_path) and os.path.exists(run.masks_path)):
        raise StoreError(f"{run.path} has no parent and masks yet: run the shards (--shard I/N) first")
    exp = Experiment(cfg, run.path, rank=0, threads=1)
    exp.load_parent()
    exp.load_masks()
    graph = kinds.build_graph(exp)
    return [t.id for t in graph.tasks], {t.id: t.deps for t in graph.tasks if t.deps}


def _records(run: RunDir) -> list[dict]:
    """The shards' own records (the latest of each shard), for the timings and provenance."""
    d = os.path.join(run.path, "shards")
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if re.fullmatch(r"\d+-of-\d+\.json", name):
            try:
                with open(os.path.join(d, name)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue  # a record is only for the timings: the task files are what counts
    return out


def _timing(records: list[dict], timer: PhaseTimer) -> dict:
    """Phases: the longest shard's; total: from the first shard's start to the last one's end, plus this merge."""
    records = [r for r in records if r.get("finished")]
    phases = {}
    for r in records:
        for k in ("startup", "parent", "masks", "distribution", "training"):
            phases[k] = max(phases.get(k, 0.0), float(r.get(k, 0.0)))
    gather = time.time() - timer.t0
    if not records:
        return {**phases, "gather": gather, "total": gather, "start_time": timer.t0}
    start = min(r["start_time"] for r in records)
    end = max(r["start_time"] + r["total"] for r in records)
    return {**phases, "gather": gather, "total": end - start + gather, "start_time": start}
