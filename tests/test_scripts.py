"""The scaling scripts' options, checks and planned commands (dry runs: no training)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.dataset=digits", "--set", "train.epochs=2"]


def script(name, *args):
    env = dict(os.environ, PYTHON=sys.executable, MPIRUN=str(Path(sys.executable).parent / "mpirun"))
    return subprocess.run(["bash", str(ROOT / "run" / name), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def planned(r):
    """The commands a dry run prints, as argument lists."""
    assert r.returncode == 0, r.stderr
    return [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]


def value_of(cmd, key):
    (v,) = [cmd[i + 1].split("=", 1)[1] for i, a in enumerate(cmd[:-1]) if a == "--set" and cmd[i + 1].startswith(key + "=")]
    return v


def test_strong_plans_the_doubling_series_and_the_baseline(tmp_path):
    cmds = planned(script("strong_scaling.sh", "--dry-run", "--out", str(tmp_path), "--max-ranks", "2", *TINY))
    assert len(cmds) == 3
    (p1, p2, base) = cmds
    assert p1[p1.index("-np") + 1] == "1" and p2[p2.index("-np") + 1] == "2"
    assert "-np" not in base and base[0] == sys.executable, "the baseline is one process without mpirun"
    cores = len(os.sched_getaffinity(0))  # what nproc says
    names = ["p1", "p2" if cores >= 2 else "p2-oversubscribed", f"baseline-1proc-{cores}threads"]
    assert [c[c.index("--run-dir") + 1] for c in cmds] == [str(tmp_path / n) for n in names]
    assert [value_of(c, "parallel.threads") for c in cmds] == ["1", "1", str(cores)]
    assert all(value_of(c, "data.dataset") == "digits" for c in cmds)
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_strong_plans_the_parent_both_ways_and_the_pair_beside_p1(tmp_path):
    """--parent-dp both: every P > 1 twice, the parent's setting explicit in the command and the folder's name;
    --pair-bound: p1's command twice more, started together (a trailing &), pinned to two cores by taskset."""
    cmds = planned(script("strong_scaling.sh", "--dry-run", "--out", str(tmp_path), "--max-ranks", "2", "--no-baseline",
                          "--parent-dp", "both", "--pair-bound", *TINY))
    together = [c[-1] == "&" for c in cmds]
    cmds = [c[:-1] if c[-1] == "&" else c for c in cmds]
    names = [os.path.basename(c[c.index("--run-dir") + 1]) for c in cmds]
    assert names == ["p1", "p1-pair-a", "p1-pair-b", "p2-parent-dp", "p2-parent-serial"]
    assert together == [False, True, True, False, False]
    pdp = [[a for a in c if a.startswith("parallel.parent_data_parallel=")] for c in cmds]
    assert pdp == [[], [], [], ["parallel.parent_data_parallel=true"], ["parallel.parent_data_parallel=false"]]
    p1 = cmds[0]
    for c, name in zip(cmds[1:3], names[1:3]):
        launch = c[c.index(p1[0]):]  # mpirun onwards: p1's command but for the run directory
        assert launch == [str(tmp_path / name) if a == str(tmp_path / "p1") else a for a in p1]
    if shutil.which("taskset"):
        assert [c[:3] for c in cmds[1:3]] == [["taskset", "-c", str(core)] for core in sorted(os.sched_getaffinity(0))[:2]]
    assert [c[c.index("-np") + 1] for c in cmds] == ["1", "1", "1", "2", "2"]


def test_strong_parent_dp_on_names_the_runs_and_auto_leaves_them(tmp_path):
    on = planned(script("strong_scaling.sh", "--dry-run", "--out", str(tmp_path), "--max-ranks", "4", "--no-baseline",
                        "--parent-dp", "on", *TINY))
    p4 = "p4-oversubscribed" if len(os.sched_getaffinity(0)) < 4 else "p4"
    assert [os.path.basename(c[c.index("--run-dir") + 1]) for c in on] == ["p1", "p2-parent-dp", f"{p4}-parent-dp"]
    assert [value_of(c, "parallel.parent_data_parallel") for c in on[1:]] == ["true", "true"]
    auto = planned(script("strong_scaling.sh", "--dry-run", "--out", str(tmp_path), "--no-baseline", *TINY))
    assert not any(a.startswith("parallel.parent_data_parallel") for c in auto for a in c)


