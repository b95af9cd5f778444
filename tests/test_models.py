"""Tests of the model registry (lthmpi/models.py): shapes, masked training steps, prunable variables,
paper parameter counts, seeding, fresh_init and errors. Tiny inputs throughout, except the count tests."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
import keras

from lthmpi.models import (MODELS, ModelError, build_model, describe, fresh_init, prunable_variables)

NAMES = ["lenet300_100", "conv2", "conv4", "conv6", "resnet20", "vgg16", "mobilenetv2"]
CLASSES = 3
# Tiny shapes: 8x8x1 (the digits) and 16x16x3; vgg16 at 8x8 pools down to 1x1 and pools once more,
# mobilenetv2 at 8x8 goes through its Resizing layer.
TINY = {
    "lenet300_100": (8, 8, 1),
    "conv2": (8, 8, 1),
    "conv4": (16, 16, 3),
    "conv6": (8, 8, 1),
    "resnet20": (16, 16, 3),
    "vgg16": (8, 8, 1),
    "mobilenetv2": (8, 8, 1),
    "bn_conv": (16, 16, 3),  # tests/bnconv.py: test-only, not in MODELS (nor in NAMES)
}
PRUNABLE_TYPES = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)

_CACHE = {}


def tiny(name, seed=0):
    """A tiny model built once per (name, seed) for read-only tests; never train or assign to it."""
    key = (name, seed)
    if key not in _CACHE:
        _CACHE[key] = build_model(name, TINY[name], CLASSES, seed)
    return _CACHE[key]


def tiny_batch(shape, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(shape)).astype(np.float32)
    y = np.arange(n) % CLASSES
    return x, y


def test_registry_names():
    assert sorted(MODELS) == sorted(NAMES)


# ---------------------------------------------------------------------------------------------------
# logits and a masked training step


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_masked_step(name, opt_name):
    model = build_model(name, TINY[name], CLASSES, seed=7)
    x, y = tiny_batch(TINY[name])
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    assert logits.shape == (len(x), CLASSES)
    assert np.all(np.isfinite(logits))
    assert model.get_layer("output").activation is keras.activations.linear  # logits, no softmax

    rng = np.random.default_rng(1)
    prunable = prunable_variables(model)
    masks = {id(v): (rng.random(tuple(v.shape)) < 0.5).astype(np.float32) for v in prunable}
    for v in prunable:
        v.assign(v * masks[id(v)])
    before = {id(v): v.numpy().copy() for v in model.trainable_variables}

    if opt_name == "sgd":
        opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, weight_decay=1e-2)
    else:
        opt = keras.optimizers.Adam(learning_rate=1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tvars = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, tvars)
    assert all(g is not None for g in grads)
    grads = [g * masks[id(v)] if id(v) in masks else g for g, v in zip(grads, tvars)]
    gnp = {id(v): keras.ops.convert_to_numpy(g) for g, v in zip(grads, tvars)}
    opt.apply(grads, tvars)
    # masked gradients on zeroed weights: the optimizer step alone (momentum, Adam moments, weight decay)
    # leaves the pruned entries at exactly zero ...
    for v in prunable:
        assert np.all(v.numpy()[masks[id(v)] == 0] == 0.0), v.path
    # ... and re-applying the mask keeps them there.
    for v in prunable:
        v.assign(v * masks[id(v)])

    for v in prunable:
        m = masks[id(v)]
        now = v.numpy()
        assert np.all(now[m == 0] == 0.0), v.path
        changed = now[m == 1] != before[id(v)][m == 1]
        if opt_name == "sgd":
            # decoupled weight decay moves every non-zero weight (bar the rare entry where the gradient
            # step and the decay cancel to within float32 rounding)
            assert changed.mean() > 0.99, f"{v.path}: {np.mean(~changed):.2%} of unpruned weights unchanged"
        else:
            # Adam moves every weight whose gradient is not negligible (at 8x8, vgg16's last 3x3 convs see
            # a 1x1 map and only their centre taps get a gradient, so "all changed" is not expected)
            live = np.abs(gnp[id(v)][m == 1]) > 1e-6
            assert live.any(), v.path
            assert changed[live].all(), f"{v.path}: {np.sum(~changed[live])} live unpruned weights unchanged"


# ---------------------------------------------------------------------------------------------------
# prunable variables


def _walk(layers):
    for layer in layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer.layers)
        else:
            yield layer


@pytest.mark.parametrize("name", NAMES)
def test_prunable_variables_are_exactly_the_kernels(name):
    model = tiny(name)
    pv = prunable_variables(model)
    expected = []
    for layer in _walk(model.layers):
        if isinstance(layer, PRUNABLE_TYPES):
            k = getattr(layer, "kernel", None)
            if k is None:
                k = layer.depthwise_kernel
            expected.append(k)
    assert [v.path for v in pv] == [v.path for v in expected]
    assert [id(v) for v in pv] == [id(v) for v in expected]
    assert len({v.path for v in pv}) == len(pv)
    assert pv[-1].path == "output/kernel"

    pv_ids = {id(v) for v in pv}
    for v in pv:
        assert v.path.endswith("/kernel") or v.path.endswith("/depthwise_kernel"), v.path
        assert v.trainable
        assert not any(w in v.path for w in ("bias", "gamma", "beta", "moving")), v.path
    # every other variable is a bias or a normalisation parameter/statistic
    for v in model.weights:
        if id(v) not in pv_ids:
            assert v.path.split("/")[-1] in ("bias", "gamma", "beta", "moving_mean", "moving_variance"), v.path
    # and every kernel in the model is prunable
    kernels = {v.path for v in model.weights if "kernel" in v.path.split("/")[-1]}
    assert kernels == {v.path for v in pv}

    if name == "mobilenetv2":
        assert any(isinstance(ly, keras.layers.DepthwiseConv2D) and id(_k(ly)) in pv_ids for ly in model.layers)
    if name in ("resnet20", "vgg16", "mobilenetv2"):
        assert any(isinstance(ly, keras.layers.BatchNormalization) for ly in model.layers)


def _k(layer):
    k = getattr(layer, "kernel", None)
    return k if k is not None else layer.depthwise_kernel


# ---------------------------------------------------------------------------------------------------
# paper parameter counts


def _conv_kernel_weights(model):
    return sum(int(np.prod(v.shape)) for v in prunable_variables(model) if len(v.shape) == 4)


def test_count_lenet300_100():
    assert build_model("lenet300_100", (28, 28, 1), 10, 0).count_params() == 266_610


@pytest.mark.parametrize("name,total,conv_weights", [
    ("conv2", 4.3e6, 38e3),   # Frankle & Carbin 2019, Fig. 2: 4.3M / conv 38K
    ("conv4", 2.4e6, 260e3),  # 2.4M / conv 260K
])
def test_count_conv2_conv4(name, total, conv_weights):
    model = build_model(name, (32, 32, 3), 10, 0)
    assert abs(model.count_params() - total) <= 0.03 * total
    assert abs(_conv_kernel_weights(model) - conv_weights) <= 0.03 * conv_weights


def test_count_conv6():
    # The paper's Fig. 2 says 1.7M in all, 1.1M in convolutions. The conv figure holds (1,144,512 kernel
    # weights), but the stated architecture then has a 4*4*256 = 4096-wide flatten, so its FC layers
    # alone hold 4096*256 + 256*256 + 256*10 weights (+ biases) = 1.12M: 2.26M in all. The 1.7M total is
    # not reachable by the architecture the same table describes; we build the architecture and pin its count.
    model = build_model("conv6", (32, 32, 3), 10, 0)
    conv = _conv_kernel_weights(model)
    assert conv == 1_144_512
    assert abs(conv - 1.1e6) <= 0.05 * 1.1e6
    fc_weights = 4096 * 256 + 256 * 256 + 256 * 10
    assert model.count_params() == conv + fc_weights + (64 * 2 + 128 * 2 + 256 * 2) + (256 + 256 + 10)
    assert model.count_params() == 2_262_602


def test_count_resnet20():
    n = build_model("resnet20", (32, 32, 3), 10, 0).count_params()
    assert abs(n - 0.27e6) <= 0.05 * 0.27e6


def test_count_vgg16():
    n = build_model("vgg16", (32, 32, 3), 10, 0).count_params()
    assert abs(n - 15e6) <= 0.03 * 15e6


def test_count_mobilenetv2_matches_keras():
    model = build_model("mobilenetv2", (224, 224, 3), 1000, 0)
    assert model.count_params() == 3_538_984
    assert "resize" not in [ly.name for ly in model.layers]


# ---------------------------------------------------------------------------------------------------
# seeds, stable names, fresh_init


def _arrays(model):
    return [v.numpy() for v in model.weights]


@pytest.mark.parametrize("name", NAMES)
def test_seeding_and_stable_paths(name):
    a = tiny(name, seed=0)
    b = build_model(name, TINY[name], CLASSES, seed=0)
    c = tiny(name, seed=1)
    assert [v.path for v in a.weights] == [v.path for v in b.weights] == [v.path for v in c.weights]
    assert len({v.path for v in a.weights}) == len(a.weights)
    for va, vb in zip(a.weights, b.weights):
        assert np.array_equal(va.numpy(), vb.numpy()), va.path
    for va, vc in zip(prunable_variables(a), prunable_variables(c)):
        assert not np.array_equal(va.numpy(), vc.numpy()), va.path
    # no two kernels share a random stream
    flat = [v.numpy().ravel()[:8] for v in prunable_variables(a)]
    assert len({f.tobytes() for f in flat}) == len(flat)
    assert a.layers[-1].name == "output"


@pytest.mark.parametrize("name", NAMES)
def test_fresh_init(name):
    model = tiny(name, seed=0)
    current = [v.numpy().copy() for v in model.trainable_variables]
    n_layers = len(model.layers)
    f1 = fresh_init(model, 5)
    f2 = fresh_init(model, 5)
    f3 = fresh_init(model, 6)
    f0 = fresh_init(model, 0)  # the build seed: must still not reproduce the build's init
    tvars = model.trainable_variables
    assert len(f1) == len(tvars)
    pv_ids = {id(v) for v in prunable_variables(model)}
    for i, v in enumerate(tvars):
        assert isinstance(f1[i], np.ndarray)
        assert f1[i].shape == tuple(v.shape) and f1[i].dtype == np.dtype(v.dtype), v.path
        assert np.array_equal(f1[i], f2[i]), v.path
        if id(v) in pv_ids:
            assert not np.array_equal(f1[i], current[i]), v.path
            assert not np.array_equal(f0[i], current[i]), v.path
            assert not np.array_equal(f1[i], f3[i]), v.path
        elif v.path.endswith("/bias") or v.path.endswith("/beta"):
            assert np.all(f1[i] == 0.0), v.path
        elif v.path.endswith("/gamma"):
            assert np.all(f1[i] == 1.0), v.path
    # the model itself is untouched
    assert len(model.layers) == n_layers
    for v, before in zip(model.trainable_variables, current):
        assert np.array_equal(v.numpy(), before)


def test_fresh_init_uses_the_layer_initializer():
    model = tiny("lenet300_100")
    values = dict(zip([v.path for v in model.trainable_variables], fresh_init(model, 3)))
    fc1 = values["fc1/kernel"]  # Glorot normal, fan_in 64, fan_out 300
    assert abs(fc1.std() - np.sqrt(2.0 / (64 + 300))) < 0.05 * np.sqrt(2.0 / (64 + 300))
    assert abs(fc1.mean()) < 0.01
    model = tiny("resnet20")
    values = dict(zip([v.path for v in model.trainable_variables], fresh_init(model, 3)))
    k = values["stage3_block2_conv1/kernel"]  # He normal, fan_in 3*3*64
    assert abs(k.std() - np.sqrt(2.0 / 576)) < 0.05 * np.sqrt(2.0 / 576)


# ---------------------------------------------------------------------------------------------------
# small and odd shapes, describe, errors


@pytest.mark.parametrize("name", ["conv6", "resnet20"])
def test_odd_small_shapes(name):
    model = build_model(name, (3, 5, 2), 4, 0)
    x = np.zeros((2, 3, 5, 2), np.float32)
    assert tuple(model(x).shape) == (2, 4)


def test_describe():
    model = tiny("mobilenetv2")
    text = describe(model)
    lines = text.splitlines()
    assert len(lines) == len(model.layers) + 1
    assert sum(line.endswith("prunable") for line in lines[:-1]) == len(prunable_variables(model))
    assert f"{model.count_params():,}" in lines[-1]
    assert lines[-2].split()[0] == "output" and "Dense" in lines[-2]
    assert any("DepthwiseConv2D" in line and line.endswith("prunable") for line in lines)
    assert any("BatchNormalization" in line and not line.endswith("prunable") for line in lines)


def test_unknown_model():
    with pytest.raises(ModelError) as e:
        build_model("resnet50", (32, 32, 3), 10, 0)
    msg = str(e.value)
    assert "resnet50" in msg and "\n" not in msg
    for name in NAMES:
        assert name in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("args", [
    ("conv2", (64,), 10, 0),
    ("resnet20", (8, 8, 0), 10, 0),
    ("lenet300_100", (8, 8, 1), 0, 0),
    ("lenet300_100", (8, 8, 1), 10, -1),
])
def test_bad_arguments(args):
    with pytest.raises(ModelError):
        build_model(*args)


def test_build_leaves_python_random_state_alone():
    # Keras' unseeded initialisers (MobileNetV2's) draw their seeds from Python's `random`.
    import random
    random.seed(123)
    expected = random.random()
    random.seed(123)
    build_model("mobilenetv2", TINY["mobilenetv2"], CLASSES, 0)
    assert random.random() == expected


# ---------------------------------------------------------------------------------------------------
# the engine's compiled step trains every model (XLA with op determinism, as in every run)


@pytest.mark.parametrize("shape", [(8, 8, 4), (5, 7, 3), (1, 1, 2)])
def test_max_pool_equals_keras_same_pooling(tf_runtime, shape):
    from lthmpi.models import MaxPool2x2

    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    want = keras.layers.MaxPooling2D(2, padding="same")(x)
    got = MaxPool2x2()(x)
    assert tuple(got.shape) == tuple(want.shape)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want))


# XLA compiles MobileNetV2 and VGG-16 for minutes on a 2-core CPU, where they train on oneDNN without XLA
# anyway (test_logits_and_masked_step above steps both); their XLA form, the GPU's, runs with the slow
# variants (`./run/test.sh -m "battery or not battery"`). Every layer type they use but the depthwise
# convolution is compiled here in the other nets (MobileNetV2's residual Add and strided convolutions only in
# the battery's ResNet-20, below).
XLA_ON_CPU_TAKES_MINUTES = pytest.mark.battery
# Variants whose compiled path another default test runs (each XLA compile is seconds of CPU on two cores):
# Conv-4 and Conv-6 are Conv-2's code (models._conv_n) with more of the same layers, and Conv-2 runs here (Conv-6
# compiled for ~4 s of CPU more);
# LeNet-300-100 trains on this XLA path (whole fused blocks, the CPU's default for a Dense net) in every
# test_training.py test of a rig, which asserts the same (pruned weights exactly zero, kept ones moved).
# ResNet-20's layers (convolution, lthmpi's FusedBatchNorm, ReLU, global average pool, Dense) are compiled here
# in the test-only bn_conv (tests/bnconv.py), ~13 s of CPU less; only its residual Add and its strided
# convolutions are not (test_logits_and_masked_step steps ResNet-20 without XLA).
COVERED_ELSEWHERE = pytest.mark.battery


def _compiled_variant(name):
    if name in ("vgg16", "mobilenetv2"):
        return pytest.param(name, marks=XLA_ON_CPU_TAKES_MINUTES)
    if name in ("conv4", "conv6", "lenet300_100", "resnet20"):
        return pytest.param(name, marks=COVERED_ELSEWHERE)
    return name


@pytest.mark.parametrize("name", [_compiled_variant(n) for n in NAMES] + ["bn_conv"])
def test_compiled_masked_trainer_trains_every_model(tf_runtime, monkeypatch, name):
    """Two compiled training steps: MaxPooling2D's gradient, for one, has no deterministic XLA kernel."""
    from types import SimpleNamespace

    import bnconv

    from lthmpi.config import TrainConfig
    from lthmpi.training import MaskedTrainer

    monkeypatch.setitem(MODELS, bnconv.NAME, bnconv.build)
    shape = TINY[name]
    x, y = tiny_batch(shape, n=64)
    data = SimpleNamespace(x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], x_test=x[:16], y_test=y[:16])
    model = build_model(name, shape, CLASSES, seed=0)
    cfg = TrainConfig(batch_size=16, eval_every="2it")
    # XLA, as conv nets train on a GPU (on the CPU they now run without it: lthmpi/devices.py kernel_plan)
    tr = MaskedTrainer(model, data, cfg, 0, prunable_variables(model), jit=True)
    masks = {v.path: (np.random.default_rng(1).random(tuple(v.shape)) < 0.5) for v in prunable_variables(model)}
    tr.set_masks(masks)
    before = {v.path: v.numpy().copy() for v in prunable_variables(model)}
    h = tr.fit(0, 2)
    assert not h.diverged and np.isfinite(h.evals[-1]["train_loss"])
    for v in prunable_variables(model):
        now, m = v.numpy(), masks[v.path]
        assert np.all(now[~m] == 0.0), v.path
        assert np.any(now[m] != before[v.path][m]), f"{v.path} did not train"


