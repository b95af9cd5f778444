"""Faults and bad input, through the real CLI and the real mpirun on the tiny digits experiment: a dead rank,
SIGTERM and Ctrl-C, rank 0 dying in the gather or the merge, a full or read-only disk, corrupt files and
data, two runs on one directory, a diverging retraining. Each case ends the job by itself with a clear line,
leaves nothing half-written, and the rerun of the same command finishes the work with the results of an
uninterrupted run, redoing no finished task. Slow variants run in run/fault_battery.sh (marked `battery`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import needs_root

from faultkit import (MPIRUN, N_TASKS, PY, ROOT, TINY_SETS, assert_every_h5_readable, assert_same_results, battery,
                      clean_env, command, done_counts, error_lines, finish, free_bytes, launch, launch_in_process,
                      log_has, lthmpi_lines, note, records, start, task_files, temporaries, tmpfs, wait_for)

WAITING = "injected fault: waiting"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tf_runtime):
    """The uninterrupted run (serial, one TF thread): what every interrupted-then-resumed run must equal. Made
    in this process (run_serial): the corrupt-input cases import TensorFlow here anyway, and the runs through
    the command line that must equal it show that the two agree bit for bit."""
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.validation import resolve

    run = tmp_path_factory.mktemp("reference") / "run"
    run_serial(resolve(None, TINY_SETS), str(run), threads=1, quiet=True)
    assert len(task_files(run)) == N_TASKS
    return run


def copy_run(reference, dest) -> Path:
    """A finished run's files (not its logs or lock), to damage or resume."""
    dest = Path(dest)
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("logs", "lock"))
    return dest


def assert_trained_once(run, reference, left=()):
    """Every task of the reference on disk, each trained once over all runs: one "done" line, or none for a file
    that an interrupted launch left (`left`: the file names after the last one) when the launcher ended its rank
    between writing the file and logging that line (the file is complete: the write is atomic)."""
    counts = done_counts(run)
    silent = task_files(run) - set(counts)
    assert {f"{t}.h5" for t in silent} <= set(left), f"task files that no run says it trained: {silent}"
    assert sorted(set(counts) | silent) == sorted(task_files(reference)), counts
    assert set(counts.values()) == {1}, f"a finished task was redone: {counts}"


def assert_resumed_cleanly(run, reference, before: dict | None = None, left=None):
    """After the rerun: complete, equal to the uninterrupted run, every task trained exactly once over all
    runs, finished files (`before`: name -> mtime) untouched, nothing temporary left. `left`: as
    assert_trained_once's, `before`'s names unless given."""
    assert_trained_once(run, reference, (before or {}) if left is None else left)
    assert temporaries(run) == []
    assert_every_h5_readable(run)
    assert_same_results(run, reference)
    for name, mtime in (before or {}).items():
        assert (Path(run) / "tasks" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"


def mtimes(run) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (Path(run) / "tasks").glob("*.h5")}


# -- units: the pieces the end-to-end cases rely on ------------------------------------------------------

def test_disk_errors_are_recognised_with_or_without_errno():
    from lthmpi.errors import describe_error
    from lthmpi.fileio import disk_errno

    h5_text = ("Can't synchronously write data (file write failed: time = Tue Nov 24 08:48:06 2026\n, filename = "
               "'a.h5', file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x1)")
    assert disk_errno(OSError(28, "No space left on device")) == 28
    assert disk_errno(OSError(h5_text)) == 28  # h5py: errno unset, the C library's text
    assert disk_errno(RuntimeError("Disable slist on flush dest failure failed (file write failed: errno = 28, "
                                   "error message = 'No space left on device')")) == 28
    assert disk_errno(OSError(None, "Unable to create file (unable to open file: name = 'x', errno = 30, "
                                    "error message = 'Read-only file system')")) == 30
    assert disk_errno(OSError(2, "No such file")) is None and disk_errno(ValueError("errno = 28")) is None
    line, code, bug = describe_error(OSError(28, os.strerror(28), "/r/tasks/m000_r00_ticket.h5"))
    assert line.startswith("No space left on device writing /r/tasks/m000_r00_ticket.h5; finished tasks are kept")
    assert code == 1 and not bug and "\n" not in line
    line, _, bug = describe_error(RuntimeError("boom\nsecond line"))
    assert bug and line == "RuntimeError: boom"


@needs_root("mount a tmpfs")
def test_full_disk_write_names_the_file_and_leaves_nothing(tmp_path):
    from lthmpi.fileio import atomic_h5

    with tmpfs(tmp_path / "small", "1m") as d:
        target = d / "big.h5"
        with pytest.raises(OSError) as e:
            with atomic_h5(str(target)) as f:
                f.create_dataset("x", data=np.zeros(400_000))
        assert e.value.errno == 28 and e.value.filename == str(target)
        assert os.listdir(d) == []


FILL_AT_EVERY_PAGE = """
import os, sys
import numpy as np
from lthmpi.fileio import atomic_h5
d = sys.argv[1]
for room in range(0, 6 * 4096, 4096):
    st = os.statvfs(d)
    with open(os.path.join(d, "filler"), "wb") as f:
        f.write(b"\\0" * (st.f_bavail * st.f_frsize - room))
    try:
        with atomic_h5(os.path.join(d, "task.h5")) as f:
            f.attrs.update(task_id="m000_r00_ticket", accuracy=0.9)
            for g in ("eval", "epoch"):
                for c in ("iteration", "loss", "accuracy"):
                    f.create_dataset(f"{g}/{c}", data=np.arange(40.0))
        print(room, "written")
    except OSError as e:
        print(room, "errno", e.errno)
    for name in ("filler", "task.h5"):
        if os.path.exists(os.path.join(d, name)):
            os.unlink(os.path.join(d, name))
"""


