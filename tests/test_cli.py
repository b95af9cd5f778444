"""End-to-end tests through the real command lines: `python -m lthmpi.main` on the digits, then
`python -m lthmpi.analysis RUN_DIR --json`; and bad input, which must give one line on stderr, a
non-zero exit and no half-written files."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO

BASE_SETS = ["data.dataset=digits", "data.validation=200", "train.epochs=2", "train.batch_size=32",
             "train.eval_every=10it", "prune.remaining=[0.5, 0.2]", 'reset.points=["0ep", "10it"]']
CONFIG_FILE = """# the rest of the tiny experiment, as a file (the --set options above overlay it)
seed = 5
[reset]
controls = ["random_reinit", "random_mask"]
"""
T = 2 * 38  # iterations: 1237 training digits at batch 32, 2 epochs


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("LTHMPI_DATA_DIR", None)
    for v in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD"):
        e.pop(v, None)  # never look launched by mpirun
    return e


def cli(args, cwd, module="lthmpi.main", timeout=300, **more_env):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env() | more_env, capture_output=True,
                          text=True, timeout=timeout)


def main_args(run_dir, config_file, extra=(), sets=BASE_SETS):
    args = ["--run-dir", str(run_dir), "--config", str(config_file)]
    for s in [*sets, *extra]:
        args += ["--set", s]
    return args


def files_under(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def assert_one_error_line(proc, *words):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("lthmpi: error: "), lines[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "results:" not in proc.stdout
    return lines[0]


def assert_nothing_half_written(run_dir):
    if os.path.exists(run_dir):
        bad = [f for f in files_under(run_dir) if f.endswith(".h5") or os.path.basename(f).startswith(".tmp-")]
        assert bad == [], bad


# -- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    config_file = base / "tiny.toml"
    config_file.write_text(CONFIG_FILE)
    run_dir = base / "run"
    # a first attempt with a typo in the model name fails; it must not block the corrected rerun. With oneDNN on
    # (see bad_runs): the model is built after TensorFlow's import, whose start-up notice must not reach stderr.
    failed = cli(main_args(run_dir, config_file, ["model.name=lenet300"]), cwd=base, TF_ENABLE_ONEDNN_OPTS="1")
    failed_left = os.path.exists(run_dir)
    failed_files = files_under(run_dir) if failed_left else []
    run = cli(main_args(run_dir, config_file), cwd=base)
    analysis = cli([str(run_dir), "--json"], cwd=base, module="lthmpi.analysis")
    return dict(base=base, config_file=str(config_file), run_dir=str(run_dir), failed=failed, failed_left=failed_left,
                failed_files=failed_files, run=run, analysis=analysis)


def test_failed_first_attempt_leaves_nothing_in_the_way(e2e):
    """Also the bad-input case of an unknown model (one line, no run directory left)."""
    assert_one_error_line(e2e["failed"], "unknown model 'lenet300'", "lenet300_100")
    assert e2e["failed_files"] == []  # no config.toml that would refuse the corrected rerun
    assert not e2e["failed_left"], "a failed start left its run directory behind"
    assert e2e["run"].returncode == 0, e2e["run"].stderr[-3000:]


def test_run_succeeds_and_prints_the_table(e2e):
    run, run_dir = e2e["run"], e2e["run_dir"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert f"results: {os.path.join(run_dir, 'results.h5')}" in run.stdout
    assert "dense parent test accuracy" in run.stdout and "k=10it" in run.stdout
    files = files_under(run_dir)
    assert not [f for f in files if os.path.basename(f).startswith(".tmp-")]
    assert len([f for f in files if os.sep + "tasks" + os.sep in f and f.endswith(".h5")]) == 12


def check_summary(s, config_file):
    from lthmpi.validation import resolve

    expected_cfg = resolve(config_file, BASE_SETS).to_dict()
    assert s["config"] == expected_cfg  # the resolved config, defaults included
    assert s["config"]["seed"] == 5 and s["config"]["train"]["lr"] == 0.0012
    assert 0.5 < s["parent"]["test_accuracy"] <= 1.0
    tasks = s["tasks"]
    assert len(tasks) == 2 * 2 * (1 + 2)  # masks x resets x (ticket + controls)
    keys = {"mask", "remaining", "reset", "control", "final_accuracy", "early_stop_iteration",
            "early_stop_accuracy", "seconds", "rank"}
    for t in tasks:
        assert keys <= set(t), keys - set(t)
    assert {(t["mask"], t["reset"], t["control"]) for t in tasks} == {
        (m, r, c) for m in (0, 1) for r in ("0ep", "10it") for c in (None, "random_reinit", "random_mask")}
    by_mask = {}
    for t in tasks:
        by_mask.setdefault(t["mask"], set()).add(round(t["remaining"], 12))
        k = {"0ep": 0, "10it": 10}[t["reset"]]
        assert isinstance(t["early_stop_iteration"], int) and 0 < t["early_stop_iteration"] <= T - k
        assert 0.0 <= t["final_accuracy"] <= 1.0 and 0.0 <= t["early_stop_accuracy"] <= 1.0
        assert t["seconds"] > 0 and t["rank"] == 0
    # every task of a mask has the same sparsity (the random mask keeps the per-layer counts)
    assert all(len(v) == 1 for v in by_mask.values())
    r0, r1 = by_mask[0].pop(), by_mask[1].pop()
    # the output layer at half the per-round rate keeps more of itself, the pool less: overall exactly as asked
    assert abs(r0 - 0.5) < 1e-4 and abs(r1 - 0.2) < 1e-4
    tickets = [t for t in tasks if t["control"] is None]
    assert max(t["early_stop_accuracy"] for t in tickets) > 0.5


def test_analysis_json_subprocess(e2e):
    a = e2e["analysis"]
    assert a.returncode == 0, a.stderr[-3000:]
    check_summary(json.loads(a.stdout), e2e["config_file"])


def test_summary_json_in_process(e2e):
    from lthmpi.results import load, summary_json

    s = summary_json(load(e2e["run_dir"]))
    check_summary(json.loads(json.dumps(s)), e2e["config_file"])
    # the analysis prints the same records
    a = json.loads(e2e["analysis"].stdout)
    assert [{k: t[k] for k in ("mask", "reset", "control", "remaining", "final_accuracy")} for t in a["tasks"]] == \
        [{k: t[k] for k in ("mask", "reset", "control", "remaining", "final_accuracy")} for t in s["tasks"]]


def test_other_config_in_the_run_dir_is_refused(e2e):
    run_dir = e2e["run_dir"]
    before = {f: (os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files_under(run_dir)}
    proc = cli(main_args(run_dir, e2e["config_file"], ["train.lr=0.01"]), cwd=e2e["base"])
    assert_one_error_line(proc, run_dir, "different experiment", "train.lr")
    after = {f: (os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files_under(run_dir)}
    assert after == before


def test_same_config_other_parallel_settings_resumes(e2e):
    """A finished run rerun (here with other `parallel` settings) trains nothing and rewrites no task."""
    run_dir = e2e["run_dir"]
    tasks = [f for f in files_under(run_dir) if os.sep + "tasks" + os.sep in f]
    before = {f: os.stat(f).st_mtime_ns for f in tasks + [os.path.join(run_dir, "parent.h5")]}
    proc = cli(main_args(run_dir, e2e["config_file"], ["parallel.schedule=static"]) + ["--quiet"], cwd=e2e["base"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {f: os.stat(f).st_mtime_ns for f in before} == before


# -- bad input ----------------------------------------------------------------------------------------

def write_idx(path, dims, payload_len=None):
    magic = 0x00000803 if len(dims) == 3 else 0x00000801
    n = 1
    for d in dims:
        n *= d
    body = bytes(i % 10 for i in range(n if payload_len is None else payload_len))
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + body)


def make_case(base, name):
    """(args, words expected in the error line, run directory) for one bad-input case."""
    run_dir = base / "run"
    config = base / "tiny.toml"
    config.write_text(CONFIG_FILE)
    extra, words = [], []
    if name == "unknown_dataset":
        extra, words = ["data.dataset=mnits"], ["unknown dataset 'mnits'", "mnist"]
    elif name == "unknown_optimizer":
        extra, words = ["train.optimizer=rmsprop"], ["train.optimizer", "rmsprop", "adam"]
    elif name == "threshold_outside":
        extra, words = ["prune.remaining=[0.5, 1.2]"], ["prune.remaining", "1.2", "(0, 1)"]
    elif name == "empty_masks":
        extra, words = ["prune.remaining=[]"], ["prune.remaining is empty"]
    elif name == "empty_resets":
        extra, words = ["reset.points=[]"], ["reset.points is empty"]
    elif name == "reset_past_end":
        extra, words = ['reset.points=["0ep", "2ep"]'], ["2ep", "at or past the end", f"{T} iterations"]
    elif name == "unknown_key":
        extra, words = ["train.epocs=3"], ["epocs", "did you mean 'epochs'"]
    elif name == "missing_data":
        empty = base / "empty"
        empty.mkdir()
        extra, words = ["data.dataset=fashion_mnist", f"data.dir={empty}"], ["fashion_mnist", str(empty),
                                                                              "train-images-idx3-ubyte"]
    elif name == "truncated_data":
        d = base / "idx"
        d.mkdir()
        write_idx(d / "train-images-idx3-ubyte", (10, 28, 28), payload_len=1000)  # 7840 bytes promised
        write_idx(d / "train-labels-idx1-ubyte", (10,))
        write_idx(d / "t10k-images-idx3-ubyte", (5, 28, 28))
        write_idx(d / "t10k-labels-idx1-ubyte", (5,))
        extra, words = ["data.dataset=fashion_mnist", f"data.dir={d}"], ["train-images-idx3-ubyte", "truncated"]
    elif name == "unwritable_run_dir":  # refused once the model is built: run in the worker, whose TF has 1 thread
        blocker = base / "a_file"
        blocker.write_text("not a directory\n")
        run_dir = blocker / "run"
        extra, words = ["parallel.threads=1"], ["cannot create run directory", str(run_dir)]
    elif name == "malformed_toml":
        config.write_text("[train]\nepochs = = 2\n")
        words = ["not valid TOML", str(config)]
    elif name == "malformed_set":
        extra, words = ["prune.remaining=[0.5,"], ["--set", "prune.remaining", "not a valid TOML value"]
    elif name == "malformed_set_no_equals":
        extra, words = ["train.epochs"], ["--set", "section.key=value"]
    else:  # pragma: no cover
        raise KeyError(name)
    return main_args(run_dir, config, extra), words, run_dir


# An unknown model (refused once TensorFlow is imported and the model is built) is the e2e fixture's failed first
# attempt, through the real command line with oneDNN on: test_failed_first_attempt_leaves_nothing_in_the_way.
BAD = ["unknown_dataset", "unknown_optimizer", "threshold_outside", "empty_masks", "empty_resets",
       "reset_past_end", "unknown_key", "missing_data", "truncated_data", "unwritable_run_dir", "malformed_toml",
       "malformed_set", "malformed_set_no_equals"]

# Through the real command line: one refusal in the data and one in a config file's parsing. The others through
# lthmpi.main.main in this process (faultkit.main_in_process): what they check is a start-up's one line and exit
# status. Only unwritable_run_dir imports TensorFlow (the run directory is made once the model is built), which
# the worker has done anyway in the suite (tests/conftest.py); the refusal after TensorFlow's import through the
# real command line, its start-up notice kept off stderr, is the e2e test's failed first attempt.
BY_CLI = ("truncated_data", "malformed_toml")


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case run once (BY_CLI side by side, the others meanwhile in this process).

    With oneDNN on, as TensorFlow has it by default on Intel CPUs with AVX-512: its start-up notice
    ignores TF_CPP_MIN_LOG_LEVEL, and it must not turn the one-line errors into five lines."""
    from faultkit import main_in_process

    cases = {}
    for name in BAD:
        base = tmp_path_factory.mktemp(name)
        cases[name] = (base, *make_case(base, name))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(cli, args, base, TF_ENABLE_ONEDNN_OPTS="1")
                   for name, (base, args, _, _) in cases.items() if name in BY_CLI}
        done = {name: main_in_process(args) for name, (_, args, _, _) in cases.items() if name not in BY_CLI}
        done.update({name: f.result() for name, f in futures.items()})
    return {name: (done[name], words, run_dir) for name, (_, _, words, run_dir) in cases.items()}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_line_and_no_files(bad_runs, name):
    proc, words, run_dir = bad_runs[name]
    assert_one_error_line(proc, *words)
    assert_nothing_half_written(str(run_dir))
    assert not os.path.exists(run_dir), f"a failed start left {run_dir} behind: {files_under(run_dir)}"


def test_analysis_of_a_missing_run_is_one_line(tmp_path):
    proc = cli([str(tmp_path / "nope"), "--json"], cwd=tmp_path, module="lthmpi.analysis")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lthmpi.analysis: error:") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
