"""``metalora.stats``: the seeds' confidence interval against scipy, the paired bootstrap against cases
whose resampling distribution is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metalora.stats import mean_ci, paired_bootstrap


@pytest.mark.parametrize(
    "values", [[0.61, 0.66, 0.58], [0.2, 0.9], [1.0, 1.0, 1.0, 1.0], list(np.linspace(0, 1, 7))]
)
def test_mean_ci_equals_scipy_t_interval(values):
    got = mean_ci(values)
    x = np.asarray(values)
    assert got.mean == pytest.approx(x.mean(), abs=1e-15)
    if x.std() == 0:
        assert got.low == got.high == x.mean()
        return
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)


def test_mean_ci_of_one_seed_has_no_interval():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError):
        mean_ci([])


def test_bootstrap_two_items_matches_the_enumerated_distribution():
    """d = [1, 0]: a resample of 2 items has mean 1, 0.5, 0 with probabilities 1/4, 1/2, 1/4, so
    P(Δ* <= 0) = 1/4, P(Δ* >= 0) = 1, p = 2 · 1/4 = 0.5, and the 95% percentile interval is [0, 1]."""
    got = paired_bootstrap({"t": [1, 0]}, {"t": [0, 0]}, resamples=40_000, seed=1)
    assert got.diff == 0.5 and (got.low, got.high) == (0.0, 1.0)
    assert got.p_value == pytest.approx(0.5, abs=0.01)


def test_bootstrap_is_stratified_by_task():
    """Task x always differs by 1, task y never: every stratified resample has macro Δ = 0.5 exactly."""
    got = paired_bootstrap({"x": [1, 1], "y": [0, 0]}, {"x": [0, 0], "y": [0, 0]}, resamples=500)
    assert (got.diff, got.low, got.high, got.p_value) == (0.5, 0.5, 0.5, 0.0)


def test_bootstrap_of_identical_scores_has_p_one_and_needs_pairs():
    same = paired_bootstrap({"t": [1, 0, 1]}, {"t": [1, 0, 1]}, resamples=200)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="pair up"):
        paired_bootstrap({"t": [1, 0]}, {"t": [1]})
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"t": [1]}, {"u": [1]})
