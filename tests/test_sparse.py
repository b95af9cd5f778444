"""Tests of lthmpi/sparse.py (the sparse kernels of masked ReLU MLPs) and of the trainer's choice of kernels:
the sparse path must train what the dense XLA path trains (to float rounding), keep pruned weights at
exactly zero, and hand back weights and optimizer state that the dense path can go on from."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from test_training import OPTIMIZERS, PER_EPOCH, data, train_cfg  # noqa: F401 (data: the digits fixture)

from lthmpi import sparse
from lthmpi.config import ConfigError, from_dict
from lthmpi.validation import validate
from lthmpi.pruning import magnitude_masks


def trainer(data, sparse_below, model_name="lenet300_100", **train):
    from lthmpi.models import build_model, prunable_variables
    from lthmpi.training import MaskedTrainer

    cfg = train_cfg(**train)
    model = build_model(model_name, data.input_shape, data.num_classes, 0)
    return MaskedTrainer(model, data, cfg.train, 0, prunable_variables(model), sparse_below=sparse_below)


def masks_for(tr, remaining):
    w = tr.get_weights()
    return magnitude_masks({p: w[p] for p in tr.prunable_paths}, remaining, "global", {"output": 0.5})


def test_kernels_compile_and_cache(tmp_path, monkeypatch):
    """The first use compiles into the cache; a later process finds the same file and does not compile."""
    monkeypatch.setenv("LTHMPI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sparse, "_library", None)
    monkeypatch.setattr(sparse, "_library_error", None)
    lib = sparse.library()
    assert lib is not None, sparse.library_error()
    built = [f for f in tmp_path.iterdir()]
    assert len(built) == 1 and built[0].name.startswith("sparse_mlp-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(sparse.subprocess, "run", no_compiler)
    assert sparse._build() == str(built[0]) and built[0].stat().st_mtime_ns == mtime


def test_no_compiler_falls_back_to_dense_kernels(tmp_path, monkeypatch, data):
    monkeypatch.setenv("LTHMPI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(sparse, "_library", None)
    monkeypatch.setattr(sparse, "_library_error", None)
    assert sparse.library() is None
    assert "could not compile" in sparse.library_error()
    assert not list(tmp_path.iterdir()), "a failed compile must leave nothing in the cache"
    tr = trainer(data, 1.0)
    with pytest.warns(UserWarning, match="sparse kernels unavailable"):
        tr.set_masks(masks_for(tr, 0.2))
    assert tr.kernels == "dense"
    h = tr.fit(0, 12)
    assert not h.diverged and len(h.evals) == 2


def test_sparse_forward_matches_numpy(data):
    """Evaluation on the sparse kernels against a float64 numpy forward pass of the masked net, over a
    split whose length is not a multiple of the 64-column tile."""
    rng = np.random.default_rng(1)
    sizes = [64, 40, 30, 10]
    kernels = [rng.standard_normal((a, b)).astype(np.float32) * 0.3 for a, b in zip(sizes, sizes[1:])]
    biases = [rng.standard_normal(b).astype(np.float32) * 0.1 for b in sizes[1:]]
    masks = [rng.random(k.shape) < 0.3 for k in kernels]
    masks[1][:, 5] = False  # a unit with no inputs left: its output is relu(bias) alone
    net = sparse.SparseMLP(kernels, biases, masks, "adam")
    x = sparse.flat(data.x_val)
    y = np.ascontiguousarray(data.y_val, np.int32)
    assert len(y) % 64
    h = x.astype(np.float64)
    for i, (k, b, m) in enumerate(zip(kernels, biases, masks)):
        h = h @ (k * m) + b
        if i < len(kernels) - 1:
            h = np.maximum(h, 0)
    shifted = h - h.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss, correct = net.evaluate(sparse.feature_major(x), y)
    assert loss == pytest.approx(-log_p[np.arange(len(y)), y].sum(), rel=1e-5)
    assert correct == np.sum(h.argmax(axis=1) == y)
    for k, m, back in zip(kernels, masks, net.kernels()):
        assert np.array_equal(back, k * m)


def _slot_of(key, masks):
    """The pruned variable an optimizer slot belongs to (None for a bias's slot or the step count)."""
    return next((p for p in masks if key.endswith(p.replace("/", "_") + "_momentum")
                 or key.endswith(p.replace("/", "_") + "_velocity")), None)


def _retrain(tr, below, weights, masks, state, start, end):
    """`tr` (built with sparse_below = `below`) trained from `weights`, `masks` and optimizer `state`."""
    tr.set_weights(weights)
    tr.set_masks(masks)
    tr.reset_optimizer(state)
    assert tr.kernels == ("sparse" if below else "dense")
    h = tr.fit(start, end)
    return h, tr.get_weights(), tr.get_optimizer_state()


@pytest.fixture(scope="module")
def dense_start(data):
    """Per optimizer: weights and optimizer state after 20 dense iterations, and masks keeping 20%."""
    return {name: dense_start_of(data, name) for name in OPTIMIZERS}


_TRAINERS: dict = {}


def module_trainer(data, below, name):
    """One trainer per (sparse_below, optimizer) for the module: each takes its weights, masks and optimizer
    state from the test (`_retrain`), so a reused one trains what a new one would, without another compile."""
    if (below, name) not in _TRAINERS:
        _TRAINERS[below, name] = trainer(data, below, **OPTIMIZERS[name])
    return _TRAINERS[below, name]


def dense_start_of(data, name):
    tr = module_trainer(data, 0.0, name)
    tr.fit(0, 20)
    return tr.get_weights(), tr.get_optimizer_state(), masks_for(tr, 0.2)


@pytest.fixture(scope="module", autouse=True)
def _drop_module_trainers():
    yield
    _TRAINERS.clear()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_training_matches_dense_training(data, dense_start, name):
    """From the same weights, masks, optimizer state, batches and schedule (the learning rate drops at 30
    and 60 it for SGD) the two kernels train the same net to float rounding: weights, kept optimizer
    slots and step count, every validation loss, the early-stopping bookkeeping; pruned weights stay
    exactly zero. (Over hundreds of steps rounding differences can grow: ReLU nets are chaotic.)"""
    weights, state, masks = dense_start[name]
    (hd, wd, od), (hs, ws, os_) = (_retrain(module_trainer(data, below, name), below, weights, masks, state, 20, 70)
                                   for below in (0.0, 1.0))
    assert [e["iteration"] for e in hs.evals] == [e["iteration"] for e in hd.evals] == [30, 38, 40, 50, 60, 70]
    for a, b in zip(hd.evals, hs.evals):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert hs.best_iteration == hd.best_iteration
    assert hs.final_accuracy == hd.final_accuracy and hs.early_stop_accuracy == hd.early_stop_accuracy
    for p in wd:
        assert np.allclose(ws[p], wd[p], rtol=0, atol=1e-4 * np.abs(wd[p]).max()), p
        if p in masks:
            assert np.count_nonzero(ws[p][~masks[p]]) == 0, f"pruned weights of {p} revived"
    for k in od:
        if k.endswith("iteration"):
            assert os_[k] == od[k] == state[k] + 50
            continue
        p = _slot_of(k, masks)
        a, b = (od[k][masks[p]], os_[k][masks[p]]) if p else (od[k], os_[k])
        assert np.allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max())), k


