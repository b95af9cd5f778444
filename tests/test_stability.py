"""Stability (linear mode connectivity, docs/stability.md): the interpolation, the barrier and the batch-norm
re-estimation (lthmpi/lmc.py), the [stability] config section's bad input, the analysis tables, figures
and --json/--csv, and the stability kind run by the coordinator (pairs, endpoint files, resume, P = 1 vs 2),
on tiny models (digits, 8x8)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from faultkit import launch
from test_bad_config import assert_one_line

from lthmpi import lmc as st
from lthmpi.config import ConfigError, from_dict
from lthmpi.validation import resolve, stability_masks


def test_interpolation_keeps_zeros_and_ends():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 7)) < 0.3
    a = {"k": (rng.normal(size=(20, 7)) * mask).astype(np.float32), "n": np.array(3, np.int64)}
    b = {"k": (rng.normal(size=(20, 7)) * mask).astype(np.float32), "n": np.array(9, np.int64)}
    for alpha in st.alphas(7):
        w = st.interpolate(a, b, float(alpha))
        assert w["k"].dtype == np.float32 and np.all(w["k"][~mask] == 0), alpha  # exactly zero, not tiny
        assert w["n"] == 3
    assert np.array_equal(st.interpolate(a, b, 0.0)["k"], a["k"])
    assert np.array_equal(st.interpolate(a, b, 1.0)["k"], b["k"])
    mid = st.interpolate(a, b, 0.5)["k"]
    assert np.allclose(mid, (a["k"] + b["k"]) / 2, atol=1e-7)
    assert list(st.alphas(3)) == [0.0, 0.5, 1.0]


def test_barrier_and_error_and_loss():
    assert st.barrier([0.10, 0.12, 0.30, 0.14]) == pytest.approx(0.30 - 0.12)
    assert st.barrier([0.2, 0.1, 0.2]) == pytest.approx(0.0)  # a dip in the middle is no barrier
    s = st.summary({"error": np.array([0.125, 0.1875, 0.125]), "loss": np.array([0.25, 0.5, 0.25])}, 0.0625)
    assert s["barrier"] == 0.0625 and not s["stable"]  # stable only *below* the threshold
    assert st.summary({"error": np.array([0.125, 0.1875, 0.125]), "loss": np.ones(3)}, 0.07)["stable"]
    assert s["loss_barrier"] == 0.25 and s["error_a"] == 0.125 and s["error_b"] == 0.125
    z = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0]])
    y = np.array([0, 2, 2])
    err, loss = st.error_and_loss(z, y)
    assert err == pytest.approx(1 / 3)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert loss == pytest.approx(float(np.mean(-np.log(p[np.arange(3), y]))), abs=1e-12)
    assert st.order_seed(5, 0) == 5 and st.order_seed(5, 1) != 5 and st.order_seed(5, 1) == st.order_seed(5, 1)


def test_curve_ends_are_the_two_networks(tf_runtime):
    from lthmpi.models import build_model

    rng = np.random.default_rng(1)
    x, y = rng.random((300, 8, 8, 1), np.float32), rng.integers(0, 10, 300)
    model = build_model("lenet300_100", (8, 8, 1), 10, seed=0)
    a = {v.path: v.numpy() for v in model.variables}
    b = {v.path: v.numpy() for v in build_model("lenet300_100", (8, 8, 1), 10, seed=1).variables}
    c = st.curve(model, a, b, x, y, 5)
    assert all(np.array_equal(v.numpy(), a[v.path]) for v in model.variables)  # restored
    for end, w in ((0, a), (-1, b)):
        st.assign(model, w)
        assert (c["error"][end], c["loss"][end]) == st.error_and_loss(st.logits(model, x), y)
    assert list(c["alpha"]) == [0.0, 0.25, 0.5, 0.75, 1.0] and c["error"].shape == (5,)


def test_batch_norm_reestimation_is_the_mean_of_batch_statistics(tf_runtime):
    import keras

    from lthmpi.models import build_model

    rng = np.random.default_rng(2)
    x = rng.random((96, 8, 8, 1), np.float32)
    model = build_model("resnet20", (8, 8, 1), 10, seed=0)
    layers = st.batch_norm_layers(model)
    assert len(layers) == 21  # stem, 18 in the blocks, 2 projection shortcuts
    first = layers[0]
    before = [ly.momentum for ly in layers]
    batches = st.bn_batches(len(x), 32, 3, seed=4)
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)
    assert st.reestimate_batch_norm(model, x, batches) == 21
    assert [ly.momentum for ly in layers] == before
    feed = keras.Model(model.inputs, first.input)  # the first BN's input does not depend on any BN
    feats = [np.asarray(feed(x[b], training=True)) for b in batches]
    want_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in feats], axis=0)
    want_var = np.mean([f.var(axis=(0, 1, 2)) for f in feats], axis=0)
    assert np.allclose(first.moving_mean.numpy(), want_mean, rtol=1e-4, atol=1e-5)
    assert np.allclose(first.moving_variance.numpy(), want_var, rtol=1e-3, atol=1e-5)
    assert st.reestimate_batch_norm(build_model("lenet300_100", (8, 8, 1), 10, 0), x, batches) == 0


def test_stability_masks_and_config_lines():
    cfg = from_dict({"prune": {"remaining": [0.5, 0.2]}, "stability": {"masks": [1, "dense"]}})
    assert stability_masks(cfg) == [None, 1]
    everything = from_dict({"prune": {"remaining": [0.5, 0.2]}, "stability": {"masks": "all"}})
    assert stability_masks(everything) == [None, 0, 1]
    assert from_dict({}).hash() == from_dict({"stability": {"alphas": 30}}).hash()  # disabled: not in the identity
    assert from_dict({"stability": {"enabled": True}}).hash() != from_dict({}).hash()
    for sets, words in ((["stability.alphas=1"], "stability.alphas must be an integer >= 2"),
                        (["stability.threshold=0"], "stability.threshold must be a fraction in (0, 1)"),
                        (["stability.threshold=1.0"], "stability.threshold must be a fraction in (0, 1)"),
                        (["stability.masks=[0, 20]"], "stability.masks names mask 20"),
                        (['stability.masks="some"'], "stability.masks must be"),
                        (['stability.points=["0ep", "0ep"]'], "duplicates")):
        with pytest.raises(ConfigError, match=None) as e:
            resolve(None, sets)
        assert words in str(e.value), (sets, str(e.value))


BAD = {"alphas": (["stability.alphas=1"], ["stability.alphas", ">= 2", "not 1"]),
       "threshold": (["stability.threshold=1.5"], ["stability.threshold", "(0, 1)", "1.5"]),
       "missing_mask": (["stability.masks=[0, 5]"], ["stability.masks names mask 5", "masks 0..1"]),
       "point_past_end": (["stability.enabled=true", 'stability.points=["90it"]'],
                          ["stability point 90it", "(76 iterations)"])}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_stability_input_is_one_line(tmp_path, name):
    sets, words = BAD[name]
    proc = launch(tmp_path / "run", None, sets, cwd=tmp_path)
    assert_one_line(proc, tmp_path / "run", words)


# -- analysis ---------------------------------------------------------------------------------------------
# Designed barriers: (mask, k) -> barrier; -1 = dense. With the grid of test_analysis (dense early-stop 0.90,
# tolerance 0.005): dense becomes stable at 500it; mask 0 from 0ep (ticket 0.91: matches); mask 1 at 500it
# (ticket 0.89: does not match); mask 2 at 500it (ticket 0.896: matches); mask 3 is stable at 0ep but not
# at 500it, so it is never "stable from k on".
BARRIERS = {(-1, 0): 0.05, (-1, 500): 0.01, (0, 0): 0.01, (0, 500): 0.015, (1, 0): 0.05, (1, 500): 0.001,
            (2, 0): 0.03, (2, 500): 0.019, (3, 0): 0.01, (3, 500): 0.04}


def make_stability_run(path, seed=0, shift=0.0):
    """The designed run with its stability pairs; `shift` is added to every barrier (another seed)."""
    from test_analysis import REMAINING, make_run

    from lthmpi.results import merge
    from lthmpi.store import RunDir

    make_run(path, seed=seed)
    run = RunDir(str(path))
    tasks = sorted(run.done_tasks())
    pair_ids = []
    for (m, k), b in BARRIERS.items():
        b += shift
        a = st.alphas(5)
        err = 0.1 + b * 4 * a * (1 - a)
        curve = {"alpha": a, "error": err, "loss": 0.3 + 2 * b * 4 * a * (1 - a)}
        pid = f"stab_{'dense' if m < 0 else f'm{m:03d}'}_k{k}_eval"
        run.write_task(pid, dict(mask=m, remaining=1.0 if m < 0 else REMAINING[m], reset="0ep" if k == 0 else "500it",
                                 reset_iteration=k, threshold=0.02, bn_reestimate=False, **st.summary(curve, 0.02)),
                       {"curve": curve})
        pair_ids.append(pid)
    merge(run, tasks, {"total": 10.0, "start_time": 1e6}, {"ranks": 1, "hosts": ["h0"], "threads_per_rank": 1,
                                                            "git_commit": "abc"}, pair_ids=pair_ids)
    return str(path)


@pytest.fixture(scope="module")
def stab_run(tmp_path_factory):
    return make_stability_run(tmp_path_factory.mktemp("stab") / "run")


def test_stability_tables(stab_run):
    from lthmpi.analysis import load_runs
    from lthmpi.analysis import stability as sa

    (res,) = load_runs([stab_run])
    ps = sa.pairs(res)
    assert len(ps) == 10 and ps[0]["mask"] == -1 and [p["mask"] for p in ps[2:4]] == [0, 0]
    assert np.allclose(ps[0]["error"], 0.1 + 0.05 * 4 * st.alphas(5) * (1 - st.alphas(5)))
    head, rows = sa.barrier_rows(ps)
    assert head == ["network", "k=0ep", "k=500it"]
    assert rows[0] == ["dense", "5.00", "1.00*"] and rows[1] == ["50% left", "1.00*", "1.50*"]
    got = {r["network"]: (r["reset"], r["matches_dense"]) for r in sa.earliest_stable(ps, res, 0.005)}
    assert got == {"dense": ("500it", None), "50% left": ("0ep", True), "20% left": ("500it", False),
                   "10% left": ("500it", True), "5% left": (None, None)}


def test_stability_cli_json_csv_and_figures(stab_run, tmp_path):
    import csv
    import json

    from test_analysis import assert_png, cli

    p = cli(stab_run, "--json", "--csv", "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["stability"]
    assert len(s["pairs"]) == 10 and s["pairs"][0]["mask"] is None and len(s["pairs"][0]["error"]) == 5
    assert s["pairs"][0]["barrier"] == pytest.approx(0.05)
    assert [r["reset"] for r in s["earliest_stable"]] == ["500it", "0ep", "500it", "500it", None]
    with open(tmp_path / "o" / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and rows[0]["mask"] == "dense" and float(rows[2]["error"]) == pytest.approx(0.15)
    p = cli(stab_run, "--out", tmp_path / "r", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Earliest stable reset point" in p.stdout and "1.00*" in p.stdout
    for name in ("instability.png", "interpolation.png"):
        assert_png(tmp_path / "r" / name)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Stability (linear mode connectivity)" in report and "| 20% left | 500it | 0.10 |" in report


# -- the stability kind: pairs trained and evaluated by the coordinator ---------------------------------------
# TINY (conftest) + 2 stability points x (dense, mask 1): 12 one-shot retrainings alongside 8 stability
# trainings and 4 evaluations, all on 8x8 digits, T = 76 iterations.
PAIRS = {"enabled": True, "points": ["0ep", "10it"], "masks": ["dense", 1], "alphas": 5}
ALONE = ["stability.enabled=true", 'stability.points=["0ep", "10it"]', "stability.only=true", "stability.alphas=5"]


def stab_config(**stability):
    import copy

    from conftest import TINY

    from lthmpi.validation import validate

    raw = copy.deepcopy(TINY)
    raw["stability"] = dict(PAIRS, **stability)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tf_runtime):
    from lthmpi.parallel.coordinator import run_serial

    path = str(tmp_path_factory.mktemp("pairs") / "run")
    run_serial(stab_config(), path, threads=1, quiet=True)
    return path


def h5_weights(path) -> dict:
    """An endpoint file's weights with h5py alone."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f["weights"].visititems(lambda n, obj: out.__setitem__(n, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_curve_recomputed_from_the_endpoint_files_with_plain_keras(pair_run):
    """The stored curve of a sparse pair, recomputed with h5py, numpy and Keras forward passes only."""
    import h5py

    from lthmpi.data import load_dataset
    from lthmpi.models import build_model

    cfg = stab_config()
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, 0)
    run = os.path.join(pair_run, "stability")
    a, b = h5_weights(os.path.join(run, "stab_m001_k01_a.h5")), h5_weights(os.path.join(run, "stab_m001_k01_b.h5"))
    with h5py.File(os.path.join(pair_run, "masks.h5"), "r") as f:
        kernels = {p: f[f"masks/1/{p}"][()] for p in ("fc1/kernel", "fc2/kernel", "output/kernel")}
    with h5py.File(os.path.join(pair_run, "tasks", "stab_m001_k01_eval.h5"), "r") as f:
        alphas, errors, losses = f["curve/alpha"][()], f["curve/error"][()], f["curve/loss"][()]
        barrier, stable = float(f.attrs["barrier"]), bool(f.attrs["stable"])
    assert len(alphas) == 5 and not np.array_equal(a["fc1/kernel"], b["fc1/kernel"])
    for alpha, err, loss in zip(alphas, errors, losses):
        for v in model.variables:
            w = ((1 - alpha) * a[v.path].astype(np.float64) + alpha * b[v.path].astype(np.float64)).astype(np.float32)
            if v.path in kernels:
                assert np.all(w[~kernels[v.path].astype(bool)] == 0), (alpha, v.path)  # pruned: zero at every alpha
            v.assign(w)
        z = np.concatenate([np.asarray(model(data.x_test[i:i + 100], training=False), np.float64)
                            for i in range(0, len(data.x_test), 100)])
        lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
        assert abs(np.mean(z.argmax(1) != data.y_test) - err) <= 1e-6, alpha
        assert abs(np.mean(lse - z[np.arange(len(z)), data.y_test]) - loss) <= 1e-5, alpha
    assert barrier == pytest.approx(errors.max() - (errors[0] + errors[-1]) / 2, abs=1e-12)
    assert stable == (barrier < 0.02)


