"""Rank correlations and bootstrap intervals against scipy.stats (the dense reference)."""

import jax
import numpy as np
import pytest
from scipy import stats as sps

from geomcollapse import stats


@pytest.mark.parametrize("seed", range(6))
def test_spearman_and_kendall_match_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(5, 40))
    x = rng.normal(size=m)
    y = x + rng.normal(scale=1.5, size=m)
    if seed % 2:  # heavy ties in both variables
        x, y = np.round(x), np.round(y * 0.5)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert stats.kendall_tau(x, y) == pytest.approx(
        sps.kendalltau(x, y, variant="b").statistic, abs=1e-12
    )
    np.testing.assert_allclose(stats.mid_ranks(x), sps.rankdata(x), atol=0)


def test_perfect_and_reversed_rankings_and_constant_input():
    x = np.arange(7.0)
    assert stats.spearman(x, x**3) == 1.0 and stats.kendall_tau(x, -np.exp(x)) == -1.0
    assert np.isnan(stats.spearman(x, np.ones(7))) and np.isnan(stats.kendall_tau(np.ones(7), x))


def test_bootstrap_interval_covers_the_statistic_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    lo, hi = stats.bootstrap_interval(stats.spearman, x, y, key=jax.random.key(3))
    rho = stats.spearman(x, y)
    assert lo < rho < hi and hi - lo < 0.8
    # the percentile interval by hand, same resamples
    seed = np.asarray(jax.random.key_data(jax.random.key(3))).ravel()
    idx = np.random.default_rng(seed).integers(0, 30, (2000, 30))
    values = [sps.spearmanr(x[i], y[i]).statistic for i in idx]
    np.testing.assert_allclose((lo, hi), np.percentile(values, [2.5, 97.5]), atol=1e-12)
    again = stats.bootstrap_interval(stats.spearman, x, y, key=jax.random.key(3))
    assert again == (lo, hi)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones(3), np.ones(4)), "equal shape"),
        ((np.ones(2), np.ones(2)), "at least 3"),
        ((np.array([1.0, np.nan, 2.0]), np.ones(3)), "finite"),
        ((np.ones((2, 3, 1)), np.ones((2, 3, 1))), "1-D"),
    ],
)
def test_bad_input_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        stats.spearman(*args)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_interval(stats.spearman, np.arange(4.0), np.arange(4.0), key=0, level=1.5)


def test_row_wise_correlations_equal_the_one_dimensional_ones():
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=(50, 9)), 1)
    y = x + np.round(rng.normal(size=(50, 9)), 0)
    y[3] = 1.0  # a constant row: nan there only
    rho, tau = stats.spearman(x, y), stats.kendall_tau(x, y)
    assert rho.shape == tau.shape == (50,) and np.isnan(rho[3]) and np.isnan(tau[3])
    for i in range(50):
        if i != 3:
            assert rho[i] == pytest.approx(stats.spearman(x[i], y[i]), abs=1e-14)
            assert tau[i] == pytest.approx(stats.kendall_tau(x[i], y[i]), abs=1e-14)


def test_mid_ranks_equal_the_pairwise_count_on_rows_with_ties_and_refuse_nan():
    """The sort-based ranks against their definition, ``#{x_j < x_i} + (#{x_j = x_i} + 1)/2``
    (bit for bit: both are exact halves), row by row on a batch with many ties."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (50, 17)).astype(np.float64)
    x[::7] = rng.normal(size=x[::7].shape)  # rows without ties too
    x[3] = 2.0  # a constant row
    less = np.sum(x[:, None, :] < x[:, :, None], axis=-1)
    equal = np.sum(x[:, None, :] == x[:, :, None], axis=-1)
    np.testing.assert_array_equal(stats.mid_ranks(x), less + 0.5 * (equal + 1))
    np.testing.assert_array_equal(stats.mid_ranks(x[5]), (less + 0.5 * (equal + 1))[5])
    with pytest.raises(ValueError, match="NaN"):
        stats.mid_ranks([1.0, np.nan, 0.0])
