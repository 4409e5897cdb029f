"""Taylor forecast of Δu along gradient flow (geomcollapse.series, docs/theory.md §6).

Identity tests on a quadratic landscape (closed forms of §4), dense-tensor
twins on a small MLP (§6 formulas for c₂, c₃, c₄), the ``Pg = 0`` quartic
onset ``⅛γ²``, and convergence order against a float64 ODE flow: the
truncation error of an order-``K`` series is ``O(t^{K+1})``.
"""

import dataclasses
import functools
import math
import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import landscapes, models, series, theory
from tests.conftest import rel_err

# --------------------------------------------------------------------------- problems


def kl_to(params_star, x):
    """``u(θ) = mean_x KL(p_{θ*}(·|x) ‖ p_θ(·|x))``: a minimum at θ* with Hessian F (§5)."""

    def u(params):
        lp_star = jax.nn.log_softmax(models.mlp_apply(params_star, x))
        lp = jax.nn.log_softmax(models.mlp_apply(params, x))
        return jnp.mean(jnp.sum(jnp.exp(lp_star) * (lp_star - lp), axis=-1))

    return u


@dataclasses.dataclass(frozen=True, eq=False)
class ModelCase:
    """A task loss ``L(θ)`` at ``θ*`` and skill losses, every one a plain function of θ.

    Hashed by identity (``eq=False``): caches key on the case itself.
    """

    params: object
    task_loss: object
    skills: dict  # name -> (u, Δu over a batch of positions without cancellation)


@pytest.fixture(scope="module")
def mlp_case():
    """A 4-6-3 tanh MLP (51 parameters): CE fine-tuning, a KL skill (min) and a CE skill (not)."""
    k_model, k_skill = jax.random.split(jax.random.key(0))
    p = models.mlp_problem(k_model, (4, 6, 3), 16, gd_steps=2, dtype=jnp.float64)
    skill_batch = models.gaussian_mixture(k_skill, 8, 4, 3, dtype=jnp.float64)
    params = p.params

    def task_loss(th):
        return p.loss(th, p.batch)

    u_kl = kl_to(params, skill_batch.x)

    def u_ce(th):
        return p.loss(th, skill_batch)

    def shifted(u):
        return lambda thetas: jax.vmap(u)(thetas) - u(params)

    return ModelCase(params, task_loss, {"kl": (u_kl, jax.vmap(u_kl)), "ce": (u_ce, shifted(u_ce))})


@pytest.fixture(scope="module")
def logistic_case():
    """A logistic landscape (n = 16): skill NLL at its minimum, and with one-hot targets (not)."""
    ls = landscapes.make_logistic_landscape(jax.random.key(3), 16)
    onehot = jax.nn.one_hot(jnp.arange(ls.skill_targets.shape[0]) % 3, 3, dtype=jnp.float64)
    off = dataclasses.replace(ls, skill_targets=onehot)
    return ModelCase(
        ls.theta_star,
        ls.task_loss,
        {
            # delta_u takes displacements; the flow's positions are θ* + x
            "min": (ls.skill_loss, lambda thetas: ls.delta_u(thetas - ls.theta_star)),
            "nonmin": (off.skill_loss, lambda thetas: off.delta_u(thetas - off.theta_star)),
        },
    )


def flow_positions(loss, params, ts):
    """Float64 gradient flow θ(t) with diffrax (Dopri8, rtol 1e-13) at times ``ts``."""
    flat, unravel = ravel_pytree(params)

    def field(t, x, _):
        return -ravel_pytree(jax.grad(loss)(unravel(flat + x)))[0]

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri8(),
        0.0,
        float(ts[-1]),
        None,
        jnp.zeros_like(flat),
        saveat=diffrax.SaveAt(ts=jnp.asarray(ts)),
        stepsize_controller=diffrax.PIDController(rtol=1e-13, atol=1e-18),
        max_steps=100_000,
    )
    return jax.vmap(unravel)(flat[None] + sol.ys)


