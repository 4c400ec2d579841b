"""``lab/stats.py``: the Wilson interval of a proportion (means, CIs and paired differences are tested with the
study's verdicts, ``tests/lab/study/test_verdicts.py``)."""

from __future__ import annotations

import pytest

from nora_peft.lab.stats import Z95, t975, wilson_interval


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 200)])
def test_wilson_interval_bounds_solve_the_score_equation(correct, n):
    """An independent check: each bound p (inside (0, 1)) solves (p_hat - p)^2 = z^2 p (1 - p) / n, and the interval
    holds p_hat; known value: 0 of 10 -> [0, 0.2775]."""
    lo, hi = wilson_interval(correct, n)
    p_hat, z = correct / n, 1.959963984540054
    for p in (lo, hi):
        if 0 < p < 1:
            assert (p_hat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)
    assert lo <= p_hat <= hi and 0 <= lo < hi <= 1
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5)) and wilson_interval(0, 0) is None


def test_z95_is_the_normal_quantile_and_the_limit_of_t975():
    """An independent value: Phi(Z95) = 0.975 (from math.erf), and t975 tends to it."""
    import math

    assert 0.5 * (1 + math.erf(Z95 / math.sqrt(2))) == pytest.approx(0.975, abs=1e-12)
    assert t975(1e12) == pytest.approx(Z95, rel=1e-9)
