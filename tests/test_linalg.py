"""Lanczos, SLQ and the Gram route against numpy.linalg.eigh and their defining identities."""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import curvature as cv
from geomcollapse import linalg
from geomcollapse.linalg._lanczos import _random_unit, run_lanczos, tridiagonal
from tests.conftest import eigensolver_spectra, rel_err, symmetric_with_spectrum

N = 240

SPECTRA = eigensolver_spectra(N)
_operator = symmetric_with_spectrum


def _true_residuals(A, values, vectors):
    V = np.asarray(vectors, np.float64)
    return np.linalg.norm(V @ A - np.asarray(values)[:, None] * V, axis=1)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_top_eigenpairs_match_eigh(name):
    A = _operator(SPECTRA[name])
    evals, evecs = np.linalg.eigh(A)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    k, tol = 10, 1e-10
    Aj = jnp.asarray(A)
    res = linalg.top_eigenpairs(
        jax.jit(lambda v: Aj @ v), jnp.zeros(N), k, key=jax.random.key(1), tol=tol
    )
    assert res.values.shape == (k,) and res.vectors.shape == (k, N) and res.residuals.shape == (k,)
    assert np.all(np.diff(np.asarray(res.values)) <= 0)
    np.testing.assert_allclose(res.values, evals[:k], atol=1e-9 * evals[0])
    assert not np.any(np.isnan(np.asarray(res.vectors)))
    found = np.asarray(res.found)
    # reported residuals are the true residuals, and within tol
    true = _true_residuals(A, res.values, res.vectors)
    np.testing.assert_allclose(res.residuals, true, atol=1e-12 * evals[0])
    assert np.all(np.asarray(res.residuals)[found] <= tol * evals[0])
    V = np.asarray(res.vectors)[found]
    np.testing.assert_allclose(V @ V.T, np.eye(V.shape[0]), atol=1e-10)
    # eigenvectors compared as projectors onto each distinct eigenvalue's eigenspace
    distinct = np.unique(np.round(evals[:k][found], 6))
    for lam in distinct:
        ours = np.abs(np.asarray(res.values)[found] - lam) < 1e-6
        ref_all = np.abs(evals - lam) < 1e-6
        if ours.sum() != ref_all.sum():  # eigenspace cut by k: compare spans via containment
            ref = evecs[:, ref_all]
            assert np.linalg.norm(V[ours].T - ref @ (ref.T @ V[ours].T)) < 1e-8
            continue
        P_ours = V[ours].T @ V[ours]
        P_ref = evecs[:, ref_all] @ evecs[:, ref_all].T
        assert np.linalg.norm(P_ours - P_ref) < 1e-8


def test_rank_deficient_is_zero_filled_and_flagged():
    A = jnp.asarray(_operator(np.r_[[4.0, 3.0, 2.0], np.zeros(N - 3)]))
    res = linalg.top_eigenpairs(lambda v: A @ v, jnp.zeros(N), 6, key=jax.random.key(0), tol=1e-10)
    np.testing.assert_allclose(res.values[:3], [4.0, 3.0, 2.0], rtol=1e-12)
    assert res.found.tolist() == [True] * 3 + [False] * 3
    assert res.converged.tolist() == [True] * 3 + [False] * 3
    assert np.all(np.asarray(res.values[3:]) == 0) and np.all(np.asarray(res.vectors[3:]) == 0)
    assert np.all(np.isfinite(np.asarray(res.vectors)))
    # 4-dim Krylov space, one restart, one null probe; + one certifying matvec per found pair
    assert res.num_matvecs <= 8 + 3