@needs_root("mount a tmpfs")
def test_disk_full_at_any_point_of_a_write_is_one_error(tmp_path):
    """ENOSPC wherever it falls in an HDF5 write (the task file of test_disk_full_mid_run with one page left
    made HDF5 fail in its flush at close, and the process died of SIGSEGV): an OSError 28, never a crash, at
    each of 0 to 5 free pages."""
    with tmpfs(tmp_path / "small", "1m") as d:
        r = subprocess.run([PY, "-c", FILL_AT_EVERY_PAGE, str(d)], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env=clean_env())
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
        outcomes = dict(ln.split(" ", 1) for ln in r.stdout.splitlines())
        assert len(outcomes) == 6 and set(outcomes.values()) <= {"written", "errno 28"}, r.stdout
        assert [f for f in os.listdir(d) if f.startswith(".tmp-")] == []


def test_fault_spec_is_checked():
    from lthmpi.faults import FaultInjection

    f = FaultInjection(1, "kill:1:gather")
    assert f.active and f.kind == "kill" and f.where == "gather"
    assert not FaultInjection(0, "kill:1:2").active
    for bad in ("kill:1", "explode:0:1", "raise:0:lunch", "raise:x:1", "nan:0:merge"):
        with pytest.raises(ValueError, match="LTHMPI_FAULT"):
            FaultInjection(0, bad)