def test_copies_differ_only_in_data_order(pair_run, monkeypatch):
    """Same start weights (bitwise, = parent at k x mask), other order seed; B retrained with A's order is A."""
    from lthmpi.experiment import Experiment
    from lthmpi.kinds import stability as kind
    from lthmpi.store import RunDir

    cfg = stab_config()
    run = RunDir(pair_run)
    ckpts, _, _ = run.read_checkpoints()
    masks, _ = run.read_masks()
    k = 10
    start = {p: (w * masks[1][p] if p in masks[1] else w) for p, w in ckpts[k].items()}
    (wa, aa), (wb, ab) = (kind.read_endpoint(kind.endpoint_path(run, "stab_m001_k01", c)) for c in (0, 1))
    assert aa["start_sha256"] == ab["start_sha256"] == kind.weights_digest(start)
    assert aa["order_seed"] == cfg.seed and ab["order_seed"] != cfg.seed
    assert any(not np.array_equal(wa[p], wb[p]) for p in wa)
    exp = Experiment(cfg, pair_run, threads=1)
    exp.load_parent()
    exp.load_masks()
    (task_b,) = [t for t in kind.KIND.tasks(exp) if t.id == "stab_m001_k01_b"]
    monkeypatch.setattr(kind.st, "order_seed", lambda base, copy: base)  # B's training with A's data order
    kind.KIND.run(exp, task_b, write=False)
    again = exp.trainer.get_weights()
    assert all(np.array_equal(again[p], wa[p]) for p in wa)