def test_sparse_path_leaves_the_slots_of_pruned_weights_alone(data, dense_start):
    """What the optimizer holds at pruned weights is not the sparse path's to change (it never reads it)."""
    weights, state, masks = dense_start["adam"]
    _, _, after = _retrain(module_trainer(data, 1.0, "adam"), 1.0, weights, masks, state, 20, 25)
    for k in state:
        p = _slot_of(k, masks)
        if p:
            assert np.array_equal(after[k][~masks[p]], state[k][~masks[p]]), k
            assert not np.array_equal(after[k][masks[p]], state[k][masks[p]]), k


def test_sparse_training_is_deterministic_and_batch_tiles_pad(data):
    """Batches that do not fill a 64-column tile (7 here) train exactly as the dense path does, and two runs
    give the same bits."""
    runs = []
    for below in (1.0, 1.0, 0.0):
        tr = trainer(data, below, batch_size=7)
        tr.set_masks(masks_for(tr, 0.05))
        h = tr.fit(0, 30)
        runs.append((tr.get_weights(), [e["val_loss"] for e in h.evals]))
    (w1, l1), (w2, l2), (wd, ld) = runs
    assert l1 == l2 and all(np.array_equal(w1[p], w2[p]) for p in w1)
    assert l1 == pytest.approx(ld, rel=1e-4)


