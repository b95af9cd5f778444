"""The coordinator under real `mpirun`: every task once, results independent of P and scheduler and equal to
the code before the task graph (tests/data/flat_reference.json), data-parallel subgroups in sync, a failing
rank ends the job, and a rerun resumes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import portable
from faultkit import curves, records as task_records

from lthmpi import results

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"

TINY = ["--set", "data.dataset=digits", "--set", "data.validation=200", "--set", "train.epochs=2",
        "--set", "train.batch_size=32", "--set", "prune.remaining=[0.5, 0.2, 0.1]",
        "--set", 'reset.points=["0ep", "10it"]', "--set", 'reset.controls=["random_reinit"]',
        "--set", "train.eval_every=10it", "--set", "parallel.threads=1", "--set", "prune.layer_rates={}", "--quiet"]
N_TASKS = 3 * 2 * 2
DIGITS_SIZES = {"val": 200, "test": 360}  # data.validation = 200 of digits' 1797, 360 test


def launch(run_dir, np_=None, extra=(), env=None, timeout=300, main=("-m", "lthmpi.main")):
    cmd = [sys.executable, *main, "--run-dir", str(run_dir), *TINY, *extra]
    if np_ is not None:
        cmd = [str(MPIRUN), "-np", str(np_), *cmd]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def done_lines(run_dir):
    """Task ids that a rank logged as trained, over all rank logs (one line per training)."""
    ids = []
    for log in (Path(run_dir) / "logs").glob("rank*.log"):
        ids += re.findall(r"task (\S+) done in", log.read_text())
    return ids


MEASURED = ("final_accuracy", "early_stop_iteration", "early_stop_accuracy", "best_val_loss", "remaining",
            "iterations", "reset_iteration")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tf_runtime):
    """P = 1 without mpirun: the one-rank communicator, through lthmpi.main.main in this process (one TF thread,
    as every rank): the command line's code after the interpreter starts, without a process importing
    TensorFlow (~5 s of CPU)."""
    from faultkit import main_in_process

    run = tmp_path_factory.mktemp("p1") / "run"
    r = main_in_process(["--run-dir", str(run), *TINY])
    assert r.returncode == 0, r.stderr
    return run


def flat_reference() -> dict:
    return json.loads((ROOT / "tests" / "data" / "flat_reference.json").read_text())


def reference_mismatches(run, old) -> list[str]:
    """Every stored field the run does not hold, by tests/portable.py's rules: counts, iterations, accuracies (as
    counts of the 200 validation and 360 test examples) and fractions exactly, losses within LOSS_RTOL (the
    reference was made on another CPU, whose float reductions round otherwise)."""
    got, c_got = task_records(run), curves(run)
    assert sorted(got) == sorted(old["tasks"]) and len(got) == N_TASKS
    out = []
    for tid, want in old["tasks"].items():
        attrs = dict(got[tid], control=got[tid]["control"] or "")
        out += portable.mismatches(attrs, want["attrs"], DIGITS_SIZES, f"{tid} ")
        flat = {key: c_got[(tid, *key.split("/"))] for key in want["curves"]}
        out += portable.mismatches(flat, want["curves"], DIGITS_SIZES, f"{tid} ")
    return out


def test_p1_equals_the_code_before_the_task_graph(reference):
    """The per-task results that commit dd455de gave (tests/data/make_flat_reference.py) on another machine,
    field by field within tests/portable.py's rules: the other tests compare every P and scheduler with
    `reference` bitwise, so they equal the old code too."""
    old = flat_reference()
    assert old["sets"] == [v for k, v in zip(TINY[::2], TINY[1::2]) if k == "--set"], "made on this grid"
    assert reference_mismatches(reference, old) == []


def test_a_stored_value_moved_past_its_tolerance_is_caught(reference):
    """The comparison above can fail: one loss moved by 3 x LOSS_RTOL, one accuracy by one example, one
    iteration by one are each named; a loss moved by a third of the tolerance is not."""
    tid = "m000_r00_random_reinit"
    for field, move, caught in [("best_val_loss", lambda v: v * (1 + 3 * portable.LOSS_RTOL), True),
                                ("best_val_loss", lambda v: v * (1 + portable.LOSS_RTOL / 3), False),
                                ("final_accuracy", lambda v: v + 1 / DIGITS_SIZES["test"], True),
                                ("early_stop_iteration", lambda v: v + 1, True)]:
        old = flat_reference()
        attrs = old["tasks"][tid]["attrs"]
        attrs[field] = move(attrs[field])
        found = reference_mismatches(reference, old)
        assert [m.split(":")[0] for m in found] == ([f"{tid} {field}"] if caught else []), (field, found)
    old = flat_reference()
    old["tasks"][tid]["curves"]["evals/val_loss"][3] *= 1 + 3 * portable.LOSS_RTOL
    assert [m.split(":")[0] for m in reference_mismatches(reference, old)] == [f"{tid} evals/val_loss"]


# P = 1, 2 and 3 under each scheduler: the default suite runs each scheduler with MPI at least once (static at
# P = 2, lpt and dynamic at P = 3, dynamic at P = 1); the other cases are marked `battery` (`./run/test.sh -m
# "battery or not battery"` runs them all).
OTHER_SCHEDULES = pytest.mark.battery
# P = 3 under lpt and dynamic runs in the default suite, bitwise against P = 1 with every task trained once:
# test_failing_rank_aborts_job_and_rerun_resumes trains part of the grid under lpt (the default schedule) in its
# first run and the rest under dynamic on all three ranks in its rerun, and compares the whole with `reference`
# (and test_pai.py::test_snip_grid_p2_under_mpirun_equals_p1 runs a whole grid under lpt on two ranks). So the
# three fresh P = 3 runs here are battery variants.
P3_ALSO_ELSEWHERE = pytest.mark.battery


@pytest.mark.parametrize("schedule", [pytest.param("static", marks=OTHER_SCHEDULES),
                                      pytest.param("lpt", marks=OTHER_SCHEDULES), "dynamic"])
def test_p1_under_mpirun_equals_p1(reference, tmp_path, schedule):
    run = tmp_path / "run"
    r = launch(run, 1, ["--set", f"parallel.schedule={schedule}"])
    assert r.returncode == 0, r.stderr
    assert_equal_runs(run, reference)
    assert sorted(done_lines(run)) == sorted(task_records(reference)), "every task trained exactly once"


@pytest.mark.parametrize("schedule", [pytest.param("static", marks=OTHER_SCHEDULES),
                                      pytest.param("lpt", marks=P3_ALSO_ELSEWHERE),
                                      pytest.param("dynamic", marks=P3_ALSO_ELSEWHERE)])
def test_p3_equals_p1_and_runs_every_task_once(reference, tmp_path, schedule):
    run = tmp_path / "run"
    r = launch(run, 3, ["--set", f"parallel.schedule={schedule}"])
    assert r.returncode == 0, r.stderr
    got, want = assert_equal_runs(run, reference)
    trained = done_lines(run)
    assert sorted(trained) == sorted(want), "every task trained exactly once"
    used = {t["rank"] for t in got.values()}
    assert used == {0, 1, 2}, f"all three ranks train ({schedule}): {used}"
    prov = results.load(str(run))["provenance"]
    assert prov["ranks"] == 3 and prov["schedule"] == schedule


def assert_equal_runs(run, reference):
    """Every task's measured columns and curves bitwise equal; returns both runs' records."""
    got, want = task_records(run), task_records(reference)
    assert sorted(got) == sorted(want) and len(got) == N_TASKS
    for tid in want:
        for k in MEASURED:
            assert got[tid][k] == want[tid][k], (tid, k)
    c_got, c_want = curves(run), curves(reference)
    assert c_got.keys() == c_want.keys()
    for key in c_want:
        np.testing.assert_array_equal(c_got[key], c_want[key], err_msg=str(key))
    return got, want


@pytest.mark.parametrize("schedule", ["static", pytest.param("lpt", marks=OTHER_SCHEDULES),
                                      pytest.param("dynamic", marks=OTHER_SCHEDULES)])
def test_p2_mpirun_and_phase_timings(reference, tmp_path, schedule):
    run = tmp_path / "run"
    r = launch(run, 2, ["--set", f"parallel.schedule={schedule}"])
    assert r.returncode == 0, r.stderr
    got, want = assert_equal_runs(run, reference)
    timing = results.load(str(run))["timing"]
    for phase in ("startup", "parent", "masks", "distribution", "training", "gather", "total"):
        assert timing[phase] >= 0, phase
    assert timing["total"] >= timing["training"] > 0
    for t in got.values():
        assert t["start_time"] <= t["end_time"] and t["threads"] == 1


def test_more_ranks_than_tasks_forms_data_parallel_subgroups(tmp_path):
    """2 tasks on 3 ranks: one subgroup of 2 ranks averaging gradients, one rank alone (forced: `auto`
    keeps a Dense-only net out of subgroups). 20 iterations, every step of the pair an Allreduce (the tasks reach
    ~0.73 and ~0.79 at P = 1; most of the CPU is the three ranks' start and compiles, not the steps)."""
    run = tmp_path / "run"
    r = launch(run, 3, ["--set", "prune.remaining=[0.5, 0.2]", "--set", 'reset.points=["0ep"]',
                        "--set", "reset.controls=[]", "--set", "parallel.subgroups=true", "--set", "train.iterations=20"])
    assert r.returncode == 0, r.stderr
    recs = task_records(run)
    assert len(recs) == 2
    with h5py.File(run / "results.h5", "r") as f:
        assert f["provenance"].attrs["workers"] == 2
        assert not f["provenance"].attrs["parent_data_parallel"]  # `auto`: a Dense-only parent stays on rank 0
    assert "parent trained on rank 0: parallel.parent_data_parallel = auto keeps a model without convolutions" in (
        run / "logs" / "rank0.log").read_text()
    replicas = {}
    for tid in recs:
        with h5py.File(run / "tasks" / f"{tid}.h5", "r") as f:
            replicas[tid] = (int(f.attrs["replicas"]), bool(f.attrs["replicas_identical"]))
    assert sorted(replicas.values()) == [(1, True), (2, True)]
    assert sorted(done_lines(run)).count(next(t for t, v in replicas.items() if v[0] == 2)) == 2
    for t in recs.values():
        assert 0.5 < t["final_accuracy"] <= 1.0


def test_failing_rank_aborts_job_and_rerun_resumes(reference, tmp_path):
    """P = 3 under lpt (the default) with rank 1 failing in its second task: the job ends with one line naming
    it. The rerun, P = 3 under the dynamic schedule (a run directory does not care which schedule made its
    tasks), trains only the rest, on all three ranks; every task is then trained exactly once, and the results
    of both runs together equal P = 1 bitwise."""
    run = tmp_path / "run"
    try:  # a job that hangs instead of ending is the failure this test looks for
        r = launch(run, 3, env={"LTHMPI_FAULT": "raise:1:2"}, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 1 failed but the job did not end: still running after 180 s")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lthmpi: error:")]
    assert len(lines) == 1 and "rank 1" in lines[0] and "injected fault" in lines[0], r.stderr
    finished = set(done_lines(run))
    on_disk = {p.stem for p in (run / "tasks").glob("*.h5")}
    assert finished == on_disk and 0 < len(on_disk) < N_TASKS
    before = {p.name: p.stat().st_mtime_ns for p in (run / "tasks").glob("*.h5")}

    r = launch(run, 3, ["--set", "parallel.schedule=dynamic"])
    assert r.returncode == 0, r.stderr
    trained = done_lines(run)
    assert len(trained) == len(set(trained)) == N_TASKS, "no finished task redone"
    assert not list(run.rglob(".tmp-*")), "no half-written file left behind"
    after = {p.name: p.stat().st_mtime_ns for p in (run / "tasks").glob("*.h5")}
    assert all(after[n] == t for n, t in before.items())
    got, _ = assert_equal_runs(run, reference)
    used = {t["rank"] for tid, t in got.items() if f"{tid}.h5" not in before}
    assert used == {0, 1, 2}, f"all three ranks train in the rerun (dynamic): {used}"
    prov = results.load(str(run))["provenance"]
    assert prov["ranks"] == 3 and prov["schedule"] == "dynamic"


