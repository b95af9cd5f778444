"""The conv step's form chosen by measurement (parallel.conv_step, lthmpi/training/step_form.py, issue 33).

The timings are injected: these tests check what is chosen from which numbers, what is cached and when it
is timed again, never how fast a form is. One tiny conv run (digits, Conv-2, a few iterations) checks that
the form is recorded with each task and that a rerun in the other form is caught like a thread count.
"""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

FIELDS = dict(model="conv2", input=[8, 8, 1], params=1, batch=16, threads=1, precision="float32",
              deterministic=True, tensorflow="x")


class Timer:
    """Seconds per step by form, counting the calls."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, form):
        self.calls.append(form)
        return self.seconds[form]


def test_auto_runs_the_faster_form_and_caches_it_per_threads(tmp_path):
    from lthmpi.training import step_form

    cache = str(tmp_path / "cache" / "conv_step.json")
    big = step_form.MIN_TIMED_ITERATIONS
    timer = Timer(graph=0.437, xla=0.381)
    assert step_form.choose("auto", FIELDS, timer, big, cache)[0] == "xla"
    assert timer.calls == ["graph", "xla"] and os.path.exists(cache)
    timer.calls.clear()
    form, why = step_form.choose("auto", FIELDS, timer, big, cache)
    assert (form, timer.calls) == ("xla", []) and "cached" in why  # the second run does not time again
    other = Timer(graph=0.3, xla=0.5)
    assert step_form.choose("auto", {**FIELDS, "threads": 2}, other, big, cache)[0] == "graph"
    assert other.calls == ["graph", "xla"]  # another thread count is another entry: timed
    assert step_form.choose("auto", FIELDS, other, big, cache)[0] == "xla" and len(other.calls) == 2
    assert not [f for f in os.listdir(tmp_path / "cache") if f != "conv_step.json"]  # written atomically


def test_forced_forms_short_runs_and_a_failing_form(tmp_path):
    from lthmpi.training import step_form

    cache = str(tmp_path / "conv_step.json")
    timer = Timer(graph=0.4, xla=0.1)
    for form in step_form.FORMS:
        assert step_form.choose(form, FIELDS, timer, 10 ** 6, cache)[0] == form
    assert step_form.choose("auto", FIELDS, timer, step_form.MIN_TIMED_ITERATIONS - 1, cache)[0] == "graph"
    assert timer.calls == [] and not os.path.exists(cache)  # not timed: the rule's form, nothing cached

    def broken(form):
        if form == "xla":
            raise RuntimeError("no XLA kernel\nmore")
        return 0.4

    assert step_form.choose("auto", FIELDS, broken, 10 ** 6, cache)[0] == "graph"
    assert step_form.faster({"graph": 0.2, "xla": 0.2}) == "graph"  # a tie keeps the rule's form
    with open(cache, "w") as f:
        f.write("{not json")  # a damaged cache is an empty one
    assert step_form.choose("auto", FIELDS, Timer(graph=0.5, xla=0.2), 10 ** 6, cache)[0] == "xla"


def _conv_trainer(conv_step=None, name="conv2"):
    from lthmpi.config import TrainConfig
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 1)).astype(np.float32), np.arange(32) % 3
    data = SimpleNamespace(x_train=x, y_train=y, x_val=x[:8], y_val=y[:8], x_test=x[:8], y_test=y[:8])
    model = build_model(name, (8, 8, 1), 3, seed=0)
    return MaskedTrainer(model, data, TrainConfig(batch_size=8, eval_every="2it"), 0, prunable_variables(model),
                         conv_step=conv_step)


def test_the_trainer_switches_to_the_chosen_form_and_leaves_mlps_alone(tf_runtime, tmp_path):
    cache = str(tmp_path / "conv_step.json")
    assert _conv_trainer("xla", "lenet300_100").conv_step == ""  # one form: nothing to choose
    assert _conv_trainer("xla").conv_step == "xla" and _conv_trainer("graph").conv_step == "graph"
    tr = _conv_trainer()
    assert tr.conv_step == "graph"  # the rule's form until chosen
    timer = Timer(graph=0.437, xla=0.381)
    assert tr.choose_conv_step("auto", 10 ** 6, timer, cache) == "xla" and tr.conv_step == "xla"
    assert tr.steps.step_jit and timer.calls == ["graph", "xla"]
    again = _conv_trainer()  # a new process on this host: the cached choice, not timed
    assert again.choose_conv_step("auto", 10 ** 6, Timer(), cache) == "xla"
    assert tr.choose_conv_step("graph", 10 ** 6, Timer(), cache) == "graph" and not tr.steps.step_jit
    weights, state = tr.get_weights(), tr.get_optimizer_state()
    assert tr.time_conv_step("graph", warm=1, timed=1) > 0  # the real measurement leaves no trace
    assert tr.conv_step == "graph"
    assert all(np.array_equal(w, tr.get_weights()[p]) for p, w in weights.items())
    assert all(np.array_equal(s, tr.get_optimizer_state()[p]) for p, s in state.items())


def test_mixed_kernels_names_tasks_trained_in_another_conv_step_form():
    from lthmpi.store import mixed_kernels

    dense = lambda r: "dense"  # noqa: E731
    done = {"a": dict(threads=1, kernels="dense", conv_step="graph", iterations=10),
            "b": dict(threads=1, kernels="dense", conv_step="xla", iterations=10),
            "old": dict(threads=1, kernels="dense", device="cpu", iterations=10),  # before the form was recorded
            "eval": dict(threads=1, kernels="", iterations=0)}  # trains nothing: no step to compare
    assert mixed_kernels(done, 1, dense, "graph") == ["1 finished task(s) trained with the xla conv step (this run: "
                                                      "graph): b"]
    assert mixed_kernels(done, 1, dense, "xla") == ["2 finished task(s) trained with the graph conv step (this run: "
                                                    "xla): a, old"]
    assert mixed_kernels(done, 1, dense, "") == []  # a net with one form (an MLP, a GPU)
    assert mixed_kernels(done, 2, dense, "graph")[0].startswith("3 finished task(s) trained with 1 TF threads "
                                                                "(this run: 2)")


def test_a_run_directory_records_its_form_once(tmp_path):
    """Write-once: job-array shards that chose at the same time end in the form recorded first."""
    from lthmpi.store import RunDir

    run = RunDir(str(tmp_path))
    assert run.recorded_conv_step() == ""
    assert run.record_conv_step("xla") == "xla"
    assert run.record_conv_step("graph") == "xla" and run.recorded_conv_step() == "xla"
    assert os.listdir(tmp_path) == ["conv_step"]  # no temporary left


CONV_RUN = {"seed": 3, "data": {"dataset": "digits", "validation": 200}, "model": {"name": "conv2"},
            "train": {"iterations": 4, "batch_size": 32, "eval_every": "2it"},
            "prune": {"remaining": [0.5, 0.2]}, "reset": {"points": ["0ep"], "controls": []}}


def test_the_form_is_recorded_and_a_rerun_in_another_is_caught(tf_runtime, tmp_path, monkeypatch):
    """auto on a short run keeps the rule's form (graph), recorded per task; a rerun forced to xla is refused
    like one with another thread count; auto resumes in the form of the tasks on disk; with
    --allow-mixed-kernels the forced rerun trains the rest in xla."""
    from lthmpi.config import from_dict
    from lthmpi.experiment import Experiment
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load
    from lthmpi.store import RunDir, StoreError
    from lthmpi.training import step_form
    from lthmpi.validation import validate

    monkeypatch.setenv("LTHMPI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(step_form, "MIN_TIMED_ITERATIONS", 10 ** 9)  # never timed here: the rule's form
    cfg = from_dict(CONV_RUN)
    validate(cfg)
    first = str(tmp_path / "first")
    res = load(run_serial(cfg, first, threads=1, quiet=True))
    assert [t["conv_step"] for t in res["tasks"]] == ["graph", "graph"]
    assert RunDir(first).recorded_conv_step() == "graph"
    with open(os.path.join(first, "logs", "rank0.log")) as f:
        assert "conv step: graph (not timed: 4 iterations" in f.read()
    run = str(tmp_path / "rerun")
    shutil.copytree(first, run)
    os.unlink(os.path.join(run, "tasks", "m001_r00_ticket.h5"))
    os.unlink(os.path.join(run, "results.h5"))
    xla = from_dict({"parallel": {"conv_step": "xla"}}, base=cfg)
    with pytest.raises(StoreError, match=r"1 finished task\(s\) trained with the graph conv step \(this run: xla\): "
                                         r"m000_r00_ticket.*parallel.conv_step.*--allow-mixed-kernels"):
        run_serial(xla, run, threads=1, quiet=True)
    assert not os.path.exists(os.path.join(run, "tasks", "m001_r00_ticket.h5"))  # refused before any training
    with monkeypatch.context() as m:  # auto: the run's form, neither cached nor timed
        m.setattr(step_form, "choose", lambda *a, **k: pytest.fail("auto chose instead of resuming in the run's form"))
        exp = Experiment(cfg, run)
        exp.trainer.use_conv_step("xla")
        assert exp.choose_conv_step() == "graph" and exp.trainer.conv_step == "graph"  # recorded in the directory
        os.unlink(exp.run.conv_step_path)  # a run directory from before the record: the tasks' form
        exp.trainer.use_conv_step("xla")
        assert exp.choose_conv_step() == "graph" and exp.trainer.conv_step == "graph"
    exp.trainer.use_conv_step("xla")  # a shard that timed xla while another recorded graph first
    assert exp.run.record_conv_step("graph") == "graph"
    assert exp.settle_conv_step() == "graph" and "recorded first" in exp.conv_step_line()
    res = load(run_serial(xla, run, threads=1, quiet=True, allow_mixed=True))
    assert sorted(t["conv_step"] for t in res["tasks"]) == ["graph", "xla"]
