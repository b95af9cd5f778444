"""Linear mode connectivity (Frankle, Dziugaite, Roy & Carbin, ICML 2020): the test error and loss along the
straight line θ(α) = (1 − α) θ_A + α θ_B between two copies trained from the same weights with different
data orders, and its error barrier max_α err(α) − mean(err(0), err(1)).

Plain Keras forward passes and numpy, no trainer code, so that anyone can recompute a stored curve from the
two endpoint weight files (docs/stability.md). Every floating-point model variable is interpolated, the
batch-norm moving mean and variance included (the default, the paper's choice: nothing is re-estimated);
with `bn_batches` the moving statistics are instead re-estimated at each α as the plain average of the batch
statistics of a fixed list of training batches. A weight that is zero at both ends (a pruned one) is zero at
every α: (1 − α)·0 + α·0 = 0 exactly.
"""
from __future__ import annotations

import numpy as np

EVAL_BATCH = 500  # rows per forward pass
DENSE = -1  # the mask index recorded for the dense network (an all-ones mask), in task files and results


def alphas(n: int) -> np.ndarray:
    """n evenly spaced interpolation coefficients in [0, 1], both ends included."""
    return np.linspace(0.0, 1.0, int(n))


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    """θ(α) per variable path, computed in float64 and stored in each variable's dtype; non-float variables
    (counters) are taken from A."""
    out = {}
    for p, wa in a.items():
        wa, wb = np.asarray(wa), np.asarray(b[p])
        if wa.dtype.kind == "f":
            out[p] = ((1.0 - alpha) * wa.astype(np.float64) + alpha * wb.astype(np.float64)).astype(wa.dtype)
        else:
            out[p] = wa
    return out


def error_and_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Classification error (fraction wrong, argmax) and mean cross-entropy of logits, in float64."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(y).astype(np.int64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    loss = float(np.mean(lse - z[np.arange(len(y)), y]))
    return float(np.mean(np.argmax(z, axis=1) != y)), loss


def barrier(errors) -> float:
    """Error barrier: the highest error on the path above the mean of the two ends' errors."""
    e = np.asarray(errors, np.float64)
    return float(e.max() - 0.5 * (e[0] + e[-1]))


def logits(model, x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Inference-mode forward passes over x, `batch` rows at a time."""
    return np.concatenate([np.asarray(model(x[i:i + batch], training=False)) for i in range(0, len(x), batch)])


def assign(model, weights: dict):
    for v in model.variables:
        v.assign(weights[v.path])


def batch_norm_layers(model) -> list:
    import keras

    from .models import _leaf_layers

    return [ly for ly in _leaf_layers(model) if isinstance(ly, keras.layers.BatchNormalization)]


def reestimate_batch_norm(model, x_train: np.ndarray, batches: list) -> int:
    """Replace every batch-norm layer's moving mean and variance by the average of its batch statistics over
    `batches` (row-index arrays into x_train): training-mode forward passes with the momentum of batch i set
    to i / (i + 1), so that the moving average is the plain mean. Returns the number of layers re-estimated."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    saved = [ly.momentum for ly in layers]
    try:
        for i, rows in enumerate(batches):
            for ly in layers:
                ly.momentum = i / (i + 1.0)
            model(x_train[np.asarray(rows)], training=True)
    finally:
        for ly, m in zip(layers, saved):
            ly.momentum = m
    return len(layers)


def bn_batches(n_train: int, batch_size: int, count: int, seed: int) -> list:
    """`count` fixed training batches for the re-estimation: a permutation drawn from the seed alone."""
    rows = np.random.default_rng([seed, 0x626E]).permutation(n_train)
    count = min(count, max(1, n_train // batch_size))
    return [rows[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def curve(model, a: dict, b: dict, x: np.ndarray, y: np.ndarray, n_alphas: int, x_train: np.ndarray | None = None,
          batches: list | None = None) -> dict:
    """Error and loss on (x, y) at each α; with `batches` (of x_train rows) the batch-norm statistics are
    re-estimated at each α. The model's variables are restored afterwards. x and x_train are model inputs
    (`Dataset.inputs`): raw uint8 pixels are refused, since the network was trained on normalised ones."""
    for arr in (x, x_train):
        if arr is not None and np.dtype(getattr(arr, "dtype", np.float32)) == np.uint8:
            raise ValueError("lmc.curve got raw uint8 images: pass Dataset.inputs(split), normalised as the "
                             "training step normalises them")
    saved = {v.path: v.numpy() for v in model.variables}
    out = {"alpha": alphas(n_alphas), "error": [], "loss": []}
    try:
        for alpha in out["alpha"]:
            assign(model, interpolate(a, b, float(alpha)))
            if batches:
                reestimate_batch_norm(model, x_train, batches)
            err, loss = error_and_loss(logits(model, x), y)
            out["error"].append(err)
            out["loss"].append(loss)
    finally:
        assign(model, saved)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def summary(c: dict, threshold: float) -> dict:
    """The scalars of one curve: error and loss barriers, the ends' errors, and whether it is stable."""
    b = barrier(c["error"])
    return dict(barrier=b, loss_barrier=barrier(c["loss"]), error_a=float(c["error"][0]),
                error_b=float(c["error"][-1]), max_error=float(np.max(c["error"])), stable=bool(b < threshold))


def order_seed(base: int, copy: int) -> int:
    """The data-order seed of stability copy 0 (A: the run's own seed, the same order as the one-shot tasks)
    or 1 (B: another seed derived from it)."""
    if copy == 0:
        return int(base)
    state = np.random.SeedSequence([int(base), 0x5354_4142, copy]).generate_state(1, dtype=np.uint32)
    return int(state[0] & 0x7FFFFFFF)
