"""Tests of lthmpi/criteria.py: SNIP and GraSP against a direct computation, SynFlow's conservation, exact counts
for every criterion, the sanity-check transforms, and the one-line refusals. Tiny nets only (seconds)."""
from __future__ import annotations

import numpy as np
import pytest

from lthmpi.config import ConfigError
from lthmpi.criteria import (CRITERIA, check_criterion, check_transform, criterion_masks, invert, layer_shuffle,
                             masks_from_scores, score_batches_from, scores, synflow_masks, synflow_scores)
from lthmpi.pruning import magnitude_masks

SIZES = {"fc1/kernel": (6, 16), "fc2/kernel": (16, 8), "output/kernel": (8, 3)}


def mlp(seed=0, bias=True, relu=True):
    """6 -> 16 -> 8 -> 3 logits; non-zero biases so that they matter to the gradients."""
    import keras

    act = "relu" if relu else None
    inputs = keras.Input(shape=(6,), name="input")
    x = keras.layers.Dense(16, activation=act, use_bias=bias, name="fc1",
                           kernel_initializer=keras.initializers.GlorotNormal(seed),
                           bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 1))(inputs)
    x = keras.layers.Dense(8, activation=act, use_bias=bias, name="fc2",
                           kernel_initializer=keras.initializers.GlorotNormal(seed + 2),
                           bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 3))(x)
    out = keras.layers.Dense(3, use_bias=bias, name="output",
                             kernel_initializer=keras.initializers.GlorotNormal(seed + 4),
                             bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 5))(x)
    return keras.Model(inputs, out)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)


def by_path(model):
    return {v.path: v.numpy() for v in model.variables}


def direct_loss(tf, ws, bs, x, y, c=None, temperature=1.0):
    """The MLP's loss written out by hand (no Keras), with an optional multiplicative mask c on each kernel."""
    h = tf.constant(x)
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = tf.matmul(h, w * c[i] if c is not None else w) + b
        if i < len(ws) - 1:
            h = tf.nn.relu(h)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=h / temperature))


def assert_close(a, b, rel):
    """Every entry within `rel` of the largest reference magnitude in its layer."""
    for p in b:
        scale = np.abs(b[p]).max()
        assert scale > 0, p
        assert np.abs(a[p] - b[p]).max() <= rel * scale, (p, np.abs(a[p] - b[p]).max() / scale)


def test_snip_equals_the_mask_gradient_computed_directly(tf_runtime):
    import tensorflow as tf

    model = mlp()
    x, y = data()
    batches = score_batches_from(x, y, 8, 3, seed=1)
    before = by_path(model)
    got = scores("snip", model, batches=batches)
    assert all(np.array_equal(before[p], v) for p, v in by_path(model).items()), "scoring changed the model"
    names = ["fc1", "fc2", "output"]
    ws = [tf.constant(before[f"{n}/kernel"], tf.float64) for n in names]
    bs = [tf.constant(before[f"{n}/bias"], tf.float64) for n in names]
    c = [tf.Variable(tf.ones_like(w)) for w in ws]
    total = [0.0] * 3
    for xb, yb in batches:  # SNIP's own definition: dL/dc at c = 1, summed over batches
        with tf.GradientTape() as tape:
            loss = direct_loss(tf, ws, bs, xb.astype(np.float64), yb, c)
        total = [t + g.numpy() for t, g in zip(total, tape.gradient(loss, c))]
    want = {f"{n}/kernel": np.abs(t) for n, t in zip(names, total)}
    assert list(got) == list(SIZES)
    assert_close(got, want, 1e-6)


def test_grasp_equals_theta_times_the_explicit_hessian_times_gradient(tf_runtime):
    import tensorflow as tf

    model = mlp(seed=7)
    x, y = data(seed=2)
    batches = score_batches_from(x, y, 10, 2, seed=3)
    got = scores("grasp", model, batches=batches, temperature=2.0)
    v = by_path(model)
    names = ["fc1", "fc2", "output"]
    shapes = [v[f"{n}/kernel"].shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]
    bs = [tf.constant(v[f"{n}/bias"], tf.float64) for n in names]
    theta = tf.Variable(np.concatenate([v[f"{n}/kernel"].ravel() for n in names]).astype(np.float64))

    def loss_of(flat, xb, yb):
        ws = [tf.reshape(part, s) for part, s in zip(tf.split(flat, sizes), shapes)]
        return direct_loss(tf, ws, bs, xb.astype(np.float64), yb, temperature=2.0)

    g, hess = 0.0, 0.0
    for xb, yb in batches:  # the full Hessian over the 248 kernel weights, then H @ g
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(theta, xb, yb)
            grad = inner.gradient(loss, theta)
        g = g + grad.numpy()
        hess = hess + outer.jacobian(grad, theta).numpy()
    flat = theta.numpy() * (hess @ g)
    want = {f"{n}/kernel": part.reshape(s) for n, part, s in zip(names, np.split(flat, np.cumsum(sizes)[:-1]), shapes)}
    assert_close(got, want, 1e-6)
    assert any((s < 0).any() for s in got.values()), "GraSP scores are signed: the test must see negative ones"


