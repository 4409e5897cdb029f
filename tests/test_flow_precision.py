"""Flows at the rounding level: displacements, Δu and GD factors against exact references."""

from decimal import Decimal, localcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import flow, landscapes


def _gd_reference(a: float, eta: float, k: int) -> Decimal:
    """``((1 − ηa)^k − 1)/a`` with the floats ``a``, ``η`` taken exactly, to 90 digits."""
    with localcontext() as ctx:
        ctx.prec = 90
        base = 1 - Decimal(a) * Decimal(eta)
        return (base**k - 1) / Decimal(a)


def test_quadratic_gd_factor_has_full_relative_accuracy_for_every_step():
    """``ηa ∈ [1e-14, 1]`` and ``k`` up to 10⁶: ≤ 1e-13 relative to a 90-digit reference.

    A first-order branch for small ``ηa`` was off by ``(kηa)²/6``: 1.35e-5 at
    ``ηa = 9e-9``, ``k = 10⁶``.
    """
    eta = 0.1
    ea = np.concatenate([np.logspace(-14, 0, 29), [9e-9, 1.1e-8, 0.5, 0.999999, 1.0]])
    a = ea / eta
    ks = np.array([0, 1, 2, 3, 7, 50, 1000, 10**5, 10**6])
    # diagonal A: eigh returns a exactly, so the reference sees the same a
    got = np.asarray(flow.quadratic_gd(jnp.diag(jnp.asarray(a)), jnp.ones(a.size), eta, ks))
    worst = 0.0
    for j, aj in enumerate(a):
        for i, k in enumerate(ks):
            ref = _gd_reference(float(aj), eta, int(k))
            if ref == 0:
                assert got[i, j] == 0
                continue
            worst = max(worst, abs(float((Decimal(float(got[i, j])) - ref) / ref)))
    assert worst <= 1e-13, worst


