"""The paired benchmarks' statistics (run/paired.py): the sign test and the per-round ratio summary."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run"))
from paired import ratio_summary, sign_test  # noqa: E402


def test_sign_test_is_the_two_sided_binomial_tail():
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(10, 10) == pytest.approx(2 / 1024)
    assert sign_test(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(5, 10) == 1.0 and sign_test(20, 40) == 1.0


def test_ratio_summary_counts_the_rounds_the_new_form_won():
    line = ratio_summary([0.9, 1.1, 0.8, 0.95], [1.0, 1.0, 1.0, 1.0])
    assert "median 0.925" in line and "new faster in 3/4 rounds" in line and "range 0.80-1.10" in line

