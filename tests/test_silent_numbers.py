"""Public routines that returned a plausible wrong number, NaN/−inf or a bare traceback.

Found by a probe of the subspace, the series, the defences, SS-HOPM and the statistics
against dense references; each case fails without its fix. float64 (conftest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import defences, series, stats, tensor_norm
from geomcollapse.subspace import Subspace

N = 6
RNG = np.random.default_rng(0)
_B = RNG.standard_normal((N, N))
F = _B @ _B.T / N
_LAM, _U = np.linalg.eigh(F)
LAM, V = _LAM[::-1][:2], _U[:, ::-1][:, :2].T  # top-2 pairs, (2, N) rows
X = RNG.standard_normal(N)


def test_subspace_values_must_be_one_per_basis_row():
    """Before: one value for two rows, or (d, 1) values, broadcast into another loss."""
    dense = 0.5 * float(X @ V.T @ np.diag(LAM) @ V @ X)
    assert float(Subspace.exact(LAM, V).projected_loss(X)) == pytest.approx(dense, rel=1e-13)
    for values in (LAM[:1], LAM[:, None], np.append(LAM, 1.0)):
        with pytest.raises(ValueError, match=r"^values must be \(d,\) for the basis' d = 2"):
            Subspace.exact(values, V)


def test_a_diverged_update_scores_nan_not_zero():
    """Before: geometric overlap 0 ("nothing in M") for a NaN update."""
    s = Subspace.exact(LAM, V)
    got = s.overlap_score(X)
    assert float(got.geometric) == pytest.approx(
        np.linalg.norm(V @ X) / np.linalg.norm(X), rel=1e-13
    )
    assert float(got.fisher) == pytest.approx(float(s.projected_loss(X)), rel=1e-14)
    assert float(s.overlap_score(np.zeros(N)).geometric) == 0.0
    nan = s.overlap_score(np.where(np.arange(N) == 3, np.nan, X))
    assert np.isnan(float(nan.geometric)) and np.isnan(float(nan.fisher))


def test_a_pytree_update_laid_out_unlike_the_basis_is_refused():
    """Before: {"b", "c"} against a basis over {"a", "b"} paired coordinates by position:
    an update orthogonal to M scored 1.0."""
    s = Subspace.exact(LAM, {"a": V[:, :4], "b": V[:, 4:]})
    same = s.overlap_score({"a": X[:4], "b": X[4:]})
    flat = Subspace.exact(LAM, V).overlap_score(X)
    assert float(same.geometric) == pytest.approx(float(flat.geometric), rel=1e-13)
    with pytest.raises(ValueError, match=r"^delta_theta is laid out unlike the subspace's basis"):
        s.overlap_score({"b": X[:2], "c": X[2:]})
    with pytest.raises(ValueError, match=r"^x is laid out unlike"):
        s.coordinates({"a": X[:3], "b": X[3:]})  # same paths, other shapes
    with pytest.raises(ValueError, match=r"^delta_theta has 7 entries, the subspace's basis"):
        Subspace.exact(LAM, V).overlap_score(np.ones(N + 1))


def _quadratic(c):
    skill = lambda p: 0.5 * jnp.sum(p**2)  # noqa: E731
    task = lambda p: 0.5 * jnp.sum(p**2) + jnp.dot(c, p)  # noqa: E731
    return skill, task


def test_the_series_refuses_a_subspace_basis_that_is_not_orthonormal():
    """Before: 3V gave projected coefficients 9× V's."""
    skill, task = _quadratic(jnp.arange(1.0, N + 1))
    good = series.delta_u_series(skill, task, jnp.zeros(N), 4, subspace=(LAM, V))
    assert np.all(np.isfinite(np.asarray(good.projected)))
    for basis in (3 * V, {"a": 3 * V[:, :4], "b": 3 * V[:, 4:]}):
        params = jnp.zeros(N) if isinstance(basis, np.ndarray) else {"a": X[:4], "b": X[4:]}
        with pytest.raises(ValueError, match=r"^subspace basis must have orthonormal rows"):
            series.delta_u_series(skill, task, params, 4, subspace=(LAM, basis))


def test_the_series_refuses_a_loss_that_is_not_finite_at_theta_star():
    """Before: an infinite task gradient gave NaN coefficients; NaN skill loss gave an
    all-NaN SGD forecast."""
    skill, _ = _quadratic(jnp.ones(N))
    sqrt_task = lambda p: jnp.sum(p**2) + jnp.sqrt(p[0])  # noqa: E731  ∇ = ∞ at p₀ = 0
    with pytest.raises(ValueError, match=r"^the Δu series' coefficients are not finite"):
        series.delta_u_series(skill, sqrt_task, jnp.zeros(N), 3)
    data = (jnp.asarray(RNG.standard_normal((8, N))),)
    example = lambda p, x: 0.5 * jnp.dot(x, p) ** 2 + jnp.dot(x, p)  # noqa: E731
    nan_skill = lambda p: jnp.nan * jnp.sum(p**2)  # noqa: E731
    with pytest.raises(ValueError, match=r"coefficients are not finite at params"):
        series.sgd_delta_u(
            nan_skill, example, jnp.zeros(N), data, lr=0.01, batch_size=2, steps=[1, 2], order=2
        )


