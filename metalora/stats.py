"""Confidence intervals and the paired bootstrap that ``metalora compare`` reports.

* ``mean_ci(values)``: the mean over seeds and its two-sided Student-t interval,
  mean ± t_{1-α/2, n-1} · s / √n (s the sample standard deviation), as scipy's ``t.interval`` gives it;
  undefined (NaN) for a single seed.
* ``paired_bootstrap(a, b)``: recipe A against a reference B on the *same* test items. Each task's items
  are resampled with replacement (stratified by task, so every task keeps its size), the statistic is
  the macro average over tasks of mean(a) − mean(b), and
  - the interval is the percentile interval of the resampled differences;
  - the two-sided p-value is 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)), capped at 1 (the share of resamples on either
    side of zero).
  Scores per item are first averaged over seeds, so the bootstrap measures the uncertainty from the test
  items and the CI over seeds measures the one from training.

Written by hand (a few lines of numpy): scipy's ``bootstrap`` resamples one array, not strata of pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` and its Student-t confidence interval (NaN bounds for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half)


@dataclass(frozen=True)
class BootstrapResult:
    diff: float
    """The observed macro-average difference A − B."""
    low: float
    high: float
    p_value: float
    resamples: int


def paired_bootstrap(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """A against B on the same items: ``{task: per-item scores}`` for each, aligned item by item."""
    if set(a) != set(b) or not a:
        raise ValueError(
            f"paired_bootstrap needs the same tasks on both sides, got {sorted(a)} and {sorted(b)}"
        )
    rng = np.random.default_rng(seed)
    observed, resampled = [], []
    for task in sorted(a):
        d = np.asarray(a[task], dtype=np.float64) - np.asarray(b[task], dtype=np.float64)
        if len(a[task]) != len(b[task]) or d.size == 0:
            raise ValueError(f"task {task!r}: {len(a[task])} and {len(b[task])} items; they must pair up")
        observed.append(d.mean())
        idx = rng.integers(0, d.size, size=(resamples, d.size))  # [resamples, items]
        resampled.append(d[idx].mean(axis=1))
    diffs = np.mean(resampled, axis=0)
    tail = (1 - confidence) / 2
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return BootstrapResult(float(np.mean(observed)), float(low), float(high), p, resamples)
