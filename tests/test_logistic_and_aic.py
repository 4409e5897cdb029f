"""Logistic landscapes (docs/theory.md §5) and the matrix-free AIC (Def. 5.1) vs dense twins."""

import dataclasses
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import aic, curvature, landscapes, models, theory
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def logistic():
    return landscapes.make_logistic_landscape(jax.random.key(3), 20, classes=3, skill_examples=3)


def test_logistic_fisher_equals_hessian_everywhere(logistic):
    th = logistic.theta_star + 0.5 * jax.random.normal(jax.random.key(0), (logistic.n,))
    hessian = jax.jit(jax.hessian(logistic.skill_loss))
    for theta in (logistic.theta_star, th):
        H = hessian(theta)
        assert rel_err(logistic.fisher(theta), H) < 1e-13
        v = jax.random.normal(jax.random.key(1), (logistic.n,))
        assert rel_err(logistic.fisher_vp(theta, v), H @ v) < 1e-13


def test_logistic_theta_star_is_the_skill_minimum_and_u_is_flat_off_its_range(logistic):
    assert float(jnp.linalg.norm(jax.grad(logistic.skill_loss)(logistic.theta_star))) < 1e-14
    lam, V = np.linalg.eigh(np.asarray(logistic.fisher()))
    rank = 3 * (3 - 1)
    assert np.sum(lam > 1e-12 * lam[-1]) == rank
    null = V[:, 0]  # F's null space: u(θ* + s·v) is constant
    assert abs(float(logistic.delta_u(3.0 * null))) < 1e-13


def test_orthogonalized_correction_zeroes_pg_and_keeps_the_hessian(logistic):
    d = 6
    ortho = logistic.orthogonalized(d)
    r_raw, r = logistic.aic(d), ortho.aic(d)
    assert r_raw.orthogonality > 1e-3
    assert r.orthogonality < 1e-14
    H0 = jax.jit(jax.hessian(logistic.task_loss))(logistic.theta_star)
    assert rel_err(jax.jit(jax.hessian(ortho.task_loss))(logistic.theta_star), H0) < 1e-14
    # the tail-free skill Fisher: the onset is the quartic γ²/8 t⁴ (Cor. 6.3)
    assert r.tail_mass < 1e-14 and r.coupling > 0


def test_orthogonalized_report_from_g_hg_and_hpg_matches_the_dense_orthogonalized_landscape(
    logistic,
):
    """``theory.orthogonalized_report(g, Hg, H(Pg))`` is the AIC of ``L̃`` (docs/theory.md §5.2).

    Dense twins: the landscape with the correction built in (its own dense
    ``aic``), and ``γ̃ = ‖F^{1/2}PH(I−P)g‖`` from explicit matrices.
    """
    d = 4
    sub = logistic.subspace(d)
    theta = logistic.theta_star
    g = jax.grad(logistic.task_loss)(theta)
    H = jax.jit(jax.hessian(logistic.task_loss))(theta)
    P = np.asarray(sub.rows).T @ np.asarray(sub.rows)
    tail = float(jnp.trace(logistic.fisher())) - float(jnp.sum(sub.values))
    got = theory.orthogonalized_report(sub, g, H @ g, H @ (P @ g), tail_mass=tail)
    want = logistic.orthogonalized(d).aic(d)
    assert logistic.aic(d).orthogonality > 1e-3  # the raw gradient is not orthogonal to M
    assert got.orthogonality < 1e-14
    for field in ("coupling", "quartic_coefficient", "tail_mass", "lambda_d"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-12), field
    lam, V = np.linalg.eigh(np.asarray(logistic.fisher()))
    F_half = (V * np.sqrt(np.maximum(lam, 0.0))) @ V.T
    n = logistic.n
    dense = np.linalg.norm(F_half @ P @ np.asarray(H) @ (np.eye(n) - P) @ np.asarray(g))
    assert got.coupling == pytest.approx(dense, rel=1e-10)
    assert got.quartic_coefficient == pytest.approx(dense**2 / 8, rel=1e-10)
    # with Pg ≠ 0 the raw γ differs: the extra H(Pg) matters here
    assert abs(logistic.aic(d).coupling - dense) > 1e-3 * dense


