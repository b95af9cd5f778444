"""What the paired benchmarks (bench_conv.py, bench_pair.py) say of per-round ratios: the box's speed drifts
by up to 2x between minutes, so two forms are timed in turn within a round and compared round by round."""
from __future__ import annotations

import math
import statistics


def sign_test(k: int, n: int) -> float:
    """Two-sided p of k successes in n fair coin flips (how often one form won, if neither were faster)."""
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n)


def ratio_summary(new: list[float], base: list[float], name: str = "new") -> str:
    """The per-round ratios new/base: median, quartiles, how often `name` was faster, and the sign test."""
    ratios = [a / b for a, b in zip(new, base)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    faster = sum(r < 1 for r in ratios)
    return (f"median {statistics.median(ratios):.3f}, quartiles {q1:.3f}-{q3:.3f}, range {min(ratios):.2f}-"
            f"{max(ratios):.2f}; {name} faster in {faster}/{len(ratios)} rounds (sign test p = "
            f"{sign_test(faster, len(ratios)):.2f})")
