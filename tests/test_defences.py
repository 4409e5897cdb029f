"""Defences (docs/theory.md §7) against dense twins and closed forms, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, defences, flow, models
from geomcollapse.subspace import Subspace
from tests.conftest import flat, rel_err, run_optimizer, symmetric_with_spectrum

D = 3


class Mlp:
    """The 6-12-4 MLP (136 parameters): skill = its Fisher on one batch, task = shifted labels."""

    def __init__(self):
        p = models.mlp_problem(jax.random.key(3), (6, 12, 4), 24, gd_steps=2, dtype=jnp.float64)
        self.problem, self.params, self.skill = p, p.params, p.batch
        self.task = models.Batch(p.batch.x, (p.batch.y + 1) % 4)
        self.flat, self.unravel = ravel_pytree(p.params)
        self.fvp = curvature.fisher_vp(p.logits)
        self.grad = jax.jit(jax.grad(p.loss))
        self.F0 = self.dense_fisher(self.flat)
        lam, V = np.linalg.eigh(self.F0)
        self.lam, self.V = lam[::-1], V[:, ::-1].T  # rows, descending

    def dense_fisher(self, flat) -> np.ndarray:
        """``Jᵀ(diag p − ppᵀ)J / N`` from the explicit Jacobian of the logits."""

        def logits(f):
            return self.problem.logits(self.unravel(f), self.skill)

        J = jax.jacfwd(logits)(flat)  # (N, C, n)
        p = jax.nn.softmax(logits(flat), axis=-1)
        W = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
        return np.asarray(jnp.einsum("kci,kcd,kdj->ij", J, W, J) / p.shape[0])

    def subspace(self, d: int = D) -> Subspace:
        return Subspace.exact(self.lam[:d], self.V[:d])

    def top_rows(self, flat, d: int = D) -> np.ndarray:
        _, V = np.linalg.eigh(self.dense_fisher(flat))
        return V[:, ::-1][:, :d].T


@pytest.fixture(scope="module")
def mlp():
    return Mlp()


# --- initial orthogonalisation, static projection ----------------------------------------


def test_initial_orthogonalization_is_sgd_on_the_corrected_loss(mlp):
    """Twin: SGD on ``L(θ) − ⟨P g(θ*), θ⟩``, dense ``P``; only the first step avoids M."""
    s = mlp.subspace()
    P = mlp.V[:D].T @ mlp.V[:D]
    c = jnp.asarray(P @ flat(mlp.grad(mlp.params, mlp.task)))

    def corrected(params, batch):
        return mlp.problem.loss(params, batch) - jnp.dot(c, ravel_pytree(params)[0])

    ours, updates, _ = run_optimizer(
        optax.chain(defences.initial_orthogonalization(s), optax.sgd(0.5)),
        mlp.params,
        mlp.grad,
        6,
        mlp.task,
    )
    twin, _, _ = run_optimizer(
        optax.sgd(0.5), mlp.params, jax.jit(jax.grad(corrected)), 6, mlp.task
    )
    for a, b in zip(ours, twin, strict=True):
        assert rel_err(flat(a) - mlp.flat, flat(b) - mlp.flat) < 1e-13
    inside = [np.linalg.norm(P @ flat(u)) / np.linalg.norm(flat(u)) for u in updates]
    assert inside[0] < 1e-14 and min(inside[1:]) > 1e-3  # the drift is left on


def test_project_out_keeps_the_displacement_out_of_M(mlp):
    """``P(θ_K − θ*) = 0`` to rounding, with SGD before and Adam after it; not so without it."""
    s = mlp.subspace()
    rows = mlp.V[:D]
    for opt in (
        optax.chain(defences.project_out(s), optax.sgd(0.5)),
        optax.chain(optax.adam(0.05), defences.project_out(s)),
    ):
        thetas, _, _ = run_optimizer(opt, mlp.params, mlp.grad, 20, mlp.task)
        x = flat(thetas[-1]) - mlp.flat
        assert jax.tree_util.tree_structure(thetas[-1]) == jax.tree_util.tree_structure(mlp.params)
        assert np.linalg.norm(rows @ x) < 1e-13 * np.linalg.norm(x)
    thetas, _, _ = run_optimizer(optax.sgd(0.5), mlp.params, mlp.grad, 20, mlp.task)
    x = flat(thetas[-1]) - mlp.flat
    assert np.linalg.norm(rows @ x) > 0.05 * np.linalg.norm(x)


# --- tracking M(θ) ----------------------------------------------------------------------


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_project_out_tracking_follows_the_dense_top_eigenspace(mlp, refresh_every):
    """After each refresh the basis spans ``eigh``'s top-d of ``F(θ_k)``; updates are ⊥ to it."""
    tracker = defences.project_out_tracking(
        mlp.fvp, D, refresh_every, key=jax.random.key(0), fisher_args=(mlp.skill,)
    )
    steps = 2 * refresh_every + 1
    thetas, updates, states = run_optimizer(
        optax.chain(tracker, optax.sgd(0.5)), mlp.params, mlp.grad, steps, mlp.task
    )
    for k in range(steps):
        state, u = states[k][0], flat(updates[k])
        basis = np.asarray(state.basis)
        assert np.linalg.norm(basis @ u) < 1e-13 * np.linalg.norm(u)
        if k % refresh_every == 0:
            assert bool(state.converged)
            assert flow.principal_angle(mlp.top_rows(flat(thetas[k])), basis) < 1e-10
        else:
            np.testing.assert_array_equal(basis, np.asarray(states[k - 1][0].basis))
    # M really moved: a basis frozen at θ* would fail the angle check above
    assert flow.principal_angle(mlp.V[:D], np.asarray(states[-1][0].basis)) > 0.1


