"""Comparing a run with numbers stored from another machine (tests/data/*.json), field by field.

The stored references were made on one CPU each (trainer_reference.json on an Intel Sapphire Rapids box with
AVX-512, flat_reference.json re-made on an AMD EPYC with AVX2), and the suite runs on either make. Across
makes, float reductions (a loss summed over a batch, a weight update) run in another order and differ in
their last bits (../shared/DESIGN.md §6), while every count the run makes stays equal. So:

- exact: iterations, epochs, early-stopping iterations, masks' fractions left (exact counts over exact
  sizes), strings, flags; accuracies compared as *counts of correct examples* (accuracy × set size);
- within LOSS_RTOL: losses. A float32 loss summed in another order moves by a few units in the last place
  (float32's is 1.2e-7 relative); measured AMD EPYC against the Intel references: at most 1.7e-7 relative over
  every loss. 1e-6 (~8 units in the last place) holds that with a margin and still catches any real change
  of the training, which moves a loss by far more;
- within WEIGHT_SUM_RTOL: the sum of |w| of a variable after training (measured: at most 1.3e-7 relative).

Comparisons between two runs made on one machine in one test stay bitwise (tests/faultkit.py).
"""
from __future__ import annotations

import math

LOSS_RTOL = 1e-6
WEIGHT_SUM_RTOL = 1e-5

EXACT = ("iteration", "epoch", "best_iteration", "early_stop_iteration", "iterations", "reset_iteration",
         "remaining", "target_remaining", "mask", "reset", "control", "diverged")


def accuracy_count(accuracy: float, n: int) -> int:
    """The number of correct examples an accuracy over `n` examples stands for (it is count / n exactly)."""
    count = accuracy * n
    if abs(count - round(count)) > 1e-6:
        raise ValueError(f"accuracy {accuracy!r} is no count out of {n} examples")
    return round(count)


def rule(key: str, sizes: dict):
    """(equal(got, want), how) for a field named `key`: its comparison by the rules above."""
    if key.endswith("accuracy"):
        prefix = key.split("_")[0]
        n = sizes[prefix if prefix in sizes else "test"]
        return (lambda g, w: accuracy_count(g, n) == accuracy_count(w, n)), f"as a count of {n}"
    if key.endswith("loss"):
        return (lambda g, w: math.isclose(g, w, rel_tol=LOSS_RTOL, abs_tol=0.0)), f"within {LOSS_RTOL:g} relative"
    if key in EXACT:
        return (lambda g, w: g == w), "exactly"
    raise KeyError(f"field {key!r} has no comparison rule in tests/portable.py: add it to one")


def mismatches(got: dict, want: dict, sizes: dict, where: str = "") -> list[str]:
    """One line per field of `want` that `got` does not hold, by the rules above; a field may be a list (a
    curve), compared element by element. `sizes` maps a prefix of an accuracy's name to its set's size
    ({"val": 200, "test": 360}; an accuracy without such a prefix is a test accuracy)."""
    out = []
    for key, w in want.items():
        equal, how = rule(key.rsplit("/", 1)[-1], sizes)
        g = got.get(key)
        if isinstance(w, (list, tuple)):
            g = None if g is None else [v.item() if hasattr(v, "item") else v for v in g]
            ok = g is not None and len(g) == len(w) and all(equal(a, b) for a, b in zip(g, w))
        else:
            ok = g is not None and equal(g, w)
        if not ok:
            out.append(f"{where}{key}: {g!r} != {w!r} ({how})")
    return out


def weight_sum_mismatches(got: dict, want: dict) -> list[str]:
    return [f"sum |w| of {p}: {got.get(p)!r} != {w!r} (within {WEIGHT_SUM_RTOL:g} relative)"
            for p, w in want.items() if p not in got or not math.isclose(got[p], w, rel_tol=WEIGHT_SUM_RTOL)]