@pytest.mark.parametrize("k", [8, 11, 12])
def test_a_multiple_eigenvalue_filling_most_of_the_space_is_found_in_full(k):
    """The identity (one eigenvalue, n-fold): every Lanczos step breaks down and restarts;
    the k requested pairs are all found once most of R^n is spanned (a restart that kept
    less than half a random vector used to end the run at 7 of 8 pairs, with a shape error)."""
    n = 12
    res = linalg.top_eigenpairs(lambda v: v, jnp.zeros(n, jnp.float32), k, key=jax.random.key(k))
    assert bool(np.all(np.asarray(res.found))) and bool(np.all(np.asarray(res.converged)))
    np.testing.assert_allclose(res.values, np.ones(k), rtol=1e-6)
    V = np.asarray(res.vectors, np.float64)
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=1e-6)  # k orthonormal eigenvectors


def test_zero_operator_returns_all_flagged():
    res = linalg.top_eigenpairs(lambda v: 0 * v, jnp.zeros(50), 3, key=jax.random.key(0))
    assert not np.any(np.asarray(res.found))
    assert np.all(np.asarray(res.values) == 0) and np.all(np.isfinite(np.asarray(res.vectors)))


def test_lanczos_identities():
    """``A Qᵀ = Qᵀ T + β q eₘᵀ``, ``QQᵀ = I``; a full-depth run reconstructs ``A``."""
    A = _operator(np.linspace(1.0, 10.0, 200), seed=3)
    Aj = jnp.asarray(A)
    q0 = _random_unit(jax.random.key(0), 200, jnp.float64)
    for steps in (25, 200):
        b = run_lanczos(lambda v: Aj @ v, q0, steps, stop=lambda *_: False, restart_key=None)
        Q = np.asarray(b.Q)  # (m, n) rows
        T = tridiagonal(b.alphas, b.betas)
        m = Q.shape[0]
        assert m == steps
        np.testing.assert_allclose(Q @ Q.T, np.eye(m), atol=1e-12)
        R = A @ Q.T - Q.T @ T  # only the last column is non-zero: β q_{m+1}
        np.testing.assert_allclose(R[:, :-1], 0, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(R[:, -1]), b.last_beta, rtol=1e-8, atol=1e-12)
        assert np.linalg.norm(Q @ R[:, -1]) < 1e-12
    np.testing.assert_allclose(Q.T @ T @ Q, A, atol=1e-11)


def test_lanczos_basis_is_the_stored_krylov_basis_of_a_pytree_operator():
    """The public basis: orthonormal rows spanning ``K_m(A, q₀)``, in blocks of 8 rows,
    ``Q A Qᵀ`` tridiagonal (dense twin), the same for a flat and a pytree ``like``."""
    A = _operator(np.linspace(1.0, 10.0, 60), seed=5)
    Aj = jnp.asarray(A)
    like = {"a": jnp.zeros((4, 5)), "b": jnp.zeros(40)}
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    tree_op = lambda v: unravel(Aj @ jax.flatten_util.ravel_pytree(v)[0])  # noqa: E731
    for op, start in ((lambda v: Aj @ v, flat), (tree_op, like)):
        blocks = linalg.lanczos_basis(op, start, 13, key=jax.random.key(2))
        assert [b.shape[0] for b in blocks] == [8, 8]  # 13 rows stored in two blocks
        Q = np.concatenate([np.asarray(b) for b in blocks])[:13]
        np.testing.assert_allclose(Q @ Q.T, np.eye(13), atol=1e-12)
        T = Q @ A @ Q.T
        np.testing.assert_allclose(np.triu(T, 2), 0, atol=1e-11)
        # K_13(A, q₀): A^j q₀ for j < 13 lies in the span of Q
        K = np.stack([np.linalg.matrix_power(A, j) @ Q[0] for j in range(13)], axis=1)
        K /= np.linalg.norm(K, axis=0)
        np.testing.assert_allclose(Q.T @ (Q @ K), K, atol=1e-9)
    with pytest.raises(ValueError, match="steps"):
        linalg.lanczos_basis(lambda v: Aj @ v, flat, 0, key=jax.random.key(2))


