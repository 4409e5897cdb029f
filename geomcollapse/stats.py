"""Rank correlations with bootstrap intervals: how well a score ranks datasets by harm.

* ``spearman(x, y)``: Spearman's ρ, the Pearson correlation of the mid-ranks
  (ties share the mean of their ranks).
* ``kendall_tau(x, y)``: Kendall's τ_b (ties in either variable corrected).
* ``bootstrap_interval(stat, x, y, key=...)``: a percentile interval of
  ``stat`` over resamples of the pairs ``(x_i, y_i)`` with replacement
  (resampling datasets, not runs).

The correlations take sequences of equal length ``m ≥ 3`` of finite floats
and return a Python float; ``nan`` when a variable is constant (no ranking to
compare). Given ``(B, m)`` arrays they return the ``(B,)`` correlations of the
rows, which is how the bootstrap evaluates all its resamples in one call (2,000
resamples of 26 pairs: ~1 ms instead of ~0.2 s one by one). Numpy only: no
scipy at run time (the tests compare with ``scipy.stats``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from geomcollapse._checks import positive_int, prng_key

__all__ = ["bootstrap_interval", "kendall_tau", "mid_ranks", "spearman"]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim not in (1, 2) or x.shape != y.shape:
        raise ValueError(
            f"x and y must be 1-D (or 2-D rows) of equal shape, got {x.shape} and {y.shape}"
        )
    if x.shape[-1] < 3:
        raise ValueError(f"x and y need at least 3 pairs, got {x.shape[-1]}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    return x, y


def mid_ranks(x) -> np.ndarray:
    """Ranks ``1 … m`` along the last axis, ties sharing the mean of their ranks (float64)."""
    x = np.asarray(x, np.float64)
    less = np.sum(x[..., None, :] < x[..., :, None], axis=-1)
    equal = np.sum(x[..., None, :] == x[..., :, None], axis=-1)
    return less + 0.5 * (equal + 1)


def _result(num: np.ndarray, denom: np.ndarray):
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def spearman(x, y):
    """Spearman's ρ of ``x`` and ``y`` (mid-ranks); ``nan`` if either is constant."""
    x, y = _pair(x, y)
    m = x.shape[-1]
    rx, ry = mid_ranks(x) - (m + 1) / 2, mid_ranks(y) - (m + 1) / 2
    denom = np.sqrt(np.sum(rx**2, axis=-1) * np.sum(ry**2, axis=-1))
    return _result(np.sum(rx * ry, axis=-1), denom)


def kendall_tau(x, y):
    """Kendall's τ_b of ``x`` and ``y``; ``nan`` if either is constant."""
    x, y = _pair(x, y)
    upper = np.triu(np.ones((x.shape[-1],) * 2, bool), 1)
    sx = np.sign(x[..., :, None] - x[..., None, :]) * upper
    sy = np.sign(y[..., :, None] - y[..., None, :]) * upper
    denom = np.sqrt(np.sum(sx != 0, axis=(-2, -1)) * np.sum(sy != 0, axis=(-2, -1)))
    return _result(np.sum(sx * sy, axis=(-2, -1)).astype(np.float64), denom.astype(np.float64))


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

    ``idx`` draws ``m`` indices with replacement (seeded by ``key``); ``stat``
    is called once on the ``(num_resamples, m)`` resamples when it works on rows
    (as :func:`spearman` and :func:`kendall_tau` do), else once per resample. Resamples
    on which ``stat`` is ``nan`` (a constant variable) are dropped; ``(nan,
    nan)`` when more than half are. Returns ``(low, high)``.
    """
    x, y = _pair(x, y)
    num_resamples = positive_int(num_resamples, "num_resamples")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    seed = np.asarray(jax.random.key_data(prng_key(key))).ravel()
    idx = np.random.default_rng(seed).integers(0, x.size, (num_resamples, x.size))
    values = np.asarray(stat(x[idx], y[idx]), np.float64)  # a row-wise stat: one call
    if values.shape != (num_resamples,):  # a stat of 1-D inputs only
        values = np.array([stat(x[i], y[i]) for i in idx])
    values = values[np.isfinite(values)]
    if values.size < num_resamples / 2:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