def linear_net(seed=0):
    import keras

    inputs = keras.Input(shape=(5,), name="input")
    x = inputs
    for i, (n, name) in enumerate(((7, "fc1"), (4, "fc2"), (3, "output"))):
        x = keras.layers.Dense(n, use_bias=False, name=name,
                               kernel_initializer=keras.initializers.GlorotNormal(seed + i))(x)
    return keras.Model(inputs, x)


def test_synflow_scores_conserve_the_flow_in_every_layer(tf_runtime):
    model = linear_net()
    kernels = {v.path: v.numpy() for v in model.variables}
    # R = 1ᵀ (∏|W_l|) 1 computed by hand; the scores of every layer sum to it (Tanaka et al., Theorem 1)
    for masks in (None, {p: np.random.default_rng(i).random(w.shape) < 0.6 for i, (p, w) in enumerate(kernels.items())}):
        prod = np.ones((1, 5))
        for p, w in kernels.items():
            prod = prod @ (np.abs(w.astype(np.float64)) * (masks[p] if masks else 1))
        r = prod.sum()
        s = synflow_scores(model, masks)
        sums = [float(a.sum()) for a in s.values()]
        assert len(sums) == 3 and r > 0
        for total in sums:
            assert abs(total - r) <= 1e-5 * r, (sums, r)
        if masks:
            assert all((s[p][~m] == 0).all() for p, m in masks.items())
    assert all(np.array_equal(kernels[p], v.numpy()) for p, v in zip(kernels, model.variables)), "model restored"


def test_synflow_refuses_a_flow_that_overflows_float32(tf_runtime):
    from lthmpi.models import ModelError

    model = linear_net()
    for v in model.variables:
        v.assign(np.full(v.shape, 1e15, np.float32))  # R ~ 420 * 1e45: beyond float32
    with pytest.raises(ModelError, match="overflowed float32 on model .*choose another prune.criterion"):
        synflow_scores(model)
    assert all((v.numpy() == 1e15).all() for v in model.variables), "restored even when refused"


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_iterative_synflow_reaches_the_exact_count(tf_runtime, scope):
    model = mlp(seed=3)
    final = synflow_masks(model, 0.1, scope, {"output": 0.5}, iterations=8)
    assert counts(final, scope) == expected_counts(0.1, scope)
    fewer = synflow_masks(model, 0.1, scope, {"output": 0.5}, iterations=1)
    assert counts(fewer, scope) == expected_counts(0.1, scope)
    assert any(not np.array_equal(final[p], fewer[p]) for p in final), "iterating changes the mask"


def test_iterative_synflow_is_the_exponential_schedule_with_nested_masks(tf_runtime):
    model = mlp(seed=4)
    rounds = []
    got = synflow_masks(model, 0.04, "layerwise", {"output": 0.5}, iterations=3, rounds=rounds)
    assert len(rounds) == 3 and rounds[-1] is got
    alive = None
    for k, m in enumerate(rounds, start=1):  # round k: d^(k/n) kept, cut on the scores of round k-1's mask
        assert counts(m, "layerwise") == expected_counts(0.04 ** (k / 3), "layerwise"), k
        want = masks_from_scores(synflow_scores(model, alive), 0.04 ** (k / 3), "layerwise", {"output": 0.5}, alive)
        assert all(np.array_equal(m[p], want[p]) for p in m), k
        if alive is not None:
            assert all(not (m[p] & ~alive[p]).any() for p in m), "a pruned weight never comes back"
        alive = m
    one_shot = masks_from_scores(synflow_scores(model), 0.04, "layerwise", {"output": 0.5})
    assert any(not np.array_equal(got[p], one_shot[p]) for p in got), "rescoring after a round matters"