def test_pytree_like_and_which_magnitude(mlp64):
    """On a pytree Hessian (indefinite), against eigh of the dense Hessian."""
    H = np.asarray(mlp64.dense_hessian)
    hvp = jax.jit(cv.hessian_vp(mlp64.loss))
    evals = np.linalg.eigvalsh(H)
    for which, ref in (
        ("largest", np.sort(evals)[::-1][:4]),
        ("magnitude", evals[np.argsort(-np.abs(evals))][:4]),
    ):
        res = linalg.top_eigenpairs(
            lambda v: hvp(mlp64.params, v, mlp64.batch),
            mlp64.params,
            4,
            key=jax.random.key(2),
            tol=1e-10,
            which=which,
        )
        np.testing.assert_allclose(res.values, ref, rtol=1e-8, atol=1e-12)
        leaves = jax.tree_util.tree_leaves(res.vectors)
        assert all(leaf.shape[0] == 4 for leaf in leaves)
        flat = jax.vmap(lambda t: cv.ravel(t)[0])(res.vectors)
        np.testing.assert_allclose(_true_residuals(H, res.values, flat), res.residuals, atol=1e-10)


def test_float32_keeps_float32_and_reaches_its_accuracy():
    A = _operator(SPECTRA["decaying"])
    A32 = jnp.asarray(A, jnp.float32)
    res = linalg.top_eigenpairs(
        jax.jit(lambda v: A32 @ v), jnp.zeros(N, jnp.float32), 5, key=jax.random.key(0), tol=1e-5
    )
    assert res.values.dtype == jnp.float32 and res.vectors.dtype == jnp.float32
    assert res.residuals.dtype == jnp.float32
    np.testing.assert_allclose(res.values, np.sort(SPECTRA["decaying"])[::-1][:5], rtol=1e-5)


def test_deterministic_under_a_fixed_key():
    A = jnp.asarray(_operator(SPECTRA["clustered"]))
    run = lambda: linalg.top_eigenpairs(lambda v: A @ v, jnp.zeros(N), 3, key=jax.random.key(5))  # noqa: E731
    a, b = run(), run()
    assert np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert a.num_matvecs == b.num_matvecs


def test_budget_exhaustion_is_reported():
    A = jnp.asarray(_operator(SPECTRA["clustered"]))
    with pytest.warns(RuntimeWarning, match="did not reach tol") as record:
        res = linalg.top_eigenpairs(
            lambda v: A @ v, jnp.zeros(N), 8, key=jax.random.key(0), tol=1e-12, max_matvecs=12
        )
    assert {w.filename for w in record} == {__file__}  # the caller's line
    # 12 Lanczos steps, then one certifying matvec per returned pair
    assert res.num_matvecs == 12 + 8 and not np.all(np.asarray(res.converged))
    assert np.all(np.isfinite(np.asarray(res.values)))


def test_loose_tolerance_uses_few_matvecs():
    """Stopping is on residuals, not a fixed depth: looser tol, fewer matvecs."""
    A = jnp.asarray(_operator(SPECTRA["decaying"]))
    counts = [
        linalg.top_eigenpairs(
            lambda v: A @ v, jnp.zeros(N), 4, key=jax.random.key(0), tol=t
        ).num_matvecs
        for t in (1e-2, 1e-6, 1e-10)
    ]
    assert counts[0] < counts[1] < counts[2] < N


