"""Subspace (Def. 3.4), the one AIC path and the orthogonalising correction vs dense twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import aic, curvature, landscapes, linalg, models, theory
from geomcollapse.subspace import (
    Subspace,
    fisher_product,
    orthogonalized,
    subspace_arrays,
    warm_eigenpairs,
)
from tests.conftest import rel_err, symmetric_with_spectrum

N, D = 30, 4


@pytest.fixture(scope="module")
def dense():
    spectrum = np.r_[[6.0, 5.0, 3.0, 2.0], np.linspace(0.5, 0.01, N - 4)]
    F = symmetric_with_spectrum(spectrum, seed=1)
    lam, V = np.linalg.eigh(F)
    lam, V = lam[::-1], V[:, ::-1]
    return F, lam, V


def test_subspace_methods_match_dense_projectors(dense):
    F, lam, V = dense
    s = Subspace.exact(lam[:D], V[:, :D].T)
    P = V[:, :D] @ V[:, :D].T
    F_half_P = V[:, :D] @ np.diag(np.sqrt(lam[:D])) @ V[:, :D].T  # F^{1/2}P
    x = np.random.default_rng(0).standard_normal(N)
    assert rel_err(s.project(jnp.asarray(x)), P @ x) < 1e-13
    assert abs(np.linalg.norm(s.fisher_half(x)) - np.linalg.norm(F_half_P @ x)) < 1e-13
    assert abs(float(s.projected_loss(x)) - 0.5 * x @ P @ F @ P @ x) < 1e-12
    score = s.overlap_score(x)
    assert abs(float(score.geometric) - np.linalg.norm(P @ x) / np.linalg.norm(x)) < 1e-13
    assert abs(float(score.fisher) - 0.5 * np.linalg.norm(F_half_P @ x) ** 2) < 1e-12
    assert float(s.overlap_score(np.zeros(N)).geometric) == 0.0
    lead = s.leading(2)
    assert lead.dim == 2 and rel_err(lead.project(x), V[:, :2] @ (V[:, :2].T @ x)) < 1e-13


def test_a_pytree_basis_from_top_eigenpairs_is_accepted(dense):
    """Eigenvectors of a pytree operator work wherever a basis does (same numbers as raveled)."""
    F, lam, _ = dense
    like = {"a": jnp.zeros((5, 4)), "b": jnp.zeros(10)}
    _flat, unravel = ravel_pytree(like)
    Fj = jnp.asarray(F)
    pairs = linalg.top_eigenpairs(
        lambda t: unravel(Fj @ ravel_pytree(t)[0]), like, D, key=jax.random.key(0), tol=1e-12
    )
    tree_space = Subspace.from_eigenpairs(pairs)
    rows = jax.vmap(lambda t: ravel_pytree(t)[0])(pairs.vectors)
    flat_space = Subspace.exact(pairs.values, rows)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(N))
    assert rel_err(tree_space.projected_loss(unravel(x)), flat_space.projected_loss(x)) < 1e-14
    projected = tree_space.project(unravel(x))
    assert jax.tree_util.tree_structure(projected) == jax.tree_util.tree_structure(like)
    np.testing.assert_allclose(tree_space.values, lam[:D], rtol=1e-12)


def test_unconverged_eigenpairs_are_refused_unless_allowed(dense):
    F = jnp.asarray(dense[0])
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        pairs = linalg.top_eigenpairs(
            lambda v: F @ v, jnp.zeros(N), D, key=jax.random.key(0), tol=1e-14, max_matvecs=5
        )
    with pytest.raises(ValueError, match="not converged"):
        Subspace.from_eigenpairs(pairs)
    s = Subspace.from_eigenpairs(pairs, allow_unconverged=True)
    assert not bool(s.converged)


def test_measure_aic_refuses_an_unconverged_subspace_unless_allowed():
    q = landscapes.make_quadratic_landscape(
        jax.random.key(5), 40, 3, top=(3.0, 2.0, 1.0), tail_mass=0.3, epsilon=0.0, coupling=0.8
    )
    args = dict(key=jax.random.key(1), fisher_args=(q.F,), tol=1e-14, max_matvecs=4)

    def task(x):
        return 0.5 * x @ q.A @ x + q.c @ x

    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="not converged"):
        aic.measure_aic(lambda _, v, F: F @ v, task, jnp.zeros(q.n), 3, **args)
    with pytest.warns(RuntimeWarning):
        m = aic.measure_aic(
            lambda _, v, F: F @ v, task, jnp.zeros(q.n), 3, allow_unconverged=True, **args
        )
    assert not m.report.converged and len(m.report.eigen_residuals) == 3


def test_aic_measures_is_the_report_path_and_traces(dense):
    """aic_report's numbers equal aic_measures under jit (the batch summaries' path)."""
    _F, lam, V = dense
    rng = np.random.default_rng(2)
    g, Hg = rng.standard_normal(N), rng.standard_normal(N)
    s = Subspace.exact(lam[:D], V[:, :D].T)
    report = theory.aic_report(s, g, Hg, tail_mass=lam[D:].sum())
    traced = jax.jit(lambda s, g, Hg: theory.aic_measures(s, g, Hg, tail_mass=0.0))(s, g, Hg)
    P = V[:, :D] @ V[:, :D].T
    F_half = V @ np.diag(np.sqrt(lam)) @ V.T
    assert abs(report.coupling - np.linalg.norm(F_half @ P @ Hg)) < 1e-12
    assert abs(report.orthogonality - np.linalg.norm(P @ g)) < 1e-13
    assert abs(report.fisher_orthogonality - np.linalg.norm(F_half @ P @ g)) < 1e-12
    assert report.lambda_d == lam[D - 1] and abs(report.tail_mass - lam[D:].sum()) < 1e-13
    assert float(traced.coupling) == pytest.approx(report.coupling, rel=1e-14)


def test_orthogonalized_removes_pg_and_keeps_the_hessian():
    params = models.mlp_init(jax.random.key(0), (3, 5, 2), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (6, 3))
    ys = jnp.arange(6) % 2

    def loss(p, x, y):
        return models.softmax_cross_entropy(models.mlp_apply(p, x), y)

    flat, unravel = ravel_pytree(params)
    n = flat.size
    F = symmetric_with_spectrum(np.linspace(3.0, 0.1, n), seed=3)
    lam, V = np.linalg.eigh(F)
    s = Subspace.exact(lam[::-1][:3], V[:, ::-1][:, :3].T)
    corrected = orthogonalized(loss, s, params, xs, ys)

    def flat_loss(fn):
        return lambda w: fn(unravel(w), xs, ys)

    g_tilde = jax.grad(flat_loss(corrected))(flat)
    g = jax.grad(flat_loss(loss))(flat)
    assert float(jnp.linalg.norm(s.coordinates(g_tilde))) < 1e-14 * float(jnp.linalg.norm(g))
    assert float(jnp.linalg.norm(s.coordinates(g))) > 1e-3
    H = jax.hessian(flat_loss(loss))(flat)
    H_tilde = jax.hessian(flat_loss(corrected))(flat)
    assert rel_err(H_tilde, H) < 1e-13
    # the corrected loss differs by a linear function only
    w = flat + 0.1 * jax.random.normal(jax.random.key(2), (n,))
    pg = np.asarray(s.project(g))
    expected = float(flat_loss(loss)(w)) - pg @ np.asarray(w - flat)
    assert abs(float(flat_loss(corrected)(w)) - expected) < 1e-13


def test_bad_subspace_inputs_raise(dense):
    _F, lam, V = dense
    with pytest.raises(ValueError, match="basis"):
        Subspace.exact(lam[:D], np.zeros(N)).rows  # noqa: B018
    with pytest.raises(ValueError, match="leading d axis"):
        Subspace.exact(lam[:2], {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}).rows  # noqa: B018
    with pytest.raises(ValueError, match="d must be"):
        Subspace.exact(lam[:D], V[:, :D].T).leading(D + 1)
    s = Subspace.exact(lam[:D], V[:, :D].T)
    with pytest.raises(ValueError, match="params"):
        orthogonalized(lambda p: jnp.sum(p**2), s, jnp.full(N, jnp.nan))
    with pytest.raises(ValueError, match="parameters"):
        orthogonalized(lambda p: jnp.sum(p**2), s, jnp.zeros(N + 1))


def test_subspace_arrays_validates_and_returns_values_and_rows(dense):
    _, lam, V = dense
    values, rows = subspace_arrays(Subspace.exact(lam[:D], V[:, :D].T))
    np.testing.assert_array_equal(values, lam[:D])
    np.testing.assert_array_equal(rows, V[:, :D].T)
    with pytest.raises(ValueError, match=r"^subspace must be a geomcollapse Subspace"):
        subspace_arrays((lam[:D], V[:, :D].T))
    skewed = Subspace.exact(lam[:D], V[:, :D].T)._replace(basis=jnp.asarray(2.0 * V[:, :D].T))
    with pytest.raises(ValueError, match=r"^subspace.basis must have orthonormal rows"):
        subspace_arrays(skewed)


def test_warm_eigenpairs_match_dense_eigh_from_a_stale_basis(dense):
    """The warm-started traced Lanczos finds ``M(θ)`` of ``F`` as ``eigh`` does (dense twin)."""
    F, lam, V = dense
    Fj = jnp.asarray(F)
    params = {"w": jnp.zeros(N)}

    def fisher_vp(p, v, matrix):
        return {"w": matrix @ v["w"]}

    stale = jnp.asarray(np.roll(V[:, :D], 1, axis=0).T)  # some other orthonormal rows
    keys = tuple(jax.random.split(jax.random.key(0)))
    pairs = jax.jit(warm_eigenpairs, static_argnums=(0, 4))(
        fisher_vp, params, (Fj,), stale, D, keys, 1e-10, None
    )
    assert bool(pairs.certified) and bool(jnp.all(pairs.converged))  # every pair, by residual
    assert rel_err(pairs.values, lam[:D]) < 1e-9
    P = V[:, :D] @ V[:, :D].T
    Q = np.asarray(pairs.vectors).T
    assert np.max(np.abs(Q @ Q.T - P)) < 1e-8  # the same subspace, compared as projectors


def test_fisher_product_wraps_a_function_and_refuses_a_bound_operator_or_a_non_callable():
    def fvp(params, v):
        return v

    wrapped = fisher_product(fvp)
    assert isinstance(wrapped, curvature.VectorProduct) and wrapped.fn is fvp
    assert fisher_product(wrapped) is wrapped
    bound = curvature.linear_operator(fvp, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"^fisher_vp must be the unbound fisher_vp"):
        fisher_product(bound)
    with pytest.raises(ValueError, match=r"^fisher_vp must be callable, got int"):
        fisher_product(3)
