"""Tests of lthmpi/pruning.py: exact kept counts, scopes and rate multipliers, ties, the random-mask control."""
from __future__ import annotations

import numpy as np
import pytest

from lthmpi.pruning import (fraction_remaining, layer_of, magnitude_masks, random_masks,
                            rate_multiplier)


def hand_weights():
    """Magnitudes chosen so the kept sets can be read off by hand (signs must not matter)."""
    return {
        "fc1/kernel": np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], np.float32),
        "fc2/kernel": np.array([[0.5, -7.0], [8.0, -0.25], [-9.0, 10.0]], np.float32),
        "output/kernel": np.array([[1.0, -3.0], [2.0, 0.1]], np.float32),
    }


def test_global_with_output_at_half_rate_by_hand():
    m = magnitude_masks(hand_weights(), 0.5, "global", {"output": 0.5})
    # fc1 + fc2 are ranked together (12 weights, keep 6): |10|, |9|, |8|, |7|, |6|, |5|.
    assert m["fc1/kernel"].tolist() == [[False, False, False], [False, True, True]]
    assert m["fc2/kernel"].tolist() == [[False, True], [True, False], [True, True]]
    # output on its own at half the rate: prune 0.25 * 4 = 1 weight, the smallest (0.1).
    assert m["output/kernel"].tolist() == [[True, True], [True, False]]
    assert all(a.dtype == bool for a in m.values())
    assert list(m) == list(hand_weights())  # same keys, same order


def test_global_without_multipliers_pools_every_layer():
    m = magnitude_masks(hand_weights(), 0.5, "global", {})
    # 16 weights, keep 8: 10, 9, 8, 7, 6, 5, 4, 3 (fc1's 3 and output's -3 tie at 3: earlier position wins)
    kept = sorted(abs(float(v)) for p, w in hand_weights().items() for v in w[m[p]])
    assert kept == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert m["fc1/kernel"].tolist() == [[False, False, True], [True, True, True]]  # fc1's 3 comes first
    assert not m["output/kernel"].any()


def test_layerwise_with_multiplier_by_hand():
    m = magnitude_masks(hand_weights(), 0.5, "layerwise", {"output": 0.5})
    assert m["fc1/kernel"].tolist() == [[False, False, False], [True, True, True]]  # 4, 5, 6
    assert m["fc2/kernel"].tolist() == [[False, False], [True, False], [True, True]]  # 8, 9, 10
    assert m["output/kernel"].tolist() == [[True, True], [True, False]]  # 3 of 4


@pytest.mark.parametrize("remaining", [0.8, 0.5, 0.2, 0.05, 0.01])
def test_exact_counts_on_random_weights(remaining):
    rng = np.random.default_rng(0)
    w = {"fc1/kernel": rng.normal(size=(40, 25)).astype(np.float32),  # 1000
         "fc2/kernel": rng.normal(size=(25, 12)).astype(np.float32),  # 300
         "output/kernel": rng.normal(size=(5, 10)).astype(np.float32)}  # 50
    rate = 1 - remaining
    g = magnitude_masks(w, remaining, "global", {"output": 0.5})
    pooled = 1300 - int(round(rate * 1300))
    out = 50 - int(round(0.5 * rate * 50))
    assert int(g["fc1/kernel"].sum() + g["fc2/kernel"].sum()) == pooled
    assert int(g["output/kernel"].sum()) == out
    # what is kept in the pool is the largest: no pruned weight is bigger than a kept one
    pool = np.concatenate([w["fc1/kernel"].ravel(), w["fc2/kernel"].ravel()])
    keep = np.concatenate([g["fc1/kernel"].ravel(), g["fc2/kernel"].ravel()])
    assert np.abs(pool[keep]).min() >= np.abs(pool[~keep]).max()

    lw = magnitude_masks(w, remaining, "layerwise", {"output": 0.5})
    assert int(lw["fc1/kernel"].sum()) == 1000 - int(round(rate * 1000))
    assert int(lw["fc2/kernel"].sum()) == 300 - int(round(rate * 300))
    assert int(lw["output/kernel"].sum()) == out
    for p in w:
        assert np.abs(w[p][lw[p]]).min() >= np.abs(w[p][~lw[p]]).max()


def test_counts_are_round_of_fraction():
    w = {"a/kernel": np.arange(1, 1001, dtype=np.float32).reshape(10, 100)}
    for r, k in ((0.8, 800), (0.2, 200), (0.8 ** 10, 107), (0.01, 10), (0.0001, 1)):
        m = magnitude_masks(w, r, "global")
        assert int(m["a/kernel"].sum()) == k, r
        assert m["a/kernel"].ravel()[-k:].all()  # the k largest
    assert fraction_remaining(magnitude_masks(w, 0.2, "global")) == 0.2