class TestBadInput:
    A = jnp.asarray(_operator(SPECTRA["decaying"][:20]))

    def mv(self, v):
        return self.A @ v

    def test_k_larger_than_dimension(self):
        with pytest.raises(ValueError, match="k=21 exceeds the operator dimension n=20"):
            linalg.top_eigenpairs(self.mv, jnp.zeros(20), 21, key=jax.random.key(0))

    @pytest.mark.parametrize("k", [0, -1, 2.5, True])
    def test_k_not_a_positive_int(self, k):
        with pytest.raises(ValueError, match="k must be an integer"):
            linalg.top_eigenpairs(self.mv, jnp.zeros(20), k, key=jax.random.key(0))

    def test_non_finite_matvec(self):
        with pytest.raises(ValueError, match="matvec returned non-finite"):
            linalg.top_eigenpairs(lambda v: v / 0.0, jnp.ones(20), 2, key=jax.random.key(0))

    def test_non_symmetric_operator(self):
        B = self.A + jnp.triu(jnp.ones((20, 20)), 1)
        with pytest.raises(ValueError, match="matvec is not symmetric"):
            linalg.top_eigenpairs(lambda v: B @ v, jnp.zeros(20), 2, key=jax.random.key(0))

    def test_mismatched_pytree(self):
        like = {"a": jnp.zeros(10), "b": jnp.zeros(10)}
        with pytest.raises(ValueError, match="matvec must return a vector like its input"):
            linalg.top_eigenpairs(lambda t: [t["a"], t["b"]], like, 2, key=jax.random.key(0))

    def test_wrong_dtypes(self):
        with pytest.raises(ValueError, match="like must hold floating-point"):
            linalg.top_eigenpairs(self.mv, jnp.zeros(20, jnp.int32), 2, key=jax.random.key(0))
        with pytest.raises(ValueError, match="matvec must return a vector like its input"):
            linalg.top_eigenpairs(
                lambda v: (self.A @ v).astype(jnp.float32), jnp.zeros(20), 2, key=jax.random.key(0)
            )

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="tol must be"):
            linalg.top_eigenpairs(self.mv, jnp.zeros(20), 2, key=jax.random.key(0), tol=-1.0)
        with pytest.raises(ValueError, match=r"key must be a jax\.random key"):
            linalg.top_eigenpairs(self.mv, jnp.zeros(20), 2, key=0)
        with pytest.raises(ValueError, match="like must be a 1-D array"):
            linalg.top_eigenpairs(self.mv, jnp.zeros((4, 5)), 2, key=jax.random.key(0))
        with pytest.raises(ValueError, match="which must be"):
            linalg.top_eigenpairs(
                self.mv, jnp.zeros(20), 2, key=jax.random.key(0), which="smallest"
            )


def test_slq_density_integrates_to_one_and_matches_dense_histogram():
    rng = np.random.default_rng(0)
    n = 400
    spectrum = np.r_[rng.gamma(2.0, 0.5, n - 10), rng.uniform(8, 12, 10)]
    A = jnp.asarray(_operator(spectrum, seed=1))
    sd = linalg.spectral_density(
        lambda v: A @ v, jnp.zeros(n), key=jax.random.key(0), num_probes=64, num_steps=60
    )
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    grid = np.linspace(-3, 16, 2000)
    sigma = 0.3
    est = linalg.density_on_grid(sd, grid, sigma=sigma)
    assert abs(np.trapezoid(est, grid) - 1.0) < 1e-6
    exact = linalg.density_on_grid(
        linalg.SpectralDensity(spectrum[None], np.full((1, n), 1.0 / n)), grid, sigma=sigma
    )
    l1 = np.trapezoid(np.abs(est - exact), grid)
    assert l1 < 0.1, l1
    # histogram mass in the outlier bulk [7, 13] within 1 % of the exact 10/400
    band = (grid > 7) & (grid < 13)
    assert abs(np.trapezoid(est[band], grid[band]) - 10 / n) < 0.01


def test_slq_on_rank_deficient_operator_has_no_nan():
    A = jnp.asarray(_operator(np.r_[[3.0, 1.0], np.zeros(38)]))
    sd = linalg.spectral_density(
        lambda v: A @ v, jnp.zeros(40), key=jax.random.key(0), num_probes=4, num_steps=30
    )
    assert np.all(np.isfinite(sd.nodes)) and np.all(np.isfinite(sd.weights))
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    # the quadrature is exact: mean of zᵀAz equals tr(A)/n
    np.testing.assert_allclose(np.mean(np.sum(sd.weights * sd.nodes, axis=1)), 4.0 / 40, rtol=0.5)


