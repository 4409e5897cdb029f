"""ODE flow (diffrax), optax trajectories and the trajectory record against exact twins."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geomcollapse import flow, landscapes, linalg
from geomcollapse.subspace import Subspace
from tests.conftest import rel_err


def _quadratic(kappa=1.0, epsilon=0.0, n=24, seed=0):
    return landscapes.make_quadratic_landscape(
        jax.random.key(seed), n, 3, top=(3.0, 2.0, 1.0), tail_mass=0.1, epsilon=epsilon, kappa=kappa
    )


def _loss(q):
    return lambda x: 0.5 * x @ q.A @ x + q.c @ x


def _taylor_flow(A, c, ts, terms=40):
    """``x(t) = Σ_{k≥1} (−t)^k A^{k−1} c / k!``, summed to ``terms`` (converges for all t)."""
    out, power = np.zeros((len(ts), len(c))), np.asarray(c, np.float64)
    for k in range(1, terms + 1):
        out += np.outer((-np.asarray(ts)) ** k / math.factorial(k), power)
        power = np.asarray(A) @ power
    return out


def test_ode_flow_matches_exact_flow_and_series():
    q = _quadratic(kappa=3.0)
    ts = jnp.logspace(-4, 0, 17)  # t‖A‖ ≤ 4.4: the series converges fast with 40 terms
    out = flow.ode_flow(_loss(q), jnp.zeros(q.n), ts)  # Dopri8, rtol 1e-12
    xs = out.displacement
    np.testing.assert_array_equal(out.theta, xs)  # θ* = 0
    np.testing.assert_array_equal(out.ts, ts)
    exact = q.trajectory(ts)
    series = _taylor_flow(q.A, q.c, ts)
    for other in (exact, series):
        err = np.linalg.norm(xs - other, axis=1) / np.linalg.norm(other, axis=1)
        assert err.max() < 1e-9
    S = _fisher_half_p(q)

    def projected(x):
        return 0.5 * np.sum((np.asarray(x) @ S.T) ** 2, axis=1)

    # ½‖F^{1/2}Px‖² is t⁴-small against ‖x‖²: the demanding comparison
    np.testing.assert_allclose(projected(xs), q.projected_loss(ts), rtol=1e-8)
    np.testing.assert_allclose(projected(series), q.projected_loss(ts), rtol=1e-8)
    # and the t⁴ law with coefficient γ²/8 is the t → 0 limit of all three
    gamma = q.aic(3).coupling
    assert abs(projected(xs)[0] / (gamma**2 / 8 * ts[0] ** 4) - 1) < 1e-3


def _fisher_half_p(q):
    lam, V = np.linalg.eigh(np.asarray(q.F))
    lam, V = lam[::-1][: q.d], V[:, ::-1][:, : q.d]
    return np.sqrt(lam)[:, None] * V.T


@pytest.mark.parametrize(
    ("solver", "steps"),
    [
        (diffrax.Euler(), (1 / 32, 1 / 64, 1 / 128, 1 / 256)),
        (diffrax.Heun(), (1 / 16, 1 / 32, 1 / 64, 1 / 128)),
        (diffrax.Bosh3(), (1 / 16, 1 / 32, 1 / 64, 1 / 128)),
        (diffrax.Tsit5(), (1 / 8, 1 / 16, 1 / 32, 1 / 64)),
    ],
)
def test_ode_solver_order(solver, steps):
    """Regress log-error on log-step at t = 1 against the exact flow (STYLE 9)."""
    q = _quadratic()
    loss = _loss(q)  # one loss object: diffrax's compiled solve is reused across steps
    exact = q.trajectory(jnp.array([1.0]))[-1]
    errs = [
        float(
            jnp.linalg.norm(
                flow.ode_flow(loss, jnp.zeros(q.n), [1.0], solver=solver, dt=h).displacement[-1]
                - exact
            )
        )
        for h in steps
    ]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    # On a linear ODE, Tsit5's stability polynomial matches e^z one order past
    # its declared 5, so its pre-asymptotic slope sits above 5; never below.
    assert solver.order(None) - 0.3 < slope < solver.order(None) + 0.7, (slope, errs)


def test_ode_flow_on_a_pytree_matches_flat():
    q = _quadratic()
    split = q.n // 2

    def loss_tree(p):
        return _loss(q)(jnp.concatenate([p["a"], p["b"]]))

    tree = {"a": jnp.zeros(split), "b": jnp.zeros(q.n - split)}
    out = flow.ode_flow(loss_tree, tree, [0.1, 0.5]).displacement
    flat = jnp.concatenate([out["a"], out["b"]], axis=1)
    assert rel_err(flat, q.trajectory(jnp.array([0.1, 0.5]))) < 1e-9


def test_optax_sgd_is_the_gd_closed_form_and_momentum_matches_a_loop():
    q = _quadratic()
    eta, K = 0.05, 40
    xs = flow.optimizer_trajectory(_loss(q), jnp.zeros(q.n), optax.sgd(eta), K)
    assert xs.shape == (K + 1, q.n)
    assert rel_err(xs, flow.quadratic_gd(q.A, q.c, eta, jnp.arange(K + 1))) < 1e-12
    # heavy ball, written out by hand
    beta = 0.9
    ms = flow.optimizer_trajectory(_loss(q), jnp.zeros(q.n), optax.sgd(eta, momentum=beta), K)
    A, c = np.asarray(q.A), np.asarray(q.c)
    x, m, ref = np.zeros(q.n), np.zeros(q.n), [np.zeros(q.n)]
    for _ in range(K):
        m = beta * m + (A @ x + c)
        x = x - eta * m
        ref.append(x)
    assert rel_err(ms, np.array(ref)) < 1e-12


def test_trajectory_record_matches_the_landscape_and_subspace_rotation():
    q = _quadratic(epsilon=0.01)
    ts = jnp.array([1e-6, 0.01, 0.1, 0.5])
    xs = q.trajectory(ts)
    star = jnp.linspace(-50.0, 50.0, q.n)  # far from 0, with u(θ*) = 3: both would cancel
    lam, V = np.linalg.eigh(np.asarray(q.F))
    lam, V = lam[::-1][:3], V[:, ::-1][:, :3]
    rec = flow.record_trajectory(
        ts,
        xs,
        star,
        lambda th: 3.0 + 0.5 * (th - star) @ q.F @ (th - star),
        (lam, V.T),
        fisher_vp=lambda th, v: q.F @ v,
        key=jax.random.key(0),
    )
    np.testing.assert_allclose(rec.delta_u, q.delta_u(ts), rtol=1e-12)
    assert np.all(rec.delta_u_error <= 1e-12 * rec.delta_u)
    np.testing.assert_allclose(rec.projected_loss, q.projected_loss(ts, 3), rtol=1e-12)
    np.testing.assert_allclose(rec.projected_norm**2 / 2, rec.projected_loss, rtol=1e-14)
    np.testing.assert_allclose(rec.displacement_norm, np.linalg.norm(xs, axis=1), rtol=1e-14)
    assert np.all(rec.subspace_angle < 1e-6)  # constant F: M never rotates


def test_trajectory_record_takes_pytree_displacements_and_a_pytree_basis():
    """Positions and ``top_eigenpairs``' basis as pytrees give the flat record."""
    q = _quadratic()
    split = q.n // 2
    ts = jnp.array([0.01, 0.1])
    xs = q.trajectory(ts)

    def to_tree(v):
        return {"a": v[..., :split], "b": v[..., split:]}

    def skill(tree):
        v = jnp.concatenate([tree["a"], tree["b"]])
        return 0.5 * v @ q.F @ v

    def fvp(v):
        return to_tree(q.F @ jnp.concatenate([v["a"], v["b"]]))

    star = to_tree(jnp.zeros(q.n))
    pairs = linalg.top_eigenpairs(fvp, star, 3, key=jax.random.key(1), tol=1e-12)
    assert pairs.vectors["a"].shape == (3, split)
    tree_rec = flow.record_trajectory(ts, to_tree(xs), star, skill, Subspace.from_eigenpairs(pairs))
    flat_basis = jnp.concatenate([pairs.vectors["a"], pairs.vectors["b"]], axis=1)
    flat_rec = flow.record_trajectory(
        ts, xs, jnp.zeros(q.n), lambda v: 0.5 * v @ q.F @ v, (pairs.values, flat_basis)
    )
    for field in ("delta_u", "projected_loss", "displacement_norm"):
        np.testing.assert_allclose(getattr(tree_rec, field), getattr(flat_rec, field), rtol=1e-14)
    # Lanczos to residual 1e-12 moves a t⁴-small projected loss by ~1e-9 relative
    np.testing.assert_allclose(tree_rec.projected_loss, q.projected_loss(ts, 3), rtol=1e-8)
    with pytest.raises(ValueError, match=r"values must be \(d,\) for the basis' d = 2 rows"):
        flow.record_trajectory(ts, xs, jnp.zeros(q.n), jnp.sum, (pairs.values, flat_basis[:2]))
    with pytest.raises(ValueError, match="xs must hold"):
        flow.record_trajectory(ts[:1], xs, jnp.zeros(q.n), jnp.sum, (pairs.values, flat_basis))
    uncertified = Subspace(pairs.values, flat_basis, pairs.residuals, jnp.asarray(False))
    with pytest.raises(ValueError, match="not converged"):
        flow.record_trajectory(ts, xs, jnp.zeros(q.n), jnp.sum, uncertified)
    loose = flow.record_trajectory(
        ts, xs, jnp.zeros(q.n), lambda v: 0.5 * v @ q.F @ v, uncertified, allow_unconverged=True
    )
    np.testing.assert_allclose(loose.projected_loss, flat_rec.projected_loss, rtol=1e-15)


