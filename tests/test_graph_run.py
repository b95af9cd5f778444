"""A graph with chains and joins (tests/chainkind.py) through the real coordinator, on P = 1 (no mpirun),
2 and 3: every task exactly once, each after its inputs, reading their results; a rank SIGKILLed mid-chain
ends the job by itself and the rerun (P = 1, the dynamic schedule without mpirun) finishes without redoing a
finished task."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from chainkind import EXPECTED
from faultkit import MPIRUN, PY, ROOT, clean_env, done_counts, error_lines, task_files, temporaries

SETS = ["data.dataset=digits", "data.validation=200", "train.epochs=1", "train.batch_size=32",
        "prune.remaining=[0.5]", 'reset.points=["0ep"]', "reset.controls=[]", "train.eval_every=10it",
        "parallel.threads=1"]
GRID = ["m000_r00_ticket"]


def launch(run_dir, np_=None, schedule="dynamic", env=None, timeout=240):
    cmd = [PY, str(ROOT / "tests" / "chainkind.py"), "--run-dir", str(run_dir), "--quiet"]
    for s in [*SETS, f"parallel.schedule={schedule}"]:
        cmd += ["--set", s]
    if np_ is not None:
        cmd = [str(MPIRUN), "-np", str(np_), *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env(env))


def attrs_of(run_dir) -> dict:
    from lthmpi.store import RunDir

    run = RunDir(str(run_dir))
    return {tid: run.read_task(tid)[0] for tid in task_files(run_dir)}


def assert_graph_ran(run_dir):
    got = attrs_of(run_dir)
    assert sorted(got) == sorted([*EXPECTED, *GRID])
    assert {t: got[t]["value"] for t in EXPECTED} == EXPECTED, "each task read its inputs' results"
    for t in EXPECTED:
        assert got[t]["start_time"] >= got[t]["inputs_ended"], f"{t} started before an input had finished"
    counts = done_counts(run_dir)
    assert sorted(counts) == sorted(got) and set(counts.values()) == {1}, counts
    return got


def assert_results_name_every_task(run_dir, got):
    from lthmpi import results

    res = results.load(str(run_dir))
    assert sorted(t["task_id"] for t in res["tasks"]) == sorted(got)
    assert {t["task_id"]: t["kind"] for t in res["tasks"]} == {t: "chain" if t in EXPECTED else "oneshot" for t in got}


# P = 3 under dynamic, and P = 1 (dynamic, no mpirun): the killed run and its rerun below.
# lpt at P = 3 is a battery variant: under mpirun `static` and `lpt` run the same code (each rank runs its planned
# list in order, waiting for its inputs' files; only the pure `plan` differs, which test_graph.py checks never
# deadlocks), and [2-static] runs it here on this graph with its joins; lpt's plan on chains under mpirun -np 3,
# every rank training, bitwise equal to P = 1, runs in
# test_imp.py::test_sigkill_mid_chain_resumes_without_retraining_and_three_ranks_agree.
SAME_CODE_AS_STATIC = pytest.mark.battery


@pytest.mark.parametrize("np_, schedule", [(2, "static"), pytest.param(3, "lpt", marks=SAME_CODE_AS_STATIC)])
def test_chains_and_joins_run_in_dependency_order(tmp_path, np_, schedule):
    run = tmp_path / "run"
    r = launch(run, np_, schedule)
    assert r.returncode == 0, r.stderr[-3000:]
    got = assert_graph_ran(run)
    assert {a["rank"] for a in got.values()} == set(range(np_)), "every rank ran tasks"
    assert_results_name_every_task(run, got)


def test_rank_killed_mid_chain_ends_the_job_and_the_rerun_redoes_nothing(tmp_path):
    """P = 3 (dynamic) with rank 1 SIGKILLed in its second task; the rerun is P = 1 without mpirun (a run
    directory does not care how many ranks made it), the dynamic schedule in one process on what is left of
    the graph: every task then ran exactly once over both runs, each after its inputs."""
    run = tmp_path / "run"
    t0 = time.time()
    r = launch(run, 3, env={"LTHMPI_FAULT": "kill:1:2"}, timeout=180)
    assert r.returncode != 0 and time.time() - t0 < 180
    assert not (run / "results.h5").exists()
    finished = task_files(run)
    assert 0 < len(finished) < len(EXPECTED) + len(GRID), finished
    assert set(done_counts(run)) == finished, "what a rank logged as done is exactly what is on disk"
    before = {p.name: p.stat().st_mtime_ns for p in (Path(run) / "tasks").glob("*.h5")}

    r = launch(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert error_lines(r.stderr) == []
    got = assert_graph_ran(run)  # every task done exactly once over both runs
    assert {got[t]["rank"] for t in got if f"{t}.h5" not in before} == {0}, "the rerun trained the rest"
    assert_results_name_every_task(run, got)
    assert temporaries(run) == []
    for name, mtime in before.items():
        assert (Path(run) / "tasks" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