def test_gram_route_matches_dense_empirical_fisher(mlp64):
    per_example = jax.jit(cv.per_example_gradients(mlp64.example_loss))(mlp64.params, mlp64.batch)
    G = np.asarray(jax.vmap(lambda t: cv.ravel(t)[0])(per_example))
    m, n = G.shape
    F = G.T @ G / m
    evals, evecs = np.linalg.eigh(F)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    k = m + 3  # more than the rank: the tail is zero-filled
    res = linalg.empirical_fisher_eigenpairs(per_example, k)
    rank = int(np.sum(evals > 1e-12 * evals[0]))
    np.testing.assert_allclose(res.values[:rank], evals[:rank], rtol=1e-10, atol=1e-14)
    assert res.found.tolist() == [True] * rank + [False] * (k - rank)
    flat = np.asarray(jax.vmap(lambda t: cv.ravel(t)[0])(res.vectors))
    for i in range(min(rank, 5)):
        assert abs(abs(flat[i] @ evecs[:, i]) - 1) < 1e-8
    np.testing.assert_allclose(_true_residuals(F, res.values, flat), res.residuals, atol=1e-12)
    # array input gives (k, n) vectors and agrees with Lanczos on the matrix-free operator
    res_arr = linalg.empirical_fisher_eigenpairs(jnp.asarray(G), 3)
    assert res_arr.vectors.shape == (3, n)
    efvp = jax.jit(cv.empirical_fisher_vp(mlp64.example_loss))
    lz = linalg.top_eigenpairs(
        lambda v: efvp(mlp64.params, v, mlp64.batch),
        mlp64.params,
        3,
        key=jax.random.key(0),
        tol=1e-10,
    )
    assert rel_err(lz.values, res_arr.values) < 1e-9
    with pytest.raises(ValueError, match="k=1000 exceeds"):
        linalg.empirical_fisher_eigenpairs(jnp.asarray(G), 1000)


