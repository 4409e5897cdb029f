"""Rank correlations with bootstrap intervals: how well a score ranks datasets by harm.

* ``spearman(x, y)``: Spearman's ρ, the Pearson correlation of the mid-ranks
  (ties share the mean of their ranks).
* ``kendall_tau(x, y)``: Kendall's τ_b (ties in either variable corrected).
* ``bootstrap_interval(stat, x, y, key=...)``: a percentile interval of
  ``stat`` over resamples of the pairs ``(x_i, y_i)`` with replacement
  (resampling datasets, not runs).

All take 1-D sequences of equal length ``m ≥ 3`` of finite floats and return
Python floats; ``nan`` when a variable is constant (no ranking to compare).
Numpy only: no scipy at run time (the tests compare with ``scipy.stats``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from geomcollapse._checks import positive_int, prng_key

__all__ = ["bootstrap_interval", "kendall_tau", "mid_ranks", "spearman"]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if x.size < 3:
        raise ValueError(f"x and y need at least 3 pairs, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    return x, y


def mid_ranks(x) -> np.ndarray:
    """Ranks ``1 … m`` of a 1-D array, ties sharing the mean of their ranks: ``(m,)`` float64."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman's ρ of ``x`` and ``y`` (mid-ranks); ``nan`` if either is constant."""
    x, y = _pair(x, y)
    rx, ry = mid_ranks(x) - (x.size + 1) / 2, mid_ranks(y) - (y.size + 1) / 2
    denom = np.sqrt(np.sum(rx**2) * np.sum(ry**2))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def kendall_tau(x, y) -> float:
    """Kendall's τ_b of ``x`` and ``y``; ``nan`` if either is constant."""
    x, y = _pair(x, y)
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(x.size, 1)
    sx, sy = sx[upper], sy[upper]
    denom = np.sqrt(np.sum(sx != 0) * np.sum(sy != 0))
    return float(np.sum(sx * sy) / denom) if denom > 0 else float("nan")


def bootstrap_interval(
    stat: Callable[[np.ndarray, np.ndarray], float],
    x,
    y,
    *,
    key: jax.Array,
    num_resamples: int = 2000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``stat(x[idx], y[idx])`` over resamples of the pairs.

    ``idx`` draws ``m`` indices with replacement (seeded by ``key``). Resamples
    on which ``stat`` is ``nan`` (a constant variable) are dropped; ``(nan,
    nan)`` when more than half are. Returns ``(low, high)``.
    """
    x, y = _pair(x, y)
    num_resamples = positive_int(num_resamples, "num_resamples")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    seed = np.asarray(jax.random.key_data(prng_key(key))).ravel()
    idx = np.random.default_rng(seed).integers(0, x.size, (num_resamples, x.size))
    values = np.array([stat(x[i], y[i]) for i in idx])
    values = values[np.isfinite(values)]
    if values.size < num_resamples / 2:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