def test_pairs_are_merged_alongside_the_grid(pair_run):
    from lthmpi.analysis import load_runs, science
    from lthmpi.analysis import stability as sa

    (res,) = load_runs([pair_run])
    assert len(res["stability"]) == 4
    assert [(p["mask"], p["reset"]) for p in sa.pairs(res)] == [(-1, "0ep"), (-1, "10it"), (1, "0ep"), (1, "10it")]
    assert {t["kind"] for t in res["tasks"]} == {"oneshot", "stability"} and len(res["tasks"]) == 24
    g = science.build_grid([res])
    assert g.masks == [0, 1] and g.controls == ["random_reinit", "random_mask"]  # the pairs stay out of the grid
    rows = sa.earliest_stable(sa.pairs(res), res)
    assert rows[1]["mask"] == 1 and (rows[1]["reset"] is None or rows[1]["matches_dense"] is not None)


# ResNet-20 is a battery variant: the test-only bn_conv (tests/bnconv.py) has the same batch-norm layer
# (models._bn), which is all the re-estimation touches (test_batch_norm_reestimation_is_the_mean_of_batch_statistics
# above counts ResNet-20's 21), and trains in ~2 s of CPU where ResNet-20 takes ~17 s.
@pytest.mark.parametrize("model", ["bn_conv", pytest.param("resnet20", marks=pytest.mark.battery)])
def test_batch_norm_net_through_both_options(tmp_path, tf_runtime, monkeypatch, model):
    """A batch-norm conv net on digits, run with the statistics re-estimated at each alpha; the same endpoints
    evaluated by the kind with the default (statistics interpolated). The option changes only the evaluation,
    so one pair of trainings serves both. Each stored value is what lthmpi.lmc computes."""
    import dataclasses

    import bnconv

    from lthmpi import models
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.experiment import Experiment
    from lthmpi.kinds import stability as kind
    from lthmpi.results import load

    monkeypatch.setitem(models.MODELS, bnconv.NAME, bnconv.build)
    cfg = stab_config(points=["4it"], masks="dense", alphas=3, only=True, bn_reestimate=True, bn_batches=2)
    cfg.model.name, cfg.train.iterations, cfg.train.eval_every, cfg.reset.points = model, 8, "4it", ["0ep"]
    path = str(tmp_path / "bn")
    (pair,) = load(run_serial(cfg, path, threads=1, quiet=True))["stability"]
    assert pair["bn_reestimate"] and np.all(np.isfinite(pair["error"]))
    exp = Experiment(cfg, path, threads=1)
    exp.load_parent()
    (wa, _), (wb, _) = (kind.read_endpoint(kind.endpoint_path(exp.run, "stab_dense_k00", c)) for c in (0, 1))
    x, y = exp.data.x_test, exp.data.y_test
    batches = st.bn_batches(len(exp.data.x_train), 32, 2, cfg.seed)
    again = st.curve(exp.trainer.model, wa, wb, x, y, 3, exp.data.x_train, batches)
    assert np.array_equal(again["error"], pair["error"]) and np.allclose(again["loss"], pair["loss"], atol=1e-6)
    plain = st.curve(exp.trainer.model, wa, wb, x, y, 3)
    exp.cfg = dataclasses.replace(cfg, stability=dataclasses.replace(cfg.stability, bn_reestimate=False))
    (ev,) = [t for t in kind.KIND.tasks(exp) if t.id.endswith("_eval")]
    got = kind.KIND.run(exp, ev, write=False)
    assert not got["bn_reestimate"] and got["barrier"] == st.barrier(plain["error"])
    assert got["loss_barrier"] == pytest.approx(st.barrier(plain["loss"]), abs=1e-9)
    assert not np.allclose(plain["loss"], pair["loss"])  # the two options measure different networks


