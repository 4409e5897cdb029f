"""Minibatch SGD forecast ``series.sgd_delta_u`` (docs/theory.md §8).

Checks: on linear-regression tasks with a quadratic skill, against the exact
moment recursion of ``E[x]``, ``E[xxᵀ]`` (with and without replacement) at
several learning rates, its noise series against a dense recursion of
``C̃``; on a logistic landscape and a small MLP, the noise series against a
dense ODE of the covariance and mean shift (convergence order), and the
forecast against the mean of independent minibatch SGD runs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import landscapes, models, series

ORDER = 6  # one compilation serves every quadratic check below


# --------------------------------------------------------------------------- regression tasks


def quad_skill(theta, f):
    return 0.5 * theta @ f @ theta


def sq_loss(theta, a, y):
    return 0.5 * (a @ theta - y) ** 2


def regression(seed: int, n: int = 6, count: int = 24, *, fg_zero: bool = False):
    """Rows ``(a_j, y_j)``, ``A = E aaᵀ``, ``c = g(0)``, a low-rank-plus-tail ``F``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(count, n)) * np.linspace(0.6, 1.6, n) / np.sqrt(n)
    y = rng.normal(size=count) + 0.5
    c = -(a * y[:, None]).mean(0)
    basis = np.linalg.qr(rng.normal(size=(n, n)))[0]
    f = (basis * np.array([2.0, 1.0] + [0.05] * (n - 2))) @ basis.T
    if fg_zero:  # F g = 0: no deterministic t² term, the noise term leads
        q = np.eye(n) - np.outer(c, c) / (c @ c)
        f = q @ f @ q
    return a, y, a.T @ a / count, c, f


@functools.partial(jax.jit, static_argnames=("replacement",))
def exact_moments(a, y, f, lr, batch, steps, *, replacement=True):
    """Exact ``E[Δu_k]`` under SGD and ``Δu`` under GD at the increasing ``steps`` (dense).

    ``x_{k+1} = x_k − η(Ĥx_k + b̂)`` with ``Ĥ``, ``b̂`` means of ``B`` rows; for
    the mean of ``B`` draws ``E[X̂ ⊗ Ŷ] = EX ⊗ EY + s·Cov(X, Y)``, ``s = 1/B``
    with replacement and ``(N − B)/(B(N − 1))`` without.
    """
    count = a.shape[0]
    s = 1.0 / batch if replacement else (count - batch) / (batch * (count - 1))
    b = -a * y[:, None]
    h, c = a.T @ a / count, b.mean(0)

    def step(_, carry):
        m, sec, gd = carry
        hsh = h @ sec @ h
        e_hsh = hsh + s * (
            jnp.einsum("jx,j,jy->xy", a, jnp.einsum("jx,xy,jy->j", a, sec, a), a) / count - hsh
        )
        hmc = jnp.outer(h @ m, c)
        e_hmb = hmc + s * (jnp.einsum("jx,j,jy->xy", a, a @ m, b) / count - hmc)
        e_bb = jnp.outer(c, c) + s * (b.T @ b / count - jnp.outer(c, c))
        mc = jnp.outer(m, c)
        sec = sec - lr * (h @ sec + sec @ h + mc + mc.T) + lr**2 * (e_hsh + e_hmb + e_hmb.T + e_bb)
        m = m - lr * (h @ m + c)
        gd = gd - lr * (h @ gd + c)
        return m, sec, gd

    def segment(carry, target):  # run on to the next requested step (one compilation)
        k, state = carry
        _, sec, gd = state = jax.lax.fori_loop(k, target, step, state)
        return (target, state), (0.5 * jnp.trace(f @ sec), 0.5 * gd @ f @ gd)

    zero = jnp.zeros(a.shape[1], a.dtype)
    init = (zero, jnp.zeros((a.shape[1],) * 2, a.dtype), zero)
    return jax.lax.scan(segment, (jnp.zeros((), steps.dtype), init), steps)[1]