def counts(masks, scope):
    """Kept weights per pruning unit: the output layer on its own (rate x 0.5), the rest pooled when global."""
    if scope == "global":
        return {"pool": int(masks["fc1/kernel"].sum() + masks["fc2/kernel"].sum()),
                "output/kernel": int(masks["output/kernel"].sum())}
    return {p: int(m.sum()) for p, m in masks.items()}


def expected_counts(remaining, scope):
    """What pruning.magnitude_masks keeps per unit at this fraction, output layer at half rate (criteria promise
    magnitude masks' counts, whatever rule pruning.py gives them)."""
    w = {p: np.random.default_rng(0).normal(size=s) for p, s in SIZES.items()}
    return counts(magnitude_masks(w, remaining, scope, {"output": 0.5}), scope)


def test_layerwise_counts_without_rate_multipliers_are_round_of_fraction(tf_runtime):
    model = mlp(seed=6)
    for name in ("magnitude_init", "synflow", "random"):
        m = criterion_masks(name, model, 0.13, "layerwise", synflow_iterations=3)
        for p, shape in SIZES.items():
            n = int(np.prod(shape))
            assert int(m[p].sum()) == n - int(round(0.87 * n)), (name, p)
    g = criterion_masks("random", model, 0.13, "global")
    assert sum(int(a.sum()) for a in g.values()) == 248 - int(round(0.87 * 248))


def test_nested_cut_keeps_only_alive_weights():
    s = {"a/kernel": np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])}
    alive = {"a/kernel": np.array([False, True, True, False, True, True])}
    m = masks_from_scores(s, 0.5, alive=alive)
    assert m["a/kernel"].tolist() == [False, True, True, False, True, False]  # the best 3 alive, not 5
    with pytest.raises(ValueError, match="more in some layer than the alive ones"):
        masks_from_scores(s, 0.9, alive={"a/kernel": np.array([True, True, False, False, False, False])})
    loose = masks_from_scores(s, 0.9, alive={"a/kernel": np.array([True, True, False, False, False, False])},
                              exact=False)
    assert loose["a/kernel"].tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_every_criterion_gives_exact_counts(tf_runtime, scope):
    model = mlp(seed=5)
    x, y = data()
    batches = score_batches_from(x, y, 8, 2, seed=0)
    final = {p: np.random.default_rng(9).normal(size=s) for p, s in SIZES.items()}
    for name in CRITERIA:
        for remaining in (0.5, 0.07):
            m = criterion_masks(name, model, remaining, scope, {"output": 0.5}, final=final, batches=batches,
                                seed=4, synflow_iterations=3)
            assert list(m) == list(SIZES) and all(a.dtype == bool for a in m.values())
            assert counts(m, scope) == expected_counts(remaining, scope), (name, remaining)
            if name.startswith("magnitude"):  # the same masks as pruning.py's for the same weights
                w = final if name == "magnitude" else {v.path: v.numpy() for v in model.variables if v.path in SIZES}
                want = magnitude_masks(w, remaining, scope, {"output": 0.5})
                assert all(np.array_equal(m[p], want[p]) for p in SIZES), name


def test_masks_keep_the_highest_signed_scores():
    s = {"a/kernel": np.array([-5.0, 2.0, -1.0, 0.5]), "b/kernel": np.array([[3.0, -0.1], [-7.0, 1.0]])}
    m = masks_from_scores(s, 0.5, "global")
    assert m["a/kernel"].tolist() == [False, True, False, True]  # 3, 2, 1, 0.5 kept; -5 is lowest, not largest
    assert m["b/kernel"].tolist() == [[True, False], [False, True]]
    tie = masks_from_scores({"a/kernel": np.array([1.0, 2.0, 1.0, 1.0])}, 0.5)
    assert tie["a/kernel"].tolist() == [True, True, False, False]  # equal scores in order of position


def test_invert_and_layer_shuffle_keep_per_layer_counts():
    rng = np.random.default_rng(0)
    s = {p: rng.normal(size=shape) for p, shape in SIZES.items()}
    m = masks_from_scores(s, 0.2, "global", {"output": 0.5})
    for t in (invert(m, s), layer_shuffle(m, [1, 2]), layer_shuffle(m, [1, 3])):
        assert {p: int(a.sum()) for p, a in t.items()} == {p: int(a.sum()) for p, a in m.items()}
    inv = invert(m, s)
    for p in s:  # the complement ranking: every weight invert keeps scores at most every one it drops
        assert s[p][inv[p]].max() <= s[p][~inv[p]].min()
        assert s[p][m[p]].min() >= s[p][~m[p]].max()
        if 2 * m[p].sum() <= m[p].size:  # under half kept (fc1, fc2): the two masks are disjoint
            assert not (inv[p] & m[p]).any()
        else:  # over half kept (output, at half rate): together they cover the layer
            assert (inv[p] | m[p]).all()
    a, b = layer_shuffle(m, [1, 2]), layer_shuffle(m, [1, 2])
    assert all(np.array_equal(a[p], b[p]) for p in m), "seeded"
    assert any(not np.array_equal(a[p], m[p]) for p in m)