def test_quadratic_gd_zero_mode_edge_and_past_the_edge_equal_the_iteration():
    eta = 0.1
    a = np.array([0.0, 10.0, 15.0, 20.0, 25.0, -3.0])  # ηa = 0, 1, 1.5, 2, 2.5, −0.3
    ks = np.arange(9)
    got = np.asarray(flow.quadratic_gd(jnp.diag(jnp.asarray(a)), jnp.ones(a.size), eta, ks))
    x, ref = np.zeros(a.size), []
    for _ in ks:
        ref.append(x.copy())
        x = x - eta * (a * x + 1.0)
    ref = np.array(ref)
    np.testing.assert_array_equal(got[0], 0.0)  # k = 0
    np.testing.assert_allclose(got[:, 0], -eta * ks, rtol=1e-15)  # a = 0: −ηk
    np.testing.assert_allclose(got[1:, 1], -eta, rtol=1e-15)  # ηa = 1: one step to −c/a
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("ea", [1e-14, 1e-10, 9e-9, 1e-4])
def test_quadratic_gd_small_steps_on_a_rotated_matrix(ea):
    """A non-diagonal ``A`` against the explicit sum ``−η Σ_{j<k} (I − ηA)^j c`` in longdouble."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    spec = np.array([1.0, 0.5, 0.25, 0.0, 2.0])
    A = (Q * spec) @ Q.T
    c = rng.standard_normal(5)
    eta = ea / 2.0
    K = 3000  # large enough that a first-order (kηa)² error would show at ηa = 9e-9
    got = np.asarray(flow.quadratic_gd(jnp.asarray(A), jnp.asarray(c), eta, np.arange(K + 1)))
    # per-mode factors summed in long double in the eigenbasis numpy finds
    lam, V = np.linalg.eigh(A)
    b = 1 - np.longdouble(eta) * lam.astype(np.longdouble)
    powers = np.cumprod(np.vstack([np.ones(5, np.longdouble), np.tile(b, (K, 1))]), axis=0)
    sums = np.cumsum(np.vstack([np.zeros(5, np.longdouble), powers[:-1]]), axis=0)
    ref = np.asarray((-np.longdouble(eta) * sums * (V.T @ c)) @ V.T, np.float64)
    err = np.linalg.norm(got[1:] - ref[1:], axis=1) / np.linalg.norm(ref[1:], axis=1)
    assert err.max() < 1e-13, err.max()


# --- displacements and Δu far from the origin -------------------------------------------


def _quadratic_problem():
    q = landscapes.make_quadratic_landscape(
        jax.random.key(0), 24, 3, top=(3.0, 2.0, 1.0), tail_mass=0.1, epsilon=0.0, kappa=3.0
    )
    direction = np.random.default_rng(1).uniform(-1, 1, q.n)
    return q, direction / np.abs(direction).max()


def _generic_loss(theta, star, A, c):
    """``½(θ−θ*)ᵀA(θ−θ*) + cᵀ(θ−θ*)`` written as a loss of ``θ`` (one object: one compile)."""
    x = theta - star
    return 0.5 * x @ A @ x + c @ x


def _generic_skill(theta, star, F, u0):
    x = theta - star
    return u0 + 0.5 * x @ F @ x


TIMES = jnp.array([1e-7, 1e-6, 1e-3, 1.0])


@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
def test_ode_flow_displacement_keeps_relative_accuracy_far_from_the_origin(scale):
    """``x(t)`` against ``quadratic_flow`` at ``|θ*|∞ = scale``.

    Returning ``θ`` and subtracting ``θ*`` again lost ``eps|θ*|/|x|``: 1.1e-6
    relative at ``t = 1e-7``, ``|θ*|∞ = 10³`` (2e-13 now).
    """
    q, direction = _quadratic_problem()
    star = jnp.asarray(scale * direction)
    out = flow.ode_flow(_generic_loss, star, TIMES, args=(star, q.A, q.c))
    exact = np.asarray(flow.quadratic_flow(q.A, q.c, TIMES))
    x = np.asarray(out.displacement)
    err = np.linalg.norm(x - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert err.max() <= 1e-11, err
    np.testing.assert_array_equal(out.theta, star[None] + out.displacement)


def test_loss_of_displacement_removes_the_rounding_of_theta_star():
    """With ``loss_fn(x)`` the flow from ``|θ*|∞ = 10³`` is the flow from 0, bit for bit."""
    q, direction = _quadratic_problem()
    star = jnp.asarray(1000.0 * direction)
    zero = jnp.zeros(q.n)

    def loss_of_x(x, A, c):
        return 0.5 * x @ A @ x + c @ x

    far = flow.ode_flow(loss_of_x, star, TIMES, args=(q.A, q.c), loss_of_displacement=True)
    near = flow.ode_flow(loss_of_x, zero, TIMES, args=(q.A, q.c), loss_of_displacement=True)
    np.testing.assert_array_equal(far.displacement, near.displacement)
    np.testing.assert_array_equal(far.theta, star[None] + near.displacement)


def test_non_finite_theta0_names_theta0():
    q, _ = _quadratic_problem()
    bad = jnp.zeros(q.n).at[3].set(jnp.nan)
    with pytest.raises(ValueError, match="theta0 has 1 non-finite"):
        flow.ode_flow(_generic_loss, bad, TIMES, args=(bad, q.A, q.c))


@pytest.mark.parametrize("u0", [0.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_skill_change_on_a_generic_quadratic_is_exact_to_rounding(scale, u0):
    """``Δu = ½xᵀFx`` from ``u(θ) = u0 + ½(θ−θ*)ᵀF(θ−θ*)``, any ``|θ*|``, any ``u(θ*)``.

    The direct difference is off by 2e-2 at ``t = 1e-6`` with ``u0 = 1``
    (cancellation of ``u``) and by 3e-8 with ``u0 = 0``, ``|θ*|∞ = 10³``
    (rounding of ``θ* + x``); the compensated line integral by ≤ 2e-14.
    """
    q, direction = _quadratic_problem()
    star = jnp.asarray(scale * direction)
    xs = flow.quadratic_flow(q.A, q.c, TIMES)
    exact = np.asarray(q.delta_u(TIMES))

    def skill(theta):
        return _generic_skill(theta, star, q.F, u0)

    out = flow.skill_change(skill, star, xs)
    err = np.abs(np.asarray(out.delta_u) - exact) / exact
    assert err.max() <= 1e-12, err
    assert not np.any(out.used_direct)
    assert np.all(np.asarray(out.error) <= 1e-12 * exact)
    direct_err = np.abs(np.asarray(out.direct) - exact) / exact
    assert direct_err.max() > 1e4 * err.max()  # the plain difference is far off: the test bites


def test_skill_change_on_a_logistic_model_against_its_closed_form():
    """A softmax NLL as a generic ``u``; reference: the landscape's cancellation-free ``Δu``.

    The displacements are exact differences of representable ``θ``, so reference and
    quadrature see the same points. Left: rounding inside ``∇u`` (its per-example terms
    cancel at the minimum), ``≈ eps/‖x‖`` relative.
    """
    L = landscapes.make_logistic_landscape(jax.random.key(2), 12, feature_scale=3.0)
    d = np.random.default_rng(0).standard_normal(12)
    norms = np.logspace(-6, 1, 8)
    theta = np.asarray(L.theta_star) + norms[:, None] * (d / np.linalg.norm(d))
    xs = jnp.asarray(theta - np.asarray(L.theta_star))
    ref = np.asarray(L.delta_u(xs))
    out = jax.jit(lambda xs: flow.skill_change(L.skill_loss, L.theta_star, xs))(xs)
    err = np.abs(np.asarray(out.delta_u) - ref) / ref
    assert np.all(err <= 1e-15 / norms + 1e-13), err
    assert np.abs(float(out.direct[0]) - ref[0]) / ref[0] > 1e-7  # |x| = 1e-6: direct fails
    # large x: the direct difference is as accurate and is the one used
    assert bool(out.used_direct[-1]) and not np.any(out.used_direct[:5])
    assert np.all(np.asarray(out.error)[:3] >= 0.3 * err[:3] * ref[:3])


def test_skill_change_rejects_bad_nodes():
    with pytest.raises(ValueError, match="nodes"):
        flow.skill_change(jnp.sum, jnp.zeros(3), jnp.zeros((2, 3)), nodes=1)