# --------------------------------------------------------------------------- quadratic identities


@pytest.fixture(scope="module")
def quadratic():
    """``L = ½xᵀAx + cᵀx``, ``u = ½xᵀFx`` with ``x = θ − θ*`` written as losses of θ, θ* ≠ 0."""
    q = landscapes.make_quadratic_landscape(
        jax.random.key(1), 12, 3, top=[3.0, 2.0, 1.0], tail_mass=0.2, epsilon=0.4, coupling=1.5
    )
    theta_star = jax.random.normal(jax.random.key(2), (12,), jnp.float64)

    def task_loss(th):
        x = th - theta_star
        return 0.5 * x @ (q.A @ x) + q.c @ x

    def skill_loss(th):
        x = th - theta_star
        return 0.5 * x @ (q.F @ x)

    return q, theta_star, task_loss, skill_loss


@pytest.fixture(scope="module")
def quadratic_series(quadratic):
    """Order-4 series of the quadratic landscape with ``M`` = top-3 of ``F``, per engine."""
    q, theta_star, task_loss, skill_loss = quadratic
    lam, V = np.linalg.eigh(np.asarray(q.F))
    subspace = (lam[::-1][:3], V[:, ::-1][:, :3].T)
    cache = {}

    def get(method: str) -> series.Series:
        if method not in cache:
            cache[method] = series.delta_u_series(
                skill_loss, task_loss, theta_star, 4, subspace=subspace, method=method
            )
        return cache[method]

    return subspace, get


@pytest.mark.parametrize("method", ["jet", "jvp"])
def test_quadratic_coefficients_match_closed_forms(quadratic, quadratic_series, method):
    q, theta_star, task_loss, _ = quadratic
    A, c, F = (np.asarray(a) for a in (q.A, q.c, q.F))
    (lam, basis), get = quadratic_series
    s = get(method)
    assert s.route == method  # the engine asked for is the one recorded
    assert s.delta_u.shape == (5,) and s.delta_u.dtype == jnp.float64
    assert float(s.delta_u[0]) == 0.0
    c_expected = {
        2: 0.5 * c @ F @ c,
        3: -0.5 * c @ F @ A @ c,
        4: c @ A @ F @ A @ c / 8 + c @ F @ A @ A @ c / 6,
    }
    for k, expected in c_expected.items():
        assert rel_err(s.delta_u[k], expected) <= 1e-12, k
    assert abs(float(s.delta_u[1])) <= 1e-14 * abs(c_expected[2])
    # x(t) = −ct + ½Act² − ⅙A²ct³ + (1/24)A³ct⁴
    x_expected = [-c, A @ c / 2, -A @ A @ c / 6, A @ A @ A @ c / 24]
    for k, expected in enumerate(x_expected):
        assert rel_err(s.displacement[k], expected) <= 1e-13, k + 1
    xs = series.flow_taylor(task_loss, theta_star, 4, method=method)
    assert len(xs) == 4
    for k, expected in enumerate(x_expected):
        assert rel_err(xs[k], expected) <= 1e-13, k + 1
    # projected loss ½‖F^{1/2}Px‖²: theory.series_coefficients with S = F^{1/2}P
    S = np.sqrt(lam)[:, None] * basis
    ref = theory.series_coefficients(A, c, S)
    np.testing.assert_allclose(
        np.asarray(s.projected[2:]), [ref.c2, ref.c3, ref.c4], rtol=1e-12, atol=0
    )
    assert float(s.projected[0]) == 0.0 and float(s.projected[1]) == 0.0


