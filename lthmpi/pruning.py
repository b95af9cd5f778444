"""Masks by weight magnitude (global or layer-wise, per-layer rate multipliers), one IMP level, and the
random-mask control.

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


def pruned_count(n: int, rate: float) -> int:
    """How many of n weights a pruning rate removes: round(rate * n), with float noise below 1e-6 of a weight
    ignored, so that rate 0.2 and rate 1 - 0.8 (= 0.19999999999999996) prune the same count."""
    return int(round(round(min(max(rate, 0.0), 1.0) * n, 6)))


def _keep_count(n: int, rate: float) -> int:
    """Weights kept when a fraction `rate` of n is pruned; never all of them pruned."""
    return int(min(n, max(1, n - pruned_count(n, rate))))


def _top_k(values: np.ndarray, k: int, alive: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the k largest |values| among the `alive` positions (all when None); equal
    magnitudes are kept in order of position. Never keeps a position that is not alive."""
    flat = np.abs(np.asarray(values, dtype=np.float64).ravel())
    if alive is not None:
        flat = np.where(alive.ravel(), flat, -1.0)  # below every magnitude: ranked last
        k = min(k, int(alive.sum()))
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(np.shape(values))


def _prune(weights: Weights, alive: Weights | None, rate: float, scope: str, layer_rates: dict | None,
           keep_count) -> Weights:
    """Remove a fraction `rate` (x the layer multiplier) of the alive weights, smallest magnitudes first.

    With scope "global", all layers whose multiplier is 1 are ranked together; a layer with another
    multiplier m is pruned on its own at rate m * rate, as Frankle & Carbin prune the output layer at half
    the rate of the others. `keep_count(n_alive, rate)` gives how many stay.
    """
    layer_rates = layer_rates or {}
    alive = alive or {p: np.ones(np.shape(w), dtype=bool) for p, w in weights.items()}
    masks: Weights = {}
    pooled = []
    for path, w in weights.items():
        m = rate_multiplier(path, layer_rates)
        if scope == "global" and m == 1.0:
            pooled.append(path)
        else:
            masks[path] = _top_k(w, keep_count(int(alive[path].sum()), m * rate), alive[path])
    if pooled:
        flat = np.concatenate([np.asarray(weights[p]).ravel() for p in pooled])
        flat_alive = np.concatenate([alive[p].ravel() for p in pooled])
        keep = _top_k(flat, keep_count(int(flat_alive.sum()), rate), flat_alive)
        start = 0
        for p in pooled:
            size = np.size(weights[p])
            masks[p] = keep[start:start + size].reshape(np.shape(weights[p]))
            start += size
    return {p: masks[p] for p in weights}


def magnitude_masks(weights: Weights, remaining: float, scope: str = "global",
                    layer_rates: dict | None = None) -> Weights:
    """Keep the largest weights so that a fraction `remaining` is left (rates scaled per layer, see _prune)."""
    if not 0 < remaining < 1:
        raise ValueError(f"remaining fraction {remaining} must be in (0, 1)")
    return _prune(weights, None, 1.0 - remaining, scope, layer_rates, _keep_count)


class EmptyLayerError(ValueError):
    """An IMP level would prune every weight of a layer."""


def imp_step(weights: Weights, previous: Weights | None, rate: float, scope: str = "global",
             layer_rates: dict | None = None) -> Weights:
    """One level of iterative magnitude pruning: the next mask prunes `rate` (x the layer multiplier) of
    `previous`'s surviving weights, ranked by the magnitude of `weights` (those the previous level ended
    with). Pruned weights stay pruned (the masks are nested). `previous` None is the dense level 0, for
    which the result equals magnitude_masks(weights, 1 - rate). EmptyLayerError when a layer loses its
    last weight (the counts are exact, so this is known before training: see imp_counts)."""
    if not 0 < rate < 1:
        raise ValueError(f"IMP pruning rate {rate} must be in (0, 1)")
    masks = _prune(weights, previous, rate, scope, layer_rates,
                   lambda n, r: n - pruned_count(n, r))
    for p, m in masks.items():
        if not m.any():
            raise EmptyLayerError(f"the IMP mask leaves layer {layer_of(p)} ({p}) with no weight")
    return masks


def imp_counts(sizes: dict, levels: int, rate: float, scope: str = "global", layer_rates: dict | None = None
               ) -> list[dict]:
    """Weights kept per pruning unit (a layer on its own, or "*" for the global pool) after each level
    1..levels, from the layer sizes alone (the counts are exact, whatever the weights)."""
    layer_rates = layer_rates or {}
    units: dict[str, tuple[int, float]] = {}
    for path, n in sizes.items():
        m = rate_multiplier(path, layer_rates)
        key = "*" if scope == "global" and m == 1.0 else path
        size, _ = units.get(key, (0, m))
        units[key] = (size + int(n), m)
    alive = {k: n for k, (n, _) in units.items()}
    out = []
    for _ in range(levels):
        alive = {k: n - pruned_count(n, units[k][1] * rate) for k, n in alive.items()}
        out.append(dict(alive))
    return out


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
