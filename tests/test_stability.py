"""Stability (linear mode connectivity, lthmpi/stability.py): the interpolation, the barrier, the batch-norm
re-estimation, and the [stability] config section's bad input, on tiny models (digits, 8x8)."""
from __future__ import annotations

import numpy as np
import pytest

from faultkit import launch
from lthmpi import stability as st
from lthmpi.config import ConfigError, from_dict, resolve, stability_masks
from test_bad_config import assert_one_line


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
    assert stability_masks(from_dict({"prune": {"remaining": [0.5, 0.2]}, "stability": {"masks": "all"}})) == [None, 0, 1]
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


def make_stability_run(path):
    from test_analysis import REMAINING, make_run

    from lthmpi.results import merge
    from lthmpi.store import RunDir

    make_run(path)
    run = RunDir(str(path))
    tasks = sorted(run.done_tasks())
    pair_ids = []
    for (m, k), b in BARRIERS.items():
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