def test_quadratic_forecast_tracks_the_exact_flow(quadratic, quadratic_series):
    """Evaluated series vs the exact flow: error ∝ t⁵, and ≤ 1 % of Δu inside the validity time."""
    q = quadratic[0]
    s = quadratic_series[1]("jet")
    t_valid = s.validity_time
    assert 0 < t_valid < np.inf
    ts = np.geomspace(t_valid / 400, t_valid / 4, 12)
    exact = np.asarray(q.delta_u(jnp.asarray(ts)))
    forecast = np.asarray(s.evaluate(ts).delta_u)
    fit = theory.fit_exponent(ts, np.abs(forecast - exact), (ts[0], ts[5]))
    assert abs(fit.exponent - 5) <= 0.05, fit
    assert np.all(np.abs(forecast - exact) <= 0.01 * exact)
    x_exact = np.asarray(q.trajectory(jnp.asarray(ts[:1])))[0]
    assert rel_err(s.displacement_at(ts[:1])[0], x_exact) <= 1e-8


# --------------------------------------------------------------------------- convergence order


HIGH_ORDER = 6


@pytest.fixture(scope="module")
def high_series():
    """Order-6 series per (case, skill), computed once: c_k for k ≤ K is that of any order K ≥ k."""
    cache = {}

    def get(case: ModelCase, skill: str) -> series.Series:
        key = (id(case), skill)
        if key not in cache:
            u = case.skills[skill][0]
            cache[key] = series.delta_u_series(u, case.task_loss, case.params, HIGH_ORDER)
        return cache[key]

    return get


def _fit_orders(case: ModelCase, high_series) -> dict:
    """Exponent of |series − ODE flow| for orders 2, 3, 4 and every skill of ``case``.

    The order-``K`` series is the order-6 one truncated (the same coefficients:
    see ``test_truncated_series_equals_lower_order_call``). Its window ends
    where the next terms would tilt the local slope by ≈ 5 %
    (``t ≤ 0.05 · |c_{K+1}/c_{K+2}|``, and ``0.05 · |c_{K+1}/c_{K+3}|^{1/2}``
    where ``c_{K+3}`` is known); it spans a factor 4 in ``t``.
    """
    plans = []
    for name in case.skills:
        c = np.abs(np.asarray(high_series(case, name).delta_u))
        for order in (2, 3, 4):
            hi = c[order + 1] / c[order + 2]
            if order + 3 <= HIGH_ORDER:
                hi = min(hi, math.sqrt(c[order + 1] / c[order + 3]))
            plans.append((name, order, 0.05 * hi / 4, 0.05 * hi))
    ts = np.unique(np.concatenate([np.geomspace(lo, hi, 6) for *_, lo, hi in plans]))
    thetas = flow_positions(case.task_loss, case.params, ts)
    fits = {}
    for name, order, lo, hi in plans:
        truncated = high_series(case, name).delta_u[: order + 1]
        delta_u = case.skills[name][1]
        reference = np.asarray(delta_u(thetas))
        err = np.abs(np.polyval(np.asarray(truncated)[::-1], ts) - reference)
        inside = (ts >= lo * (1 - 1e-9)) & (ts <= hi * (1 + 1e-9))
        # The truncation error must stand far above the reference's own error:
        # rounding of Δu (≈1e-16 absolute) and the ODE's (≈1e-12 · |Δu|).
        assert np.min(err[inside]) >= 1e-14, (name, order)
        assert np.min(err[inside] / np.abs(reference[inside])) >= 1e-10, (name, order)
        fits[name, order] = theory.fit_exponent(ts[inside], err[inside]).exponent
    return fits


@pytest.mark.parametrize(
    "case_name", ["logistic_case", pytest.param("mlp_case", marks=pytest.mark.full)]
)
def test_series_error_is_order_plus_one(case_name, request, high_series):
    case = request.getfixturevalue(case_name)
    fits = _fit_orders(case, high_series)
    for (name, order), exponent in fits.items():
        assert abs(exponent - (order + 1)) <= 0.1, (name, order, exponent)
    # one skill has its minimum at θ* (Δu starts at t²), the other does not (t¹)
    starts = sorted(
        abs(float(high_series(case, name).delta_u[1] / high_series(case, name).delta_u[2]))
        for name in case.skills
    )
    assert starts[0] <= 1e-12 and starts[1] >= 1e-3


