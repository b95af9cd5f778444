"""Tests of the single-process engine (experiment.py, parallel/coordinator.py, store.py, results.py) on the tiny run:
reproducibility, resume after deletion and interruption, refusal of another config, atomic files."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import TINY_PER_EPOCH, TINY_TOTAL

TIMING_COLUMNS = ("seconds", "start_time", "end_time")


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def temporaries(path):
    return [f for f in files_under(path) if os.path.basename(f).startswith(".tmp-")]


def stat_of(path):
    s = os.stat(path)
    return (s.st_ino, s.st_mtime_ns, s.st_ctime_ns, s.st_size)


def curves(run_dir):
    """Every curve of results.h5: {task: {"evals/val_loss": array, ...}}."""
    out = {}
    with h5py.File(os.path.join(run_dir, "results.h5"), "r") as f:
        for tid, g in f["curves"].items():
            out[tid] = {f"{name}/{col}": g[name][col][()] for name in g for col in g[name]}
    return out


def by_id(res):
    return {t["task_id"]: t for t in res["tasks"]}


def assert_same_results(a_dir, b_dir, timing_equal_for=(), parallel_equal=True):
    """Every task's measurements and curves identical (timings only for the tasks named); the configs equal
    (but for the parallel section, which does not change the experiment, when not `parallel_equal`)."""
    from lthmpi.results import load

    a, b = load(a_dir), load(b_dir)
    ta, tb = by_id(a), by_id(b)
    assert list(ta) == list(tb)
    for tid in ta:
        for col, va in ta[tid].items():
            if col in TIMING_COLUMNS and tid not in timing_equal_for:
                continue
            assert tb[tid][col] == va or (va != va and tb[tid][col] != tb[tid][col]), (tid, col, va, tb[tid][col])
    ca, cb = curves(a_dir), curves(b_dir)
    assert set(ca) == set(cb) == set(ta)
    for tid in ca:
        assert set(ca[tid]) == set(cb[tid])
        for k in ca[tid]:
            assert np.array_equal(ca[tid][k], cb[tid][k]), (tid, k)
    for k in ("test_accuracy", "early_stop_accuracy", "early_stop_iteration", "iterations"):
        assert a["parent"][k] == b["parent"][k], k
    if parallel_equal:
        assert a["config"] == b["config"]
    else:
        assert {**a["config"], "parallel": None} == {**b["config"], "parallel": None}


# -- the tiny run itself ------------------------------------------------------------------------------

def test_run_directory_layout(tiny_run, tiny_config):
    from lthmpi.results import load

    files = files_under(tiny_run)
    assert {"config.toml", "parent.h5", "masks.h5", "results.h5"} <= set(files)
    tasks = [f for f in files if f.startswith("tasks/")]
    assert len(tasks) == 2 * 2 * 3
    assert temporaries(tiny_run) == []  # every file was renamed into place
    res = load(tiny_run)
    assert len(res["tasks"]) == 12
    assert {(t["mask"], t["reset"], t["control"]) for t in res["tasks"]} == {
        (m, r, c) for m in (0, 1) for r in ("0ep", "10it") for c in (None, "random_reinit", "random_mask")}
    assert res["parent"]["iterations"] == TINY_TOTAL
    assert 0.5 < res["parent"]["test_accuracy"] <= 1.0
    assert res["config"] == tiny_config.to_dict()
    for t in res["tasks"]:
        start = {"0ep": 0, "10it": 10}[t["reset"]]
        assert t["reset_iteration"] == start and t["iterations"] == TINY_TOTAL - start
        assert 0 < t["early_stop_iteration"] <= TINY_TOTAL - start
        assert 0.0 <= t["final_accuracy"] <= 1.0 and 0.0 <= t["early_stop_accuracy"] <= 1.0
        assert t["rank"] == 0 and t["seconds"] > 0 and not t["diverged"]
    for phase in ("startup", "parent", "masks", "training", "total"):
        assert res["timing"][phase] >= 0
    assert res["provenance"]["ranks"] == 1


def test_the_first_log_line_states_parameters_and_memory(tiny_run):
    """Before anything trains, the log says how large the network is (an absurd one is seen at once)."""
    with open(os.path.join(tiny_run, "logs", "rank0.log")) as f:
        first = f.readline()
    # LeNet-300-100 on 8x8 digits: 64*300 + 300 + 300*100 + 100 + 100*10 + 10 weights, Adam's two slots
    assert "lenet300_100 on digits (8, 8, 1): parameters: 50,610 (50,200 prunable)" in first, first
    assert "float32 weights 0.2 MiB + 2 Adam slots = 0.6 MiB per model and rank" in first, first


def test_task_early_stop_is_argmin_of_validation_loss(tiny_run):
    from lthmpi.results import load

    res, cur = load(tiny_run), curves(tiny_run)
    for t in res["tasks"]:
        c = cur[t["task_id"]]
        its, losses = c["evals/iteration"], c["evals/val_loss"]
        assert its[0] > t["reset_iteration"] and its[-1] == TINY_TOTAL
        best = int(its[int(np.argmin(losses))])
        assert t["early_stop_iteration"] == best - t["reset_iteration"]
        assert t["best_val_loss"] == float(np.min(losses))
        # the per-epoch rows end every epoch and at T; their last test accuracy is the final accuracy
        assert list(c["epochs/iteration"]) == [TINY_PER_EPOCH, TINY_TOTAL]
        assert c["epochs/test_accuracy"][-1] == t["final_accuracy"]


def test_masks_are_cut_from_the_final_parent_weights(tiny_run, tiny_config):
    from lthmpi.pruning import fraction_remaining, magnitude_masks
    from lthmpi.store import RunDir

    run = RunDir(tiny_run)
    ckpts, _, attrs = run.read_checkpoints()
    assert sorted(ckpts) == [0, 10, TINY_TOTAL]
    masks, remaining = run.read_masks()
    final = {p: ckpts[TINY_TOTAL][p] for p in ("fc1/kernel", "fc2/kernel", "output/kernel")}
    for i, r in enumerate(tiny_config.remaining_fractions()):
        assert set(masks[i]) == set(final)  # no biases
        expected = magnitude_masks(final, r, "global", {"output": 0.5})
        for p in final:
            assert np.array_equal(masks[i][p], expected[p]), p
        assert remaining[i] == fraction_remaining(masks[i])
        # not from the weights at a reset point (the seed implementation's bug)
        early = magnitude_masks({p: ckpts[10][p] for p in final}, r, "global", {"output": 0.5})
        assert any(not np.array_equal(masks[i][p], early[p]) for p in final)
    assert attrs["iterations"] == TINY_TOTAL


# -- reproducibility ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_run(tmp_path_factory, tiny_config, tf_runtime):
    """The tiny experiment run again in this process, under the static schedule: the second run of the seed
    for test_same_seed_gives_identical_results and the static case of the scheduler test, one run for both."""
    from lthmpi.config import from_dict
    from lthmpi.parallel.coordinator import run_serial

    path = str(tmp_path_factory.mktemp("again") / "run")
    run_serial(from_dict({"parallel": {"schedule": "static"}}, base=tiny_config), path, threads=1, quiet=True)
    return path


def test_same_seed_gives_identical_results(tiny_run, second_run):
    from lthmpi.store import RunDir

    assert_same_results(tiny_run, second_run, parallel_equal=False)
    a, b = RunDir(tiny_run), RunDir(second_run)
    ca, oa, _ = a.read_checkpoints()
    cb, ob, _ = b.read_checkpoints()
    for it in ca:
        for p in ca[it]:
            assert np.array_equal(ca[it][p], cb[it][p]), (it, p)
    ma, _ = a.read_masks()
    mb, _ = b.read_masks()
    for x, y in zip(ma, mb):
        for p in x:
            assert np.array_equal(x[p], y[p])


# -- resume ---------------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    pass


def test_resume_after_deletion_and_interruption(tiny_run, tiny_config, tmp_path, monkeypatch):
    from lthmpi.config import from_dict
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.training import MaskedTrainer

    run = str(tmp_path / "resumed")
    shutil.copytree(tiny_run, run)
    deleted = ["m000_r01_ticket", "m001_r00_random_mask", "m001_r01_random_reinit"]
    os.unlink(os.path.join(run, "results.h5"))
    for tid in deleted:
        os.unlink(os.path.join(run, "tasks", f"{tid}.h5"))
    kept = [f for f in files_under(run) if f.endswith(".h5")]
    stats = {f: stat_of(os.path.join(run, f)) for f in kept}

    calls = []
    real_fit = MaskedTrainer.fit

    def counting_fit(self, start, end, *args, **kwargs):
        calls.append((start, end))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise Interrupted()
        return real_fit(self, start, end, *args, **kwargs)

    monkeypatch.setattr(MaskedTrainer, "fit", counting_fit)

    # `static` on one rank runs the grid in its order (lpt would run the longest first)
    grid_order = from_dict({"parallel": {"schedule": "static"}}, base=tiny_config)

    # 1. interrupted during the second retraining: the first one is on disk, nothing half-written
    interrupt_at = 2
    with pytest.raises(Interrupted):
        run_serial(grid_order, run, threads=1, quiet=True)
    assert len(calls) == 2  # the parent was not retrained: it is complete on disk
    assert not os.path.exists(os.path.join(run, "results.h5"))
    assert temporaries(run) == []
    present = [tid for tid in deleted if os.path.exists(os.path.join(run, "tasks", f"{tid}.h5"))]
    assert present == [deleted[0]]
    for f, s in stats.items():
        assert stat_of(os.path.join(run, f)) == s, f

    # 2. the rerun trains only the two tasks still missing and merges
    calls.clear()
    interrupt_at = None
    run_serial(grid_order, run, threads=1, quiet=True)
    assert calls == [(0, TINY_TOTAL), (10, TINY_TOTAL)]  # m001_r00_random_mask, then m001_r01_random_reinit
    for f, s in stats.items():
        assert stat_of(os.path.join(run, f)) == s, f  # finished work is never rewritten
    assert temporaries(run) == []
    untouched = [os.path.splitext(os.path.basename(f))[0] for f in kept if f.startswith("tasks/")]
    assert_same_results(tiny_run, run, timing_equal_for=untouched)


def test_rerun_of_a_finished_run_trains_nothing(tiny_run, tiny_config, tmp_path, monkeypatch):
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.training import MaskedTrainer

    run = str(tmp_path / "again")
    shutil.copytree(tiny_run, run)
    before = {f: stat_of(os.path.join(run, f)) for f in files_under(run) if f.startswith("tasks/") or f in (
        "parent.h5", "masks.h5", "config.toml")}
    monkeypatch.setattr(MaskedTrainer, "fit", lambda *a, **k: pytest.fail("a finished run trained again"))
    run_serial(tiny_config, run, threads=1, quiet=True)
    for f, s in before.items():
        assert stat_of(os.path.join(run, f)) == s, f
    assert_same_results(tiny_run, run, timing_equal_for=[f[6:-3] for f in before if f.startswith("tasks/")])


# -- another config in the same directory -------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"train": {"lr": 0.002}}, ["train.lr", "different experiment"]),
    ({"seed": 4}, ["seed", "different experiment"]),
    ({"prune": {"remaining": [0.5, 0.1]}}, ["prune.remaining", "different experiment"]),
])
def test_other_config_is_refused_and_files_untouched(tiny_run, tiny_config, tmp_path, monkeypatch, change, words):
    from lthmpi.config import from_dict
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.store import StoreError
    from lthmpi.training import MaskedTrainer

    run = str(tmp_path / "other")
    shutil.copytree(tiny_run, run)
    before = {f: (stat_of(os.path.join(run, f)), open(os.path.join(run, f), "rb").read()) for f in files_under(run)}
    monkeypatch.setattr(MaskedTrainer, "fit", lambda *a, **k: pytest.fail("trained in a refused directory"))
    other = from_dict(change, base=tiny_config)
    with pytest.raises(StoreError) as e:
        run_serial(other, run, threads=1, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and run in msg
    for w in words:
        assert w in msg
    after = {f: (stat_of(os.path.join(run, f)), open(os.path.join(run, f), "rb").read()) for f in files_under(run)}
    assert after == before


def test_parallel_section_does_not_change_the_experiment(tiny_run, tiny_config, tmp_path):
    from lthmpi.config import from_dict
    from lthmpi.store import RunDir

    run = str(tmp_path / "par")
    shutil.copytree(tiny_run, run)
    other = from_dict({"parallel": {"threads": 2, "schedule": "static"}}, base=tiny_config)
    before = open(os.path.join(run, "config.toml")).read()
    RunDir(run).create(other)  # accepted: the same experiment
    assert open(os.path.join(run, "config.toml")).read() == before  # the first run's config stays, not rewritten
    assert RunDir(run).load_config().identity() == other.identity() and other.hash() == tiny_config.hash()
    assert other.parallel != tiny_config.parallel


# -- atomic files ---------------------------------------------------------------------------------------

def test_failed_task_write_leaves_nothing(tmp_path, tiny_config):
    from lthmpi.store import RunDir

    run = RunDir(str(tmp_path / "r"))
    run.create(tiny_config)
    run.write_task("m000_r00_ticket", {"final_accuracy": 0.5}, {"evals": {"iteration": np.arange(3)}})
    good = open(run.task_path("m000_r00_ticket"), "rb").read()
    for tid in ("m000_r00_ticket", "m001_r00_ticket"):
        with pytest.raises(TypeError):  # a value h5py cannot store fails half-way through the write
            run.write_task(tid, {"final_accuracy": 0.7}, {"evals": {"iteration": np.arange(3),
                                                                   "bad": np.array([object()])}})
    assert open(run.task_path("m000_r00_ticket"), "rb").read() == good  # the old file, whole
    assert not os.path.exists(run.task_path("m001_r00_ticket"))  # no new file at all
    assert temporaries(run.path) == []
    assert run.done_tasks() == {"m000_r00_ticket"}
    attrs, series = run.read_task("m000_r00_ticket")
    assert attrs["final_accuracy"] == 0.5 and list(series["evals"]["iteration"]) == [0, 1, 2]


def test_atomic_path_keeps_old_file_on_interrupt(tmp_path):
    from lthmpi.fileio import atomic_h5

    path = str(tmp_path / "x.h5")
    with atomic_h5(path) as f:
        f.attrs["v"] = 1
    with pytest.raises(KeyboardInterrupt):
        with atomic_h5(path) as f:
            f.attrs["v"] = 2
            raise KeyboardInterrupt
    with h5py.File(path, "r") as f:
        assert f.attrs["v"] == 1
    assert os.listdir(tmp_path) == ["x.h5"]


def test_written_files_follow_the_umask(tmp_path):
    """Temporary files are private (mkstemp: 0600) but finished results are readable as umask allows."""
    import os
    import stat

    from lthmpi.fileio import atomic_path

    old = os.umask(0o022)
    try:
        target = tmp_path / "x.txt"
        with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
            f.write("done")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old)


# -- reruns: the directory's name, and tasks trained otherwise ----------------------------------------------

def _old_config_toml(path):
    """config.toml as lthmpi wrote it before fields were added (only the keys the legacy hash covered)."""
    from lthmpi.config import LEGACY_KEYS

    section, out = "", []
    for line in open(path).read().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            out.append(line)
        elif "=" in line and section and f"{section}.{line.split('=')[0].strip()}" not in LEGACY_KEYS:
            continue
        else:
            out.append(line)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def test_run_directory_named_by_the_old_hash_still_resumes(tiny_run, tiny_config, tmp_path, monkeypatch):
    """The default directory of a run made before fields with defaults were added (named by the hash of
    every field) is found, and the rerun trains nothing; a new config gets the new, stable name."""
    from lthmpi.config import Config, identity_hash
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.parallel.coordinator import default_run_dir
    from lthmpi.training import MaskedTrainer

    legacy = tiny_config.default_run_name(legacy=True)
    assert legacy and legacy != tiny_config.default_run_name()
    shutil.copytree(tiny_run, tmp_path / "runs" / legacy)
    _old_config_toml(tmp_path / "runs" / legacy / "config.toml")
    monkeypatch.chdir(tmp_path)
    assert default_run_dir(tiny_config) == os.path.join("runs", legacy)
    monkeypatch.setattr(MaskedTrainer, "fit", lambda *a, **k: pytest.fail("a finished run trained again"))
    run_serial(tiny_config, default_run_dir(tiny_config), threads=1, quiet=True)
    # the new name hashes only what differs from the defaults: a field added with its default changes nothing
    ident, defaults = tiny_config.identity(), Config().identity()
    grown = {**ident, "train": {**ident["train"], "new_field": 1}}
    assert identity_hash(grown, {**defaults, "train": {**defaults["train"], "new_field": 1}}) == tiny_config.hash()
    os.rename(os.path.join("runs", legacy), "elsewhere")
    assert default_run_dir(tiny_config) == os.path.join("runs", tiny_config.default_run_name())


def test_mixed_kernels_names_the_tasks_and_how_they_differ():
    from lthmpi.store import mixed_kernels

    done = {"m000_r00_ticket": dict(threads=1, kernels="dense", remaining=0.5),
            "m001_r00_ticket": dict(threads=1, kernels="sparse", remaining=0.2),
            "m001_r01_ticket": dict(threads=2, kernels="sparse", remaining=0.2),
            "m001_r01_random_mask": dict(threads=1, kernels="dense", remaining=0.2, replicas=2),
            "evaluation": dict(threads=0, kernels="")}  # a task of a kind that trains nothing: never compared
    kernels = lambda r: "sparse" if r <= 0.3 else "dense"  # noqa: E731
    assert mixed_kernels(done, 1, kernels) == ["1 finished task(s) trained with 2 TF threads (this run: 1): m001_r01_ticket"]
    assert mixed_kernels(done, 1, lambda r: "dense") == [
        "1 finished task(s) trained with sparse kernels (this run: dense): m001_r00_ticket",
        "1 finished task(s) trained with 2 TF threads (this run: 1), sparse kernels (this run: dense): m001_r01_ticket"]
    assert mixed_kernels(done, 2, kernels) == [
        "3 finished task(s) trained with 1 TF threads (this run: 2): m000_r00_ticket, m001_r00_ticket, "
        "m001_r01_random_mask"]
    assert mixed_kernels(done, 1, lambda r: "sparse" if r <= 0.3 else "dense") == mixed_kernels(done, 1, kernels)


def test_rerun_on_other_kernels_is_refused_unless_allowed(tiny_run, tiny_config, tmp_path, monkeypatch):
    from lthmpi.config import from_dict
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.store import StoreError
    from lthmpi.training import MaskedTrainer

    run = str(tmp_path / "mixed")
    shutil.copytree(tiny_run, run)
    os.unlink(os.path.join(run, "tasks", "m000_r00_ticket.h5"))  # one task left to train, on the dense kernels
    before = {f: stat_of(os.path.join(run, f)) for f in files_under(run) if f.endswith((".h5", ".toml"))}
    dense_only = from_dict({"parallel": {"sparse_below": 0.0}}, base=tiny_config)
    with pytest.raises(StoreError, match=r"sparse kernels \(this run: dense\): m001_r00_random_mask, .*"
                                         r"--allow-mixed-kernels"):
        run_serial(dense_only, run, threads=1, quiet=True)
    assert {f: stat_of(os.path.join(run, f)) for f in files_under(run) if f.endswith((".h5", ".toml"))} == before
    calls = []
    real_fit = MaskedTrainer.fit
    monkeypatch.setattr(MaskedTrainer, "fit", lambda self, *a, **k: calls.append(a) or real_fit(self, *a, **k))
    run_serial(dense_only, run, threads=1, quiet=True, allow_mixed=True)
    assert len(calls) == 1 and os.path.exists(os.path.join(run, "results.h5"))


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_one_process_gives_the_same_results_under_every_scheduler(tiny_run, tiny_config, tmp_path, schedule, request):
    """P = 1 without mpirun: the order of the tasks changes with the scheduler, their results do not (the
    fixture `tiny_run` ran under the default, lpt; `second_run` is the static one)."""
    from lthmpi.config import from_dict
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load

    if schedule == "static":
        run = request.getfixturevalue("second_run")
    else:
        run = str(tmp_path / "run")
        run_serial(from_dict({"parallel": {"schedule": schedule}}, base=tiny_config), run, threads=1, quiet=True)
    got, want = load(run), load(tiny_run)
    assert got["provenance"]["schedule"] == schedule
    ta, tb = by_id(want), by_id(got)
    assert sorted(ta) == sorted(tb)
    for tid in ta:
        for col, va in ta[tid].items():
            if col not in TIMING_COLUMNS:
                assert tb[tid][col] == va or (va != va and tb[tid][col] != tb[tid][col]), (tid, col)
    ca, cb = curves(tiny_run), curves(run)
    assert ca.keys() == cb.keys()
    assert all(ca[t].keys() == cb[t].keys() and all(np.array_equal(ca[t][k], cb[t][k]) for k in ca[t]) for t in ca)