# --- Fisher penalties -------------------------------------------------------------------


def test_fisher_penalty_adds_the_gradient_of_the_dense_penalty(mlp):
    """``update = g + ∇(½ρ xᵀPFPx)`` with ``PFP`` dense; K steps = SGD on ``L + penalty``."""
    rho = 3.0
    s = mlp.subspace()
    PFP = jnp.asarray(mlp.V[:D].T @ np.diag(mlp.lam[:D]) @ mlp.V[:D])

    def penalised(params, batch):
        x = ravel_pytree(params)[0] - mlp.flat
        return mlp.problem.loss(params, batch) + 0.5 * rho * x @ PFP @ x

    opt = optax.chain(defences.fisher_penalty(s, rho), optax.sgd(0.5))
    ours, _, _ = run_optimizer(opt, mlp.params, mlp.grad, 6, mlp.task)
    twin, _, _ = run_optimizer(
        optax.sgd(0.5), mlp.params, jax.jit(jax.grad(penalised)), 6, mlp.task
    )
    for a, b in zip(ours[1:], twin[1:], strict=True):
        assert rel_err(flat(a) - mlp.flat, flat(b) - mlp.flat) < 1e-12

    t = defences.fisher_penalty(s, rho)
    theta = mlp.unravel(mlp.flat + 0.1 * np.random.default_rng(0).standard_normal(mlp.flat.size))
    g = mlp.grad(theta, mlp.task)
    got, _ = t.update(g, t.init(mlp.params), theta)
    want = jax.grad(penalised)(theta, mlp.task)
    assert rel_err(flat(got), flat(want)) < 1e-13
    assert rel_err(flat(got) - flat(g), flat(want) - flat(g)) < 1e-12