def test_which_kernels(data):
    """Sparse kernels for masks keeping at most sparse_below; dense ones for denser masks, the dense
    parent, sparse_below = 0, subgroups (a reducer), and nets they cannot run."""
    tr = trainer(data, 0.3)
    assert tr.sparse_unsupported is None
    tr.set_masks(masks_for(tr, 0.2))
    assert tr.kernels == "sparse"
    tr.set_masks(masks_for(tr, 0.5))
    assert tr.kernels == "dense"
    tr.set_masks(None)
    assert tr.kernels == "dense"
    tr.set_masks(masks_for(tr, 0.2))

    class Pair:
        rank, size = 0, 2

    tr.set_reducer(Pair())
    assert tr.kernels == "dense"
    tr.set_reducer(None)
    assert tr.kernels == "sparse"
    assert trainer(data, 0.0).kernels == "dense"
    assert trainer(data, 0.3, batch_size=65).sparse_unsupported == "batches of more than 64"
    assert trainer(data, 0.3, optimizer="sgd", lr=0.1).sparse_unsupported is None


def test_experiment_records_which_kernels_trained_each_task(tmp_path, tf_runtime):
    from lthmpi.parallel.coordinator import run_serial
    from lthmpi.results import load

    cfg = from_dict({"seed": 1, "data": {"dataset": "digits", "validation": 200},
                     "train": {"epochs": 1, "batch_size": 32, "eval_every": "10it"},
                     "prune": {"remaining": [0.5, 0.1]}, "reset": {"points": ["0ep"], "controls": []},
                     "parallel": {"sparse_below": 0.3}})
    validate(cfg)
    res = load(run_serial(cfg, str(tmp_path / "run"), threads=1, quiet=True))
    kernels = {t["mask"]: t["kernels"] for t in res["tasks"]}
    assert kernels == {0: "dense", 1: "sparse"}
    assert all(t["final_accuracy"] > 0.5 for t in res["tasks"])


@pytest.mark.parametrize("value", [1.5, -0.1, "half", True])
def test_bad_sparse_below_is_refused(value):
    with pytest.raises(ConfigError, match="parallel.sparse_below"):
        validate(from_dict({"parallel": {"sparse_below": value}}))


# -- the C boundary: compilers, ABI, cache key, bad input, sanitizers ---------------------------------------

def _sparse_check(tmp_path, name, **env):
    """Run tests/sparse_check.py (no TensorFlow) with a fresh kernel cache under `env`; its npz results."""
    import os
    import subprocess
    import sys

    out = tmp_path / f"{name}.npz"
    cache = tmp_path / f"cache-{name}"
    full = {**os.environ, "LTHMPI_CACHE_DIR": str(cache), **env}
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sparse_check.py"), str(out)],
                       env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    assert "LTH_EINDEX" in r.stdout and "refused (row index)" in r.stdout, r.stdout
    assert len(list(cache.glob("sparse_mlp-*.so"))) == 1
    return dict(np.load(out))


