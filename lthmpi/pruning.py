"""Masks by weight magnitude (global or layer-wise, per-layer rate multipliers) and the random-mask control.

Masks work on plain numpy arrays keyed by variable path, so they can be computed, tested, stored and
sent between ranks without TensorFlow. Counts are exact: weights are ranked by magnitude and ties are
broken by position, so "keep 20%" keeps exactly round(0.2 * n) weights whatever the values are.
"""
from __future__ import annotations

import fnmatch

import numpy as np

Weights = dict  # path -> np.ndarray


def layer_of(path: str) -> str:
    """The layer part of a variable path ("fc1/kernel" -> "fc1")."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def rate_multiplier(path: str, layer_rates: dict) -> float:
    """The first pattern in `layer_rates` that matches the layer name gives its pruning-rate multiplier."""
    layer = layer_of(path)
    for pattern, mult in layer_rates.items():
        if fnmatch.fnmatchcase(layer, pattern):
            return float(mult)
    return 1.0


def _keep_count(n: int, rate: float) -> int:
    """Weights kept when a fraction `rate` of n is pruned; never all of them pruned."""
    return int(min(n, max(1, n - int(round(min(rate, 1.0) * n)))))


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest |values|; equal magnitudes are kept in order of position."""
    flat = np.abs(values.ravel())
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(values.shape)


def magnitude_masks(weights: Weights, remaining: float, scope: str = "global",
                    layer_rates: dict | None = None) -> Weights:
    """Keep the largest weights so that a fraction `remaining` is left (rates scaled per layer).

    With scope "global", all layers whose multiplier is 1 are ranked together; a layer with another
    multiplier m is pruned on its own at rate m * (1 - remaining), as Frankle & Carbin prune the output
    layer at half the rate of the others.
    """
    if not 0 < remaining < 1:
        raise ValueError(f"remaining fraction {remaining} must be in (0, 1)")
    layer_rates = layer_rates or {}
    rate = 1.0 - remaining
    masks: Weights = {}
    pooled = []
    for path, w in weights.items():
        m = rate_multiplier(path, layer_rates)
        if scope == "global" and m == 1.0:
            pooled.append(path)
        else:
            masks[path] = _top_k(w, _keep_count(w.size, m * rate))
    if pooled:
        flat = np.concatenate([np.asarray(weights[p]).ravel() for p in pooled])
        keep = _top_k(flat, _keep_count(flat.size, rate))
        start = 0
        for p in pooled:
            size = weights[p].size
            masks[p] = keep[start:start + size].reshape(weights[p].shape)
            start += size
    return {p: masks[p] for p in weights}


def random_masks(like: Weights, seed: int | list) -> Weights:
    """Same number kept in every layer as `like`, at random positions (the random-mask control)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, m in like.items():
        keep = np.zeros(m.size, dtype=bool)
        keep[rng.permutation(m.size)[: int(m.sum())]] = True
        out[path] = keep.reshape(m.shape)
    return out


def fraction_remaining(masks: Weights) -> float:
    total = sum(m.size for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total)


def layer_fractions(masks: Weights) -> dict:
    return {p: float(m.mean()) for p, m in masks.items()}
