"""Pruning criteria: a score per prunable weight, chosen by name, and masks cut from scores with exact counts.

Why its own module: magnitude pruning (pruning.py) ranks |θ|; pruning at initialization ranks other scores
(SNIP, GraSP, SynFlow; Frankle et al. 2021 compare them with tickets). Every criterion here returns scores
where *higher means keep*, and masks are cut from them by pruning.magnitude_masks on the scores' ranks, so
the counts, scopes and per-layer rate rules are exactly those of magnitude masks. The sanity checks of
Frankle et al. 2021 (`layer_shuffle`, `invert`) are transforms of a mask; `reinit` is the existing
random_reinit control. Scores are numpy float64 arrays keyed by variable path, like masks.

Scorers that run the model (snip, grasp, synflow) put every variable back as they found it.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .config import ConfigError
from .pruning import magnitude_masks, random_masks

Weights = dict  # path -> np.ndarray

CRITERIA = ("magnitude", "magnitude_init", "snip", "grasp", "synflow", "random")
DATA_CRITERIA = ("snip", "grasp")  # need batches of training data
CHECKS = ("layer_shuffle", "invert")  # mask transforms; "reinit" is the random_reinit control
GRASP_TEMPERATURE = 200.0  # Wang et al.'s reference code divides the logits by T = 200


# --------------------------------------------------------------------------------------------------
# input checks


def check_criterion(name: str, has_data: bool = True, score_batches: int = 1, batch_size: int = 1,
                    n_train: int | None = None) -> None:
    """Refuse, in one line, a criterion this setup cannot compute (before any model is built)."""
    if name not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion {name!r}; known criteria: {', '.join(CRITERIA)}")
    if name not in DATA_CRITERIA:
        return
    if not has_data:
        raise ConfigError(f"pruning criterion {name!r} needs training data (gradients of the loss) but this setup "
                          f"has none; data-free criteria: "
                          f"{', '.join(c for c in CRITERIA if c not in DATA_CRITERIA)}")
    if isinstance(score_batches, bool) or not isinstance(score_batches, (int, np.integer)) or score_batches < 1:
        raise ConfigError(f"prune.score_batches must be an integer >= 1, not {score_batches!r}")
    if n_train is not None and score_batches * batch_size > n_train:
        raise ConfigError(f"prune.score_batches = {score_batches} batches of {batch_size} need "
                          f"{score_batches * batch_size} training examples but there are {n_train}; "
                          f"use at most {n_train // batch_size}")


def score_batches_from(x, y, batch_size: int, count: int, seed, criterion: str = "snip") -> list:
    """`count` disjoint batches of (x, y), drawn by a seeded permutation (the examples SNIP/GraSP score on).
    `x` must already be what the model takes (float, normalized)."""
    check_criterion(criterion, x is not None, count, batch_size, None if x is None else len(x))
    order = np.random.default_rng(seed).permutation(len(x))[: count * batch_size]
    return [(x[idx], y[idx]) for idx in np.split(order, count)]


# --------------------------------------------------------------------------------------------------
# helpers on a Keras model


def prunable_paths(model) -> list:
    from .models import prunable_variables

    return [v.path for v in prunable_variables(model)]


def _prunable(model) -> list:
    from .models import prunable_variables

    return prunable_variables(model)


@contextlib.contextmanager
def _restored(model):
    """Every variable of `model` (weights, batch-norm statistics) is put back on leaving, whatever happened."""
    saved = [(v, v.numpy()) for v in model.variables]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _loss(tf, model, x, y, temperature: float = 1.0):
    """Mean softmax cross-entropy of the logits / temperature, in float32 (as the trainer's loss). Training mode:
    batch norm normalizes by the batch's statistics, as Wang et al.'s GraSP code scores (its net stays in train
    mode); the moving statistics this updates are put back by the caller (_restored)."""
    logits = tf.cast(model(x, training=True), tf.float32) / temperature
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits))


def _need_batches(name: str, batches) -> list:
    if not batches:
        check_criterion(name, has_data=False)
    return list(batches)


def _finite(name: str, scores: Weights) -> Weights:
    bad = [p for p, s in scores.items() if not np.all(np.isfinite(s))]
    if bad:
        raise ValueError(f"{name} scores are not finite in {', '.join(bad)} (overflow or a diverged model); "
                         f"no mask can be cut from them")
    return scores


# --------------------------------------------------------------------------------------------------
# scores (higher = keep)


def magnitude_scores(weights: Weights) -> Weights:
    """|θ| of the given weights: the parent's final weights (`magnitude`) or those at the reset point
    (`magnitude_init`, Frankle et al. 2021's magnitude at initialization)."""
    return {p: np.abs(np.asarray(w, dtype=np.float64)) for p, w in weights.items()}


def random_scores(like: Weights, seed) -> Weights:
    """Uniform random scores: a global cut gives random positions over all layers, a layer-wise one random
    positions at each layer's own count."""
    rng = np.random.default_rng(seed)
    return {p: rng.random(np.shape(w)) for p, w in like.items()}


def snip_scores(model, batches) -> Weights:
    """SNIP (Lee et al. 2019): |g ⊙ θ|, g the gradient of the loss summed over `batches` at the model's
    current weights; equal to |∂L/∂c| of a multiplicative mask c at c = 1. One forward and one backward
    pass per batch. Batch norm uses batch statistics; the model is left as it was found."""
    import tensorflow as tf

    batches = _need_batches("snip", batches)
    variables = _prunable(model)
    total = [tf.zeros_like(v) for v in variables]
    with _restored(model):
        for x, y in batches:
            with tf.GradientTape() as tape:
                loss = _loss(tf, model, x, y)
            total = [t + g for t, g in zip(total, tape.gradient(loss, variables))]
    return _finite("snip", {v.path: np.abs(g.numpy().astype(np.float64) * v.numpy())
                            for v, g in zip(variables, total)})


def grasp_scores(model, batches, temperature: float = GRASP_TEMPERATURE) -> Weights:
    """GraSP (Wang et al. 2020): θ ⊙ Hg, H the Hessian and g the gradient of the loss (logits / T) summed over
    `batches`, both over the prunable weights. Wang et al. score S = −θ ⊙ Hg and *remove* the highest S
    (their code: `topk` of S gives what is pruned), i.e. keep the highest θ ⊙ Hg, which is what this returns,
    so that higher means keep as for every criterion. Hg by a Hessian-vector product (nested tapes): per batch
    one forward and backward for g, then a forward, a backward and a double backward for Hg."""
    import tensorflow as tf

    batches = _need_batches("grasp", batches)
    variables = _prunable(model)
    g = [tf.zeros_like(v) for v in variables]
    hg = [tf.zeros_like(v) for v in variables]
    with _restored(model):
        for x, y in batches:
            with tf.GradientTape() as tape:
                loss = _loss(tf, model, x, y, temperature)
            g = [a + b for a, b in zip(g, tape.gradient(loss, variables))]
        for x, y in batches:
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss = _loss(tf, model, x, y, temperature)
                grads = inner.gradient(loss, variables)
                z = tf.add_n([tf.reduce_sum(tf.stop_gradient(a) * b) for a, b in zip(g, grads)])
            hg = [a + (b if b is not None else 0.0) for a, b in zip(hg, outer.gradient(z, variables))]
    return _finite("grasp", {v.path: h.numpy().astype(np.float64) * v.numpy() for v, h in zip(variables, hg)})


@contextlib.contextmanager
def _linearized(model):
    """The model with every float variable replaced by its absolute value, batch-norm statistics included, as
    SynFlow's code does (`model.eval()`, every parameter and buffer made absolute); restored on leaving. Yields
    the prunable kernels, their |θ|, and a compiled function giving R = 1ᵀf(1) and ∂R/∂θ (one trace, reused by
    every round: eager Keras costs ~1 s a round on ResNet-20, mostly Python)."""
    import tensorflow as tf

    variables = _prunable(model)
    with _restored(model):
        for v in model.variables:
            if "float" in str(v.dtype):  # not integer states (seed generators)
                v.assign(np.abs(v.numpy()))
        base = {v.path: v.numpy() for v in variables}
        ones = tf.ones((1,) + tuple(model.input_shape[1:]), tf.float32)

        @tf.function
        def flow():
            with tf.GradientTape() as tape:
                r = tf.reduce_sum(tf.cast(model(ones, training=False), tf.float32))
            return r, tape.gradient(r, variables)

        yield variables, base, flow


def _synflow_round(model, variables, base: Weights, flow, masks: Weights | None) -> Weights:
    for v in variables:
        v.assign(base[v.path] * masks[v.path] if masks is not None else base[v.path])
    r, grads = flow()
    if not np.isfinite(float(r)):
        from .models import ModelError

        raise ModelError(f"synflow's R = 1ᵀf(1) overflowed float32 on model {model.name!r}; "
                         f"this model cannot be scored by synflow in float32: choose another prune.criterion")
    return _finite("synflow", {v.path: np.abs(g.numpy().astype(np.float64) * v.numpy())
                               for v, g in zip(variables, grads)})


def synflow_scores(model, masks: Weights | None = None) -> Weights:
    """SynFlow (Tanaka et al. 2020), one round: every weight replaced by |θ| (⊙ mask on the prunable ones),
    R = 1ᵀ f(1) the sum of the outputs on one all-ones input, scores |∂R/∂θ ⊙ θ|. Data-free: one forward and
    one backward pass. Batch norm runs in inference mode on |statistics| (see _linearized). Float32: a
    non-finite R is refused rather than ranked (the paper's code computes in float64)."""
    with _linearized(model) as (variables, base, flow):
        return _synflow_round(model, variables, base, flow, masks)


def scores(name: str, model, *, final: Weights | None = None, batches=None, seed=0,
           temperature: float = GRASP_TEMPERATURE) -> Weights:
    """Single-shot scores of criterion `name` at the model's current weights (load the reset point first).
    `final`: the parent's final weights (needed by `magnitude`); `batches`: [(x, y), ...] for snip/grasp;
    `seed`: for `random`. Synflow here is one round: synflow_masks prunes iteratively."""
    check_criterion(name, has_data=bool(batches) or name not in DATA_CRITERIA)
    if name == "magnitude":
        if final is None:
            raise ConfigError("pruning criterion 'magnitude' ranks the parent's final weights, but none were given")
        return magnitude_scores({p: final[p] for p in prunable_paths(model)})
    if name == "magnitude_init":
        return magnitude_scores({v.path: v.numpy() for v in _prunable(model)})
    if name == "random":
        return random_scores({v.path: v.numpy() for v in _prunable(model)}, seed)
    if name == "snip":
        return snip_scores(model, batches)
    if name == "grasp":
        return grasp_scores(model, batches, temperature)
    return synflow_scores(model)


# --------------------------------------------------------------------------------------------------
# masks from scores


def _ranks(scores: Weights, alive: Weights | None = None) -> Weights:
    """Scores replaced by their ranks over all layers (N for the highest, 1 for the lowest; equal scores in
    order of position, earlier higher; dead positions below every live one). Ranks are positive and
    distinct, so magnitude_masks, which ranks |values|, keeps exactly the highest scores, signs and all."""
    flat = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores.values()])
    if np.isnan(flat).any():
        raise ValueError("scores contain NaN; no mask can be cut from them")
    if alive is not None:
        flat = np.where(np.concatenate([alive[p].ravel() for p in scores]), flat, -np.inf)
    order = np.argsort(-flat, kind="stable")
    rank = np.empty(flat.size, dtype=np.float64)
    rank[order] = np.arange(flat.size, 0, -1, dtype=np.float64)
    out, start = {}, 0
    for p, s in scores.items():
        out[p] = rank[start:start + np.size(s)].reshape(np.shape(s))
        start += np.size(s)
    return out


