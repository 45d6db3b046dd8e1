"""Statistics for evaluation and experiments: percentile-bootstrap confidence intervals.

Pure numpy, no model or Ray imports, so it is usable from the driver, the CLI and tests alike.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (one value per independent unit, e.g. problem).

    Resamples the units with replacement `n_boot` times; the interval is the (1-c)/2 and (1+c)/2 quantiles of the
    resampled means. A single value (or a constant sample) gives a zero-width interval at that value.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d sample, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): P(at least one of k draws without replacement from n samples,
    c of them correct, is correct) = 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def paired_difference_ci(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10_000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over paired units and its percentile-bootstrap interval (units resampled jointly, so the
    between-unit variance that A and B share cancels). Returns (difference, lo, hi)."""
    x, y = _paired(a, b)
    diff = y - x
    lo, hi = bootstrap_ci(diff, confidence=confidence, n_boot=n_boot, seed=seed)
    return float(diff.mean()), lo, hi


def paired_ratio_ci(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """mean(b) / mean(a) over paired units (e.g. mean response tokens per problem) with a percentile-bootstrap
    interval from resampling the units jointly. Returns (ratio, lo, hi)."""
    x, y = _paired(a, b)
    if x.sum() <= 0:
        raise ValueError("paired_ratio_ci: the denominator sample sums to zero")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    num, den = y[idx].sum(axis=1), x[idx].sum(axis=1)
    ratios = num[den > 0] / den[den > 0]
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return float(y.sum() / x.sum()), float(lo), float(hi)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired samples must be non-empty, 1-d and of equal length, got {x.shape} and {y.shape}")
    return x, y