def test_full_fisher_penalty_adds_the_gradient_of_the_dense_ewc_term(mlp):
    """``update = g + ∇(½ρ xᵀF(θ*)x)``, ``F`` from the explicit Jacobian."""
    rho = 2.0
    F = jnp.asarray(mlp.F0)

    def penalised(params, batch):
        x = ravel_pytree(params)[0] - mlp.flat
        return mlp.problem.loss(params, batch) + 0.5 * rho * x @ F @ x

    t = defences.full_fisher_penalty(mlp.fvp, rho, fisher_args=(mlp.skill,))
    theta = mlp.unravel(mlp.flat + 0.1 * np.random.default_rng(1).standard_normal(mlp.flat.size))
    g = mlp.grad(theta, mlp.task)
    got, _ = jax.jit(t.update)(g, t.init(mlp.params), theta)
    want = jax.grad(penalised)(theta, mlp.task)
    assert rel_err(flat(got) - flat(g), flat(want) - flat(g)) < 1e-12
    # fisher_args given per call replace the factory's
    other = models.Batch(mlp.skill.x[:12], mlp.skill.y[:12])
    t0 = defences.full_fisher_penalty(mlp.fvp, rho, fisher_args=(other,))
    again, _ = t0.update(g, t0.init(mlp.params), theta, fisher_args=(mlp.skill,))
    assert rel_err(flat(again), flat(got)) < 1e-14

    opt = optax.chain(t, optax.sgd(0.5))
    ours, _, _ = run_optimizer(opt, mlp.params, mlp.grad, 5, mlp.task)
    twin, _, _ = run_optimizer(
        optax.sgd(0.5), mlp.params, jax.jit(jax.grad(penalised)), 5, mlp.task
    )
    assert rel_err(flat(ours[-1]) - mlp.flat, flat(twin[-1]) - mlp.flat) < 1e-12


# --- Fisher budget ----------------------------------------------------------------------

N = 20


@pytest.fixture(scope="module")
def quadratic():
    """``F`` with 5 large, 5 tail and 10 zero eigenvalues; a task target far outside the budget."""
    F = symmetric_with_spectrum(np.r_[[5.0, 4.0, 3.0, 2.0, 1.0], [0.1] * 5, [0.0] * 10], seed=2)
    rng = np.random.default_rng(3)
    theta_star = rng.standard_normal(N)
    target = theta_star + 3.0 * rng.standard_normal(N)
    return jnp.asarray(F), jnp.asarray(theta_star), jnp.asarray(target)


def dense_fvp(params, v, F):
    return F @ v


def budget_step(F, x, u, budget):
    """The Fisher-budget step (docs/theory.md §7) written densely in numpy; its rule too."""
    F, x, u = (np.asarray(a, np.float64) for a in (F, x, u))
    w = F @ x

    def q(z):
        return 0.5 * z @ F @ z

    def onto_boundary(y):
        """``a`` nearest 0 with ``q(y − a w) = budget`` (0 inside), or None if the line misses."""
        if q(y) <= budget:
            return 0.0
        if w @ w == 0:
            return None
        roots = np.roots([0.5 * w @ F @ w, -(w @ F @ y), q(y) - budget])
        real = roots[np.abs(roots.imag) <= 1e-12 * np.abs(roots).max()].real
        return real[np.argmin(np.abs(real))] if real.size else None

    a = onto_boundary(x + u)
    if a is not None:
        return u - a * w, "pass" if a == 0 else "normal"
    v = u - max(0.0, w @ u) / (w @ w) * w if w @ w > 0 else u
    if onto_boundary(x) is None:
        y = x + u
        return np.sqrt(budget / q(y)) * y - x, "ray"
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if onto_boundary(x + mid * v) is not None else (lo, mid)
    return lo * v - onto_boundary(x + lo * v) * w, "shortened"


def q_of(F, x):
    x = np.asarray(x)
    return 0.5 * x @ np.asarray(F) @ x