def test_ties_give_exact_count_and_deterministic_choice():
    rng = np.random.default_rng(1)
    signs = rng.choice([-1.0, 1.0], size=(20, 10)).astype(np.float32)
    w = {"fc1/kernel": 0.5 * signs, "fc2/kernel": 0.5 * signs[:10].T.copy()}  # 300 weights, all |0.5|
    for scope in ("global", "layerwise"):
        a = magnitude_masks(w, 0.3, scope)
        b = magnitude_masks({p: v.copy() for p, v in w.items()}, 0.3, scope)
        assert sum(int(m.sum()) for m in a.values()) == 90
        for p in w:
            assert np.array_equal(a[p], b[p])
    g = magnitude_masks(w, 0.3, "global")
    # equal magnitudes are kept in order of position: the first 90 of fc1 (200 weights), none of fc2
    assert g["fc1/kernel"].ravel()[:90].all() and not g["fc1/kernel"].ravel()[90:].any()
    assert not g["fc2/kernel"].any()
    # a tie straddling the threshold: 3 kept out of [3, 1, 1, 1, 1, 0.5] -> 3 and the first two 1s
    m = magnitude_masks({"x/kernel": np.array([1.0, 3.0, -1.0, 0.5, 1.0, -1.0])}, 0.5, "global")
    assert m["x/kernel"].tolist() == [True, True, True, False, False, False]


def test_never_prunes_a_layer_entirely_when_alone():
    w = {"output/kernel": np.ones((2, 2), np.float32)}
    m = magnitude_masks(w, 0.01, "layerwise")
    assert int(m["output/kernel"].sum()) == 1


def test_rate_multiplier_patterns():
    rates = {"output": 0.5, "conv*": 0.25}
    assert layer_of("fc1/kernel") == "fc1"
    assert rate_multiplier("output/kernel", rates) == 0.5
    assert rate_multiplier("conv3/kernel", rates) == 0.25
    assert rate_multiplier("fc1/kernel", rates) == 1.0
    assert rate_multiplier("output2/kernel", rates) == 1.0  # patterns match the whole layer name


def test_zero_multiplier_keeps_layer_dense():
    m = magnitude_masks(hand_weights(), 0.2, "global", {"output": 0.0})
    assert m["output/kernel"].all()


def test_remaining_outside_unit_interval_is_refused():
    for r in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            magnitude_masks(hand_weights(), r)


def test_random_masks_keep_per_layer_counts_at_other_positions():
    rng = np.random.default_rng(2)
    w = {"fc1/kernel": rng.normal(size=(64, 30)).astype(np.float32),
         "fc2/kernel": rng.normal(size=(30, 20)).astype(np.float32),
         "output/kernel": rng.normal(size=(20, 10)).astype(np.float32)}
    ticket = magnitude_masks(w, 0.2, "global", {"output": 0.5})
    r1 = random_masks(ticket, [0, 1, 2, 2])
    r2 = random_masks(ticket, [0, 1, 2, 2])
    r3 = random_masks(ticket, [0, 1, 2, 1])
    assert list(r1) == list(ticket)
    for p in ticket:
        assert r1[p].shape == ticket[p].shape and r1[p].dtype == bool
        assert int(r1[p].sum()) == int(ticket[p].sum())
        assert int(r3[p].sum()) == int(ticket[p].sum())
        assert np.array_equal(r1[p], r2[p])  # deterministic in its seed
        assert not np.array_equal(r1[p], ticket[p])  # other positions
        assert not np.array_equal(r1[p], r3[p])  # another seed, another mask
        # a random mask overlaps the ticket about as chance predicts, far from identical
        k, n = int(ticket[p].sum()), ticket[p].size
        overlap = int((r1[p] & ticket[p]).sum())
        assert overlap < k * k / n + 0.25 * k
    assert {p: float(m.mean()) for p, m in r1.items()} == {p: float(m.mean()) for p, m in ticket.items()}


def test_biases_never_appear_in_masks_of_a_real_model(tf_runtime):
    from lthmpi.models import build_model, prunable_variables

    model = build_model("lenet300_100", (8, 8, 1), 10, 0)
    prunable = [v.path for v in prunable_variables(model)]
    assert prunable == ["fc1/kernel", "fc2/kernel", "output/kernel"]
    weights = {v.path: v.numpy() for v in model.variables if v.path in prunable}
    for scope in ("global", "layerwise"):
        masks = magnitude_masks(weights, 0.1, scope, {"output": 0.5})
        assert set(masks) == set(prunable)
        assert not any("bias" in p for p in masks)
        total = sum(m.size for m in masks.values())
        assert total == 64 * 300 + 300 * 100 + 100 * 10
        if scope == "layerwise":
            assert int(masks["fc1/kernel"].sum()) == 64 * 300 - int(round(0.9 * 64 * 300))
