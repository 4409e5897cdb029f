"""Quadratic landscapes, exact flows and theory helpers against closed forms (docs/theory.md §4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from geomcollapse import flow, landscapes, theory

GEN = {
    "orthogonal": dict(top=[5.0, 3.0, 2.0], tail_mass=0.3, epsilon=0.0, coupling=0.7),
    "tilted": dict(top=[4.0, 1.5], tail_mass=0.05, epsilon=0.02, coupling=1.3),
    "kappa_zero": dict(top=[2.0, 2.0, 1.0], tail_mass=0.0, epsilon=0.0, kappa=0.0),
}


def _landscape(name, n=30, seed=0):
    cfg = GEN[name]
    return landscapes.make_quadratic_landscape(jax.random.key(seed), n, len(cfg["top"]), **cfg)


@pytest.mark.parametrize("name", sorted(GEN))
def test_generator_hits_its_targets(name):
    cfg = GEN[name]
    L = _landscape(name)
    r = L.aic(len(cfg["top"]))
    assert math.isclose(r.tail_mass, cfg["tail_mass"], rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(r.lambda_d, min(cfg["top"]), rel_tol=1e-10)
    assert math.isclose(r.orthogonality, cfg["epsilon"], rel_tol=1e-10, abs_tol=1e-12)
    if "coupling" in cfg:
        assert math.isclose(r.coupling, cfg["coupling"], rel_tol=1e-10)
        assert math.isclose(r.quartic_coefficient, cfg["coupling"] ** 2 / 8, rel_tol=1e-10)
    else:  # κ = 0 and ε = 0: no coupling at all (docs/theory.md §4)
        assert r.coupling < 1e-12


def test_aic_report_matches_dense_formulas():
    L = _landscape("tilted")
    d = 2
    A, c, F = (np.asarray(x) for x in (L.A, L.c, L.F))
    lam, V = np.linalg.eigh(F)
    lam, V = lam[::-1], V[:, ::-1]
    P = V[:, :d] @ V[:, :d].T
    F_half = (V * np.sqrt(np.maximum(lam, 0))) @ V.T
    r = L.aic(d)
    assert math.isclose(r.orthogonality, np.linalg.norm(P @ c), rel_tol=1e-12)
    assert math.isclose(r.fisher_orthogonality, np.linalg.norm(F_half @ P @ c), rel_tol=1e-10)
    assert math.isclose(r.coupling, np.linalg.norm(F_half @ P @ A @ c), rel_tol=1e-10)
    assert math.isclose(r.crossover_time, 2 * r.fisher_orthogonality / r.coupling, rel_tol=1e-12)
    cq = (np.eye(30) - P) @ c
    assert math.isclose(r.tail_crossover_time, 2 * np.sqrt(cq @ F @ cq) / r.coupling, rel_tol=1e-10)


def test_exact_flow_matches_matrix_exponential_and_ode():
    L = _landscape("tilted")
    A, c = np.asarray(L.A), np.asarray(L.c)
    ts = np.array([1e-3, 0.1, 1.0, 5.0])
    x = np.asarray(L.trajectory(ts))
    for t, xt in zip(ts, x, strict=True):
        ref = np.linalg.solve(A, (scipy.linalg.expm(-A * t) - np.eye(30)) @ c)
        np.testing.assert_allclose(xt, ref, rtol=1e-10, atol=1e-13)
    # ẋ = −(Ax + c), by forward-mode differentiation in t
    for t in ts:
        xdot = jax.jvp(
            lambda s: flow.quadratic_flow(L.A, L.c, s[None])[0], (jnp.array(t),), (1.0,)
        )[1]
        np.testing.assert_allclose(
            xdot,
            -(A @ flow.quadratic_flow(L.A, L.c, jnp.array([t]))[0] + c),
            rtol=1e-10,
            atol=1e-12,
        )


def test_exact_flow_matches_its_taylor_series_and_singular_a():
    L = _landscape("orthogonal")
    A, c = np.asarray(L.A), np.asarray(L.c)
    t = 0.3 / np.linalg.norm(A, 2)
    series, term = np.zeros_like(c), c.copy()
    for k in range(1, 30):  # x(t) = Σ_k (−1)^k A^{k−1} c t^k / k!
        series += (-1) ** k * term * t**k / math.factorial(k)
        term = A @ term
    np.testing.assert_allclose(np.asarray(L.trajectory([t]))[0], series, rtol=1e-12, atol=1e-15)
    # singular A: the null direction moves as −t c, with no division by zero
    As = np.diag([0.0, 1.0, 2.0])
    cs = np.array([1.0, 1.0, 1.0])
    x = np.asarray(flow.quadratic_flow(jnp.asarray(As), jnp.asarray(cs), jnp.array([0.0, 2.0])))
    np.testing.assert_allclose(x[0], 0.0, atol=0)
    np.testing.assert_allclose(x[1], [-2.0, np.expm1(-2.0), np.expm1(-4.0) / 2], rtol=1e-14)


@pytest.mark.parametrize("name", ["orthogonal", "tilted"])
def test_series_coefficients_equal_the_flow(name):
    """Theorem as identity: (exact − c2t² − c3t³ − c4t⁴)/t⁵ stays bounded as t → 0."""
    L = _landscape(name)
    d = L.d
    S = L.subspace(d).fisher_half_rows  # F^{1/2}P as (d, n)
    co = theory.series_coefficients(np.asarray(L.A), np.asarray(L.c), np.asarray(S))
    r = L.aic(d)
    assert math.isclose(co.c2, 0.5 * r.fisher_orthogonality**2, rel_tol=1e-10, abs_tol=1e-30)
    if r.orthogonality < 1e-12:
        assert math.isclose(co.c4, r.quartic_coefficient, rel_tol=1e-10)
    ts = np.array([1e-3, 2e-3, 4e-3])
    exact = np.asarray(L.projected_loss(ts))
    series = co.c2 * ts**2 + co.c3 * ts**3 + co.c4 * ts**4
    scaled = (exact - series) / ts**5
    assert np.all(
        np.abs(scaled) < 10 * np.linalg.norm(np.asarray(L.A), 2) ** 2 * max(co.c4, co.c2, 1e-3)
    )
    assert np.ptp(scaled) < 0.1 * np.max(np.abs(scaled)) + 1e-6  # converging to the t⁵ coefficient


def test_exponent_fit_recovers_4_and_2():
    ts = np.logspace(-4, 1, 200)
    L = _landscape("orthogonal")
    r = L.aic(L.d)
    w = theory.onset_window(r, float(np.linalg.norm(np.asarray(L.A), 2)), t_min=1e-4)
    fit4 = theory.fit_exponent(ts, np.asarray(L.projected_loss(ts)), w)
    assert abs(fit4.exponent - 4) < 0.01
    assert (
        abs(fit4.prefactor / r.quartic_coefficient - 1) < 0.05
    )  # O(t⁵) bends the top of the window
    ratio = np.asarray(L.projected_loss(ts[:5])) / (r.quartic_coefficient * ts[:5] ** 4)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-3)
    T = _landscape("tilted")
    rt = T.aic(T.d)
    w2 = theory.onset_window(
        rt, float(np.linalg.norm(np.asarray(T.A), 2)), t_min=1e-7, regime="quadratic"
    )
    ts2 = np.logspace(-7, 0, 200)
    fit2 = theory.fit_exponent(ts2, np.asarray(T.projected_loss(ts2)), w2)
    assert abs(fit2.exponent - 2) < 0.01
    # a window that cannot hold (t_min past the radius) is said, at this line
    norm = float(np.linalg.norm(np.asarray(L.A), 2))
    with pytest.warns(RuntimeWarning, match="quartic window is empty") as record:
        lo, hi = theory.onset_window(r, norm, t_min=1.0 / norm)
    assert lo > hi and [w.filename for w in record] == [__file__]


def test_local_slope_crosses_3_near_the_predicted_crossover():
    T = landscapes.make_quadratic_landscape(
        jax.random.key(4),
        30,
        2,
        top=[4.0, 2.0],
        tail_mass=0.0,
        epsilon=1e-3,
        coupling=2.0,
        curvature_scale=0.01,
    )
    r = T.aic(2)
    ts = np.logspace(-6, 1, 600)
    slope = theory.local_slope(ts, np.asarray(T.projected_loss(ts)))
    assert slope[0] == pytest.approx(2, abs=0.01)
    i = int(np.argmax(slope > 3))  # first grid point past slope 3; interpolate in log t
    frac = (3 - slope[i - 1]) / (slope[i] - slope[i - 1])
    t3 = np.exp(np.log(ts[i - 1]) + frac * (np.log(ts[i]) - np.log(ts[i - 1])))
    assert abs(t3 / r.crossover_time - 1) < 0.01


def test_gd_closed_form_matches_iteration_and_quartic_law():
    L = _landscape("orthogonal")
    A, c = np.asarray(L.A), np.asarray(L.c)
    eta, K = 0.05, 40
    x, xs = np.zeros_like(c), []
    for _ in range(K + 1):
        xs.append(x.copy())
        x = x - eta * (A @ x + c)
    ks = np.arange(K + 1)
    np.testing.assert_allclose(
        np.asarray(flow.quadratic_gd(L.A, L.c, eta, ks)), np.array(xs), rtol=1e-10, atol=1e-14
    )
    # past the stability edge (ηa ≥ 1) the closed form still equals the iteration
    big = 2.5 / np.linalg.norm(A, 2)
    x, xs = np.zeros_like(c), []
    for _ in range(6):
        xs.append(x.copy())
        x = x - big * (A @ x + c)
    np.testing.assert_allclose(
        np.asarray(flow.quadratic_gd(L.A, L.c, big, np.arange(6))),
        np.array(xs),
        rtol=1e-9,
        atol=1e-12,
    )
    r = L.aic(L.d)
    small_eta, kk = 1e-4, np.array([2.0, 5.0, 10.0])
    got = np.asarray(L.gd_projected_loss(small_eta, kk))
    np.testing.assert_allclose(
        got / theory.gd_projected_loss_approx(r.coupling, small_eta, kk), 1.0, rtol=1e-2
    )


def test_landscapes_vmap_without_recompiling():
    Ls = [_landscape("orthogonal", seed=s) for s in range(4)]
    batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *Ls)
    ts = jnp.logspace(-3, 0, 8)
    f = jax.jit(jax.vmap(lambda L: L.projected_loss(ts)))
    out = f(batch)
    for i, L in enumerate(Ls):
        np.testing.assert_allclose(out[i], L.projected_loss(ts), rtol=1e-12)
    f(batch)
    assert f._cache_size() == 1


class TestBadInput:
    def test_d_not_below_n(self):
        with pytest.raises(ValueError, match="d=30 must be smaller than n=30"):
            _landscape("orthogonal").aic(30)
        with pytest.raises(ValueError, match="d=5 must be smaller than n=5"):
            landscapes.make_quadratic_landscape(
                jax.random.key(0), 5, 5, top=[1.0] * 5, tail_mass=0, epsilon=0, kappa=1.0
            )

    def test_non_symmetric_or_negative(self):
        I = jnp.eye(4)
        with pytest.raises(ValueError, match="A is not symmetric"):
            landscapes.QuadraticLandscape(A=I.at[0, 1].set(1.0), c=jnp.ones(4), F=I)
        with pytest.raises(ValueError, match="F is not symmetric"):
            landscapes.QuadraticLandscape(A=I, c=jnp.ones(4), F=I.at[0, 1].set(1.0))
        with pytest.raises(ValueError, match="F has a negative eigenvalue"):
            landscapes.QuadraticLandscape(A=I, c=jnp.ones(4), F=I.at[0, 0].set(-0.1))
        with pytest.raises(ValueError, match="shapes disagree"):
            landscapes.QuadraticLandscape(A=I, c=jnp.ones(3), F=I)

    def test_generator_arguments(self):
        with pytest.raises(ValueError, match="exactly one of coupling"):
            landscapes.make_quadratic_landscape(
                jax.random.key(0), 10, 2, top=[2, 1], tail_mass=0, epsilon=0
            )
        with pytest.raises(ValueError, match="above λ_d"):
            landscapes.make_quadratic_landscape(
                jax.random.key(0), 10, 2, top=[2, 1], tail_mass=5, epsilon=0, kappa=1
            )

    def test_float32_exponent_fit_below_resolution(self):
        L32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), _landscape("orthogonal"))
        assert L32.d == 3 and L32.c.dtype == jnp.float32
        ts = np.logspace(-4, 1, 100).astype(np.float32)
        with pytest.raises(ValueError, match="rounding level"):
            theory.fit_exponent(ts, np.asarray(L32.projected_loss(ts)), (1e-4, 1e-2))


def test_jitted_quadratic_summary_does_not_recompile_for_a_new_landscape():
    ts = jnp.logspace(-3, 0, 6)
    summary = jax.jit(landscapes.quadratic_summary, static_argnums=3)
    outs = []
    for seed in (0, 1):
        L = _landscape("orthogonal", seed=seed)
        outs.append((summary(L.A, L.c, L.F, 3, ts), L))
    assert summary._cache_size() == 1
    for out, L in outs:  # the reused compile summarised each landscape, not the first
        np.testing.assert_allclose(out.projected_loss, L.projected_loss(ts, 3), rtol=1e-10)
        assert math.isclose(float(out.coupling), L.aic(3).coupling, rel_tol=1e-10)
    assert not np.allclose(outs[0][0].projected_loss, outs[1][0].projected_loss)


def test_first_crossing_is_exact_for_power_laws():
    """``a = αt⁴`` overtakes ``b = βt²`` at ``(β/α)^{1/2}``: log-log interpolation is exact."""
    ts = np.logspace(-4, 0, 9)  # coarse: the crossing falls between grid points
    for alpha, beta in ((1e6, 3.0), (2.5, 1e-3), (7.0, 0.2)):
        t_cross = np.sqrt(beta / alpha)
        got = theory.first_crossing(ts, alpha * ts**4, beta * ts**2)
        assert abs(got / t_cross - 1) < 1e-12, (alpha, beta)
    # not linear in t: a t⁴ against a t³ law, crossing at β/α
    got = theory.first_crossing(ts, 50.0 * ts**4, 2.0 * ts**3)
    assert abs(got / (2.0 / 50.0) - 1) < 1e-12
    assert np.isnan(theory.first_crossing(ts, ts**4, 1.0 + ts))  # never overtakes
    assert theory.first_crossing(ts, 2.0 + ts, 1.0 + ts) == ts[0]  # above from the start