def test_logistic_landscape_rejects_bad_input(logistic):
    with pytest.raises(ValueError, match="sum to 1"):
        dataclasses.replace(logistic, skill_targets=2 * logistic.skill_targets)
    with pytest.raises(ValueError, match="theta_star"):
        dataclasses.replace(logistic, theta_star=jnp.zeros(3))
    with pytest.raises(ValueError, match="classes"):
        landscapes.make_logistic_landscape(jax.random.key(0), 8, classes=1)
    with pytest.raises(ValueError, match="d=20"):
        logistic.orthogonalized(20)


@pytest.mark.parametrize("epsilon", [0.0, 0.03])
def test_measured_aic_equals_the_quadratic_report(epsilon):
    q = landscapes.make_quadratic_landscape(
        jax.random.key(5), 40, 3, top=(3.0, 2.0, 1.0), tail_mass=0.3, epsilon=epsilon, coupling=0.8
    )
    m = aic.measure_aic(
        lambda _, v, F: F @ v,
        lambda x: 0.5 * x @ q.A @ x + q.c @ x,
        jnp.zeros(q.n),
        3,
        key=jax.random.key(1),
        fisher_args=(q.F,),
        tol=1e-12,
    )
    ref = q.aic(3)
    for field in ref._fields[:-2]:  # the numbers; then converged and eigen_residuals
        a, b = getattr(m.report, field), getattr(ref, field)
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (field, a, b)
    assert m.report.converged and ref.converged and ref.eigen_residuals == ()
    # the report carries the certifying residuals, the true ‖Fv − λv‖
    V = np.asarray(m.eigenpairs.vectors)
    true = np.linalg.norm(
        V @ np.asarray(q.F) - np.asarray(m.eigenpairs.values)[:, None] * V, axis=1
    )
    np.testing.assert_allclose(m.report.eigen_residuals, true, atol=1e-14)
    assert max(m.report.eigen_residuals) <= 1e-12 * float(m.eigenpairs.values[0])
    assert m.trace_stderr == 0.0 and m.eigenpairs.converged.all()


def test_hutchinson_tail_mass_is_unbiased_within_its_error():
    q = landscapes.make_quadratic_landscape(
        jax.random.key(6), 60, 2, top=(5.0, 4.0), tail_mass=0.5, epsilon=0.0, coupling=1.0
    )
    m = aic.measure_aic(
        lambda _, v, F: F @ v,
        lambda x: 0.5 * x @ q.A @ x + q.c @ x,
        jnp.zeros(q.n),
        2,
        key=jax.random.key(2),
        fisher_args=(q.F,),
        trace="hutchinson",
        num_probes=400,
    )
    assert 0 < m.trace_stderr < 0.05
    assert abs(m.report.tail_mass - 0.5) < 4 * m.trace_stderr
    assert abs(m.trace - float(jnp.trace(q.F))) < 4 * m.trace_stderr