def test_bad_times_and_steps_raise():
    q = _quadratic()
    with pytest.raises(ValueError, match="strictly increasing"):
        flow.ode_flow(_loss(q), jnp.zeros(q.n), [0.5, 0.1])
    with pytest.raises(ValueError, match="dt"):
        flow.ode_flow(_loss(q), jnp.zeros(q.n), [0.5], dt=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        flow.optimizer_trajectory(_loss(q), jnp.zeros(q.n), optax.sgd(0.1), 0)


@pytest.mark.parametrize("angle", [1e-12, 1e-6, 0.3, np.pi / 2])
def test_principal_angle_is_accurate_from_tiny_to_right_angles(angle):
    Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    a = Q[:, :2].T
    b = np.stack([np.cos(angle) * Q[:, 0] + np.sin(angle) * Q[:, 2], Q[:, 1]])
    # arccos(σ_min) alone would be off by ~1e-8 at the tiny angles
    assert abs(flow.principal_angle(a, b) - angle) <= 1e-12 * angle + 1e-16


def test_default_solver_is_eighth_order_on_a_nonlinear_flow():
    """``solver=None`` (Dopri8): log-error on log-step has slope ≈ 8 (STYLE 9).

    On a linear ODE the 8th-order pair's stability polynomial matches ``e^z``
    past order 8 (measured slopes ≈ 10), so the flow here is nonlinear with a
    closed form: ``L = −Σ log θ`` gives ``θ(t) = (θ0² + 2t)^{1/2}``. The errors
    (1e-8 … 4e-13) sit far above float64 round-off; the pairwise slopes rise
    towards 8 from below (the ``h⁹`` term has the other sign), so the last pair
    is held to 8 more tightly than the whole fit.
    """
    theta0 = jnp.array([0.6, 0.8, 1.0])

    def loss(theta):
        return -jnp.sum(jnp.log(theta))

    exact = jnp.sqrt(theta0**2 + 2.0)
    steps = np.array([1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16])
    errs = np.array(
        [
            float(jnp.linalg.norm(flow.ode_flow(loss, theta0, [1.0], dt=h).theta[-1] - exact))
            for h in steps
        ]
    )
    assert errs.min() > 1e-13, errs
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    last = np.log(errs[-2] / errs[-1]) / np.log(steps[-2] / steps[-1])
    assert 7.5 < slope < 8.5, (slope, errs)
    assert 7.7 < last < 8.3, (last, errs)


def test_ode_flow_does_not_retrace_the_loss_on_a_second_call():
    """New θ0, times and step of the same shapes reuse diffrax's compiled solve."""
    q = _quadratic()
    traces = []

    def loss(x):
        traces.append(1)  # runs only when JAX traces the loss
        return 0.5 * x @ q.A @ x + q.c @ x

    first = flow.ode_flow(loss, jnp.zeros(q.n), [0.1, 0.5])
    count = len(traces)
    assert count > 0
    theta0 = jnp.linspace(-1.0, 1.0, q.n)
    second = flow.ode_flow(loss, theta0, [0.2, 0.7])
    assert len(traces) == count, (count, len(traces))
    assert rel_err(first.displacement, q.trajectory(jnp.array([0.1, 0.5]))) < 1e-9
    # the reused solve used the new θ0 and times: x ↦ L(θ0 + x) has gradient Aθ0 + c at 0
    c_new = q.A @ theta0 + q.c
    exact = landscapes.QuadraticLandscape(q.A, c_new, q.F, d=q.d).trajectory(jnp.array([0.2, 0.7]))
    assert rel_err(second.displacement, exact) < 1e-9
