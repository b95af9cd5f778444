"""Helpers for the fault-and-input battery (tests/test_faults.py, tests/test_bad_config.py, run/fault_battery.sh):
launch the real CLI with or without the real mpirun, inspect a run directory, mount a small tmpfs."""
from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIRUN = Path(sys.executable).parent / "mpirun"

# digits, 38 iterations per epoch, T = 76; 2 masks x 2 reset points x (ticket + random_reinit) = 8 tasks
TINY_SETS = ["data.dataset=digits", "data.validation=200", "train.epochs=2", "train.batch_size=32",
             "prune.remaining=[0.5, 0.2]", 'reset.points=["0ep", "10it"]', 'reset.controls=["random_reinit"]',
             "train.eval_every=10it", "parallel.threads=1"]
N_TASKS = 8
MEASURED = ("final_accuracy", "early_stop_iteration", "early_stop_accuracy", "best_val_loss", "remaining",
            "iterations", "reset_iteration", "diverged")
MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
           "MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "LTHMPI_FAULT", "LTHMPI_DATA_DIR")

# Slow variants: deselected from the default suite (setup.cfg), run by run/fault_battery.sh.
battery = pytest.mark.battery


def clean_env(extra: dict | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in MPI_ENV}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.update(extra or {})
    return e


def command(run_dir, np_=None, sets=(), args=(), base=TINY_SETS) -> list[str]:
    cmd = [PY, "-m", "lthmpi.main", "--run-dir", str(run_dir), "--quiet", *args]
    for s in [*base, *sets]:
        cmd += ["--set", s]
    if np_ is not None:
        cmd = [str(MPIRUN), "-np", str(np_), *cmd]
    return cmd


def launch(run_dir, np_=None, sets=(), env=None, timeout=300, args=(), base=TINY_SETS, cwd=None):
    """Run to the end: CompletedProcess (text stdout/stderr)."""
    return subprocess.run(command(run_dir, np_, sets, args, base), cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env))


def main_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m lthmpi.main ARGV` through `lthmpi.main.main` in this process, its stdout and stderr captured:
    for the many cases that check how one start-up fails (or what --describe prints), without a TensorFlow
    import (~6 s of CPU) each. The real command line, its interpreter start and TensorFlow's own stderr keep
    their subprocess tests (`launch`)."""
    import contextlib
    import io

    from lthmpi.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def launch_in_process(run_dir, sets=(), args=(), base=TINY_SETS) -> subprocess.CompletedProcess:
    """What `launch` does, through `main_in_process`."""
    return main_in_process(command(run_dir, None, sets, args, base)[3:])  # without `python -m lthmpi.main`


def start(run_dir, np_=None, sets=(), env=None, args=(), base=TINY_SETS, cwd=None) -> subprocess.Popen:
    """Start in the background (own session, so that a signal reaches only what the test means)."""
    return subprocess.Popen(command(run_dir, np_, sets, args, base), cwd=cwd or ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(env), start_new_session=True)


def finish(proc: subprocess.Popen, timeout=180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"did not end within {timeout} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err


def wait_for(cond, proc: subprocess.Popen | None = None, timeout=180, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def log_has(run_dir, text: str, rank: int | None = None) -> bool:
    logs = Path(run_dir) / "logs"
    files = [logs / f"rank{rank}.log"] if rank is not None else list(logs.glob("rank*.log"))
    return any(f.exists() and text in f.read_text(errors="replace") for f in files)


def error_lines(stderr: str, prefix="lthmpi: error:") -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(prefix)]


def lthmpi_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("lthmpi")]


def done_counts(run_dir) -> collections.Counter:
    """How many times each task was trained to the end, over every run in this directory (rank and shard logs
    append)."""
    ids = []
    for log in (Path(run_dir) / "logs").glob("*.log"):
        ids += re.findall(r"task (\S+) done in", log.read_text(errors="replace"))
    return collections.Counter(ids)


def task_files(run_dir) -> set[str]:
    return {p.stem for p in (Path(run_dir) / "tasks").glob("*.h5")}


def temporaries(run_dir) -> list[str]:
    return [str(p) for p in Path(run_dir).rglob(".tmp-*")]


def assert_every_h5_readable(run_dir):
    """Every .h5 file in the run directory opens with h5py, and every task file verifies (checksums)."""
    from lthmpi.store import RunDir

    files = sorted(Path(run_dir).rglob("*.h5"))
    for p in files:
        with h5py.File(p, "r") as f:
            f.attrs.keys()
    run = RunDir(str(run_dir))
    for tid in task_files(run_dir):
        run.read_task(tid)
    return files


def records(run_dir) -> dict:
    from lthmpi import results

    return {t["task_id"]: t for t in results.load(str(run_dir))["tasks"]}


def curves(run_dir) -> dict:
    out = {}
    with h5py.File(Path(run_dir) / "results.h5", "r") as f:
        for tid in f["curves"]:
            for name in f["curves"][tid]:
                for col in f["curves"][tid][name]:
                    out[(tid, name, col)] = f["curves"][tid][name][col][()]
    return out


def assert_same_results(run_dir, reference):
    got, want = records(run_dir), records(reference)
    assert sorted(got) == sorted(want)
    for tid in want:
        for k in MEASURED:
            a, b = got[tid][k], want[tid][k]
            assert a == b or (a != a and b != b), (tid, k, a, b)
    c_got, c_want = curves(run_dir), curves(reference)
    assert c_got.keys() == c_want.keys()
    for key in c_want:
        np.testing.assert_array_equal(c_got[key], c_want[key], err_msg=str(key))


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of `size` at `path` (root only); unmounted (lazily if busy) in any case."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:  # as root it must work (tests that need it are marked needs_root)
        pytest.fail(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield Path(path)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True)
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def note(case: str, outcome: str):
    """One row of run/fault_battery.sh's table (written only when it asks for them)."""
    path = os.environ.get("LTHMPI_BATTERY_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{case}\t{' '.join(outcome.split())}\n")
