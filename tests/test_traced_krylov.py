"""Traced (jit-compiled) Lanczos, Krylov exact flow and Krylov landscape summary vs dense twins."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import flow, landscapes, linalg
from tests.conftest import eigensolver_spectra, rel_err, symmetric_with_spectrum

N = 200
SPECTRA = {
    name: spectrum
    for name, spectrum in eigensolver_spectra(N).items()
    if name != "repeated"  # exact repeats: test_repeated_eigenvalues_found_whole_through_restarts
}
_operator = symmetric_with_spectrum


@jax.jit
def _top(A, key):
    k_start, k_restart = jax.random.split(key)
    v0 = jax.random.normal(k_start, (A.shape[0],), A.dtype)
    return linalg.top_eigenpairs_traced(lambda v: A @ v, v0, 6, key=k_restart)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_top_eigenpairs_traced_match_eigh(name):
    A = _operator(SPECTRA[name])
    evals, evecs = np.linalg.eigh(A)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    res = _top(jnp.asarray(A), jax.random.key(1))
    assert bool(res.certified)
    np.testing.assert_allclose(res.values, evals[:6], atol=1e-13 * evals[0])
    V = np.asarray(res.vectors)
    np.testing.assert_allclose(V @ V.T, np.eye(6), atol=1e-12)
    true = np.linalg.norm(V @ A - np.asarray(res.values)[:, None] * V, axis=1)
    assert np.all(true <= 1e-13 * evals[0])
    # clustered pairs (gaps 1e-4) compared as the projector onto each cluster
    for members in ([0, 1, 2, 3], [4, 5]) if name == "clustered" else ([i] for i in range(6)):
        cut = members[-1] + 1
        if name == "clustered" and cut == 6:  # the 6-cluster is cut by k: span containment
            ref = evecs[:, 4:8]
            assert np.linalg.norm(V[4:6].T - ref @ (ref.T @ V[4:6].T)) < 1e-10
            continue
        P_ours = V[members].T @ V[members]
        P_ref = evecs[:, members] @ evecs[:, members].T
        assert np.linalg.norm(P_ours - P_ref) < 1e-9


def test_repeated_eigenvalues_found_whole_through_restarts():
    # Single-vector Krylov sees one copy of a repeated eigenvalue per invariant
    # subspace; the restarts after each breakdown find the others.
    A = _operator(np.r_[[5.0] * 3, [2.0] * 3, [0.5] * 6])
    res = jax.jit(
        lambda A: linalg.top_eigenpairs_traced(
            lambda v: A @ v, jnp.ones(12), 6, key=jax.random.key(0), max_steps=12
        )
    )(jnp.asarray(A))
    np.testing.assert_allclose(res.values, [5.0] * 3 + [2.0] * 3, atol=1e-13)
    assert bool(res.certified)


def test_lanczos_identities_and_early_stop():
    A = jnp.asarray(_operator(SPECTRA["clustered"]))
    v0 = jax.random.normal(jax.random.key(2), (N,))
    run = jax.jit(
        lambda A, v0: linalg.lanczos(lambda v: A @ v, v0, 40, lambda r: r.num_steps >= 24)
    )(A, v0)
    m = int(run.num_steps)
    assert m == 24  # stops at the first check (every 8 steps) where `stop` holds
    Q = np.asarray(run.basis[:m])
    T = np.diag(run.alpha[:m]) + np.diag(run.beta[: m - 1], 1) + np.diag(run.beta[: m - 1], -1)
    np.testing.assert_allclose(Q @ Q.T, np.eye(m), atol=1e-13)
    residual = np.outer(np.asarray(run.basis[m]), np.eye(m)[-1]) * float(run.beta[m - 1])
    np.testing.assert_allclose(np.asarray(A) @ Q.T, Q.T @ T + residual, atol=1e-12)
    # the padded Ritz decomposition carries exactly T's eigenpairs
    r = linalg.ritz(run)
    assert int(r.valid.sum()) == m
    np.testing.assert_allclose(np.asarray(r.values)[np.asarray(r.valid)], np.linalg.eigvalsh(T))
    S = np.asarray(r.vectors)[:m][:, np.asarray(r.valid)]
    np.testing.assert_allclose(S.T @ T @ S, np.diag(np.linalg.eigvalsh(T)), atol=1e-12)


@functools.partial(jax.jit, static_argnames="max_steps")
def _krylov_flow(A, c, ts, max_steps=None):
    """One compile per shape, shared by the tests below."""
    return flow.krylov_quadratic_flow(lambda v: A @ v, c, ts, max_steps=max_steps)


def _quadratic(seed, n=120, shift=0.0, rank=None):
    rng = np.random.default_rng(seed)
    spectrum = rng.uniform(0.0, 4.0, n) - shift
    if rank is not None:
        spectrum[rank:] = 0.0
    return _operator(spectrum, seed), rng.standard_normal(n)


@pytest.mark.parametrize(
    "shift, rank", [(0.0, None), (1.5, None), (0.0, 30)], ids=["psd", "indefinite", "singular"]
)
def test_krylov_flow_matches_eigh_flow(shift, rank):
    A, c = _quadratic(3, shift=shift, rank=rank)
    ts = jnp.logspace(-8, 0, 33)
    ref = flow.quadratic_flow(jnp.asarray(A), jnp.asarray(c), ts)
    out = _krylov_flow(jnp.asarray(A), jnp.asarray(c), ts)
    assert bool(out.converged) and int(out.num_matvecs) < 40
    err = np.linalg.norm(np.asarray(out.x - ref), axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < 1e-13
    # With c along e₀, x(t)'s other coordinates are its t² part (docs/theory.md §4, the part in
    # M when Pc = 0): resolved to full relative accuracy at small t, no cancellation.
    c0 = jnp.zeros(A.shape[0]).at[0].set(np.linalg.norm(c))
    ref = np.asarray(flow.quadratic_flow(jnp.asarray(A), c0, ts))[:, 1:]
    ours = _krylov_flow(jnp.asarray(A), c0, ts).x[:, 1:]
    perp_err = np.linalg.norm(np.asarray(ours) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert perp_err.max() < 1e-12


def test_krylov_flow_exhausted_space_is_exact_and_zero_c_is_zero():
    A = np.diag(np.linspace(-1.0, 3.0, 50))
    c = np.zeros(50)
    c[[3, 17, 40]] = [1.0, -2.0, 0.5]  # K(A, c) has dimension 3, exactly
    ts = jnp.logspace(-3, 1, 9)
    out = _krylov_flow(jnp.asarray(A), jnp.asarray(c), ts)
    assert int(out.num_matvecs) == 3 and bool(out.converged)
    assert np.all(np.asarray(out.error) == 0.0)
    assert rel_err(out.x, flow.quadratic_flow(jnp.asarray(A), jnp.asarray(c), ts)) < 1e-13
    zero = _krylov_flow(jnp.asarray(A), jnp.zeros(A.shape[0]), ts)
    assert np.all(np.asarray(zero.x) == 0.0) and bool(zero.converged)


def test_krylov_flow_capacity_reached_reports_an_honest_error():
    A, c = _quadratic(5)
    A = 25.0 * A  # t‖A‖ up to 100: 8 Krylov steps cannot resolve it
    ts = jnp.logspace(-3, 0, 13)
    out = _krylov_flow(jnp.asarray(A), jnp.asarray(c), ts, max_steps=8)
    assert not bool(out.converged) and int(out.num_matvecs) == 8
    assert np.all(np.isfinite(np.asarray(out.x)))
    ref = np.asarray(flow.quadratic_flow(jnp.asarray(A), jnp.asarray(c), ts))
    true = np.linalg.norm(np.asarray(out.x) - ref, axis=1) / np.linalg.norm(
        np.asarray(out.x), axis=1
    )
    est = np.asarray(out.error)
    assert true.max() > 1e-3  # genuinely unresolved
    # for A ⪰ 0 the estimate bounds the true error (up to time-grid sampling)
    assert np.all(true <= 1.05 * est + 1e-15)


def test_krylov_summary_matches_dense_summary():
    # lax.map only: vmapped LAPACK eigh inside a while_loop hangs on XLA:CPU
    # (see landscapes.map_landscapes); the vmapped route is for GPU.
    d, n = 3, 96
    rng = np.random.default_rng(0)
    members = [
        landscapes.make_quadratic_landscape(
            jax.random.key(i),
            n,
            d,
            top=[4.0, 2.5, 1.0],
            tail_mass=float(rng.uniform(0.0, 0.5)),
            epsilon=float(10 ** rng.uniform(-5, -2)),
            kappa=float(rng.uniform(0.1, 2.0)),
        )
        for i in range(4)
    ]
    A, c, F = (jnp.stack([getattr(m, f) for m in members]) for f in ("A", "c", "F"))
    keys = jax.random.split(jax.random.key(7), 4)
    ts = jnp.logspace(-5, 0, 21)

    def krylov(A, c, F, key):
        return landscapes.quadratic_summary_krylov(A, c, F, d, ts, key)

    mapped = jax.jit(lambda *a: landscapes.map_landscapes(krylov, *a, sequential=True))(
        A, c, F, keys
    )
    dense = landscapes.summarize_batch(A, c, F, d, ts, sequential=True)
    assert np.all(np.asarray(mapped.converged))
    for field in landscapes.QuadraticSummary._fields:
        ours, ref = getattr(mapped.summary, field), getattr(dense, field)
        np.testing.assert_allclose(ours, ref, rtol=1e-8, err_msg=field)
    # and each landscape's own validated AIC report
    for i, m in enumerate(members):
        report = m.aic(d)
        np.testing.assert_allclose(mapped.summary.coupling[i], report.coupling, rtol=1e-9)
        np.testing.assert_allclose(mapped.summary.orthogonality[i], report.orthogonality, rtol=1e-8)


def test_traced_solvers_reject_bad_sizes():
    with pytest.raises(ValueError, match="max_steps"):
        linalg.top_eigenpairs_traced(
            lambda v: v, jnp.ones(5), 3, key=jax.random.key(0), max_steps=8
        )
    with pytest.raises(ValueError, match="max_steps"):
        flow.krylov_quadratic_flow(lambda v: v, jnp.ones(5), jnp.ones(2), max_steps=6)
    with pytest.raises(ValueError, match="check_every"):
        linalg.lanczos(lambda v: v, jnp.ones(5), 4, lambda r: True, check_every=0)


@pytest.mark.parametrize("skew", [1e-2, 1.0])
def test_top_eigenpairs_traced_flags_a_non_symmetric_matvec(skew):
    """A non-symmetric matvec is reported unconverged (it was reported converged)."""
    A = _operator(SPECTRA["decaying"])
    rng = np.random.default_rng(0)
    B = rng.standard_normal((N, N))
    B = jnp.asarray(A + skew * (B - B.T) / np.linalg.norm(B - B.T, 2))
    res = _top(B, jax.random.key(1))
    assert not bool(res.certified)
    run = jax.jit(lambda M, v0: linalg.lanczos(lambda v: M @ v, v0, 30, lambda r: False))(
        B, jnp.ones(N)
    )
    assert not bool(linalg.is_symmetric_run(run))
    sym_run = jax.jit(lambda M, v0: linalg.lanczos(lambda v: M @ v, v0, 30, lambda r: False))(
        jnp.asarray(A), jnp.ones(N)
    )
    assert bool(linalg.is_symmetric_run(sym_run))
    assert float(sym_run.asymmetry) < 1e3 * np.finfo(np.float64).eps


def test_jitted_top_eigenpairs_traced_does_not_retrace_for_a_new_operator():
    """Under ``jit``, new matrix, start vector and key of the same shapes reuse the compile."""
    n, traces = 30, []

    @jax.jit
    def solve(A, v0, key):
        def matvec(v):
            traces.append(1)  # runs only while JAX traces the matvec
            return A @ v

        return linalg.top_eigenpairs_traced(matvec, v0, 3, key=key)

    results = []
    for seed in (0, 1):
        spectrum = np.r_[[5.0, 4.0, 3.0], np.linspace(1.0, 0.1, n - 3)] * (1 + seed)
        A = jnp.asarray(symmetric_with_spectrum(spectrum, seed=seed))
        v0 = jax.random.normal(jax.random.key(seed), (n,), jnp.float64)
        results.append((solve(A, v0, jax.random.key(10 + seed)), spectrum))
        if seed == 0:
            count = len(traces)
    assert count > 0 and len(traces) == count, (count, len(traces))
    assert solve._cache_size() == 1
    for out, spectrum in results:  # the reused compile solved the new operator
        assert bool(out.certified)
        np.testing.assert_allclose(out.values, spectrum[:3], rtol=1e-10)
