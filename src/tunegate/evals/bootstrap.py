"""Bootstrap confidence intervals (Efron & Tibshirani 1993), percentile method.

`paired_bootstrap` resamples the *same* golden rows for both systems, so the CI of the difference accounts
for the rows being shared (the test Koehn 2004 used for MT and the one eval gates need).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high}


def bootstrap_ci(scores, n_samples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Mean of per-row scores (shape (N,)) with a percentile bootstrap CI. Raises ValueError when N == 0."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap of an empty score list")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_samples, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return Interval(float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def paired_bootstrap(baseline, candidate, n_samples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """CI of mean(candidate - baseline) over shared rows (both shape (N,)). Raises ValueError on a shape mismatch."""
    b = np.asarray(baseline, dtype=float)
    c = np.asarray(candidate, dtype=float)
    if b.shape != c.shape:
        raise ValueError(f"paired bootstrap needs scores on the same rows: {b.shape} vs {c.shape}")
    return bootstrap_ci(c - b, n_samples=n_samples, seed=seed, confidence=confidence)


def bootstrap_statistic(stat, n_rows: int, n_samples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """CI of a corpus statistic (e.g. macro-F1) by resampling rows. `stat(idx)` scores the rows idx (shape (N,)).

    Pass a statistic of the difference between two systems to get a paired CI. The same seed draws the same
    resamples as `bootstrap_ci`, so row and corpus metrics are resampled alike. A statistic may be undefined
    (NaN) on some rows, as a ratio with an empty denominator (tunegate.evals.labels): those resamples are left
    out of the CI, and an undefined value on all the rows reads 0.0 (scikit-learn's zero_division=0).
    """
    if n_rows == 0:
        raise ValueError("bootstrap of zero rows")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_rows, size=(n_samples, n_rows))
    values = np.fromiter((stat(idx) for idx in draws), dtype=float, count=n_samples)
    values = values[np.isfinite(values)]
    point = float(stat(np.arange(n_rows)))
    point = point if np.isfinite(point) else 0.0
    if values.size == 0:
        return Interval(point, point, point)
    a = (1 - confidence) / 2
    return Interval(point, float(np.quantile(values, a)), float(np.quantile(values, 1 - a)))