def _stock_and_fused(channels=5, momentum=0.9, epsilon=1e-5):
    """A Keras BatchNormalization and lthmpi's FusedBatchNorm with the same (non-trivial) variables."""
    from lthmpi.models import FusedBatchNorm

    rng = np.random.default_rng(3)
    stock = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon)
    fused = FusedBatchNorm(momentum=momentum, epsilon=epsilon)
    for layer in (stock, fused):
        layer.build((None, 4, 6, channels))
    values = [rng.normal(1, 0.3, channels), rng.normal(0, 0.3, channels), rng.normal(0, 0.1, channels),
              rng.uniform(0.5, 2, channels)]  # gamma, beta, moving mean, moving variance
    stock.set_weights([v.astype(np.float32) for v in values])
    fused.set_weights([v.astype(np.float32) for v in values])
    return stock, fused


@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (1, 1, 1, 5)])
def test_fused_batch_norm_trains_as_keras_batch_normalization(tf_runtime, shape):
    """Same output, input/scale/offset gradients and moving statistics as Keras' layer in a training step
    (to float rounding), also with one value per channel (batch variance 0, not NaN); same inference output."""
    stock, fused = _stock_and_fused()
    x = tf.constant(np.random.default_rng(4).normal(2.0, 3.0, shape).astype(np.float32))
    assert fused._fusable(x, None)  # on this CPU the fused kernel runs, not Keras' code it falls back to
    dy = tf.constant(np.random.default_rng(5).normal(0, 1, shape).astype(np.float32))
    results = []
    for layer in (stock, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    names = ["output", "dx", "dgamma", "dbeta", "moving mean", "moving variance", "inference output"]
    for name, a, b in zip(names, *results):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(b)), name
        # atol: with one value per channel Keras computes x * rsqrt(eps) - mean * rsqrt(eps), ~4e-5 off beta
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-4, err_msg=name)


def test_fused_batch_norm_keeps_the_policy_dtype_and_float32_statistics(tf_runtime):
    stock, _ = _stock_and_fused()
    x = tf.constant(np.random.default_rng(6).normal(0, 1, (2, 4, 6, 5)).astype(np.float32))
    for policy in ("mixed_bfloat16", "mixed_float16"):
        from lthmpi.models import FusedBatchNorm

        layer = FusedBatchNorm(momentum=0.9, epsilon=1e-5, dtype=policy)
        layer.build(x.shape)
        layer.set_weights(stock.get_weights())
        y = layer(tf.cast(x, layer.compute_dtype), training=True)
        assert y.dtype == layer.compute_dtype and layer.moving_mean.dtype == "float32"
        want = stock(x, training=True)
        np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), np.asarray(want), atol=0.05)


def test_models_with_batch_norm_use_the_fused_layer():
    from lthmpi.models import FusedBatchNorm

    for name in ("resnet20", "vgg16"):
        model = tiny(name)  # read only: the models the other tests build
        bns = [ly for ly in model.layers if isinstance(ly, keras.layers.BatchNormalization)]
        assert bns and all(isinstance(ly, FusedBatchNorm) for ly in bns), name