def test_truncated_series_equals_lower_order_call(logistic_case, high_series):
    u = logistic_case.skills["min"][0]
    low = series.delta_u_series(u, logistic_case.task_loss, logistic_case.params, 3)
    high = high_series(logistic_case, "min")
    np.testing.assert_allclose(low.delta_u, high.delta_u[:4], rtol=1e-13, atol=0)
    np.testing.assert_allclose(low.displacement, high.displacement[:3], rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- dense twins


@functools.cache
def _dense_twins(case: ModelCase, skill: str) -> dict:
    """Dense derivatives at θ* (raveled, n ≤ 60): g, H, ∇H, ∇u, ∇²u, ∇³u, ∇⁴u[g,g,g,g]."""
    u = case.skills[skill][0]
    flat, unravel = ravel_pytree(case.params)

    @jax.jit
    def tensors(z):
        def L(z):
            return case.task_loss(unravel(z))

        def U(z):
            return u(unravel(z))

        g = jax.grad(L)(z)
        # ∇⁴u[g,g,g,g] along one line, s ↦ u(z + s g), by nested jvps (no series code)
        line = lambda s: U(z + s * g)  # noqa: E731
        for _ in range(4):
            line = (lambda h: lambda s: jax.jvp(h, (s,), (jnp.ones(()),))[1])(line)
        return {
            "g": g,
            "H": jax.hessian(L)(z),
            "dH": jax.jacfwd(jax.hessian(L))(z),
            "du": jax.grad(U)(z),
            "F": jax.hessian(U)(z),
            "T3": jax.jacfwd(jax.hessian(U))(z),
            "u4_gggg": line(jnp.zeros(())),
        }

    assert flat.size <= 60
    return {k: np.asarray(v) for k, v in tensors(flat).items()}


def test_general_model_coefficients_match_dense_tensors(mlp_case, high_series):
    """c₂ = ½gᵀFg, c₃ = −½gᵀFHg − ⅙∇³u[g,g,g], c₄ of docs/theory.md §6, at a KL minimum."""
    t = _dense_twins(mlp_case, "kl")
    g, H, dH, F, T3 = t["g"], t["H"], t["dH"], t["F"], t["T3"]
    assert np.linalg.norm(t["du"]) <= 1e-14  # a minimum of u
    Hg = H @ g
    c2 = 0.5 * g @ F @ g
    c3 = -0.5 * g @ F @ Hg - np.einsum("ijk,i,j,k", T3, g, g, g) / 6
    c4 = (
        0.125 * Hg @ F @ Hg
        + g @ F @ (H @ Hg + np.einsum("ijk,j,k->i", dH, g, g)) / 6
        + 0.25 * np.einsum("ijk,i,j,k", T3, g, g, Hg)
        + t["u4_gggg"] / 24
    )
    s = high_series(mlp_case, "kl")
    assert rel_err(s.delta_u[2], c2) <= 1e-12
    assert rel_err(s.delta_u[3], c3) <= 1e-11
    assert rel_err(s.delta_u[4], c4) <= 1e-11
    # x₃ = −⅙(H²g + ∇H[g,g]) with the dense third derivative of L
    x3 = -(H @ Hg + np.einsum("ijk,j,k->i", dH, g, g)) / 6
    assert rel_err(ravel_pytree(jax.tree.map(lambda a: a[2], s.displacement))[0], x3) <= 1e-12


def test_skill_without_minimum_starts_linearly(mlp_case, high_series):
    """c₁ = −∇uᵀg and c₂ = ½gᵀ∇²u g + ½∇uᵀHg when θ* is not a minimum of u."""
    t = _dense_twins(mlp_case, "ce")
    g, grad_u = t["g"], t["du"]
    s = high_series(mlp_case, "ce")
    assert rel_err(s.delta_u[1], -grad_u @ g) <= 1e-13
    assert abs(float(s.delta_u[1])) > 1e-3
    expected = 0.5 * g @ t["F"] @ g + 0.5 * grad_u @ (t["H"] @ g)
    assert rel_err(s.delta_u[2], expected) <= 1e-12


# --------------------------------------------------------------------------- Pg = 0: quartic onset


class _Subspace:
    """Stand-in for the library's Subspace: anything with ``.values`` and ``.basis``."""

    def __init__(self, values, basis):
        self.values, self.basis = values, basis


def test_orthogonalised_logistic_projected_onset_is_gamma_squared_over_8():
    d = 2
    ls = landscapes.make_logistic_landscape(jax.random.key(4), 16, orthogonalize_d=d)
    lam, V = np.linalg.eigh(np.asarray(ls.fisher()))
    sub = _Subspace(lam[::-1][:d], V[:, ::-1][:, :d].T)
    s = series.delta_u_series(ls.skill_loss, ls.task_loss, ls.theta_star, 5, subspace=sub)
    gamma = ls.aic(d).coupling
    c4 = gamma**2 / 8
    assert rel_err(s.projected[4], c4) <= 1e-12
    assert abs(float(s.projected[2])) <= 1e-14 * c4
    assert abs(float(s.projected[3])) <= 1e-12 * c4
    # the correction is what zeroes Pg: the raw gradient has a projected part
    assert float(jnp.linalg.norm(ls.correction)) > 1e-3 * float(jnp.linalg.norm(ls.theta_star))
    # truncated at t⁴ one real term is left (no error estimate); order 5 bounds it
    four = series.polynomial_validity_time(s.projected[:5], time_scale=s.time_scale)
    assert np.isnan(four)
    assert 0 < s.projected_validity_time < np.inf


def test_orthogonalised_mlp_projected_onset_is_gamma_squared_over_8(mlp_case):
    """``L − ⟨Pg(θ*), θ⟩`` on the MLP; the basis given as a pytree with a leading d axis."""
    d = 3
    u = mlp_case.skills["kl"][0]
    t = _dense_twins(mlp_case, "kl")
    g, H = t["g"], t["H"]
    unravel = ravel_pytree(mlp_case.params)[1]
    lam, V = np.linalg.eigh(t["F"])
    lam, V = lam[::-1][:d], V[:, ::-1][:, :d]
    r = jnp.asarray(V @ (V.T @ g))

    def task_loss(th):
        return mlp_case.task_loss(th) - ravel_pytree(th)[0] @ r

    basis_tree = jax.vmap(unravel)(jnp.asarray(V.T))
    s = series.delta_u_series(u, task_loss, mlp_case.params, 4, subspace=(lam, basis_tree))
    gamma = np.linalg.norm(np.sqrt(lam) * (V.T @ (H @ (g - np.asarray(r)))))
    c4 = gamma**2 / 8
    assert rel_err(s.projected[4], c4) <= 1e-12
    assert abs(float(s.projected[2])) <= 1e-14 * c4
    assert abs(float(s.projected[3])) <= 1e-12 * c4
    flat_basis = series.delta_u_series(u, task_loss, mlp_case.params, 4, subspace=(lam, V.T))
    np.testing.assert_array_equal(np.asarray(flat_basis.projected), np.asarray(s.projected))


# --------------------------------------------------------------------------- engines, jit, API


def _softplus_mlp_loss(params, x, y):
    h = jax.nn.softplus(x @ params[0]["w"] + params[0]["b"])
    return models.softmax_cross_entropy(h @ params[1]["w"] + params[1]["b"], y)


def test_auto_falls_back_to_jvp_where_jet_fails():
    """softplus is a custom_jvp function that jet mishandles (jax-ml/jax#30352)."""
    data = models.gaussian_mixture(jax.random.key(5), 12, 3, 2, dtype=jnp.float64)
    params = models.mlp_init(jax.random.key(6), (3, 5, 2), dtype=jnp.float64)
    with pytest.warns(series.TaylorFallbackWarning, match="2\\^order") as record:
        auto = series.flow_taylor(_softplus_mlp_loss, params, 3, data.x, data.y)
    assert {w.filename for w in record} == {__file__}  # the caller's line
    nested = series.flow_taylor(_softplus_mlp_loss, params, 3, data.x, data.y, method="jvp")
    for a, b in zip(auto, nested, strict=True):
        assert rel_err(ravel_pytree(a)[0], ravel_pytree(b)[0]) <= 1e-13
    assert float(jnp.linalg.norm(ravel_pytree(auto[2])[0])) > 0


def test_the_series_records_its_route_and_both_routes_equal_the_dense_twin():
    """``Series.route``: ``'jet'`` where jet expands both losses (no warning), ``'jvp'`` where
    ``method='auto'`` fell back (with a :class:`series.TaylorFallbackWarning`); each route's
    ``c₁ = ∇uᵀx₁``, ``c₂ = ∇uᵀx₂ + ½x₁ᵀ∇²u x₁`` (``x₁ = −g``, ``x₂ = ½Hg``) equals the
    dense twin from ``jax.hessian`` of the raveled losses, and the routes agree to 1e-13."""
    data = models.gaussian_mixture(jax.random.key(5), 12, 3, 2, dtype=jnp.float64)
    params = models.mlp_init(jax.random.key(6), (3, 5, 2), dtype=jnp.float64)
    flat, unravel = ravel_pytree(params)

    def tanh_loss(p, x, y):
        return models.softmax_cross_entropy(models.mlp_apply(p, x), y)

    def dense_c1_c2(u, task):
        g = jax.grad(lambda f: task(unravel(f), data.x, data.y))(flat)
        H = jax.hessian(lambda f: task(unravel(f), data.x, data.y))(flat)
        grad_u = jax.grad(lambda f: u(unravel(f), data.x, data.y))(flat)
        hess_u = jax.hessian(lambda f: u(unravel(f), data.x, data.y))(flat)
        x1, x2 = -g, 0.5 * H @ g
        return np.array([grad_u @ x1, grad_u @ x2 + 0.5 * x1 @ hess_u @ x1])

    def run(task, method):
        return series.delta_u_series(
            tanh_loss,
            task,
            params,
            3,
            skill_args=(data.x, data.y),
            task_args=(data.x, data.y),
            method=method,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error", series.TaylorFallbackWarning)
        by_jet = run(tanh_loss, "auto")
    with pytest.warns(series.TaylorFallbackWarning, match="nested jax.jvp"):
        fallback = run(_softplus_mlp_loss, "auto")
    assert (by_jet.route, fallback.route) == ("jet", "jvp")
    assert run(tanh_loss, "jvp").route == "jvp" and run(tanh_loss, "jet").route == "jet"
    for task, s in ((tanh_loss, by_jet), (_softplus_mlp_loss, fallback)):
        assert rel_err(s.delta_u[1:3], dense_c1_c2(tanh_loss, task)) <= 1e-12
    assert rel_err(run(tanh_loss, "jvp").delta_u, by_jet.delta_u) <= 1e-13
    assert series.Series(by_jet.delta_u, None, None).route is None  # assembled by hand


def test_jitted_series_does_not_recompile(mlp_case, high_series):
    u = mlp_case.skills["kl"][0]
    d = 2
    lam, basis = jnp.ones((d,)), jnp.eye(d, ravel_pytree(mlp_case.params)[0].size)
    run = jax.jit(series.delta_u_series, static_argnums=(0, 1, 3))
    first = run(u, mlp_case.task_loss, mlp_case.params, 4, subspace=(lam, basis))
    moved = jax.tree.map(lambda a: a * 1.01, mlp_case.params)
    second = run(u, mlp_case.task_loss, moved, 4, subspace=(2 * lam, basis))
    assert run._cache_size() == 1
    reference = high_series(mlp_case, "kl").delta_u[:5]
    np.testing.assert_allclose(np.asarray(first.delta_u), reference, rtol=1e-12, atol=1e-20)
    assert not np.allclose(np.asarray(first.delta_u), np.asarray(second.delta_u))
    values = jax.jit(lambda s, t: s.evaluate(t))(second, jnp.linspace(0.0, 0.1, 5))
    assert values.delta_u.shape == (5,) and values.projected.shape == (5,)


def test_validity_time_of_known_polynomials():
    # t⁴ = 0.1(t² + t⁴)  ⇔  t² = 1/9
    assert series.polynomial_validity_time([0.0, 0.0, 1.0, 0.0, 1.0]) == pytest.approx(1 / 3)
    # sign changes: |−t³| = 0.1|1 + t − t³|, smallest positive root
    t = series.polynomial_validity_time([1.0, 1.0, 0.0, -1.0])
    assert t**3 == pytest.approx(0.1 * abs(1 + t - t**3))
    assert np.isnan(series.polynomial_validity_time([0.0, 0.0, 3.0]))
    assert series.polynomial_validity_time([0.0, 0.0]) == np.inf
    # a rounding-level c₁ beside real c₂, c₃ is ignored given the time scale
    noisy = [0.0, 1e-18, 1.0, 1.0]
    assert series.polynomial_validity_time(noisy, time_scale=1.0) == pytest.approx(
        series.polynomial_validity_time([0.0, 0.0, 1.0, 1.0])
    )


def test_inputs_are_validated(quadratic):
    _, theta_star, task_loss, skill_loss = quadratic
    bad = theta_star.at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="params"):
        series.flow_taylor(task_loss, bad, 2)
    with pytest.raises(ValueError, match="params"):
        series.delta_u_series(skill_loss, task_loss, bad)
    with pytest.raises(ValueError, match="order"):
        series.flow_taylor(task_loss, theta_star, 0)
    with pytest.raises(ValueError, match="order"):
        series.delta_u_series(skill_loss, task_loss, theta_star, 0)
    with pytest.raises(ValueError, match="method"):
        series.flow_taylor(task_loss, theta_star, 2, method="taylor")
    n = theta_star.size
    for subspace in [
        (jnp.ones(2), jnp.ones((2, n + 1))),
        (jnp.ones((2, 1)), jnp.ones((2, n))),
        (jnp.ones(3), jnp.ones((2, n))),
        (jnp.ones(2), jnp.full((2, n), jnp.inf)),
        jnp.ones((2, n)),
    ]:
        with pytest.raises(ValueError, match="subspace"):
            series.delta_u_series(skill_loss, task_loss, theta_star, 2, subspace=subspace)


def test_crossing_step_and_first_order_time_against_brute_force():
    rng = np.random.default_rng(1)
    lr = 0.01
    ks = np.arange(1, 3001)
    for _ in range(40):
        coeffs = np.r_[0.0, rng.standard_normal(4) * [0.1, 1, 1, 0.5]]
        threshold = float(rng.uniform(0.01, 2.0))
        values = np.polynomial.polynomial.polyval(lr * ks, coeffs)
        hits = ks[values >= threshold]
        t_max = float(rng.uniform(1, 40))
        inside = hits[lr * hits <= t_max]
        assert series.crossing_step(coeffs, threshold, lr, t_max) == (
            inside[0] if inside.size else None
        )
    c = [0.0, 2.0, 1.0, 0.0, 4.0]  # t₁: 2t = t² + 4t⁴
    t1 = series.first_order_time(c, 1.0)
    assert 2.0 * t1 == pytest.approx(1.0 * t1**2 + 4.0 * t1**4)
    assert math.isnan(series.first_order_time([0.0, 1e-30, 1.0, 1.0, 1.0], 1.0))  # rounding level
    assert series.first_order_time([0.0, 1.0, 0.0, 0.0], 1.0) == math.inf  # nothing overtakes it