def test_bad_inputs_are_refused_in_one_line(tf_runtime):
    model = mlp()
    x, y = data(n=20)
    cases = [
        (lambda: check_criterion("snap"), "unknown pruning criterion 'snap'; known criteria: magnitude, "
                                          "magnitude_init, snip, grasp, synflow, random"),
        (lambda: check_criterion("grasp", has_data=False), "needs training data"),
        (lambda: scores("snip", model), "needs training data"),
        (lambda: score_batches_from(x, y, 8, 3, 0), "prune.score_batches = 3 batches of 8 need 24 training "
                                                    "examples but there are 20; use at most 2"),
        (lambda: check_criterion("snip", score_batches=0), "prune.score_batches must be an integer >= 1"),
        (lambda: scores("magnitude", model), "parent's final weights"),
        (lambda: synflow_masks(model, 0.5, iterations=0), "prune.synflow_iterations must be an integer >= 1"),
        (lambda: check_transform("flip"), "unknown sanity check 'flip'"),
    ]
    for call, line in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert line in str(e.value) and "\n" not in str(e.value)
    check_criterion("synflow", has_data=False)  # data-free criteria need none
    assert len(score_batches_from(x, y, 10, 2, 0)) == 2


def test_synflow_runs_batch_norm_in_inference_mode_and_restores_it(tf_runtime):
    import keras

    inputs = keras.Input(shape=(4,))
    h = keras.layers.Dense(6, name="fc1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(2, name="output")(keras.layers.ReLU()(h))
    model = keras.Model(inputs, out)
    model.get_layer("bn").moving_mean.assign(-np.arange(6, dtype=np.float32))  # as after training: signed
    before = by_path(model)
    s = synflow_scores(model)
    assert all(np.array_equal(before[p], v) for p, v in by_path(model).items())
    # in training mode batch norm would normalize the single all-ones input to beta: no flow reaches fc1
    assert all((a >= 0).all() and a.sum() > 0 for a in s.values())


def test_grasp_through_the_fused_batch_norm_equals_a_finite_difference(tf_runtime):
    """GraSP's double backward through lthmpi's FusedBatchNorm (TensorFlow's fused kernel, batch statistics)
    against Hg as a central difference of the gradient along g: (∇L(θ + εg) - ∇L(θ - εg)) / 2ε."""
    import keras
    import tensorflow as tf

    from lthmpi.models import FusedBatchNorm

    inputs = keras.Input(shape=(4, 4, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv1",
                            kernel_initializer=keras.initializers.HeNormal(1))(inputs)
    h = FusedBatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(h)
    h = keras.layers.Flatten()(keras.layers.ReLU()(h))
    model = keras.Model(inputs, keras.layers.Dense(3, name="output",
                                                   kernel_initializer=keras.initializers.GlorotNormal(2))(h))
    assert model.get_layer("bn")._fusable(model.get_layer("conv1").output, None), "the fused kernel is under test"
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(6, 4, 4, 2)).astype(np.float32), rng.integers(0, 3, 6)) for _ in range(2)]
    before = by_path(model)
    got = scores("grasp", model, batches=batches, temperature=1.0)
    assert all(np.array_equal(before[p], v) for p, v in by_path(model).items()), "moving statistics put back"
    kernels = [model.get_layer(n).kernel for n in ("conv1", "output")]

    def gradient():
        total = [0.0, 0.0]
        for x, y in batches:
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            total = [t + d.numpy().astype(np.float64) for t, d in zip(total, tape.gradient(loss, kernels))]
        return total

    theta, g, eps = [k.numpy() for k in kernels], gradient(), 1e-3
    sides = []
    for sign in (1, -1):
        for k, t, d in zip(kernels, theta, g):
            k.assign((t + sign * eps * d).astype(np.float32))
        sides.append(gradient())
    for k, t in zip(kernels, theta):
        k.assign(t)
    want = {k.path: t * (a - b) / (2 * eps) for k, t, a, b in zip(kernels, theta, *sides)}
    assert_close(got, want, 1e-3)