def test_tracking_takes_a_float64_fisher_of_float32_params():
    """Before (x64 on): a TypeError from the Lanczos loop's carry (float32 in, float64 out).
    The same run with the matvec cast by the user is the twin, bit for bit."""
    Fm = jnp.asarray(F)
    theta = jnp.asarray(X, jnp.float32)
    grad = jnp.ones(N, jnp.float32)

    def step(fisher_vp):
        tx = defences.project_out_tracking(
            fisher_vp, 2, 1, key=jax.random.key(0), fisher_args=(Fm,)
        )
        return tx.update(grad, tx.init(theta), theta)[0]

    wide = step(lambda p, v, m: m @ v)  # float64 out
    cast = step(lambda p, v, m: (m @ v).astype(v.dtype))
    assert wide.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(cast))
    P = V.T @ V  # the dense twin: the update with M's part removed
    np.testing.assert_allclose(np.asarray(wide), (np.eye(N) - P) @ np.ones(N), atol=1e-5)


def test_fisher_budget_propagates_a_nan_fisher():
    """Before: a finite step pulling θ towards θ* (the ray rule with a NaN excess)."""
    tx = defences.fisher_budget(lambda p, v: v * jnp.nan, 0.1)
    step = tx.update(jnp.zeros(N), tx.init(jnp.zeros(N)), jnp.ones(N))[0]
    assert np.all(np.isnan(np.asarray(step)))
    ok = defences.fisher_budget(lambda p, v: v, 0.1)
    assert np.all(np.isfinite(np.asarray(ok.update(jnp.ones(N), ok.init(jnp.zeros(N)), X)[0])))


def test_sshopm_refuses_a_contraction_that_is_never_finite():
    """Before: value −inf (a NaN step is never accepted)."""
    starts = jnp.asarray(RNG.standard_normal((2, 3)))
    Fm = jnp.asarray(F[:3, :3])
    got = tensor_norm.sshopm(lambda v: Fm @ v, starts, order=2)
    assert float(got.value) == pytest.approx(float(np.abs(np.linalg.eigvalsh(F[:3, :3])).max()))
    with pytest.raises(ValueError, match=r"^contract gave no finite T\[vᵐ\]"):
        tensor_norm.sshopm(lambda v: v * jnp.nan, starts, order=2)


def test_bootstrap_falls_back_for_a_stat_of_1d_inputs_only():
    """Before: a stat that refuses 2-D input crashed instead of being called per resample."""
    x = RNG.standard_normal(12)
    y = x + RNG.standard_normal(12)
    key = jax.random.key(3)

    def one_d(a, b):
        assert np.ndim(a) == 1, "1-D only"
        return stats.spearman(a, b)

    def columns(a, b):  # (R,) output on (R, m) input, but not row-wise
        return np.median(a - b, axis=0) if np.ndim(a) == 2 else np.median(a - b)

    rowwise = stats.bootstrap_interval(stats.spearman, x, y, key=key, num_resamples=12)
    assert stats.bootstrap_interval(one_d, x, y, key=key, num_resamples=12) == rowwise
    per_resample = stats.bootstrap_interval(columns, x, y, key=key, num_resamples=12)
    draws = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    idx = draws.integers(0, 12, (12, 12))
    dense = np.percentile([np.median(x[i] - y[i]) for i in idx], [2.5, 97.5])
    np.testing.assert_allclose(per_resample, dense, rtol=1e-15)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda k: stats.bootstrap_interval(stats.spearman, np.eye(3), np.eye(3), key=k),
         r"^x and y must be 1-D"),
        (lambda k: stats.spearman(["1", "2", "3"], [1, 2, 3]), r"^x must hold real numbers"),
        (lambda k: stats.spearman([1, 2, 3], [1j, 2, 3]), r"^y must hold real numbers"),
        (lambda k: stats.kendall_tau([1, None, 3], [1, 2, 3]), r"^x must hold real numbers"),
    ],
)  # fmt: skip
def test_statistics_refuse_what_is_not_one_real_value_per_dataset(call, match):
    with pytest.raises(ValueError, match=match):
        call(jax.random.key(0))


def test_defences_name_an_update_or_params_of_another_size():
    """Before: bare dot_general / broadcasting TypeErrors from inside the update."""
    s = Subspace.exact(LAM, V)
    theta, wrong = jnp.asarray(X), jnp.zeros(N + 1)
    for tx in (defences.project_out(s), defences.initial_orthogonalization(s)):
        with pytest.raises(ValueError, match=rf"^updates has {N + 1} entries, .* rows have {N}"):
            tx.update(wrong, tx.init(theta))
    penalty = defences.fisher_penalty(s, 1.0)
    with pytest.raises(ValueError, match=rf"^params has {N + 1} entries"):
        penalty.update(jnp.ones(N), penalty.init(theta), wrong)
    budget = defences.fisher_budget(lambda p, v: jnp.ones(N + 1), 0.1)
    with pytest.raises(ValueError, match=rf"^fisher_vp returned {N + 1} entries for a vector"):
        budget.update(jnp.ones(N), budget.init(theta), theta)
    # the right sizes: the static projection is the dense (I − VᵀV) u
    out = defences.project_out(s).update(jnp.ones(N), defences.project_out(s).init(theta))[0]
    np.testing.assert_allclose(np.asarray(out), (np.eye(N) - V.T @ V) @ np.ones(N), atol=1e-14)