def test_weak_gives_every_rank_the_same_number_of_masks(tmp_path):
    cmds = planned(script("weak_scaling.sh", "--dry-run", "--out", str(tmp_path), "--masks-per-rank", "3",
                          "--max-ranks", "4", "--set", "seed=1", *TINY))
    assert [c[c.index("-np") + 1] for c in cmds] == ["1", "2", "4"]
    masks = [value_of(c, "prune.remaining").strip("[]").split(",") for c in cmds]
    assert [len(m) for m in masks] == [3, 6, 12]
    assert float(masks[2][-1]) == pytest.approx(0.8 ** 12)


@pytest.mark.parametrize("name,args,message", [
    ("strong_scaling.sh", ["--max-ranks", "0"], "--max-ranks must be an integer >= 1, not '0'"),
    ("strong_scaling.sh", ["--oversubscribe", "1"], "--oversubscribe must be an integer >= 2, not '1'"),
    ("strong_scaling.sh", ["--threads-per-rank", "x"], "--threads-per-rank must be an integer >= 0, not 'x'"),
    ("strong_scaling.sh", ["--out"], "--out needs a directory"),
    ("strong_scaling.sh", ["--bogus"], "unknown option --bogus"),
    ("strong_scaling.sh", ["--set", "train.optimizer=\"nope\""], "the experiment's options are refused"),
    ("strong_scaling.sh", ["--parent-dp", "maybe"], "--parent-dp must be auto, on, off or both, not 'maybe'"),
    ("strong_scaling.sh", ["--parent-dp", "both", "--set", "parallel.parent_data_parallel=true"],
     "do not pass parallel.parent_data_parallel with --parent-dp both"),
    ("strong_scaling.sh", ["--parent-efficiency", "0"], "--parent-efficiency must be a number in (0, 1], not '0'"),
    ("strong_scaling.sh", ["--pair-bound", "--threads-per-rank", "2"], "--pair-bound needs --threads-per-rank 1"),
    ("weak_scaling.sh", ["--masks-per-rank", "0"], "--masks-per-rank must be an integer >= 1, not '0'"),
    ("weak_scaling.sh", ["--set", "prune.remaining=[0.5]"], "do not pass prune.remaining"),
    ("weak_scaling.sh", ["--no-baseline"], "unknown option --no-baseline"),
])
def test_bad_options_are_refused_before_anything_runs(tmp_path, name, args, message):
    r = script(name, "--dry-run", "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2
    assert f"{name}: error: {message}" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_run_directory_is_refused_unless_forced(tmp_path):
    (tmp_path / "p1").mkdir()
    r = script("weak_scaling.sh", "--dry-run", "--out", str(tmp_path), *TINY)
    assert r.returncode == 2 and "p1 already exists; a benchmark does not resume" in r.stderr
    assert len(planned(script("weak_scaling.sh", "--dry-run", "--force", "--out", str(tmp_path), *TINY))) == 2
    assert (tmp_path / "p1").is_dir(), "a dry run deletes nothing, even with --force"


def test_the_independent_barrier_script_imports_no_lthmpi():
    """analysis/independent_barrier.py re-implements data, batch orders, training and the curve: a bug in lthmpi must
    not be able to hide in both numbers, so it imports nothing of lthmpi (plain TensorFlow/Keras, numpy, h5py)."""
    import ast

    tree = ast.parse((ROOT / "analysis" / "independent_barrier.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names and not any(m.split(".")[0] == "lthmpi" for m in names), names
    assert {"numpy", "h5py", "tensorflow", "keras"} <= names