def mpmd(run_dir, per_rank_extra, timeout=120):
    """One mpirun, rank r started with TINY plus per_rank_extra[r] (MPICH's `A : B` form)."""
    cmd = [str(MPIRUN)]
    for i, extra in enumerate(per_rank_extra):
        cmd += ([":"] if i else []) + ["-np", "1", sys.executable, "-m", "lthmpi.main", "--run-dir", str(run_dir),
                                       *TINY, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_config_unreadable_on_one_rank_is_named_by_rank_0(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("seed = 3\n")
    r = mpmd(tmp_path / "run", [["--config", str(good)], ["--config", str(tmp_path / "absent.toml")]])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lthmpi: error:")]
    assert len(lines) == 1, r.stderr
    assert "rank 1 on" in lines[0] and "absent.toml does not exist" in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "nothing written for a job that never started"


def test_ranks_with_different_configs_are_refused(tmp_path):
    r = mpmd(tmp_path / "run", [["--set", "seed=1"], ["--set", "seed=2"]])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lthmpi: error:")]
    assert len(lines) == 1 and "rank 1 on" in lines[0] and "another config than rank 0" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


# ResNet-20 is a battery variant: the test-only bn_conv (tests/bnconv.py) has the same batch-norm layer and
# goes through the same data-parallel code, and traces in a second where ResNet-20 takes each rank ~8 s of CPU.
@pytest.mark.parametrize("model", ["bn_conv", pytest.param("resnet20", marks=pytest.mark.battery)])
def test_batch_norm_statistics_agree_across_data_parallel_replicas(tmp_path, model):
    """A conv net with batch norm on a subgroup of 2 (formed by the default `auto`: it has convolutions): each
    replica normalises its own half of the batch, so without averaging, the moving statistics, and with
    them evaluation and early stopping, differ. 6 iterations in blocks of 3 (each block ends with the
    averaging), for the parent (data-parallel too) and the task: without it the replicas' statistics differ
    from the first step on (checked: this test fails with DataParallelBackend._average_statistics a no-op)."""
    run = tmp_path / "run"
    r = launch(run, 2, ["--set", f"model.name={model}", "--set", "train.iterations=6", "--set", "train.eval_every=3it",
                        "--set", "prune.remaining=[0.5]", "--set", 'reset.points=["0ep"]', "--set", "reset.controls=[]"],
               main=[str(ROOT / "tests" / "bnconv.py")])
    assert r.returncode == 0, r.stderr
    (tid,) = task_records(run)
    with h5py.File(run / "tasks" / f"{tid}.h5", "r") as f:
        assert int(f.attrs["replicas"]) == 2
        assert bool(f.attrs["replicas_identical"]), "replicas' models differ after training"
    assert "parent trained data-parallel over 2 ranks" in (run / "logs" / "rank0.log").read_text()


def test_describe_under_mpirun_prints_once():
    r = subprocess.run([str(MPIRUN), "-np", "2", sys.executable, "-m", "lthmpi.main", "--describe"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("lenet300_100 on fashion_mnist") == 1, r.stdout