def masks_from_scores(scores: Weights, remaining: float, scope: str = "global", layer_rates: dict | None = None,
                      alive: Weights | None = None, exact: bool = True) -> Weights:
    """Keep the highest scores so that a fraction `remaining` is left: the counts, scopes and per-layer rate
    rules of pruning.magnitude_masks (it is called on the scores' ranks). With `alive` (iterative pruning, nested
    masks) only alive positions are kept: a pruning unit with fewer alive weights than its count keeps them all,
    which `exact` refuses. Why allowed at all: a unit's one-shot count need not fall by at least one weight
    whenever the overall fraction falls (rounding), and an intermediate SynFlow round need not be exact."""
    masks = magnitude_masks(_ranks(scores, alive), remaining, scope, layer_rates)
    if alive is None or not any((m & ~alive[p]).any() for p, m in masks.items()):
        return masks
    if exact:
        raise ConfigError(f"keeping {remaining} of the weights needs more in some layer than the alive ones; "
                         f"with synflow, use fewer prune.synflow_iterations")
    return {p: m & alive[p] for p, m in masks.items()}


def synflow_masks(model, remaining: float, scope: str = "global", layer_rates: dict | None = None,
                  iterations: int = 100, rounds: list | None = None) -> Weights:
    """Iterative SynFlow (Tanaka et al. 2020): `iterations` rounds, round k rescoring the model masked by
    round k-1 and keeping a fraction remaining^(k/n) (the exponential schedule), each cut exactly as
    masks_from_scores; the last round keeps exactly magnitude_masks' count. Costs `iterations` forward and
    backward passes on one input. `rounds`, when a list, receives every round's mask (to check the schedule)."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ConfigError(f"prune.synflow_iterations must be an integer >= 1, not {iterations!r}")
    if not 0 < remaining < 1:
        raise ValueError(f"remaining fraction {remaining} must be in (0, 1)")
    masks = None
    with _linearized(model) as (variables, base, flow):
        for k in range(1, iterations + 1):
            s = _synflow_round(model, variables, base, flow, masks)
            masks = masks_from_scores(s, remaining ** (k / iterations), scope, layer_rates, alive=masks,
                                      exact=k == iterations)
            if rounds is not None:
                rounds.append(masks)
    return masks


def criterion_masks(name: str, model, remaining: float, scope: str = "global", layer_rates: dict | None = None, *,
                    final: Weights | None = None, batches=None, seed=0, synflow_iterations: int = 100,
                    temperature: float = GRASP_TEMPERATURE) -> Weights:
    """The mask of criterion `name` keeping a fraction `remaining` (iterative for synflow, single-shot for
    the others), at the model's current weights; the arguments as in `scores`."""
    if name == "synflow":
        return synflow_masks(model, remaining, scope, layer_rates, synflow_iterations)
    s = scores(name, model, final=final, batches=batches, seed=seed, temperature=temperature)
    return masks_from_scores(s, remaining, scope, layer_rates)


# --------------------------------------------------------------------------------------------------
# sanity checks (Frankle et al. 2021) as mask transforms


def layer_shuffle(masks: Weights, seed) -> Weights:
    """The mask's per-layer counts at random positions within each layer, seeded: tests whether a method
    found weights or only layer-wise densities. The random-mask control applied to any criterion's mask."""
    return random_masks(masks, seed)


def invert(masks: Weights, scores: Weights) -> Weights:
    """Keep the lowest-scoring weights of each layer, as many as `masks` keeps there (Frankle et al.'s
    inversion: same layer-wise densities, the opposite ranking). Equal scores in order of position."""
    out = {}
    for p, m in masks.items():
        s = np.asarray(scores[p], dtype=np.float64).ravel()
        if np.isnan(s).any():
            raise ValueError(f"scores of {p} contain NaN; cannot invert them")
        keep = np.zeros(s.size, dtype=bool)
        keep[np.argsort(s, kind="stable")[: int(np.sum(m))]] = True
        out[p] = keep.reshape(np.shape(m))
    return out


def check_transform(name: str) -> None:
    if name not in CHECKS:
        raise ConfigError(f"unknown sanity check {name!r}; known: {', '.join(CHECKS)} (reinit is the "
                          f"random_reinit control)")