def test_fisher_budget_step_is_its_dense_formula(quadratic):
    """Every rule against its numpy twin; a changed step lands on the budget."""
    F, theta_star, _ = quadratic
    budget = 0.5
    t = defences.fisher_budget(dense_fvp, budget, fisher_args=(F,))
    state = t.init(theta_star)
    update = jax.jit(t.update)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(N)
    edge = x * np.sqrt(budget / q_of(F, x))  # q(edge) = budget
    w = np.asarray(F) @ edge
    tangent = rng.standard_normal(N)
    tangent -= (tangent @ w) / (w @ w) * w
    cases = [  # (x, u, rule)
        (0.1 * edge, 0.05 * tangent, "pass"),
        (edge, -0.1 * w + 0.01 * tangent, "pass"),
        (0.5 * edge, edge, "normal"),
        (edge, 0.1 * w + 0.1 * tangent, "normal"),
        (edge, 0.1 * tangent, "normal"),
        (1.2 * edge, 0.1 * tangent, "normal"),
        (edge, 30.0 * tangent, "shortened"),
        (edge, 30.0 * edge, "shortened"),
        (np.zeros(N), 3.0 * tangent, "shortened"),
        (5.0 * edge + 3.0 * tangent, 0.1 * tangent, "ray"),
    ]
    for x, u, branch in cases:
        got, _ = update(jnp.asarray(u), state, theta_star + x)
        want, which = budget_step(F, x, u, budget)
        assert which == branch
        # a shortened step ends where the normal line is tangent to the boundary,
        # where the root moves as √(discriminant): rounding eps shows as √eps there
        assert rel_err(got, want) < (1e-7 if branch == "shortened" else 1e-12), branch
        if branch == "pass":
            np.testing.assert_array_equal(got, u)  # untouched, bit for bit
        else:
            assert q_of(F, x + np.asarray(got)) == pytest.approx(budget, rel=1e-13)


@pytest.mark.parametrize(("budget", "lr"), [(0.5, 0.02), (0.05, 0.1)], ids=["small", "large"])
def test_fisher_budget_holds_q_under_the_budget_along_200_sgd_steps(quadratic, budget, lr):
    """Plain SGD takes ``q`` past 100× the budget; with the defence ``q ≤ budget`` to rounding.

    Steps small against the budget leave the directions ``F`` does not see
    exactly as plain SGD moves them; steps large against it are shortened but
    still make progress there.
    """
    F, theta_star, target = quadratic
    Fn = np.asarray(F)

    def task_grad(theta):
        return theta - target

    free, _, _ = run_optimizer(optax.sgd(lr), theta_star, task_grad, 200)
    assert max(q_of(F, th - theta_star) for th in free) > 100 * budget

    opt = optax.chain(optax.sgd(lr), defences.fisher_budget(dense_fvp, budget, fisher_args=(F,)))
    thetas, updates, _ = run_optimizer(opt, theta_star, task_grad, 200)
    xs = [np.asarray(th - theta_star) for th in thetas]
    qs = np.array([q_of(F, x) for x in xs])
    assert qs.max() <= budget * (1 + 1e-12)
    hit = int(np.argmax(qs >= budget * (1 - 1e-12)))
    assert 0 < hit < 50  # it reaches the boundary …
    for x, u in zip(xs[hit:-1], updates[hit:], strict=True):  # … never steps outward there …
        assert (Fn @ x) @ np.asarray(u) <= 1e-12 * budget  # first-order change of q
    # … and keeps moving in the directions F does not see
    _, V = np.linalg.eigh(Fn)
    null = V[:, :10].T
    if budget == 0.5:
        for ours, plain in zip(thetas, free, strict=True):
            assert (
                rel_err(null @ np.asarray(ours - theta_star), null @ (plain - theta_star)) < 1e-12
            )
    else:
        gap = [np.linalg.norm(null @ (x - np.asarray(target - theta_star))) for x in xs]
        assert gap[-1] < 0.2 * gap[hit]