def forecast(problem, lr, batch, steps, *, replacement=True, order=ORDER):
    a, y, _, _, f = problem
    return series.sgd_delta_u(
        quad_skill,
        sq_loss,
        jnp.zeros(a.shape[1]),
        (jnp.asarray(a), jnp.asarray(y)),
        lr=lr,
        batch_size=batch,
        steps=steps,
        order=order,
        skill_args=(jnp.asarray(f),),
        replacement=replacement,
    )


def compare(problem, lr, batch, reach, *, replacement=True, points=6):
    """Forecast and exact moments at ``points`` steps up to ``‖A‖t = reach``."""
    a, y, h, _, f = problem
    last = round(reach / (np.linalg.norm(h, 2) * lr))
    steps = np.unique(np.linspace(1, last, points).astype(int))
    fc = forecast(problem, lr, batch, steps, replacement=replacement)
    sgd, gd = exact_moments(a, y, f, lr, batch, steps, replacement=replacement)
    return fc, np.asarray(sgd), np.asarray(gd)


def rel(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.max(np.abs(actual - expected) / np.abs(expected))


# --------------------------------------------------------------------------- quadratic: exact


def dense_noise_coefficients(problem, order):
    """``n_p = ½tr(F C̃_p)`` from ``C̃' = Σ(x(t)) − AC̃ − C̃A`` (dense, quadratic skill)."""
    a, y, h, c, f = problem
    xs = [np.zeros_like(c)]
    for k in range(order):
        xs.append(-(h @ xs[k] + (c if k == 0 else 0.0)) / (k + 1))
    b = -a * y[:, None]
    hj = np.einsum("jx,jy->jxy", a, a) - h
    dev = [np.einsum("jxy,y->jx", hj, x) + ((b - c) if p == 0 else 0.0) for p, x in enumerate(xs)]
    sig = [sum(dev[i].T @ dev[p - i] for i in range(p + 1)) / len(a) for p in range(order)]
    cov = [np.zeros_like(h)]
    for p in range(order):
        cov.append((sig[p] - h @ cov[p] - cov[p] @ h) / (p + 1))
    return np.array([0.5 * np.trace(f @ cp) for cp in cov])


@pytest.mark.parametrize("fg_zero", [False, True])
def test_noise_series_matches_dense_covariance_recursion(fg_zero):
    problem = regression(0, fg_zero=fg_zero)
    fc = forecast(problem, 1e-3, 4, [1])
    dense = dense_noise_coefficients(problem, ORDER)
    np.testing.assert_allclose(fc.noise_coefficients, dense, rtol=1e-10, atol=1e-14 * abs(dense[1]))
    a, y, _, c, f = problem
    dev = -a * y[:, None] - c
    rate = 0.5 * np.trace(f @ dev.T @ dev / len(a))  # ½tr(FΣ)
    np.testing.assert_allclose(fc.noise_rate, 1e-3 / 4 * rate, rtol=1e-12)
    # the GD series tends to the flow series as lr → 0 (leading terms c_m t^m)
    np.testing.assert_allclose(
        forecast(problem, 1e-9, 4, [1]).deterministic_coefficients,
        fc.flow.delta_u,
        rtol=1e-6,
        atol=1e-6 * np.max(np.abs(fc.flow.delta_u)),
    )


@pytest.mark.parametrize("order", [1, 2])
def test_low_orders_match_the_dense_recursion(order):
    problem = regression(0)
    fc = forecast(problem, 1e-3, 4, [1], order=order)
    np.testing.assert_allclose(
        fc.noise_coefficients, dense_noise_coefficients(problem, order), rtol=1e-10, atol=1e-16
    )


def relu_sq_loss(theta, a, y):
    """``sq_loss`` through an active ``relu``: ``jet`` has no rule (``custom_jvp``)."""
    return 0.5 * (jax.nn.relu(a @ theta - y + 10.0) - 10.0) ** 2


def test_models_without_jet_rules_fall_back_to_nested_jvp():
    problem = regression(0)
    a, y, _, _, f = problem
    fc = series.sgd_delta_u(
        quad_skill,
        relu_sq_loss,
        jnp.zeros(6),
        (a, y),
        lr=1e-3,
        batch_size=4,
        steps=[1],
        order=2,
        skill_args=(jnp.asarray(f),),
    )
    np.testing.assert_allclose(fc.noise_coefficients, dense_noise_coefficients(problem, 2))


@dataclasses.dataclass
class UnhashableSkill:
    """A callable with ``__eq__`` and no hash (as losses held by mutable dataclasses are)."""

    scale: float

    def __call__(self, theta, f):
        return self.scale * quad_skill(theta, f)


def test_unhashable_losses_are_accepted():
    problem = regression(0)
    a, y, _, _, f = problem
    fc = series.sgd_delta_u(
        UnhashableSkill(1.0),
        sq_loss,
        jnp.zeros(6),
        (a, y),
        lr=1e-3,
        batch_size=4,
        steps=[1],
        order=1,
        skill_args=(jnp.asarray(f),),
    )
    np.testing.assert_allclose(fc.noise_coefficients, dense_noise_coefficients(problem, 1))


@pytest.mark.parametrize("fg_zero", [False, True])
def test_small_lr_matches_exact_moments(fg_zero):
    problem = regression(0, fg_zero=fg_zero)
    fc, sgd, gd = compare(problem, 1e-5, 4, 0.1)
    assert rel(fc.mean, sgd) <= 1e-4
    assert rel(fc.deterministic, gd) <= 1e-4 if not fg_zero else True
    # the noise part alone (exact SGD − exact GD) to first order in lr
    assert rel(fc.noise, sgd - gd) <= 1e-4
    assert np.all(fc.in_window)


def test_gd_part_is_exact_for_the_first_steps():
    """On a quadratic, ``Δu(x_k)`` is a polynomial of degree ``2k`` in lr: exact for ``2k ≤ K``."""
    a, y, _, _, f = problem = regression(0)
    steps = np.array([1, 2, 3])
    fc = forecast(problem, 1e-2, 4, steps)
    gd = exact_moments(a, y, f, 1e-2, 4, steps)[1]
    np.testing.assert_allclose(fc.deterministic, gd, rtol=1e-11)


def test_first_order_in_lr():
    """The noise part's error shrinks like lr (the forecast is exact to first order)."""
    problem = regression(0, fg_zero=True)
    errs = {}
    for lr in (1e-3, 1e-4):
        fc, sgd, gd = compare(problem, lr, 4, 0.1)
        errs[lr] = rel(fc.noise, sgd - gd)
        assert rel(fc.mean, sgd) <= 1e-2
    assert errs[1e-3] <= 1e-2
    assert 5 < errs[1e-3] / errs[1e-4] < 20
    # without the noise term the forecast is far off (Fg = 0: the noise leads)
    assert rel(fc.deterministic, sgd) > 0.3


@pytest.mark.parametrize("fg_zero", [False, True])
def test_coupled_task_up_to_04(fg_zero):
    problem = regression(1, fg_zero=fg_zero)
    fc, sgd, gd = compare(problem, 1e-4, 4, 0.4)
    assert rel(fc.mean, sgd) <= 1e-2
    assert rel(fc.noise, sgd - gd) <= 1e-2
    # the two-term law (GD + the linear noise term) misses the curvature terms of N(t)
    linear = fc.deterministic + fc.noise_rate * fc.t
    assert rel(linear - gd, sgd - gd) > 3e-2


def test_without_replacement_matches_exact_moments():
    problem = regression(2)
    fc, sgd, gd = compare(problem, 1e-4, 8, 0.2, replacement=False)
    assert rel(fc.noise, sgd - gd) <= 1e-3
    assert rel(fc.mean, sgd) <= 1e-4
    fc_with = forecast(problem, 1e-4, 8, [1])
    np.testing.assert_allclose(
        fc.noise_coefficients, fc_with.noise_coefficients * (24 - 8) / 23, rtol=1e-12
    )
    everything = forecast(problem, 1e-4, 24, [10], replacement=False)  # B = N: full-batch GD
    assert np.all(np.asarray(everything.noise) == 0)


# --------------------------------------------------------------------------- general models


def logistic_skill(theta, w, y):
    return landscapes.softmax_nll(w, y, theta)


def logistic_example(theta, w, y):
    z = w @ theta
    return jax.nn.logsumexp(z) - y @ z


def mlp_example(params, x, y):
    return models.softmax_cross_entropy(models.mlp_apply(params, x[None]), y[None])


def mlp_kl(params, x, lp_star):
    """``mean_x KL(p_{θ*} ‖ p_θ)``: a skill at its minimum with Hessian F (docs/theory.md §5)."""
    lp = jax.nn.log_softmax(models.mlp_apply(params, x))
    return jnp.mean(jnp.sum(jnp.exp(lp_star) * (lp_star - lp), axis=-1))


# name -> (order, lr, batch, last step): each inside its forecast's window
SETTINGS = {"logistic": (4, 0.05, 2, 40), "mlp": (3, 0.005, 2, 20)}


def make_case(name):
    if name == "logistic":
        land = landscapes.make_logistic_landscape(
            jax.random.key(3), 6, classes=3, skill_examples=2, task_examples=24
        )
        rows = (land.task_features, land.task_targets)
        return (
            logistic_skill,
            logistic_example,
            land.theta_star,
            rows,
            (
                land.skill_features,
                land.skill_targets,
            ),
        )
    k_model, k_skill = jax.random.split(jax.random.key(4))
    p = models.mlp_problem(k_model, (3, 4, 2), 24, gd_steps=2, dtype=jnp.float64)
    skill_x = models.gaussian_mixture(k_skill, 8, 3, 2, dtype=jnp.float64).x
    lp_star = jax.nn.log_softmax(models.mlp_apply(p.params, skill_x))
    return mlp_kl, mlp_example, p.params, (p.batch.x, p.batch.y), (skill_x, lp_star)


@pytest.fixture(  # the MLP case (25 s on the 2-core machine) in the full tier
    scope="module",
    params=[pytest.param(k, marks=pytest.mark.full) if k == "mlp" else k for k in sorted(SETTINGS)],
)
def general(request):
    """A case, its settings and its forecast (computed once: the compilation dominates)."""
    skill, example, params, rows, skill_args = case = make_case(request.param)
    order, lr, batch, last = SETTINGS[request.param]
    steps = np.array([last // 4, last // 2, last])
    fc = series.sgd_delta_u(
        skill,
        example,
        params,
        rows,
        lr=lr,
        batch_size=batch,
        steps=steps,
        order=order,
        skill_args=skill_args,
    )
    return case, (order, lr, batch, last), fc


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def dense_noise(skill, example, params, rows, skill_args, steps, t_end):
    """``N(t_end)`` from the dense first-order moment ODEs along the flow (RK4).

    ``x' = −g``, ``C̃' = Σ(x) − HC̃ − C̃H``, ``μ̃' = −Hμ̃ − ½∇³L[C̃]``;
    ``N = ½tr(∇²u C̃) + ∇u·μ̃``: the dense twin of the Taylor-mode noise series.
    """
    flat, unravel = ravel_pytree(params)

    def grads(v):
        return jax.vmap(lambda *r: ravel_pytree(jax.grad(lambda p: example(p, *r))(unravel(v)))[0])(
            *rows
        )

    def task(v):
        return jnp.mean(jax.vmap(lambda *r: example(unravel(v), *r))(*rows))

    def u(v):
        return skill(unravel(v), *skill_args)

    hess, third = jax.hessian(task), jax.jacfwd(jax.hessian(task))

    def rhs(state):
        x, cov, mu = state
        dev = grads(flat + x) - jax.grad(task)(flat + x)
        h = hess(flat + x)
        return (
            -jax.grad(task)(flat + x),
            dev.T @ dev / dev.shape[0] - h @ cov - cov @ h,
            -h @ mu - 0.5 * jnp.einsum("kab,ab->k", third(flat + x), cov),
        )

    def rk4(state, _):
        dt = t_end / steps

        def add(s, k, a):
            return jax.tree_util.tree_map(lambda p, q: p + a * q, s, k)

        k1 = rhs(state)
        k2 = rhs(add(state, k1, dt / 2))
        k3 = rhs(add(state, k2, dt / 2))
        k4 = rhs(add(state, k3, dt))
        total = jax.tree_util.tree_map(lambda a, b, c, d: a + 2 * b + 2 * c + d, k1, k2, k3, k4)
        return add(state, total, dt / 6), None

    n = flat.size
    init = (jnp.zeros(n), jnp.zeros((n, n)), jnp.zeros(n))
    (x, cov, mu), _ = jax.lax.scan(rk4, init, None, length=steps)
    return 0.5 * jnp.trace(jax.hessian(u)(flat + x) @ cov) + jax.grad(u)(flat + x) @ mu


@pytest.mark.parametrize("general", ["logistic"], indirect=True)  # the MLP's dense ∇³L: slow
def test_noise_series_converges_to_dense_moment_odes(general):
    """Series error ∝ t^K relative (order K): every coefficient n₁ … n_K is right.

    The logistic task has a real third derivative, so the mean shift ``∇u·μ̃``
    (from ``t³``) is checked too: without it the errors shrink like ``t²``.
    """
    (skill, example, params, rows, skill_args), (order, *_), fc = general
    t1 = 0.5 * fc.noise_validity_time
    errs = []
    for t in (t1, t1 / 2):
        dense = dense_noise(skill, example, params, rows, skill_args, 200, t)
        series_value = np.polyval(np.asarray(fc.noise_coefficients)[::-1], t)
        errs.append(abs(series_value - float(dense)) / abs(float(dense)))
    assert errs[1] < 1e-3
    assert order - 0.5 < np.log2(errs[0] / errs[1]) < order + 0.7


@functools.partial(jax.jit, static_argnames=("skill", "example", "lr", "batch", "length", "runs"))
def sgd_runs(key, params, rows, skill_args, *, skill, example, lr, batch, length, runs):
    """``Δu`` along ``runs`` independent minibatch SGD runs and a zero-mean control variate.

    The control variate is ``∇u(x_k^GD)·w_k`` with the linear noise walk
    ``w_{k+1} = (I − ηH(x_k^GD))w_k − ηξ_k`` driven by the same minibatch
    indices, ``ξ_k = ĝ_k(x_k^GD) − g(x_k^GD)``: ``E[w_k] = 0`` exactly.
    Returns ``(runs, length)`` arrays for steps ``1 … length``.
    """
    flat, unravel = ravel_pytree(params)
    count = rows[0].shape[0]

    def u(v):
        return skill(unravel(v), *skill_args)

    def grads(v, idx):
        return jax.vmap(lambda *r: ravel_pytree(jax.grad(lambda p: example(p, *r))(unravel(v)))[0])(
            *[x[idx] for x in rows]
        )

    def task(v):
        return jnp.mean(jax.vmap(lambda *r: example(unravel(v), *r))(*rows))

    def gd_step(x, _):
        info = (jax.hessian(task)(x), grads(x, jnp.arange(count)))
        return x - lr * jax.grad(task)(x), info

    _, (hess, per_example) = jax.lax.scan(gd_step, flat, None, length=length)
    path = jax.lax.scan(lambda x, _: (x - lr * jax.grad(task)(x),) * 2, flat, None, length=length)
    grad_u = jax.vmap(jax.grad(u))(path[1])  # at x_1 … x_K of GD

    def one(key):
        def step(carry, inp):
            th, walk = carry
            h, pe, gu, k = inp
            idx = jax.random.randint(k, (batch,), 0, count)
            th = th - lr * grads(th, idx).mean(0)
            walk = walk - lr * (h @ walk + pe[idx].mean(0) - pe.mean(0))
            return (th, walk), (u(th) - u(flat), gu @ walk)

        inputs = (hess, per_example, grad_u, jax.random.split(key, length))
        return jax.lax.scan(step, (flat, jnp.zeros_like(flat)), inputs)[1]

    return jax.vmap(one)(jax.random.split(key, runs))


def test_forecast_matches_minibatch_sgd_monte_carlo(general):
    (skill, example, params, rows, skill_args), (_, lr, batch, last), fc = general
    runs = 1024
    du, cv = sgd_runs(
        jax.random.key(7),
        params,
        rows,
        skill_args,
        skill=skill,
        example=example,
        lr=lr,
        batch=batch,
        length=last,
        runs=runs,
    )
    steps = np.asarray(fc.steps)
    y = np.asarray(du - cv)[:, steps - 1]
    mean, se = y.mean(0), y.std(0, ddof=1) / np.sqrt(runs)
    assert np.all(fc.in_window)
    assert np.all(np.abs(np.asarray(fc.mean) - mean) <= 3 * se)
    # power: the noise term is many standard errors, so leaving it out fails
    assert np.all(np.abs(np.asarray(fc.deterministic) - mean) > 10 * se)
    # the control variate has mean 0: the raw mean agrees too, with its larger error
    raw = np.asarray(du)[:, steps - 1]
    raw_se = raw.std(0, ddof=1) / np.sqrt(runs)
    assert np.all(np.abs(raw.mean(0) - mean) <= 4 * raw_se)


def test_chunked_passes_equal_the_whole_batch():
    """``chunk_size`` bounds memory, not the numbers: chunks of 5 (the last zero-padded)
    against one pass over every tangent series, on the MLP (``K·N = 72`` at order 3)."""
    skill, example, params, rows, skill_args = make_case("mlp")
    order, lr, batch, last = SETTINGS["mlp"]
    kwargs = dict(lr=lr, batch_size=batch, steps=[last], order=order, skill_args=skill_args)
    whole = series.sgd_delta_u(skill, example, params, rows, chunk_size=10_000, **kwargs)
    chunked = series.sgd_delta_u(skill, example, params, rows, chunk_size=5, **kwargs)
    assert np.all(np.asarray(whole.noise_coefficients)[1:] != 0)
    np.testing.assert_allclose(chunked.noise_coefficients, whole.noise_coefficients, rtol=1e-12)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        series.sgd_delta_u(skill, example, params, rows, chunk_size=0, **kwargs)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"steps": [1, -2]}, "steps"),
        ({"steps": [1.5]}, "steps"),
        ({"steps": []}, "steps"),
        ({"order": 0}, "order"),
        ({"replacement": "no"}, "replacement"),
        ({"replacement": False, "batch_size": 25}, "batch_size"),
        ({"task_data": ()}, "task_data"),
        ({"task_data": (np.ones((24, 6)), np.ones(23))}, "task_data"),
        ({"task_data": (np.ones((1, 6)), np.ones(1))}, "task_data"),
        ({"task_data": (np.full((24, 6), np.nan), np.ones(24))}, "task_data"),
        ({"params": jnp.full(6, jnp.inf)}, "params"),
    ],
)
def test_bad_inputs_name_the_argument(change, name):
    a, y, _, _, f = regression(0)
    kwargs = {
        "params": jnp.zeros(6),
        "task_data": (a, y),
        "lr": 1e-3,
        "batch_size": 4,
        "steps": [1, 2],
        "order": 2,
        "replacement": True,
    } | change
    params, rows = kwargs.pop("params"), kwargs.pop("task_data")
    with pytest.raises(ValueError, match=name):
        series.sgd_delta_u(quad_skill, sq_loss, params, rows, skill_args=(f,), **kwargs)
