"""The `lthmpi` console script: each subcommand is its `python -m` entry point under one name, and those
entry points stay as they were (usage lines, options, errors), under mpirun too."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys

import h5py
import pytest

from conftest import REPO
from test_cli import env

LTHMPI = [sys.executable, "-m", "lthmpi.cli"]  # what the console script runs (setup.cfg: lthmpi.cli:main)
SAME = {  # lthmpi COMMAND -> the python -m entry point it must equal, and that entry point's usage name
    "run": (["lthmpi.main"], "python -m lthmpi.main"),
    "analysis": (["lthmpi.analysis"], "lthmpi.analysis"),
    "model": (["lthmpi.analysis", "model"], "python -m lthmpi.analysis model"),
    "prepare": (["lthmpi.data", "prepare"], "python -m lthmpi.data prepare"),
}


def run(cmd, cwd=REPO, timeout=120):
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def options(help_text):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


def test_setup_cfg_declares_the_console_script():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert scripts == ["lthmpi = lthmpi.cli:main"]


def test_top_level_help_lists_every_command():
    r = run([*LTHMPI, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lthmpi ")
    for name in SAME:
        assert re.search(rf"^  {name}\s+\S", r.stdout, re.M), name
    assert "docs/index.md" in r.stdout


@pytest.mark.parametrize("name", [*SAME, "scaling"])
def test_each_command_help_is_its_entry_points_help(name):
    module, usage = SAME["model" if name == "scaling" else name]
    ours = run([*LTHMPI, name, "--help"])
    theirs = run([sys.executable, "-m", *module, "--help"])
    assert ours.returncode == 0 and theirs.returncode == 0, (ours.stderr, theirs.stderr)
    assert ours.stdout.startswith(f"usage: lthmpi {'model' if name == 'scaling' else name} ")
    assert theirs.stdout.startswith(f"usage: {usage} "), "the python -m entry point's usage line changed"
    assert options(ours.stdout) == options(theirs.stdout) and len(options(ours.stdout)) >= 2


def test_unknown_or_missing_command_is_one_line_and_exit_2():
    for args, words in ((["trian"], "invalid choice: 'trian'"), ([], "give a COMMAND")):
        r = run([*LTHMPI, *args])
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
        assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [ln for ln in r.stderr.splitlines()
                                                                          if ln.startswith("lthmpi: error: ")]


def test_errors_are_those_of_the_entry_points(tmp_path):
    bad_run = ["--run-dir", str(tmp_path / "r"), "--set", "train.optimizer=rmsprop"]
    pairs = [([*LTHMPI, "run", *bad_run], [sys.executable, "-m", "lthmpi.main", *bad_run]),
             ([*LTHMPI, "analysis", str(tmp_path / "nope"), "--json"],
              [sys.executable, "-m", "lthmpi.analysis", str(tmp_path / "nope"), "--json"])]
    for ours, theirs in pairs:
        a, b = run(ours, cwd=tmp_path), run(theirs, cwd=tmp_path)
        assert a.returncode == b.returncode == 2
        assert a.stderr == b.stderr and a.stderr.count("\n") == 1, (a.stderr, b.stderr)
    assert not (tmp_path / "r").exists()


def test_model_and_prepare_give_the_same_output_as_their_entry_points(tmp_path):
    a = run([*LTHMPI, "scaling", "--seed-study", "--json"])
    b = run([sys.executable, "-m", "lthmpi.analysis", "model", "--seed-study", "--json"])
    assert a.returncode == 0 and a.stdout == b.stdout and '"seed_study"' in a.stdout
    prep = ["--dataset", "digits", "--validation", "100"]
    a = run([*LTHMPI, "prepare", *prep, "--out", str(tmp_path / "a.h5")])
    b = run([sys.executable, "-m", "lthmpi.data", "prepare", *prep, "--out", str(tmp_path / "b.h5")])
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        sums = {k: fa.attrs[k] for k in fa.attrs if k.startswith("sha256_")}
        assert len(sums) >= 4 and sums == {k: fb.attrs[k] for k in fb.attrs if k.startswith("sha256_")}


def test_run_under_mpirun_is_the_mpi_run(tmp_path):
    """`mpirun -np 2 lthmpi run` goes through the MPI start-up: a bad config is said once, by rank 0."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    r = run([mpirun, "-np", "2", *LTHMPI, "run", "--run-dir", str(tmp_path / "r"), "--set", "train.epocs=3"],
            cwd=tmp_path, timeout=180)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert lines == [ln for ln in lines if ln.startswith("lthmpi: error: ")] and len(lines) == 1, lines
    assert "did you mean 'epochs'" in lines[0]