def test_fisher_budget_with_a_huge_budget_is_the_identity(quadratic):
    """Every step passes unchanged, bit for bit; the run is plain SGD's (to XLA's fusion)."""
    F, theta_star, target = quadratic
    t = defences.fisher_budget(dense_fvp, 1e12, fisher_args=(F,))
    ours, updates, _ = run_optimizer(
        optax.chain(optax.sgd(0.1), t), theta_star, lambda th: th - target, 30
    )
    free, _, _ = run_optimizer(optax.sgd(0.1), theta_star, lambda th: th - target, 30)
    for a, b in zip(ours, free, strict=True):
        assert rel_err(a - theta_star, b - theta_star) < 1e-14
    update = jax.jit(t.update)
    state = t.init(theta_star)
    for theta, u in zip(ours[:-1], updates, strict=True):
        np.testing.assert_array_equal(update(u, state, theta)[0], u)


def test_fisher_budget_on_the_mlp_after_adam(mlp):
    """A pytree model, the library's Fisher matvec, Adam before it: dense ``q ≤ budget``."""
    budget = 1e-3
    t = defences.fisher_budget(mlp.fvp, budget, fisher_args=(mlp.skill,))
    thetas, _, _ = run_optimizer(
        optax.chain(optax.adam(0.05), t), mlp.params, mlp.grad, 25, mlp.task
    )
    qs = [q_of(mlp.F0, flat(th) - mlp.flat) for th in thetas]
    assert max(qs) <= budget * (1 + 1e-12) and max(qs) > 0.99 * budget


# --- bad input --------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument(mlp):
    s = mlp.subspace()
    key = jax.random.key(0)
    fvp = mlp.fvp
    bad = Subspace.exact(jnp.ones(2), jnp.eye(5)[:2])
    mismatched = Subspace(jnp.ones(3), jnp.eye(5)[:2], jnp.zeros(3), jnp.asarray(True))
    cases = [
        (lambda: defences.initial_orthogonalization("M"), "subspace"),
        (lambda: defences.project_out(mismatched), "subspace"),
        (lambda: defences.project_out(bad).init(mlp.params), "params"),
        (lambda: defences.initial_orthogonalization(bad).init(mlp.params), "params"),
        (lambda: defences.fisher_penalty(bad, 1.0).init(mlp.params), "params"),
        (lambda: defences.fisher_penalty(s, 0.0), "rho"),
        (lambda: defences.fisher_penalty(s, -1.0), "rho"),
        (lambda: defences.fisher_penalty(s, float("nan")), "rho"),
        (lambda: defences.full_fisher_penalty(fvp, float("inf")), "rho"),
        (lambda: defences.full_fisher_penalty("F", 1.0), "fisher_vp"),
        (lambda: defences.full_fisher_penalty(fvp, 1.0, fisher_args=mlp.skill.x), "fisher_args"),
        (lambda: defences.fisher_budget(fvp, 0.0), "budget"),
        (lambda: defences.fisher_budget(fvp, -2.0), "budget"),
        (lambda: defences.project_out_tracking(fvp, 0, 1, key=key), "d"),
        (lambda: defences.project_out_tracking(fvp, 2, 0, key=key), "refresh_every"),
        (lambda: defences.project_out_tracking(fvp, 2, 1, key=None), "key"),
        (lambda: defences.project_out_tracking(fvp, 136, 1, key=key).init(mlp.params), "d"),
        (lambda: defences.fisher_penalty(s, 1.0).init(jnp.full(136, jnp.nan)), "params"),
    ]
    g = mlp.grad(mlp.params, mlp.task)
    for t in (
        defences.fisher_penalty(s, 1.0),
        defences.full_fisher_penalty(fvp, 1.0, fisher_args=(mlp.skill,)),
        defences.fisher_budget(fvp, 1.0, fisher_args=(mlp.skill,)),
        defences.project_out_tracking(fvp, 2, 1, key=key, fisher_args=(mlp.skill,)),
    ):
        cases.append((lambda t=t: t.update(g, t.init(mlp.params)), "params"))
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