def _tool(name):
    import shutil

    path = shutil.which(name)
    if path is None:
        import os

        if os.geteuid() != 0:
            pytest.skip(f"{name} is not installed (run/setup.sh installs it as root; CI runs as root)")
        pytest.fail(f"{name} is not installed: run run/setup.sh (it installs {name} with apt)")
    return path


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_kernels_built_by_clang_train_as_gcc_built_ones(tmp_path):
    """The source builds with clang (no GCC-only builtins) and its kernels compute what GCC's do."""
    gcc = _sparse_check(tmp_path, "gcc", CC=_tool("gcc"))
    _same(_sparse_check(tmp_path, "clang", CC=_tool("clang")), gcc)


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path, cc):
    """Training, evaluation and every refused call run clean under ASan + UBSan (any finding aborts)."""
    import subprocess

    compiler = _tool(cc)
    lib = "libclang_rt.asan-x86_64.so" if cc == "clang" else "libasan.so"
    runtime = subprocess.run([compiler, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
    if cc == "clang" and not runtime.startswith("/"):
        runtime = subprocess.run([compiler, "--print-runtime-dir"], capture_output=True, text=True).stdout.strip() + "/" + lib
    reference = _sparse_check(tmp_path, f"{cc}-plain", CC=compiler)
    _same(_sparse_check(tmp_path, f"{cc}-asan", CC=compiler, LTHMPI_SPARSE_SANITIZE="1", LD_PRELOAD=runtime,
                        ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1"), reference)


def test_abi_check_names_what_disagrees(monkeypatch):
    assert sparse.library() is not None, sparse.library_error()
    good = [sparse.ABI_VERSION, sparse.TILE, sparse.MAX_LAYERS, ctypes.sizeof(sparse._Layer), ctypes.sizeof(sparse._Net),
            ctypes.sizeof(sparse._Opt), sparse._Opt.iterations.offset]
    assert sparse.abi_mismatch(good) is None
    bad = list(good)
    bad[5] += 8  # a field added to Opt on the C side only
    assert sparse.abi_mismatch(bad) == f"sizeof(Opt) {good[5] + 8} (expected {good[5]})"


def test_cache_key_covers_what_changes_the_binary(monkeypatch):
    monkeypatch.setattr(sparse, "compiler_version", lambda cc: "cc 12.2")
    key = sparse.cache_key(b"source", "/usr/bin/cc", ["-O3"])
    assert sparse.cache_key(b"source", "/usr/bin/cc", ["-O3"]) == key
    assert sparse.cache_key(b"source2", "/usr/bin/cc", ["-O3"]) != key
    assert sparse.cache_key(b"source", "/usr/bin/clang", ["-O3"]) != key
    assert sparse.cache_key(b"source", "/usr/bin/cc", ["-O2"]) != key
    monkeypatch.setattr(sparse, "compiler_version", lambda cc: "cc 13.1")
    assert sparse.cache_key(b"source", "/usr/bin/cc", ["-O3"]) != key


def test_bad_calls_are_refused_with_what_is_wrong():
    rng = np.random.default_rng(0)
    kernels = [rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)]
    biases = [np.zeros(8, np.float32), np.zeros(3, np.float32)]
    masks = [np.ones(k.shape, bool) for k in kernels]
    with pytest.raises(ValueError, match="layer 1 takes 7 inputs, layer 0 gives 8"):
        sparse.SparseMLP(kernels[:1] + [kernels[1][:7]], biases, masks[:1] + [masks[1][:7]], "adam")
    net = sparse.SparseMLP(kernels, biases, masks, "adam")
    x, y = rng.standard_normal((50, 20)).astype(np.float32), rng.integers(0, 3, 50).astype(np.int32)
    idx, lr = np.zeros((2, 4), np.int32), np.full(2, 0.01, np.float32)
    for args, words in (((x, y, idx + 50, lr), "row indices 50..50 outside the 50 training rows"),
                        ((x, y + 3, idx, lr), r"labels \d+\.\.\d+ outside the 3 classes"),
                        ((np.ascontiguousarray(x[:, :10]), y, idx, lr), "10 features per example, the first layer takes 20"),
                        ((x, y, idx, lr[:1]), "one rate per step")):
        with pytest.raises(ValueError, match=words):
            net.train(*args)
    with pytest.raises(ValueError, match="columns a multiple of 64"):
        net.evaluate(np.zeros((20, 50), np.float32), y)
    assert np.isfinite(net.train(x, y, idx, lr))  # the net is untouched by the refused calls
    with pytest.raises(sparse.SparseError, match="LTH_ELABEL, a label outside the classes"):
        sparse._check(6, "train")


def test_why_the_sparse_kernels_are_off_is_logged_once(data):
    import logging

    from lthmpi.training import trainer as trainer_module

    trainer_module._SAID.discard("batches of more than 64")
    tr = trainer(data, 0.3, batch_size=65)
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("lthmpi")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            assert tr.kernels_for(0.1) == "dense"
        assert tr.kernels_for(0.5) == "dense"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = [r.getMessage() for r in records if "sparse kernels off" in r.getMessage()]
    assert said == ["sparse kernels off (batches of more than 64): masks keeping <= 0.3 train on the dense kernels"]
