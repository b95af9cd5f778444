"""Masks by weight magnitude (global or layer-wise, per-layer rate multipliers), one IMP level, and the
random-mask control.

Rate multipliers are Frankle & Carbin's per-round rates (output layer at half the rate): IMP applies them at
every level, and a one-shot mask at overall density d gives each layer the density IMP reaches at d
(oneshot_counts), not "the multiplier times the total pruned fraction".

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


def _units(paths, scope: str, layer_rates: dict) -> dict[str, list[str]]:
    """Pruning units: with scope "global" every layer whose multiplier is 1 joins the pool "*"; every other
    layer is a unit of its own."""
    units: dict[str, list[str]] = {}
    for path in paths:
        key = "*" if scope == "global" and rate_multiplier(path, layer_rates) == 1.0 else path
        units.setdefault(key, []).append(path)
    return units


def _unit_sizes(units: dict, sizes: dict) -> dict[str, int]:
    return {u: sum(int(sizes[p]) for p in paths) for u, paths in units.items()}


def _multiplier(unit: str, layer_rates: dict) -> float:
    return 1.0 if unit == "*" else rate_multiplier(unit, layer_rates)


def _keep_largest(weights: Weights, alive: Weights | None, units: dict, counts: dict) -> Weights:
    """Keep counts[unit] of each unit's largest alive |weights| (a pooled unit ranked as one array)."""
    masks: Weights = {}
    for unit, paths in units.items():
        flat = np.concatenate([np.asarray(weights[p]).ravel() for p in paths])
        flat_alive = None if alive is None else np.concatenate([alive[p].ravel() for p in paths])
        keep = _top_k(flat, counts[unit], flat_alive)
        start = 0
        for p in paths:
            size = np.size(weights[p])
            masks[p] = keep[start:start + size].reshape(np.shape(weights[p]))
            start += size
    return {p: masks[p] for p in weights}


def _prune(weights: Weights, alive: Weights | None, rate: float, scope: str, layer_rates: dict | None,
           keep_count) -> Weights:
    """Remove a fraction `rate` (x the layer multiplier) of each unit's alive weights, smallest magnitudes first.
    `keep_count(n_alive, rate)` gives how many stay."""
    layer_rates = layer_rates or {}
    units = _units(weights, scope, layer_rates)
    counts = {}
    for unit, paths in units.items():
        n = sum(int(alive[p].sum()) if alive else int(np.size(weights[p])) for p in paths)
        counts[unit] = keep_count(n, _multiplier(unit, layer_rates) * rate)
    return _keep_largest(weights, alive, units, counts)


ONESHOT_RATE = 0.2  # the per-round rate one-shot's layer rates scale, as in Frankle & Carbin (prune.imp_rate)


def oneshot_counts(sizes: dict, remaining: float, scope: str = "global", layer_rates: dict | None = None,
                   rate: float = ONESHOT_RATE) -> dict:
    """Weights a one-shot mask keeps per pruning unit (a layer on its own, or "*" for the global pool), from the
    layer sizes alone.

    Without rate multipliers every unit keeps `remaining` of itself (as before issue 32). With them, the per-layer
    densities are Frankle & Carbin's per-round ones, as IMP reaches them: unit j keeps (1 - rate * m_j)^n of its
    s_j weights, with one real n (found by bisection) for which the total is exactly round(remaining * N); the
    real counts are rounded down and the weights left over go to the largest remainders (ties: unit order), and
    a unit keeps at least one weight. So at IMP level l's overall fraction the counts are IMP's at level l up to
    the rounding IMP accumulates over its levels (docs/imp.md).
    """
    layer_rates = layer_rates or {}
    units = _units(sizes, scope, layer_rates)
    size = _unit_sizes(units, sizes)
    mult = {u: _multiplier(u, layer_rates) for u in units}
    if all(m == 1.0 for m in mult.values()):
        return {u: _keep_count(n, 1.0 - remaining) for u, n in size.items()}
    total = sum(size.values())
    target = _keep_count(total, 1.0 - remaining)
    dense = sum(n for u, n in size.items() if rate * mult[u] <= 0)
    if target < max(dense + 1, len(units)):
        raise ValueError(f"remaining fraction {remaining} keeps {target} of {total} weights, but the layers with "
                         f"rate multiplier 0 alone keep {dense} and each of the {len(units)} pruning units keeps at "
                         f"least one: raise the fraction or the multipliers")
    density = {u: 1.0 - min(1.0, rate * mult[u]) for u in units}

    def kept(n: float) -> dict:
        return {u: size[u] * density[u] ** n for u in units}

    lo, hi = 0.0, 1.0
    while sum(kept(hi).values()) > target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(kept(mid).values()) > target else (lo, mid)
    real = kept(hi)
    counts = {u: min(size[u], max(1, int(np.floor(c)))) for u, c in real.items()}
    by_remainder = sorted(units, key=lambda u: -(real[u] - np.floor(real[u])))
    while sum(counts.values()) != target:
        step = 1 if sum(counts.values()) < target else -1
        for u in by_remainder if step == 1 else sorted(units, key=lambda u: -counts[u]):
            if sum(counts.values()) != target and 1 <= counts[u] + step <= size[u]:
                counts[u] += step
    return counts


def magnitude_masks(weights: Weights, remaining: float, scope: str = "global",
                    layer_rates: dict | None = None, rate: float = ONESHOT_RATE) -> Weights:
    """Keep the largest weights so that exactly a fraction `remaining` is left, split among the pruning units as
    oneshot_counts says (with layer rates: the per-layer densities IMP reaches at that fraction)."""
    if not 0 < remaining < 1:
        raise ValueError(f"remaining fraction {remaining} must be in (0, 1)")
    layer_rates = layer_rates or {}
    counts = oneshot_counts({p: np.size(w) for p, w in weights.items()}, remaining, scope, layer_rates, rate)
    return _keep_largest(weights, None, _units(weights, scope, layer_rates), counts)


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
    units = _units(sizes, scope, layer_rates)
    alive = _unit_sizes(units, sizes)
    out = []
    for _ in range(levels):
        alive = {k: n - pruned_count(n, _multiplier(k, layer_rates) * rate) for k, n in alive.items()}
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