def test_resume_after_a_kill_does_only_the_missing_work_and_p2_agrees(tmp_path, tf_runtime):
    """Killed (SIGKILL) in the 3rd task, after pair k00's two trainings and before its evaluation: the rerun
    keeps those two files and trains only the rest; then P = 2 under mpirun gives the same barriers and the same
    endpoint weights bit for bit, though rank 1 trained dense pairs while rank 0 still trained the parent (an
    MLP: parent_data_parallel = auto keeps it on rank 0; issue 33); a rerun of the finished run trains nothing.
    The two P = 1 reruns run in this process (run_serial: the command line's code at P = 1, without a
    TensorFlow import each); the kill and P = 2 need processes of their own."""
    from faultkit import MPIRUN, TINY_SETS, finish, start

    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load
    from lthmpi.validation import resolve

    cfg = resolve(None, [*TINY_SETS, *ALONE])
    run = tmp_path / "p1"
    rc, _, err = finish(start(run, None, ALONE, env={"LTHMPI_FAULT": "kill:0:3"}))
    assert rc != 0
    tasks = run / "tasks"
    first = {f: os.stat(tasks / f).st_mtime_ns for f in ("stab_dense_k00_a.h5", "stab_dense_k00_b.h5")}
    assert not (tasks / "stab_dense_k00_eval.h5").exists() and not (tasks / "stab_dense_k01_a.h5").exists()
    run_serial(cfg, str(run), threads=1, quiet=True)
    assert {f: os.stat(tasks / f).st_mtime_ns for f in first} == first
    assert "resuming: 2 of 6" in (run / "logs" / "rank0.log").read_text()
    p1 = {p["pair"]: p["barrier"] for p in load(str(run))["stability"]}
    assert sorted(p1) == ["stab_dense_k00_eval", "stab_dense_k01_eval"]
    from lthmpi.analysis.report import analyse  # the pairs alone: no science grid, the stability figures

    done = analyse([load(str(run))], str(tmp_path / "report"))
    assert "no science tables" in done["text"] and (tmp_path / "report" / "instability.png").exists()
    if not MPIRUN.exists():
        pytest.skip("no mpirun in this environment")
    p2 = tmp_path / "p2"
    rc, _, err = finish(start(p2, 2, ALONE))
    assert rc == 0, err
    res = load(str(p2))
    assert {p["pair"]: p["barrier"] for p in res["stability"]} == p1
    assert res["provenance"]["ranks"] == 2 and not res["provenance"]["parent_data_parallel"]
    early = [t for t in res["tasks"] if t["task_id"].startswith("stab_dense") and t["start_time"] < res["parent"]["end_time"]]
    assert early and all(t["rank"] == 1 for t in early), [(t["task_id"], t["start_time"]) for t in res["tasks"]]
    assert not (p2 / "checkpoints").exists()  # parent.h5 holds them all once the parent ends
    for pair in ("stab_dense_k00", "stab_dense_k01"):
        for c in "ab":
            a, b = (h5_weights(r / "stability" / f"{pair}_{c}.h5") for r in (run, p2))
            assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a), (pair, c)
    p1_tasks = {t["task_id"]: t for t in load(str(run))["tasks"]}
    for t in res["tasks"]:
        same = ("final_accuracy", "early_stop_accuracy", "best_val_loss", "barrier", "loss_barrier", "start_sha256")
        assert [repr(t.get(k)) for k in same] == [repr(p1_tasks[t["task_id"]].get(k)) for k in same], t["task_id"]
    stamps = {f: os.stat(f).st_mtime_ns for f in [p2 / "parent.h5", *(p2 / "tasks").iterdir(),
                                                 *(p2 / "stability").iterdir()]}
    run_serial(cfg, str(p2), threads=1, quiet=True)  # after completion: nothing trained, nothing rewritten
    assert {f: os.stat(f).st_mtime_ns for f in stamps} == stamps
    assert "resuming: 6 of 6" in (p2 / "logs" / "rank0.log").read_text()