def test_measured_aic_on_logistic_and_on_a_flax_mlp_matches_dense(logistic):
    m = aic.measure_aic(
        lambda theta, v: logistic.fisher_vp(theta, v),
        logistic.task_loss,
        logistic.theta_star,
        6,
        key=jax.random.key(0),
        tol=1e-12,
    )
    ref = logistic.aic(6)
    assert math.isclose(m.report.coupling, ref.coupling, rel_tol=1e-8)
    assert math.isclose(m.report.orthogonality, ref.orthogonality, rel_tol=1e-8)
    assert abs(m.report.tail_mass) < 1e-12

    # a pytree model: skill = its softmax Fisher on a few inputs, task = CE on others
    key = jax.random.key(4)
    params = models.mlp_init(key, (5, 6, 3), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(7), (8, 5))
    ys = jnp.arange(8) % 3
    fvp = curvature.fisher_vp(lambda p, x: models.mlp_apply(p, x))

    def task(p):
        return models.softmax_cross_entropy(models.mlp_apply(p, xs[4:]), ys[4:])

    m = aic.measure_aic(
        fvp, task, params, 3, key=jax.random.key(1), fisher_args=(xs[:4],), tol=1e-12
    )
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def logits_flat(w):
        return models.mlp_apply(unravel(w), xs[:4])

    J = jax.jit(jax.jacobian(logits_flat))(flat)  # (4, 3, n)
    p = jax.nn.softmax(logits_flat(flat), axis=-1)
    F = sum(J[i].T @ (jnp.diag(p[i]) - jnp.outer(p[i], p[i])) @ J[i] for i in range(4)) / 4
    lam, V = np.linalg.eigh(np.asarray(F))
    lam, V = lam[::-1], V[:, ::-1]
    g = jax.jit(jax.grad(lambda w: task(unravel(w))))(flat)
    Hg = jax.jit(jax.hessian(lambda w: task(unravel(w))))(flat) @ g
    P = V[:, :3] @ V[:, :3].T
    gamma = np.linalg.norm(np.sqrt(lam[:3]) * (V[:, :3].T @ Hg))
    assert math.isclose(m.report.coupling, gamma, rel_tol=1e-7)
    assert math.isclose(m.report.orthogonality, np.linalg.norm(P @ g), rel_tol=1e-7)
    assert math.isclose(m.report.tail_mass, lam[3:].sum(), rel_tol=1e-7, abs_tol=1e-12)


def test_measure_aic_rejects_bad_input(logistic):
    def fvp(theta, v):
        return logistic.fisher_vp(theta, v)

    with pytest.raises(ValueError, match="d=20"):
        aic.measure_aic(fvp, logistic.task_loss, logistic.theta_star, 20, key=jax.random.key(0))
    with pytest.raises(ValueError, match="trace"):
        aic.measure_aic(
            fvp, logistic.task_loss, logistic.theta_star, 2, key=jax.random.key(0), trace="x"
        )
    with pytest.raises(ValueError, match="key"):
        aic.measure_aic(fvp, logistic.task_loss, logistic.theta_star, 2, key=None)


def test_logistic_delta_u_is_accurate_where_the_plain_difference_cancels(logistic):
    v = jax.random.normal(jax.random.key(2), (logistic.n,))
    th = logistic.theta_star + v
    direct = logistic.skill_loss(th) - logistic.skill_loss(logistic.theta_star)
    assert abs(float(logistic.delta_u(v) - direct)) < 1e-14 * abs(float(direct)) + 1e-15
    quad = 0.5 * float(v @ logistic.fisher() @ v)
    for s in (1e-4, 1e-6, 1e-8):  # Δu = ½s²vᵀFv (1 + O(s)): full relative accuracy at s = 1e-8
        ratio = float(logistic.delta_u(s * v)) / (s**2 * quad)
        assert abs(ratio - 1) < 100 * s
    batch = jnp.stack([v, jnp.zeros_like(v)])
    np.testing.assert_allclose(logistic.delta_u(batch), [direct, 0.0], atol=1e-14)


def test_cubic_constant_bounds_the_taylor_remainder(logistic):
    C = float(logistic.cubic_constant())
    F = logistic.fisher()
    worst = 0.0
    for i, s in enumerate((0.1, 0.5, 1.0, 3.0)):
        x = s * jax.random.normal(jax.random.key(10 + i), (logistic.n,))
        remainder = float(logistic.delta_u(x)) - 0.5 * float(x @ F @ x)
        worst = max(worst, abs(remainder) / (C * float(jnp.linalg.norm(x)) ** 3))
    assert 1e-4 < worst <= 1.0  # a real cubic term, inside the proven bound