def flip_bit(path, offset: int, bit: int = 0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def flip_float_attr(path, value: float):
    """Flip the lowest mantissa bit of a float64 attribute, found by its bytes (attributes live in headers)."""
    raw = Path(path).read_bytes()
    at = raw.find(struct.pack("<d", value))
    assert at >= 0 and raw.find(struct.pack("<d", value), at + 1) < 0, "value not found once in the file"
    flip_bit(path, at)


def flip_in_dataset(path, name: str, byte: int = 0):
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_offset()
    assert offset is not None, f"{name} is not stored contiguously"
    flip_bit(path, offset + byte)


def test_task_file_bit_flips_are_detected(tmp_path, tiny_config):
    from lthmpi.store import RunDir, StoreError

    run = RunDir(str(tmp_path / "r"))
    run.create(tiny_config)
    attrs = dict(task_id="m000_r00_ticket", final_accuracy=0.8583333333333333, diverged=False, control="",
                 rank=0, remaining=0.5123)
    series = {"evals": {"iteration": np.arange(5.0), "val_loss": np.linspace(1.0, 0.5, 5)}}
    run.write_task("m000_r00_ticket", attrs, series)
    good = Path(run.task_path("m000_r00_ticket")).read_bytes()
    got, _ = run.read_task("m000_r00_ticket")
    assert {k: got[k] for k in attrs} == attrs
    for damage in (lambda p: flip_float_attr(p, 0.8583333333333333),   # an attribute (HDF5 would not notice)
                   lambda p: flip_in_dataset(p, "evals/val_loss", 3),    # raw data (HDF5 would not notice)
                   lambda p: Path(p).write_bytes(good[: len(good) // 2])):  # truncated
        Path(run.task_path("m000_r00_ticket")).write_bytes(good)
        damage(run.task_path("m000_r00_ticket"))
        with pytest.raises(StoreError) as e:
            run.read_task("m000_r00_ticket")
        msg = str(e.value)
        assert "\n" not in msg and run.task_path("m000_r00_ticket") in msg and "delete it" in msg
        assert "corrupt" in msg or "unreadable" in msg
    run.unlock()


def test_run_directory_lock_names_the_holder_and_dies_with_it(tmp_path, tiny_config):
    """One run per directory: a second is refused naming the first (host:pid); the kernel drops the flock when
    the holder dies, so a killed run's lock is never stale."""
    from lthmpi.store import RunDir, StoreError, hostname

    path = str(tmp_path / "r")
    RunDir(path).create(tiny_config)
    RunDir(path).unlock()
    holder = subprocess.Popen([PY, "-c", f"from lthmpi.store import RunDir; import sys, time; RunDir({path!r}).lock(); "
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True,
                              env=clean_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as e:
            RunDir(path).create(tiny_config)
        assert f"{hostname()}:{holder.pid}" in str(e.value) and "in use by another lthmpi run" in str(e.value)
        open(os.path.join(path, ".tmp-results.h5.x"), "w").close()
        RunDir(path).remove_stale_temporaries()  # not under the lock: must not touch another run's temporaries
        assert os.path.exists(os.path.join(path, ".tmp-results.h5.x"))
    finally:
        holder.kill()
        holder.wait()
    run = RunDir(path)
    run.create(tiny_config)  # taken over; the dead run's temporaries are removed under the lock
    assert not os.path.exists(os.path.join(path, ".tmp-results.h5.x"))
    run.unlock()


# -- a dead rank, SIGTERM and Ctrl-C, rank 0 dead in the merge, a second run on the directory -------------------
# One run through five launches, each a fault of its own, so that each launch also resumes the last one (every
# launch is a TensorFlow import per rank; the training itself takes seconds):
#   1. P = 3, rank 1 SIGKILLed in its second task (a dead node): the job ends by itself;
#   2. a scheduler's time limit: SIGTERM to mpirun -np 2 while rank 1 is in its first task, once rank 0 has saved
#      one (launch 1 left rank 1's second and third tasks, so the P = 2 plan gives each rank at least one);
#   3. Ctrl-C (SIGINT) to the serial rerun in its first task (launch 2 dropped rank 1's task in flight);
#   4. the serial rerun trains the rest and is SIGKILLed in the merge (a second rank would only exit after the
#      gather: launch 2 resumes on P = 2, and the battery kills rank 0 of P = 2 in the merge and the gather);
#   5. the serial rerun rebuilds results.h5 from the task files; while it waits in its merge, a second run on
#      the same directory (mpirun -np 2) is refused.
# The directory after each of launches 1 to 4 is kept as a copy for the tests that assert that state.

def saving_rank(run, task_id: str) -> int:
    with h5py.File(run / "tasks" / f"{task_id}.h5", "r") as f:
        return int(f.attrs["rank"])


def interrupt_mid_task(run: Path, sig, np_, rank: int, task: int, also=lambda: True):
    """Run until `rank` is in its `task`-th task (and `also()` holds), send `sig` (to mpirun, which forwards it to
    every rank, or to the serial run): (exit status, stdout, stderr, seconds it took to end). In `killed_run` no
    earlier launch waited in that task on that rank (a rank's log appends over the launches)."""
    p = start(run, np_, env={"LTHMPI_FAULT": f"wait:{rank}:{task}"})
    wait_for(lambda: log_has(run, f"{WAITING} in task {task}", rank) and also(), p, what="a task in flight")
    t = time.time()
    os.kill(p.pid, sig)
    rc, out, err = finish(p, timeout=60)
    return rc, out, err, time.time() - t


def assert_stopped_cleanly(rc, out, err, sig, run: Path, np_, rank: int, earlier=frozenset()) -> set:
    """Every rank unwound, the task in flight is dropped, nothing half-written, exit 128 + signal. `earlier`:
    the task files an earlier run left (another run's ranks saved them)."""
    assert rc == 128 + sig, (rc, err[-3000:])
    lines = lthmpi_lines(err)
    assert lines == [f"lthmpi: interrupted by {sig.name}; finished tasks are on disk, rerun the same command "
                     f"to resume"], err[-3000:]
    assert "Traceback" not in err and "results:" not in out
    assert temporaries(run) == [], "nothing half-written"
    assert_every_h5_readable(run)
    finished, done = task_files(run), set(done_counts(run))
    assert done <= finished and len(finished) < N_TASKS
    new = finished - set(earlier)
    saved_by = {t: saving_rank(run, t) for t in new}
    assert {t for t in new if saved_by[t] == rank} <= done, "the task in flight is dropped"
    # Another rank may have saved a task and been stopped before its "done" line: the file is complete
    # (readable, above) and kept; at most one such task per rank.
    cut_off = [saved_by[t] for t in new - done]
    assert len(cut_off) == len(set(cut_off)), cut_off
    assert log_has(run, "interrupted", rank) if np_ else True
    return finished


@pytest.fixture(scope="module")
def killed_run(reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("killed")
    run = base / "run"
    out = {"run": run}
    p = start(run, 3, env={"LTHMPI_FAULT": "kill:1:2"})
    wait_for(lambda: task_files(run), p, what="the first task file")
    t = time.time()
    out["rc1"], _, out["err1"] = finish(p, timeout=120)
    out["ended_in"] = time.time() - t
    out["after_kill"] = shutil.copytree(run, base / "after_kill")
    out["mtimes1"] = mtimes(run)

    kept = set(done_counts(run))  # below: rank 0's first task of launch 2 done (its log line, after its file)
    out["term"] = interrupt_mid_task(run, signal.SIGTERM, 2, 1, 1, also=lambda: set(done_counts(run)) - kept)
    out["after_term"], out["mtimes_term"] = shutil.copytree(run, base / "after_term"), mtimes(run)
    out["int"] = interrupt_mid_task(run, signal.SIGINT, None, 0, 1)
    out["after_int"], out["mtimes_int"] = shutil.copytree(run, base / "after_int"), mtimes(run)

    out["merge"] = launch(run, env={"LTHMPI_FAULT": "kill:0:merge"})
    out["after_merge"] = shutil.copytree(run, base / "after_merge")
    out["mtimes2"] = mtimes(run)

    first = start(run, env={"LTHMPI_FAULT": "wait:0:merge"})
    try:
        wait_for(lambda: log_has(run, f"{WAITING} in merge", 0), first, what="the serial rerun in its merge")
        t = time.time()
        out["second"] = launch(run, 2)
        out["refused_in"] = time.time() - t
        out["first_pid"] = first.pid
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGUSR1)
    out["first_rc"], _, out["first_err"] = finish(first)
    return out


def test_rank_sigkilled_mid_task(killed_run, reference):
    """P = 3, rank 1 SIGKILLed in its second task (a dead node): the job ends by itself, non-zero; the reruns
    (P = 2, then serial: the directory does not care) finish the work, equal to an uninterrupted run, redoing no
    finished task."""
    k = killed_run
    rc, ended_in, killed = k["rc1"], k["ended_in"], k["after_kill"]
    assert rc != 0 and ended_in < 60, (rc, ended_in, k["err1"][-2000:])
    finished, done = task_files(killed), set(done_counts(killed))
    assert 0 < len(finished) < N_TASKS and done <= finished
    assert_every_h5_readable(killed)
    # a survivor ended by the launcher between a task's file and its "done" line: at most one such file each
    silent = [saving_rank(killed, t) for t in finished - done]
    assert 1 not in silent and len(silent) == len(set(silent)), silent
    assert not (killed / "results.h5").exists()
    resumed = k["after_merge"]  # the reruns up to launch 4 trained every other task, each once, and rewrote none
    assert task_files(resumed) == task_files(reference)
    assert_trained_once(resumed, reference, k["mtimes_int"])
    assert {n: t for n, t in k["mtimes2"].items() if n in k["mtimes1"]} == k["mtimes1"]
    assert k["first_rc"] == 0, k["first_err"][-3000:]
    assert_resumed_cleanly(k["run"], reference, k["mtimes1"], left=k["mtimes_int"])
    note("rank 1 SIGKILLed mid-task (P=3)", f"job ended by itself in {ended_in:.1f} s, rc {rc}; "
         f"{len(finished)}/{N_TASKS} tasks kept; the reruns trained the rest once each; results equal")


def test_sigterm_to_mpirun_mid_task(killed_run, reference):
    """A scheduler's time limit (SIGTERM to mpirun -np 2, launch 2 of `killed_run`) while rank 1's task is in
    flight: every rank unwinds, that task is dropped, nothing half-written, exit 143; the reruns resume it,
    equal to the uninterrupted run, redoing no finished task."""
    k = killed_run
    rc, out, err, ended_in = k["term"]
    finished = assert_stopped_cleanly(rc, out, err, signal.SIGTERM, k["after_term"], 2, 1,
                                      earlier=task_files(k["after_kill"]))
    assert k["first_rc"] == 0, k["first_err"][-3000:]
    assert_resumed_cleanly(k["run"], reference, k["mtimes_term"], left=k["mtimes_int"])
    note("SIGTERM to mpirun -np 2 mid-task",
         f"rc {rc} in {ended_in:.1f} s, one line, no temporaries, {len(finished)}/{N_TASKS} kept; reruns rc 0, equal")


def test_sigint_to_a_serial_rerun_mid_task(killed_run, reference):
    """Ctrl-C (SIGINT) to a serial run (launch 3 of `killed_run`, the rerun of the one above) while its task is
    in flight: the same, exit 130; the next reruns finish it."""
    k = killed_run
    rc, out, err, ended_in = k["int"]
    finished = assert_stopped_cleanly(rc, out, err, signal.SIGINT, k["after_int"], None, 0,
                                      earlier=task_files(k["after_term"]))
    assert k["first_rc"] == 0, k["first_err"][-3000:]
    assert_resumed_cleanly(k["run"], reference, k["mtimes_int"])
    note("SIGINT to a serial run mid-task",
         f"rc {rc} in {ended_in:.1f} s, one line, no temporaries, {len(finished)}/{N_TASKS} kept; reruns rc 0, equal")


def test_rank0_killed_in_the_merge(killed_run, reference):
    """Rank 0 SIGKILLed while it writes results.h5 (the serial launch 4 of `killed_run`): every task is on disk,
    the half-written merge is a temporary, never results.h5; the serial rerun rebuilds it from the task files."""
    k = killed_run
    rc, run = k["merge"].returncode, k["after_merge"]
    assert rc != 0, k["merge"].stderr[-3000:]
    assert task_files(run) == task_files(reference), "every task was on disk before the gather"
    assert not (run / "results.h5").exists()
    files = assert_every_h5_readable(run)  # a half-written merge is a .tmp- file, never results.h5
    left = temporaries(run)
    assert left, "the merge was killed half-way: its temporary is left"
    assert k["first_rc"] == 0, k["first_err"][-3000:]
    assert_resumed_cleanly(k["run"], reference, k["mtimes2"])
    note("rank 0 SIGKILLed in the merge (serial)", f"rc {rc}; {len(files)} .h5 files all readable, {len(left)} "
         "temporaries; rerun rebuilt results.h5 from the task files, none redone")


# Each from a fresh run of its own; the default suite runs SIGTERM to mpirun (-np 2) and SIGINT to a serial run as
# launches 2 and 3 of `killed_run` (test_sigterm_to_mpirun_mid_task, test_sigint_to_a_serial_rerun_mid_task).
@battery
@pytest.mark.parametrize("sig, np_", [
    pytest.param(signal.SIGTERM, 3, id="SIGTERM-mpirun"),
    pytest.param(signal.SIGINT, None, id="SIGINT-serial"),
    pytest.param(signal.SIGINT, 3, id="SIGINT-mpirun"),
    pytest.param(signal.SIGTERM, None, id="SIGTERM-serial"),
])
def test_signal_stops_cleanly_and_rerun_resumes(reference, tmp_path, sig, np_):
    """A scheduler's time limit (SIGTERM) or Ctrl-C (SIGINT) while a task is in flight: every rank unwinds,
    the task in flight is dropped, nothing half-written, exit 128 + signal; the rerun resumes."""
    run = tmp_path / "run"
    rank = 1 if np_ else 0
    rc, out, err, ended_in = interrupt_mid_task(run, sig, np_, rank, 2)
    finished = assert_stopped_cleanly(rc, out, err, sig, run, np_, rank)
    before = mtimes(run)
    r = launch(run)  # resumed without mpirun: a run directory does not care how many ranks made it
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_cleanly(run, reference, before)
    note(f"{sig.name} to {'mpirun -np 3' if np_ else 'serial run'} mid-task",
         f"rc {rc} in {ended_in:.1f} s, one line, no temporaries, {len(finished)}/{N_TASKS} kept; rerun rc 0, equal")


# -- rank 0 dies in the gather or the merge -----------------------------------------------------------------

# Each from a fresh run of its own, on 2 ranks; the merge case runs in the default suite as the serial launch 4 of
# `killed_run` (test_rank0_killed_in_the_merge: the merge is rank 0's alone, the other rank has exited by then).
@battery
@pytest.mark.parametrize("point", ["merge", "gather"])
def test_rank0_killed_in_gather_or_merge(reference, tmp_path, point):
    run = tmp_path / "run"
    r = launch(run, 2, env={"LTHMPI_FAULT": f"kill:0:{point}"})
    rc = r.returncode
    assert rc != 0
    assert task_files(run) == task_files(reference), "every task was on disk before the gather"
    assert not (run / "results.h5").exists()
    files = assert_every_h5_readable(run)  # a half-written merge is a .tmp- file, never results.h5
    left = temporaries(run)
    assert (point == "merge") == bool(left), left
    before = mtimes(run)
    r = launch(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_cleanly(run, reference, before)
    note(f"rank 0 SIGKILLed in the {point} (P=2)", f"rc {rc}; {len(files)} .h5 files "
         f"all readable, {len(left)} temporaries; rerun rebuilt results.h5 from the task files, none redone")


# -- disk full, read-only ---------------------------------------------------------------------------------

def fill_disk(reference, disk: Path) -> tuple[Path, list]:
    """The run directory on the tmpfs `disk` with the parent, the masks and two tasks, and a filler that leaves
    40 KiB: room for about two more task files."""
    run = disk / "run"
    (run / "tasks").mkdir(parents=True)
    for name in ("config.toml", "parent.h5", "masks.h5"):
        shutil.copy(reference / name, run / name)
    kept = sorted(task_files(reference))[:2]
    for tid in kept:
        shutil.copy(reference / "tasks" / f"{tid}.h5", run / "tasks" / f"{tid}.h5")
    (disk / "filler").write_bytes(b"\0" * (free_bytes(disk) - 40 * 1024))
    return run, kept


def assert_disk_full(r, run: Path, kept: list, reference, np_) -> tuple[list, set]:
    """The rank that hit ENOSPC said so in one line and ended the job; what was written is intact."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = error_lines(r.stderr)
    assert lines and all("No space left on device writing " in ln and "finished tasks are kept" in ln
                         for ln in lines), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Logging error" not in r.stderr
    assert len(lines) <= (np_ or 1)
    written = task_files(run)
    assert set(kept) <= written
    assert len(written) < N_TASKS
    assert_every_h5_readable(run)
    for tid in kept:
        assert (run / "tasks" / f"{tid}.h5").read_bytes() == (reference / "tasks" / f"{tid}.h5").read_bytes()
    return lines, written


def read_only_mid_task(run: Path, np_) -> tuple[int, str]:
    """Run until rank 0 trains its first task, make tasks/ read-only (a bind mount remounted ro), let the task
    end: (exit status, stderr)."""
    p = start(run, np_, env={"LTHMPI_FAULT": "wait:0:1"})
    tasks = str(run / "tasks")
    mounted = False
    try:
        wait_for(lambda: log_has(run, WAITING, 0), p, what="a task in flight")
        assert subprocess.run(["mount", "--bind", tasks, tasks]).returncode == 0
        mounted = True
        assert subprocess.run(["mount", "-o", "remount,bind,ro", tasks]).returncode == 0
        os.kill(p.pid, signal.SIGUSR1)  # resume: the task ends and its result cannot be written
        rc, _out, err = finish(p, timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        if mounted:
            subprocess.run(["umount", tasks])
    return rc, err


def assert_read_only(rc: int, err: str, run: Path, kept: set, np_, tasks: str | None = None) -> list:
    """One EROFS line per failing rank naming tasks/, the job ended, what was there is intact."""
    tasks = tasks or str(run / "tasks")
    assert rc == 1, (rc, err[-3000:])
    lines = error_lines(err)
    assert lines and all("Read-only file system writing " + tasks in ln for ln in lines), err[-3000:]
    assert "Traceback" not in err
    assert task_files(run) == kept if np_ is None else kept <= task_files(run)
    assert_every_h5_readable(run)
    return lines


@pytest.fixture(scope="module")
def disk_errors(reference, tmp_path_factory):
    """One run directory on a small tmpfs through three launches, each resuming the last: on 2 ranks with the
    disk full (ENOSPC); after space is freed, a serial rerun whose tasks/ turns read-only while a task trains
    (EROFS); a serial rerun to the end. The directory after each launch is kept as a copy."""
    base = tmp_path_factory.mktemp("disk_errors")
    out = {}
    with tmpfs(base / "disk", "3m") as disk:
        run, out["kept"] = fill_disk(reference, disk)
        out["full"] = launch(run, 2)
        out["after_full"] = shutil.copytree(run, base / "after_full")
        (disk / "filler").unlink()
        out["kept_ro"] = task_files(run)
        out["tasks"] = str(run / "tasks")
        out["ro_rc"], out["ro_err"] = read_only_mid_task(run, None)
        out["after_ro"] = shutil.copytree(run, base / "after_ro")
        out["rerun"] = launch(run)
        out["final"] = shutil.copytree(run, base / "final")
    return out


def assert_rerun_equal(r, run: Path, reference):
    assert r.returncode == 0, r.stderr[-3000:]
    assert_every_h5_readable(run)
    assert_same_results(run, reference)
    assert temporaries(run) == []


@needs_root("mount a tmpfs")
def test_disk_full_mid_run_on_two_ranks(disk_errors, reference):
    """The run directory on a tmpfs that holds the parent, the masks and two tasks, with room for about two
    more, run on 2 ranks: the rank that hits ENOSPC says so in one line and ends the job; what was written is
    intact; once space is freed, the reruns (`disk_errors`) finish it, equal to the uninterrupted run."""
    d = disk_errors
    lines, written = assert_disk_full(d["full"], d["after_full"], d["kept"], reference, 2)
    assert_rerun_equal(d["rerun"], d["final"], reference)
    note("disk full (ENOSPC) mid-run under mpirun -np 2",
         f"rc 1, '{lines[0][:70]}...'; {len(written)} task files intact; rerun after freeing space rc 0, equal")


@needs_root("mount a tmpfs and a read-only bind mount")
def test_read_only_tasks_directory_mid_run(disk_errors, reference):
    """tasks/ becomes read-only while a task of the serial rerun in `disk_errors` trains: one EROFS line, the
    job ends, what was on disk is intact; the next rerun finishes it, equal to the uninterrupted run."""
    d = disk_errors
    lines = assert_read_only(d["ro_rc"], d["ro_err"], d["after_ro"], d["kept_ro"], None, d["tasks"])
    assert_rerun_equal(d["rerun"], d["final"], reference)
    note("read-only tasks/ mid-run, serial", f"rc 1, '{lines[0][:60]}...'; finished intact; rerun rc 0, equal")


# Each from a run of its own; the default suite runs the disk full on 2 ranks and the read-only tasks/ of a serial
# run as two launches of one run (`disk_errors`: test_disk_full_mid_run_on_two_ranks,
# test_read_only_tasks_directory_mid_run).
@battery
@needs_root("mount a tmpfs")
@pytest.mark.parametrize("np_", [2, None])
def test_disk_full_mid_run(reference, tmp_path, np_):
    """The run directory on a tmpfs that holds the parent, the masks and two tasks, with room for about two
    more: the rank that hits ENOSPC says so in one line and ends the job; what was written is intact."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        run, kept = fill_disk(reference, disk)
        lines, written = assert_disk_full(launch(run, np_), run, kept, reference, np_)
        (disk / "filler").unlink()
        assert_rerun_equal(launch(run), run, reference)
    note(f"disk full (ENOSPC) mid-run{' under mpirun -np 2' if np_ else ', serial'}",
         f"rc 1, '{lines[0][:70]}...'; {len(written)} task files intact; rerun after freeing space rc 0, equal")


@battery
@needs_root("a read-only bind mount")
@pytest.mark.parametrize("np_", [None, 2])
def test_read_only_run_directory_mid_run(reference, tmp_path, np_):
    """tasks/ becomes read-only (a bind mount remounted ro) while a task trains: one EROFS line, job ends."""
    run = copy_run(reference, tmp_path / "run")
    for tid in sorted(task_files(reference))[2:]:
        (run / "tasks" / f"{tid}.h5").unlink()
    (run / "results.h5").unlink()
    kept = task_files(run)
    rc, err = read_only_mid_task(run, np_)
    lines = assert_read_only(rc, err, run, kept, np_)
    r = launch(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(run, reference)
    note(f"read-only tasks/ mid-run{' under mpirun -np 2' if np_ else ', serial'}",
         f"rc 1, '{lines[0][:60]}...'; finished intact; rerun rc 0, equal")


# -- corrupt inputs -------------------------------------------------------------------------------------------

def write_idx(path, magic: int, dims, values=None):
    n = int(np.prod(dims))
    body = bytes(values if values is not None else (i % 10 for i in range(n)))
    Path(path).write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + body)


def idx_dir(base, *, image_magic=0x803, labels=None):
    d = Path(base) / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", image_magic, (20, 28, 28))
    write_idx(d / "train-labels-idx1-ubyte", 0x801, (20,), labels)
    write_idx(d / "t10k-images-idx3-ubyte", 0x803, (5, 28, 28))
    write_idx(d / "t10k-labels-idx1-ubyte", 0x801, (5,))
    return d


def npz_file(base, bad):
    x = np.random.default_rng(0).random((30, 8, 8, 1)).astype(np.float32)
    x[3, 2, 2, 0] = bad
    path = Path(base) / "data.npz"
    np.savez(path, x_train=x, y_train=np.arange(30) % 3, x_test=x[:6], y_test=np.arange(6) % 3)
    return path


def prepared_file(base):
    path = Path(base) / "digits.h5"
    r = subprocess.run([PY, "-m", "lthmpi.data", "prepare", "--dataset", "digits", "--validation", "200",
                        "--out", str(path)], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return path


def make_corrupt_case(name, reference, base: Path):
    """(run dir, extra --set items, words the one error line must hold; None = the rerun must succeed)."""
    run = base / "run"
    sets: list[str] = []
    if name.startswith(("task_", "results_", "parent_", "masks_")):
        copy_run(reference, run)
    tid = sorted(task_files(reference))[1]
    task = run / "tasks" / f"{tid}.h5"
    if name == "task_bitflip":
        with h5py.File(task, "r") as f:
            value = float(f.attrs["end_time"])
        flip_float_attr(task, value)
        words = ["task result", str(task), "corrupt", "delete it"]
    elif name == "task_curve_bitflip":
        flip_in_dataset(task, "evals/val_loss", 5)
        words = ["task result", str(task), "corrupt", "delete it"]
    elif name == "task_truncated":
        task.write_bytes(task.read_bytes()[:3000])
        words = ["task result", str(task), "unreadable", "delete it"]
    elif name == "results_truncated":
        p = run / "results.h5"
        p.write_bytes(p.read_bytes()[:5000])
        words = None
    elif name == "results_bitflip":
        flip_in_dataset(run / "results.h5", "tasks/final_accuracy", 9)
        words = None
    elif name == "parent_truncated":
        p = run / "parent.h5"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        words = ["parent checkpoint file", str(p), "delete it"]
    elif name == "parent_bitflip":
        flip_in_dataset(run / "parent.h5", "checkpoints/10/weights/fc2/kernel", 1001)
        words = ["parent checkpoint file", str(run / "parent.h5"), "corrupt", "delete it"]
    elif name == "masks_bitflip":
        flip_in_dataset(run / "masks.h5", "masks/1/output/kernel", 17)
        words = ["mask file", str(run / "masks.h5"), "corrupt", "delete it"]
    elif name == "masks_wrong_shape":
        from lthmpi.store import RunDir

        (run / "masks.h5").unlink()
        bad = {p: np.ones((3, 3), bool) for p in ("fc1/kernel", "fc2/kernel", "output/kernel")}
        RunDir(str(run)).write_masks([bad, bad], [0.5, 0.2], [0.5, 0.2])
        words = ["mask file", "does not match the model", "fc1/kernel", "delete it"]
    elif name == "prepared_truncated":
        p = prepared_file(base)
        p.write_bytes(p.read_bytes()[:20000])
        sets, words = [f"data.prepared={p}"], ["prepared file", str(p), "corrupt"]
    elif name == "prepared_bitflip":
        p = prepared_file(base)
        flip_in_dataset(p, "x_train", 4001)
        sets, words = [f"data.prepared={p}"], ["prepared file", str(p), "corrupt", "checksum"]
    elif name == "idx_wrong_magic":
        d = idx_dir(base, image_magic=0x802)
        sets = ["data.dataset=fashion_mnist", f"data.dir={d}", "data.validation=5"]
        words = ["train-images-idx3-ubyte", "magic number 0x00000802"]
    elif name == "labels_out_of_range":
        d = idx_dir(base, labels=[3] * 19 + [12])
        sets = ["data.dataset=fashion_mnist", f"data.dir={d}", "data.validation=5"]
        words = ["train-labels-idx1-ubyte", "label 12 is out of range"]
    elif name in ("nan_in_data", "inf_in_data"):
        p = npz_file(base, np.nan if name == "nan_in_data" else np.inf)
        sets = ["data.dataset=npz", f"data.dir={p}", "data.validation=5"]
        words = [str(p), "NaN or Inf"]
    else:  # pragma: no cover
        raise KeyError(name)
    return run, sets, words


CORRUPT = ["task_bitflip", "task_curve_bitflip", "task_truncated", "results_truncated", "results_bitflip",
           "parent_truncated", "parent_bitflip", "masks_bitflip", "masks_wrong_shape", "prepared_truncated",
           "prepared_bitflip", "idx_wrong_magic", "labels_out_of_range", "nan_in_data", "inf_in_data"]


# Through the real command line (a subprocess each, side by side); the other cases through lthmpi.main.main in
# this process: what they check is the one line and the exit status of a start-up, not the interpreter's start.
CORRUPT_BY_CLI = ("task_bitflip", "nan_in_data")


@pytest.fixture(scope="module")
def corrupt_runs(reference, tmp_path_factory):
    """Every corrupt-input case rerun: (CompletedProcess, run, sets, words) by name."""
    cases = {name: make_corrupt_case(name, reference, tmp_path_factory.mktemp(name)) for name in CORRUPT}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(launch, cases[name][0], None, cases[name][1]) for name in CORRUPT_BY_CLI}
        done = {name: launch_in_process(run, sets) for name, (run, sets, _) in cases.items()
                if name not in CORRUPT_BY_CLI}
        done.update({name: f.result() for name, f in futures.items()})
    return {name: (done[name], *cases[name]) for name in CORRUPT}


@pytest.fixture(scope="module")
def rerun_of_one_task(corrupt_runs):
    """The corrupt task file deleted and the run resumed on 2 ranks: one task to train, so one rank has none."""
    _, run, _, words = corrupt_runs["task_bitflip"]
    damaged = Path(words[1])
    damaged.unlink()
    before = mtimes(run)
    return run, damaged, before, launch(run, 2)


# Not a class of their own (an xdist loadscope scope on another worker, with a `reference` run of its own): since
# `killed_run` took the interrupted run in, the whole module fits one worker, and shares one `reference`.
@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_input_is_named_in_one_line(corrupt_runs, reference, name):
    proc, run, sets, words = corrupt_runs[name]
    if words is None:  # results.h5 is derived: a damaged one is rebuilt from the task files
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_every_h5_readable(run)
        assert_same_results(run, reference)
        note(f"corrupt input: {name}", "rerun rc 0: results.h5 rebuilt from the task files, equal")
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("lthmpi: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    if not name.startswith(("task_", "parent_", "masks_")):
        assert not run.exists(), "a failed start leaves no run directory"
    note(f"corrupt input: {name}", f"rc 2, {lines[0][:110]}")


def test_rerun_after_deleting_a_corrupt_task_recomputes_only_it(rerun_of_one_task, reference):
    run, damaged, before, r = rerun_of_one_task
    assert r.returncode == 0, r.stderr[-3000:]
    assert done_counts(run) == {damaged.stem: 1}, "only the deleted task is trained again"
    assert_same_results(run, reference)
    for name, mtime in before.items():
        assert (run / "tasks" / name).stat().st_mtime_ns == mtime


def test_idle_ranks_without_subgroups_run_and_are_logged(rerun_of_one_task):
    """The default `parallel.subgroups = auto` keeps a Dense-only net out of subgroups: the extra rank waits
    (2 ranks, the one task of the rerun above)."""
    run, _, _, r = rerun_of_one_task
    assert r.returncode == 0, r.stderr[-3000:]
    text = (run / "logs" / "rank0.log").read_text()
    m = re.search(r"1 workers have no task and wait \(ranks (\d)\)", text)
    assert m, text
    assert "parallel.subgroups = auto: no data-parallel subgroups for a model without convolutions" in text
    assert log_has(run, f"rank {m.group(1)} has no task", int(m.group(1)))
    note("2 ranks, 1 task to do, parallel.subgroups = auto (Dense-only net)",
         f"rc 0; rank 0's log: 1 workers have no task and wait (ranks {m.group(1)}), and why")


def test_analysis_refuses_a_corrupt_results_file(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    flip_in_dataset(run / "results.h5", "tasks/early_stop_accuracy", 2)
    r = subprocess.run([PY, "-m", "lthmpi.analysis", str(run), "--json"], capture_output=True, text=True,
                       env=clean_env(), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "corrupt" in lines[0] and "rebuild" in lines[0] and str(run / "results.h5") in lines[0]


# -- two runs, one directory ------------------------------------------------------------------------------------

def test_second_run_on_the_same_directory_is_refused(killed_run, reference):
    """mpirun -np 2 on the directory of a serial run that is working there (launch 5 of `killed_run`, waiting
    in its merge): refused in one line naming host:pid; the first run is unharmed."""
    k = killed_run
    second = k["second"]
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert "in use by another lthmpi run" in lines[0] and f":{k['first_pid']} since" in lines[0], lines[0]
    assert k["first_rc"] == 0, k["first_err"][-3000:]  # the first is unharmed
    assert_resumed_cleanly(k["run"], reference, left=k["mtimes_int"])
    note("second run on a directory in use (mpirun -np 2 while a serial run works)",
         f"refused in {k['refused_in']:.1f} s, rc 2, one line naming host:pid; the first finished rc 0, equal")


@battery  # also shown by every SIGKILL case above (rank 0 held the lock) and in-process by the lock unit test
def test_stale_lock_of_a_killed_run_is_taken_over(reference, tmp_path):
    run = tmp_path / "run"
    p = start(run, env={"LTHMPI_FAULT": "wait:0:3"})
    wait_for(lambda: log_has(run, WAITING, 0), p, what="the run in its third task")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert f":{p.pid} since" in (run / "lock").read_text()
    before = mtimes(run)
    r = launch(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f":{p.pid} since" not in (run / "lock").read_text()
    assert_resumed_cleanly(run, reference, before)
    note("stale lock of a SIGKILLed run", "rerun took the lock over, rc 0, equal, none redone")


# -- divergence ------------------------------------------------------------------------------------------------

def test_diverged_retraining_is_recorded_not_a_crash(reference, tmp_path, monkeypatch):
    """Rank 0's second task gets NaN weights: recorded diverged, the run goes on. Through lthmpi.main.main in this
    process (what it checks is the run's records, not the interpreter's start; the processes of `killed_run` are
    compared with `reference` bit for bit), from the reference's parent and masks (the divergence is a retraining's)."""
    from lthmpi import faults

    run = tmp_path / "run"
    (run / "tasks").mkdir(parents=True)
    for name in ("config.toml", "parent.h5", "masks.h5"):
        shutil.copy(reference / name, run / name)
    monkeypatch.setenv("LTHMPI_FAULT", "nan:0:2")
    try:
        r = launch_in_process(run)
    finally:
        monkeypatch.delenv("LTHMPI_FAULT")
        faults.set_fault(0)  # the fault of this run (a module global) ends with it
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(run)
    assert len(recs) == N_TASKS
    diverged = sorted(t for t, v in recs.items() if v["diverged"])
    assert len(diverged) == 1, diverged
    ref = records(reference)
    for tid, v in recs.items():  # the sweep went on: every other task is exactly the uninterrupted one
        if tid not in diverged:
            assert v["early_stop_accuracy"] == ref[tid]["early_stop_accuracy"]
    assert log_has(run, f"task {diverged[0]} diverged", 0)
    a = subprocess.run([PY, "-m", "lthmpi.analysis", str(run), "--json"], capture_output=True, text=True,
                       env=clean_env(), cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    s = json.loads(a.stdout)
    flags = [t["diverged"] for t in s["tasks"]]
    assert flags.count(True) == 1 and flags.count(False) == N_TASKS - 1
    note("retraining diverges (NaN weights injected)", f"rc 0, {diverged[0]} recorded diverged=True, the other "
         f"{N_TASKS - 1} equal the uninterrupted run; analysis --json shows diverged: true")


@needs_root("unshare and a private mount")
def test_run_dir_not_shared_with_a_rank_is_named_before_training(tmp_path):
    """Rank 1 gets its own empty tmpfs over the run directory's parent, as node-local /tmp on another host:
    it is told at start-up that it does not see rank 0's run directory, not later that parent.h5 is bad."""
    shared = tmp_path / "scratch"
    shared.mkdir()
    cmd = command(shared / "run")
    local = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {shared} && exec \"$@\"", "sh", *cmd]
    r = subprocess.run([str(MPIRUN), "-np", "1", *cmd, ":", "-np", "1", *local], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, env=clean_env())
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "rank 1 on" in lines[0] and "does not see the run directory" in lines[0] and "every rank sees" in lines[0]
    assert not (shared / "run" / "parent.h5").exists(), "stopped before rank 0 trained anything"