def test_a_checkpoint_file_is_whole_or_absent_and_written_once(tmp_path, monkeypatch):
    """RunDir.write_checkpoint (a parent checkpoint as soon as it is reached, issue 33): a failed write leaves no
    file, a second write of the same arrays keeps the file, different arrays are refused in one line."""
    from lthmpi import store
    from lthmpi.store import RunDir, StoreError

    run = RunDir(str(tmp_path))
    w, o = {"d/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"adam/m": np.ones(3, np.float32)}

    def broken(*a, **k):
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(store, "write_arrays", broken)
        with pytest.raises(OSError):
            run.write_checkpoint(10, w, o)
    assert not run.checkpoint_done(10) and not [f for f in os.listdir(run.checkpoints_dir) if f.startswith(".tmp")]
    run.write_checkpoint(10, w, o)
    stamp = os.stat(run.checkpoint_path(10)).st_mtime_ns
    run.write_checkpoint(10, {k: v.copy() for k, v in w.items()}, o)
    assert os.stat(run.checkpoint_path(10)).st_mtime_ns == stamp
    got_w, got_o = run.read_checkpoint(10)
    assert got_w.keys() == w.keys() and got_w["d/kernel"].tobytes() == w["d/kernel"].tobytes() and got_o.keys() == o.keys()
    with pytest.raises(StoreError, match="differs from the one this run reached"):
        run.write_checkpoint(10, {"d/kernel": w["d/kernel"] + 1}, o)
    run.remove_checkpoints()
    assert not os.path.exists(run.checkpoints_dir)


def test_idle_ranks_share_the_early_tasks_and_stop_at_the_parent_end(tmp_path, monkeypatch):
    """phases.train_early: rank 1 of 3 takes every other early task, waits for its checkpoint's file, skips a task
    done on disk, and stops when parent.h5 appears (the rest goes to the task graph)."""
    from lthmpi.parallel import phases
    from lthmpi.parallel.graph import Task
    from lthmpi.store import RunDir

    run = RunDir(str(tmp_path))
    os.makedirs(run.tasks_dir)
    early = [Task(f"t{i}", "k", checkpoint=c) for i, c in enumerate([0, 0, 5, 5, 9, 9])]
    open(run.task_path("t2"), "w").close()  # done by an earlier run
    ran, loaded = [], []
    monkeypatch.setattr(phases, "run_one", lambda exp, t, **kw: ran.append(t.id) or {"task_id": t.id})

    class Exp:
        def __init__(self):
            self.run = run

        def parent_done(self):
            return os.path.exists(run.parent_path)

        def load_checkpoint(self, it):
            loaded.append(it)

    class Comm:
        rank, size = 1, 3

    polls = []

    def poll():  # rank 0 reaches checkpoints 0 and 5, then ends the parent before checkpoint 9's file exists
        polls.append(1)
        if len(polls) == 2:
            for it in (0, 5):
                run.write_checkpoint(it, {"w": np.zeros(1)}, None)
        if len(polls) == 4:
            open(run.parent_path, "w").close()

    phases.train_early(Exp(), Comm(), early, poll)
    assert ran == ["t0"] and loaded == [0] and len(polls) >= 4


def test_imp_levels_as_stability_masks(tmp_path, tf_runtime):
    """stability.masks names IMP levels: level 2's pair starts from the chain's level-2 mask (written by level
    1's ticket, which its trainings depend on); levels outside 1..L, points that are not reset points, and
    levels above 1 with stability.only are refused."""
    from lthmpi.validation import validate, validate_against_data
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.kinds import stability as kind
    from lthmpi.results import load
    from lthmpi.store import RunDir

    cfg = from_dict({**TINY_IMP, "stability": {**PAIRS, "points": ["10it"], "masks": [2], "alphas": 3}})
    validate(cfg)
    res = load(run_serial(cfg, str(tmp_path / "imp"), threads=1, quiet=True))
    (pair,) = res["stability"]
    assert pair["pair"] == "stab_l02_k00_eval" and pair["level"] == 2
    deps = {t["task_id"]: t["deps"] for t in res["tasks"]}
    assert deps["stab_l02_k00_a"] == deps["stab_l02_k00_b"] == "l01_r01_ticket"
    run = RunDir(str(tmp_path / "imp"))
    mask = run.read_chain_mask(1, 2)[0]
    start = {p: (w * mask[p] if p in mask else w) for p, w in run.read_checkpoints()[0][10].items()}
    _, attrs = kind.read_endpoint(kind.endpoint_path(run, "stab_l02_k00", 1))
    assert attrs["start_sha256"] == kind.weights_digest(start)
    assert pair["remaining"] == pytest.approx(sum(m.sum() for m in mask.values()) / sum(m.size for m in mask.values()))
    for change, words in (({"masks": [3]}, "IMP level 3, but prune.levels = 2"),
                          ({"points": ["20it"]}, "stability point 20it is not a reset point"),
                          ({"only": True}, "stability.only = true cannot measure IMP levels above 1")):
        bad = from_dict({**TINY_IMP, "stability": {**PAIRS, "points": ["10it"], "masks": [2], **change}})
        with pytest.raises(ConfigError) as e:
            stability_masks(bad)
            validate_against_data(bad, 38, 1237)
        assert words in str(e.value)


TINY_IMP = {"seed": 3, "data": {"dataset": "digits", "validation": 200},
            "train": {"epochs": 2, "batch_size": 32, "eval_every": "10it"},
            "prune": {"method": "imp", "levels": 2}, "reset": {"points": ["0ep", "10it"], "controls": []}}


def test_a_rerun_does_not_call_an_evaluation_trained_on_other_kernels():
    """A pair's evaluation trains nothing (iterations = 0): a rerun compares its threads, never its kernels."""
    from lthmpi.store import mixed_kernels

    ev = {"remaining": 0.2, "iterations": 0, "threads": 1}
    train = {"remaining": 0.2, "iterations": 50, "threads": 1, "kernels": "dense"}

    def sparse(r):
        return "sparse" if r <= 0.3 else "dense"

    assert mixed_kernels({"p_eval": ev}, 1, sparse) == []
    assert mixed_kernels({"p_eval": ev}, 2, sparse) == [("1 finished task(s) trained with 1 TF threads (this run: 2): "
                                                         "p_eval")]
    assert mixed_kernels({"p_a": train}, 1, sparse) == [("1 finished task(s) trained with dense kernels (this run: "
                                                         "sparse): p_a")]


def test_stability_over_seeds_is_a_mean_with_its_range_and_stable_count(stab_run, tmp_path):
    from lthmpi.analysis import load_runs
    from lthmpi.analysis import stability as sa
    from lthmpi.analysis.report import analyse

    # seed 0 is the module's designed run (stab_run: seed 0, no shift), read only
    runs = load_runs([stab_run, *(make_stability_run(tmp_path / f"s{s}", seed=s, shift=d) for s, d in ((1, 0.01), (2, -0.01)))])
    head, rows = sa.seed_rows(runs)
    assert head == ["network", "k=0ep (min–max)", "k=500it (min–max)"]
    by = {r[0]: r[1:] for r in rows}
    assert by["dense"] == ["5.00 [4.00, 6.00], stable in 0/3", "1.00 [0.00, 2.00], stable in 2/3"]
    assert by["50% left"][1] == "1.50 [0.50, 2.50], stable in 2/3"
    head, rows = sa.earliest_seed_rows(runs, 0.005)
    by = {r[0]: r[1:] for r in rows}
    assert by["dense"] == ["0: 500it; 1: never; 2: 500it", "dense"]  # +1 pp on seed 1 puts 1.00 at the threshold
    assert by["50% left"][0] == "0: 0ep; 1: never; 2: 0ep" and by["50% left"][1].startswith("0: yes (+")
    assert by["50% left"][1].split("; ")[1] == "1: -"
    done = analyse(runs, str(tmp_path / "out"), 0.005)
    assert "Stability over seeds" in done["text"] and "5.00 [4.00, 6.00], stable in 0/3" in done["text"]
    assert "Earliest stable k per seed" in done["text"] and "0: 500it; 1: never; 2: 500it" in done["text"]