def test_logistic_batch_members_equal_single_draws_and_correction_vmaps():
    key = jax.random.key(9)
    batch = landscapes.make_logistic_batch(key, 3, 12, feature_scale=2.0)
    member = landscapes.make_logistic_landscape(jax.random.split(key, 3)[2], 12, feature_scale=2.0)
    for a, b in zip(
        jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(batch), strict=True
    ):
        np.testing.assert_array_equal(a, b[2])
    corrections = jax.vmap(landscapes.orthogonal_correction, in_axes=(0, None))(batch, 4)
    np.testing.assert_allclose(corrections[2], member.orthogonalized(4).correction, atol=1e-15)
    with pytest.raises(ValueError, match="orthogonalize_d"):
        landscapes.make_logistic_batch(key, 2, 12, orthogonalize_d=2)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_measure_aic_compiles_the_users_functions_once(trace):
    """A second measurement at new ``θ*`` (same shapes) traces neither ``fisher_vp`` nor the loss.

    Weights and data enter the compiled matvec, gradient and trace probes as
    arguments, so the compiled functions are reused; the second report still
    equals the landscape's at the new point (nothing stale was reused).
    """
    q = landscapes.make_quadratic_landscape(
        jax.random.key(5), 30, 3, top=(3.0, 2.0, 1.0), tail_mass=0.3, epsilon=0.03, coupling=0.8
    )
    counts = {"fisher_vp": 0, "loss": 0}

    def fisher_vp(_, v, F):
        counts["fisher_vp"] += 1  # runs only while JAX traces it
        return F @ v

    def loss(theta, A, c):
        counts["loss"] += 1
        return 0.5 * theta @ A @ theta + c @ theta

    def measure(theta_star):
        # θ* moved: the loss about it is the quadratic with gradient Aθ* + c
        return aic.measure_aic(
            fisher_vp,
            loss,
            theta_star,
            3,
            key=jax.random.key(1),
            fisher_args=(q.F,),
            loss_args=(q.A, q.c),
            trace=trace,
            num_probes=8,
            tol=1e-12,
        )

    measure(jnp.zeros(q.n))
    first = dict(counts)
    assert first["fisher_vp"] > 0 and first["loss"] > 0
    theta_star = jnp.linspace(-0.1, 0.1, q.n)
    second = measure(theta_star)
    assert counts == first, (first, counts)
    moved = landscapes.QuadraticLandscape(q.A, q.A @ theta_star + q.c, q.F)
    assert math.isclose(second.report.coupling, moved.aic(3).coupling, rel_tol=1e-9)
    assert math.isclose(
        second.gradient_norm, float(jnp.linalg.norm(q.A @ theta_star + q.c)), rel_tol=1e-12
    )


def test_measure_aic_takes_an_unhashable_fisher_vp_and_loss():
    """Callables that cannot key a jit cache (they hold arrays) still work, compiled per call."""
    q = landscapes.make_quadratic_landscape(
        jax.random.key(5), 20, 2, top=(2.0, 1.0), tail_mass=0.2, epsilon=0.03, coupling=0.5
    )

    @dataclasses.dataclass(frozen=True)  # eq=True: hash(self) hashes the arrays, which raises
    class Quadratic:
        A: jax.Array
        c: jax.Array

        def __call__(self, theta):
            return 0.5 * theta @ self.A @ theta + self.c @ theta

    @dataclasses.dataclass(frozen=True)
    class Fisher:
        F: jax.Array

        def __call__(self, _, v):
            return self.F @ v

    with pytest.raises(TypeError):
        hash(Fisher(q.F))
    m = aic.measure_aic(Fisher(q.F), Quadratic(q.A, q.c), jnp.zeros(q.n), 2, key=jax.random.key(1))
    assert math.isclose(m.report.coupling, q.aic(2).coupling, rel_tol=1e-9)


def test_rademacher_probes_are_independent_signs():
    z = np.asarray(aic.rademacher_probes(jax.random.key(0), 64, 1000, jnp.float64))
    assert z.shape == (64, 1000) and set(np.unique(z)) == {-1.0, 1.0}
    # mean 0 and unit variance per entry; entries (and the 32 bits of a word) uncorrelated
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    gram = z.T @ z / 64  # (1000, 1000): identity up to sampling noise 1/8
    off = gram - np.diag(np.diag(gram))
    assert np.all(np.diag(gram) == 1.0) and np.abs(off).mean() < 0.11
    other = np.asarray(aic.rademacher_probes(jax.random.key(1), 64, 1000, jnp.float64))
    assert np.mean(other == z) < 0.55