def test_no_warning_when_converged():
    A = jnp.asarray(_operator(SPECTRA["decaying"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linalg.top_eigenpairs(lambda v: A @ v, jnp.zeros(N), 3, key=jax.random.key(0))


def test_float32_residuals_are_the_true_ones():
    """Reported residuals are ‖Av − λv‖ recomputed in float64, not Lanczos estimates."""
    A32 = jnp.asarray(_operator(SPECTRA["decaying"], seed=7), jnp.float32)
    A64 = np.asarray(A32, np.float64)
    tol = 1e-5
    res = linalg.top_eigenpairs(
        jax.jit(lambda v: A32 @ v), jnp.zeros(N, jnp.float32), 4, key=jax.random.key(2), tol=tol
    )
    lam1 = float(res.values[0])
    true64 = _true_residuals(A64, np.asarray(res.values, np.float64), res.vectors)
    eps = float(jnp.finfo(jnp.float32).eps)
    # float32 rounding of the certifying matvec is a few eps·λ₁
    np.testing.assert_allclose(np.asarray(res.residuals, np.float64), true64, atol=8 * eps * lam1)
    assert bool(np.all(res.converged))
    assert np.all(true64 <= tol * lam1 + 8 * eps * lam1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_tol_below_dtype_floor_is_refused(dtype):
    A = jnp.asarray(_operator(SPECTRA["decaying"]), dtype)
    floor = linalg.min_certifiable_tol(dtype)
    with pytest.raises(ValueError, match=r"tol=.*below what"):
        linalg.top_eigenpairs(
            lambda v: A @ v, jnp.zeros(N, dtype), 3, key=jax.random.key(0), tol=floor / 2
        )


@pytest.mark.parametrize(
    ("dtype", "scale", "rtol"),
    [
        (jnp.float32, 1e-19, 1e-5),
        (jnp.float32, 1e19, 1e-5),
        (jnp.float64, 1e-300, 1e-10),
        (jnp.float64, 1e300, 1e-10),
    ],
)
def test_scaled_operator_gives_scaled_eigenvalues(dtype, scale, rtol):
    """An operator scaled by 1e±19 (float32) or 1e±300 (float64): same relative spectrum."""
    spectrum = SPECTRA["clustered"]
    A = jnp.asarray(_operator(spectrum, seed=4), dtype)
    tol = max(1e-6, linalg.min_certifiable_tol(dtype))

    def run(s):
        As = A * jnp.asarray(s, dtype)
        return linalg.top_eigenpairs(
            lambda v: As @ v, jnp.zeros(N, dtype), 3, key=jax.random.key(3), tol=tol
        )

    base, scaled = run(1.0), run(scale)
    assert bool(np.all(scaled.converged))
    np.testing.assert_allclose(
        np.asarray(scaled.values, np.float64) / scale,
        np.asarray(base.values, np.float64),
        rtol=rtol,
    )
    np.testing.assert_allclose(
        np.asarray(base.values, np.float64), np.sort(spectrum)[::-1][:3], rtol=10 * tol
    )


@pytest.mark.parametrize("num_steps", [4, 6])
def test_slq_quadrature_is_exact_per_probe_up_to_degree_2m_minus_1(num_steps):
    """Gauss quadrature from ``m`` Lanczos steps integrates degree < 2m exactly (per probe).

    For the probe ``z`` that ``spectral_density`` draws (Rademacher from
    ``fold_in(key, p)``), ``Σ_j w_pj θ_pj^k = zᵀAᵏz / zᵀz`` for ``k < 2m``; at
    ``k = 2m`` the rule is no longer exact, so the identity is not a tautology.
    """
    n, key = 48, jax.random.key(7)
    spectrum = np.linspace(0.3, 1.6, n)  # ‖A‖ < 2: the moments A^k stay O(1)
    A = symmetric_with_spectrum(spectrum, seed=4)
    sd = linalg.spectral_density(
        lambda v: jnp.asarray(A) @ v, jnp.zeros(n), key=key, num_probes=5, num_steps=num_steps
    )
    m = num_steps
    for p in range(5):
        z = np.asarray(jax.random.rademacher(jax.random.fold_in(key, p), (n,), jnp.float64))
        moments = [z @ np.linalg.matrix_power(A, k) @ z / (z @ z) for k in range(2 * m + 1)]
        quad = [np.sum(sd.weights[p] * sd.nodes[p] ** k) for k in range(2 * m + 1)]
        for k in range(2 * m):  # k = 0 … 2m−1, degrees up to 7 (m = 4) and 11 (m = 6)
            assert abs(quad[k] - moments[k]) <= 1e-12 * moments[k], (p, k, quad[k], moments[k])
        assert abs(quad[2 * m] - moments[2 * m]) > 1e-9 * moments[2 * m], (p, quad[2 * m])


def test_slq_is_scale_invariant_in_float32():
    """``1e-30·A`` in float32: nodes ``1e-30·θ`` and the same weights as ``A`` (the top
    node was off by 45 %: the recurrence's squares underflowed), the top node at eigh's."""
    spectrum = np.linspace(1.0, 10.0, 200)
    A = jnp.asarray(symmetric_with_spectrum(spectrum, seed=0), jnp.float32)

    def run(s):
        As = A * jnp.float32(s)
        return linalg.spectral_density(
            lambda v: As @ v,
            jnp.zeros(200, jnp.float32),
            key=jax.random.key(0),
            num_probes=4,
            num_steps=40,
        )

    base, scaled = run(1.0), run(1e-30)
    eps = float(jnp.finfo(jnp.float32).eps)
    top = float(np.max(base.nodes))
    assert np.max(np.abs(scaled.nodes / 1e-30 - base.nodes)) <= 100 * eps * top
    assert np.max(np.abs(scaled.weights - base.weights)) <= 1e-4
    np.testing.assert_allclose(np.max(scaled.nodes, axis=1) / 1e-30, spectrum[-1], rtol=1e-4)


def test_gram_route_decides_converged_on_true_residuals():
    """float32 ``G`` (m = 10, n = 3000) with eigenvalues down to 1.3e-5·s₁: a pair found
    by the Gram route can miss ``100·eps·s₁``; ``converged`` says so (it was ``found``)."""
    m, n = 10, 3000
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    W, _ = np.linalg.qr(rng.standard_normal((n, m)))
    G = jnp.asarray((U * np.sqrt(m * np.logspace(0, -4.9, m))) @ W.T, jnp.float32)
    pairs = linalg.empirical_fisher_eigenpairs(G, m)
    G64 = np.asarray(G, np.float64)
    V = np.asarray(pairs.vectors, np.float64)
    lam = np.asarray(pairs.values, np.float64)
    true = np.linalg.norm(((V @ G64.T) @ G64) / m - lam[:, None] * V, axis=1)
    found, conv = np.asarray(pairs.found), np.asarray(pairs.converged)
    eps = float(jnp.finfo(jnp.float32).eps)
    tol = linalg.default_tol(jnp.float32) * lam[0]
    # the float32 product F v rounds at a few eps·s₁; the rest is float64
    reported = np.asarray(pairs.residuals, np.float64)
    np.testing.assert_allclose(reported, true, atol=2 * eps * lam[0])
    assert np.all(conv == (found & (reported <= tol)))
    assert np.all(true[conv] <= tol + 2 * eps * lam[0])
    assert np.any(found & ~conv) and np.any(true[found & ~conv] > tol)  # not vacuous


def test_host_and_traced_solvers_share_one_contract():
    """Same default tolerance (``100·eps``), the same rule and the same result type: the
    host driver's default was 1e-6, so a float64 run stopped at residuals ~1e-7·‖A‖."""
    A = _operator(SPECTRA["decaying"])
    Aj = jnp.asarray(A)
    host = linalg.top_eigenpairs(lambda v: Aj @ v, jnp.zeros(N), 4, key=jax.random.key(0))
    traced = jax.jit(
        lambda A: linalg.top_eigenpairs_traced(
            lambda v: A @ v, jnp.ones(N), 4, key=jax.random.key(0), max_steps=120
        )
    )(Aj)
    assert type(host) is type(traced) is linalg.Eigenpairs
    norm = np.max(np.abs(np.linalg.eigvalsh(A)))
    tol = linalg.default_tol(jnp.float64)
    for pairs in (host, traced):
        true = _true_residuals(A, pairs.values, pairs.vectors)
        np.testing.assert_allclose(pairs.residuals, true, atol=1e-14 * norm)
        assert bool(pairs.certified) and np.all(true <= tol * norm)
    np.testing.assert_allclose(traced.values, host.values, rtol=1e-12)


def test_traced_float32_residuals_are_the_true_ones():
    """float32 traced pairs report ``‖Av − λv‖`` from one more matvec each, not the Lanczos
    estimate ``|β_m s_{m,i}|``, which falls below what float32 represents."""
    A32 = jnp.asarray(_operator(SPECTRA["decaying"], seed=7), jnp.float32)
    A64 = np.asarray(A32, np.float64)
    res = jax.jit(
        lambda A: linalg.top_eigenpairs_traced(
            lambda v: A @ v, jnp.ones(N, jnp.float32), 4, key=jax.random.key(2), max_steps=120
        )
    )(A32)
    true = _true_residuals(A64, np.asarray(res.values, np.float64), res.vectors)
    lam1 = float(np.max(np.abs(res.values)))
    eps = float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(np.asarray(res.residuals, np.float64), true, atol=eps * lam1 / 4)
    assert res.num_matvecs > 4  # the run, plus one certifying matvec per pair