@pytest.mark.parametrize("batch", [16, 3, 1])
@pytest.mark.parametrize("num_probes", [37, 16, 2])
def test_hutchinson_samples_are_deflated_probe_quadratics(num_probes, batch, monkeypatch):
    """Dense twin: each Hutchinson sample is ``zᵀ(I−P)A(I−P)z`` for the documented probes.

    Probe draw ``c`` is ``rademacher_probes(fold_in(key, c), 16, n)``; 37 probes
    leave a remainder of 5. The trace and its standard error are the sample
    mean and standard error of exactly these numbers, whatever the memory
    budget's batch of matvecs (16, 3 or 1 probes at a time).
    """
    monkeypatch.setattr(aic, "_PROBE_DRAW", 16)
    monkeypatch.setattr(aic, "_PROBE_BATCH_BYTES", batch * 40 * 8)
    n, d = 40, 3
    rng = np.random.default_rng(0)
    B = rng.standard_normal((n, n))
    A = B @ B.T
    V = np.linalg.qr(rng.standard_normal((n, d)))[0].T
    key = jax.random.key(7)
    chunk = min(16, num_probes)
    probes = []
    for c in range(-(-num_probes // chunk)):
        size = min(chunk, num_probes - c * chunk)
        probes.append(
            np.asarray(aic.rademacher_probes(jax.random.fold_in(key, c), size, n, jnp.float64))
        )
    z = np.concatenate(probes)
    z = z - (z @ V.T) @ V
    expected = np.einsum("pi,ij,pj->p", z, A, z)
    A_j = jnp.asarray(A)
    mean, stderr, count = aic.fisher_trace(
        lambda v: A_j @ v,
        n,
        jnp.float64,
        method="hutchinson",
        key=key,
        num_probes=num_probes,
        deflate=V,
    )
    assert count == num_probes
    assert mean == pytest.approx(expected.mean(), rel=1e-12)
    assert stderr == pytest.approx(expected.std(ddof=1) / np.sqrt(num_probes), rel=1e-10)
    with pytest.raises(ValueError, match=r"deflate must have shape \(d, 40\)"):
        aic.fisher_trace(
            lambda v: A_j @ v, n, jnp.float64, method="hutchinson", key=key, deflate=V[:, :5]
        )


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_float32_tail_mass_is_direct_where_condition_1_holds(trace):
    """A concentrated float32 Gauss-Newton Fisher ``JᵀJ/m`` (n = 300, d = 5 eigenvalues near
    1, a tail of 2.9e-4 = 6.5e-5·Σλ): the tail mass against the float64 truth ``Σ_{j>d} λ_j``.
    Exact, it was ``tr F − Σλ`` in float32, off by 6.6e-4 relative (more than the rounding
    bound allows); now ``tr((I−P)F(I−P))`` on deflated probes: within 1e-6 and within its
    own rounding bound. Hutchinson: within 4 standard errors and the same bound."""
    m, n, d = 400, 300, 5
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    W, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = np.r_[np.linspace(1.0, 0.8, d), rng.uniform(0.5e-6, 1.5e-6, n - d)]
    J = jnp.asarray((U * np.sqrt(m * spectrum)) @ W.T, jnp.float32)
    J64 = np.asarray(J, np.float64)
    truth = float(np.sum(np.linalg.eigvalsh(J64.T @ J64 / m)[::-1][d:]))

    def fisher_vp(params, v, J):
        return jnp.dot(J.T, jnp.dot(J, v, precision="highest"), precision="highest") / m

    out = aic.measure_aic(
        fisher_vp,
        lambda p, c: 0.5 * jnp.sum((p - c) ** 2),
        jnp.asarray(rng.standard_normal(n), jnp.float32),
        d,
        key=jax.random.key(3),
        fisher_args=(J,),
        loss_args=(jnp.asarray(rng.standard_normal(n), jnp.float32),),
        trace=trace,
        num_probes=256,
    )
    error = abs(out.report.tail_mass - truth)
    if trace == "exact":
        assert error <= 1e-6 * truth and out.trace_stderr == 0.0
    assert 0 < out.tail_rounding < 1e-3 * truth
    assert error <= 4 * out.trace_stderr + out.tail_rounding
    lam = np.asarray(out.eigenpairs.values, np.float64)
    assert math.isclose(out.trace, out.report.tail_mass + lam.sum(), rel_tol=1e-15)
