"""Gradient flows: exact on quadratics, diffrax ODE flow and optax optimizers for any loss.

docs/theory.md §4: for ``L = ½xᵀAx + cᵀx`` the flow ``ẋ = −(Ax + c)``, ``x(0) = 0`` is
``x(t) = −t φ₁(−At) c`` with ``φ₁(z) = (eᶻ − 1)/z``. We evaluate it as
``x(t) = −t c + t² A φ₂(−At) c`` with ``φ₂(z) = (eᶻ − 1 − z)/z²``, so the
component of ``x`` in ``M`` when ``Pc = 0`` (``t² PAφ₂c``) is computed with full
relative accuracy at small ``t`` instead of as a difference of ``O(t)`` terms,
and a singular ``A`` needs no special case (``φ₂(0) = ½``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from geomcollapse import linalg
from geomcollapse._checks import (
    finite_leaves,
    float_vector,
    positive_float,
    positive_float_or_traced,
    positive_int,
    prng_key,
)
from geomcollapse._phi import phi2
from geomcollapse._sharding import Layout, is_sharded
from geomcollapse.progress import progress_bar
from geomcollapse.subspace import Subspace

__all__ = [
    "Flow",
    "KrylovFlow",
    "SkillChange",
    "TrajectoryRecord",
    "krylov_quadratic_flow",
    "ode_flow",
    "optimizer_trajectory",
    "phi2",
    "principal_angle",
    "quadratic_flow",
    "quadratic_gd",
    "record_trajectory",
    "skill_change",
]

PyTree = Any


def quadratic_flow(A: jax.Array, c: jax.Array, ts: jax.Array) -> jax.Array:
    """Exact gradient flow ``x(t)`` of ``½xᵀAx + cᵀx`` from ``x(0) = 0``.

    Args:
      A: ``(n, n)`` symmetric (any sign, singular allowed).
      c: ``(n,)`` gradient at ``θ*``.
      ts: ``(T,)`` times ``≥ 0``.

    Returns:
      ``(T, n)`` positions ``x(t) = −tc + t²Aφ₂(−At)c`` (via ``eigh(A)``).
    """
    a, U = jnp.linalg.eigh(A)
    cu = U.T @ c
    ts = jnp.asarray(ts, c.dtype)
    # A φ₂(−At) c in A's eigenbasis: a_i φ₂(−a_i t) (Uᵀc)_i.
    coeff = a[None, :] * phi2(-a[None, :] * ts[:, None]) * cu[None, :]
    return -ts[:, None] * c[None, :] + (ts**2)[:, None] * (coeff @ U.T)


class KrylovFlow(NamedTuple):
    """Exact flow of a quadratic by Lanczos on ``A`` from ``c`` (:func:`krylov_quadratic_flow`).

    Attributes:
      x: ``(T, n)`` positions ``x(t)``.
      error: ``(T,)`` estimated ``‖x(t) − x_m(t)‖ / ‖x_m(t)‖`` (zero where the
        Krylov space is exhausted, i.e. the result is exact).
      num_matvecs: ``()`` int32, products with ``A``.
      converged: ``()`` bool, every ``error ≤ tol``.
    """

    x: jax.Array
    error: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array


def _krylov_coefficients(run, ts, c_norm):
    """``z(t)`` with ``−x_m(t) = Qᵀz(t)``, and the error estimate per time."""
    r = linalg.ritz(run)
    theta = jnp.where(r.valid, r.values, 0.0)
    s0 = jnp.where(r.valid, r.vectors[0], 0.0)
    # z(t) = t‖c‖e₁ − t²‖c‖ S diag(θ φ₂(−tθ)) Sᵀe₁: the t² term carries no cancellation.
    weights = theta[None, :] * phi2(-ts[:, None] * theta[None, :]) * s0[None, :]
    z = -((ts**2)[:, None] * c_norm) * (weights @ r.vectors.T)
    z = z.at[:, 0].add(ts * c_norm)
    # The residual of y_m = Qᵀz in ẏ = −Ay + c is β_m z_{m−1}(t) q_m, so the error
    # e(t) = −∫₀ᵗ e^{−(t−s)A} r(s) ds obeys
    # ‖e(t)‖ ≤ t e^{t·max(0, −a_min)} max_{s≤t} β_m|z_{m−1}(s)|,
    # the max taken over the time grid (an estimate between grid points).
    last = jnp.maximum(run.num_steps - 1, 0)
    order = jnp.argsort(ts)
    running = jax.lax.cummax(jnp.abs(z[order, last]))[jnp.argsort(order)]
    growth = jnp.exp(ts * jnp.maximum(0.0, -jnp.min(jnp.where(r.valid, r.values, jnp.inf))))
    bound = ts * growth * run.residual_norm * running
    return z, bound


def krylov_quadratic_flow(
    matvec: Callable[[jax.Array], jax.Array],
    c: jax.Array,
    ts: jax.Array,
    *,
    tol: float | None = None,
    max_steps: int | None = None,
    check_every: int = 4,
) -> KrylovFlow:
    """Exact gradient flow of ``½xᵀAx + cᵀx`` from ``x(0) = 0`` by Lanczos on ``A`` from ``c``.

    The same ``x(t) = −tc + t²Aφ₂(−At)c`` as :func:`quadratic_flow`, evaluated in
    the Krylov space ``K_m(A, c)`` (``m`` matvecs and one small ``eigh`` per check
    instead of a dense ``eigh(A)``), with ``m`` grown until the a-posteriori
    bound on ``‖x − x_m‖`` is ``≤ tol·‖x_m(t)‖`` at every time, or the space is
    exhausted (then exact). Pure and traceable: jit it; batch it with ``vmap`` on
    GPU and ``lax.map`` on CPU (vmapped, it hangs XLA:CPU; see ``linalg._traced``).

    Args:
      matvec: ``v ↦ Av`` for symmetric ``A`` (any sign), traceable.
      c: ``(n,)`` gradient at ``θ*``.
      ts: ``(T,)`` times ``≥ 0``.
      tol: relative tolerance of the estimate (default ``100·eps`` of ``c``'s dtype).
      max_steps: static Krylov capacity (default ``min(n, 96)``); if reached
        first, ``converged`` is False and ``error`` says how far off.
      check_every: static steps between stopping checks.
    """
    float_vector(c, "c")
    n = c.shape[0]
    max_steps = min(n, 96) if max_steps is None else positive_int(max_steps, "max_steps")
    if not 1 <= max_steps <= n:
        raise ValueError(f"max_steps must be in [1, n={n}], got {max_steps}")
    tol = linalg.default_tol(c.dtype) if tol is None else positive_float_or_traced(tol, "tol")
    _check_nonnegative(ts, "ts")
    ts = jnp.asarray(ts, c.dtype)
    c_norm = jnp.linalg.norm(c)
    start = jnp.where(c_norm > 0, c, jnp.zeros_like(c).at[0].set(1.0))

    def within_tol(bound, z_norm):
        return jnp.all(bound <= tol * z_norm)

    def stop(run):
        z, bound = _krylov_coefficients(run, ts, c_norm)
        return within_tol(bound, jnp.linalg.norm(z, axis=1))

    run = linalg.lanczos(matvec, start, max_steps, stop, check_every=check_every)
    z, bound = _krylov_coefficients(run, ts, c_norm)
    z_norm = jnp.linalg.norm(z, axis=1)
    error = jnp.where(bound > 0, bound / jnp.where(z_norm > 0, z_norm, 1.0), 0.0)
    return KrylovFlow(
        x=-jnp.dot(z, run.basis, precision=jax.lax.Precision.HIGHEST),
        error=error,
        num_matvecs=run.num_steps,
        converged=within_tol(bound, z_norm),
    )


def quadratic_gd(A: jax.Array, c: jax.Array, eta: float, ks: jax.Array) -> jax.Array:
    """Gradient descent ``x_{k+1} = x_k − η(Ax_k + c)``, ``x_0 = 0``, in closed form.

    ``x_k = −η Σ_{j<k} (I − ηA)^j c`` (docs/theory.md §4), evaluated in ``A``'s
    eigenbasis. Each mode's factor ``−η Σ_{j<k} b^j = (b^k − 1)/a``, ``b = 1 − ηa``,
    is computed as ``expm1(k log|b|)/a`` with ``log|b| = log1p(−ηa)`` below the
    stability edge and ``log1p(ηa − 2)`` above it (``ηa − 1`` is exact there), so
    it keeps full relative accuracy for every ``ηa`` (no first-order branch:
    ``ηa = 1e-14`` and ``ηa = 1e-8`` with ``k = 10⁶`` alike). ``a = 0`` gives
    ``−ηk``; ``ηa = 1`` gives ``−η`` for ``k ≥ 1``; past the edge (``b < 0``) odd
    ``k`` take ``−|b|^k − 1`` (no cancellation) and GD oscillates as it should.

    Args:
      A: ``(n, n)`` symmetric (any sign).
      c: ``(n,)`` gradient at ``θ*``.
      eta: step size ``η``.
      ks: ``(K,)`` step counts ``k ≥ 0`` (integers, any float dtype).

    Returns:
      ``(K, n)`` iterates ``x_k``.

    Raises:
      ValueError: ``A`` not ``(n, n)`` symmetric or ``c`` not ``(n,)`` (concrete
        ones also finite), ``eta`` not a positive number, ``ks`` not integers ≥ 0.
    """
    _check_quadratic(A, c)
    eta = positive_float_or_traced(eta, "eta")
    _check_nonnegative(ks, "ks", integers=True)
    a, U = jnp.linalg.eigh(A)
    cu = U.T @ c
    ks = jnp.asarray(ks, c.dtype)[:, None]
    ea = eta * a[None, :]
    past_edge = ea > 1
    # log|1 − ηa|: log1p(−ηa) for ηa ≤ 1 (−inf at ηa = 1, so b^k − 1 = −1 for
    # k ≥ 1; k = 0 is masked below); past the edge |b| = ηa − 1, exact by Sterbenz
    # up to ηa = 2 and well-conditioned beyond.
    log_abs_base = jnp.where(
        past_edge, jnp.log1p(jnp.where(past_edge, ea, 2.0) - 2.0), jnp.log1p(-jnp.minimum(ea, 1.0))
    )
    scaled = jnp.where(ks == 0, 0.0, ks * log_abs_base)
    negative = past_edge & (jnp.mod(ks, 2.0) == 1.0)
    power_minus_one = jnp.where(negative, -jnp.exp(scaled) - 1.0, jnp.expm1(scaled))
    zero = a[None, :] == 0
    factor = jnp.where(zero, -eta * ks, power_minus_one / jnp.where(zero, 1.0, a[None, :]))
    return (factor * cu[None, :]) @ U.T


def _check_quadratic(A: Any, c: Any) -> None:
    """``A`` ``(n, n)`` and ``c`` ``(n,)`` floating; concrete ones finite and ``A`` symmetric."""
    float_vector(c, "c")
    if np.shape(A) != (np.shape(c)[0],) * 2:
        raise ValueError(f"A must be (n, n) with n = c.size, got A {np.shape(A)}, c {np.shape(c)}")
    finite_leaves(A, "A")
    if not isinstance(A, jax.core.Tracer):
        arr = np.asarray(A)
        tol = 1e3 * np.finfo(arr.dtype).eps * max(float(np.max(np.abs(arr))), 1e-300)
        if float(np.max(np.abs(arr - arr.T))) > tol:
            raise ValueError("A is not symmetric (the closed form uses eigh(A))")


def _check_nonnegative(values: Any, name: str, integers: bool = False) -> None:
    """Raise unless ``values`` is 1-D; concrete entries finite, ``≥ 0`` (and integral)."""
    if np.ndim(values) != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {np.shape(values)}")
    if isinstance(values, jax.core.Tracer):
        return
    arr = np.asarray(values, np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and ≥ 0")
    if integers and np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must hold integer step counts")


def _check_times(ts: Any, name: str = "ts") -> np.ndarray:
    arr = np.asarray(ts, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of times, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr[0] < 0 or np.any(np.diff(arr) <= 0):
        raise ValueError(f"{name} must be finite, ≥ 0 and strictly increasing")
    return arr


class Flow(NamedTuple):
    """A gradient flow from ``θ*`` at its save times (:func:`ode_flow`).

    Attributes:
      ts: ``(T,)`` save times.
      displacement: ``x(t) = θ(t) − θ*``, the integrated state itself (never
        recovered as ``θ − θ*``, which would round it to ``eps·|θ*|``): ``θ*``'s
        pytree with a leading ``T`` axis. Use it for everything measured relative
        to ``θ*`` (projected loss, ``Δu`` via :func:`skill_change`, ``‖x‖``).
      theta: ``θ(t) = θ* + x(t)``, same layout (rounded to ``eps·|θ*|``).
    """

    ts: jax.Array
    displacement: PyTree
    theta: PyTree


class _GradientField(eqx.Module):
    """``x ↦ −∇L(θ0 + x)`` (or ``−∇ℓ(x)`` for a loss of the displacement): the field in ``x``."""

    loss_fn: Callable[..., jax.Array] = eqx.field(static=True)
    of_displacement: bool = eqx.field(static=True)
    theta0: PyTree
    args: tuple
    layout: Layout | None = eqx.field(static=True, default=None)

    def __call__(self, t, x, _):
        if self.of_displacement:
            grad = jax.grad(self.loss_fn)(x, *self.args)
        else:
            theta = jax.tree_util.tree_map(jnp.add, self.theta0, x)
            grad = jax.grad(self.loss_fn)(theta, *self.args)
        field = jax.tree_util.tree_map(jnp.negative, grad)
        if self.layout is not None:  # the state keeps θ0's sharding through the solve
            field = jax.lax.with_sharding_constraint(field, self.layout.shardings)
        return field


def ode_flow(
    loss_fn: Callable[..., jax.Array],
    theta0: PyTree,
    ts: Any,
    *,
    args: tuple = (),
    loss_of_displacement: bool = False,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dt: float | None = None,
    max_steps: int = 65536,
    progress: bool = False,
) -> Flow:
    """Gradient flow ``dθ/dt = −∇L(θ)``, ``θ(0) = θ0``, integrated with diffrax.

    The state is the displacement ``x = θ − θ0`` (``x(0) = 0``) and it is
    returned as such (:attr:`Flow.displacement`): error control and output are
    relative to ``x`` itself, so its ``t``- and ``t²``-small parts are resolved
    at small ``t`` whatever ``|θ0|``. The field still evaluates ``∇L(θ0 + x)``,
    whose rounding (``eps·|θ0|`` in ``θ``) costs an absolute error
    ``≈ t·‖H‖·eps·|θ0|`` in ``x``: relative ``‖H‖eps|θ0|/‖g‖``, 2e-13 for
    ``t ∈ [1e-7, 1]`` on the tests' quadratic at ``|θ0|∞ = 10³``. A component
    of ``x`` that starts as ``t²`` (``Px`` when ``Pg = 0``) sees it relative to
    ``t²``: 1e-8 there at ``t = 1e-7``. A loss written as a function of the
    displacement (``loss_of_displacement=True``) avoids that rounding.

    Args:
      loss_fn: ``loss_fn(θ, *args) -> scalar``, or ``loss_fn(x, *args)`` with
        ``x = θ − θ0`` when ``loss_of_displacement`` is True.
      theta0: initial parameters ``θ*`` (a pytree of finite floating arrays).
      ts: ``(T,)`` strictly increasing save times ``≥ 0``.
      args: extra arguments for ``loss_fn``.
      loss_of_displacement: static; ``loss_fn`` takes ``x`` instead of ``θ``.
      solver: a diffrax solver (default ``Dopri8()``, order 8: at the tight
        tolerances theory checks need it takes far fewer steps than ``Tsit5``).
      rtol, atol: adaptive step-size tolerances (``PIDController``); default
        ``rtol = 1e-12`` in float64 (``1e-6`` in float32) and ``atol = 1e-4·rtol``:
        ``x`` starts at 0, so a loose ``atol`` would swamp its ``t²``-small part.
      dt: a fixed step instead of adaptive control (``ConstantStepSize``); used
        by the order test.
      max_steps: diffrax step budget; exceeding it raises.
      progress: a diffrax progress bar on a terminal, a start and an end line
        otherwise (eager calls only: leave it off under ``jit``/``vmap``).

    Returns:
      :class:`Flow` with ``ts``, ``displacement`` ``x(t)`` and ``theta`` ``θ0 + x(t)``.

    Raises:
      ValueError: ``theta0`` not floating or not finite; bad ``ts``, ``rtol``,
        ``atol`` or ``dt``.
    """
    finite_leaves(theta0, "theta0")
    times = _check_times(ts)
    dtype = jax.tree_util.tree_leaves(theta0)[0].dtype
    controller, step = _step_control(rtol, atol, dt, dtype)
    max_steps = positive_int(max_steps, "max_steps")
    layout, x0, as_array = _start_and_placement(theta0, dtype)
    dt0 = None if step is None else as_array(step)
    field = _GradientField(loss_fn, bool(loss_of_displacement), theta0, tuple(args), layout)
    save = as_array(times)
    solve = partial(
        diffrax.diffeqsolve,
        diffrax.ODETerm(field),
        diffrax.Dopri8() if solver is None else solver,
        t0=as_array(0.0),
        t1=as_array(times[-1]),
        dt0=dt0,
        y0=x0,
        saveat=diffrax.SaveAt(ts=save),
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    ys = _solve_with_progress(solve, progress)
    if layout is None:
        theta = jax.tree_util.tree_map(lambda a, x: a[None] + x, theta0, ys)
    else:
        ys, theta = _restack(ys, theta0, layout)
    return Flow(ts=save, displacement=ys, theta=theta)


def _step_control(rtol, atol, dt, dtype) -> tuple[Any, float | None]:
    """``(controller, fixed step or None)`` of :func:`ode_flow`, its tolerances checked.

    Times, step and arrays enter the solve as traced values and the vector field
    is a module whose only static parts are ``loss_fn`` and the flag: diffrax's
    compiled solve is reused across calls with the same loss (new times, steps or
    θ0 included).
    """
    if rtol is None:
        rtol = 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6
    rtol = positive_float(rtol, "rtol")
    atol = 1e-4 * rtol if atol is None else positive_float(atol, "atol")
    if dt is None:
        return diffrax.PIDController(rtol=rtol, atol=atol), None
    return diffrax.ConstantStepSize(), positive_float(dt, "dt")


def _start_and_placement(theta0: PyTree, dtype) -> tuple[Layout | None, PyTree, Callable]:
    """``(layout, x0 = 0 like θ0, as_array)``: the ODE's start and how its times are placed.

    θ0 on a mesh: the state x starts sharded like θ0 and the times are put on the
    mesh explicitly, so nothing moves between devices implicitly.
    """
    layout = Layout(theta0, "theta0") if is_sharded(theta0) else None
    if layout is not None:

        def as_array(value: Any) -> jax.Array:
            return layout.put(np.asarray(value, dtype))

        return layout, _zeros_on(theta0, layout), as_array

    def as_array(value: Any) -> jax.Array:
        return jnp.asarray(value, dtype)

    return None, jax.tree_util.tree_map(jnp.zeros_like, theta0), as_array


def _solve_with_progress(solve: Callable, progress: bool) -> PyTree:
    """``solve(progress_meter=...).ys``: diffrax's bar on a terminal, else start/end lines."""
    on_terminal = progress and sys.stderr.isatty()
    with progress_bar(total=1, desc="ode_flow", enabled=progress and not on_terminal) as stage:
        meter = diffrax.TqdmProgressMeter() if on_terminal else diffrax.NoProgressMeter()
        ys = solve(progress_meter=meter).ys
        if progress and not on_terminal:
            jax.block_until_ready(ys)
            stage.update(1)
    return ys


@partial(jax.jit, static_argnums=1)
def _zeros_on(tree: PyTree, layout: Layout) -> PyTree:
    """Zeros like ``tree``, laid out like it on its mesh (made there, not moved there)."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, tree)
    return jax.lax.with_sharding_constraint(zeros, layout.shardings)


@partial(jax.jit, static_argnums=2)
def _restack(ys: PyTree, theta0: PyTree, layout: Layout) -> tuple[PyTree, PyTree]:
    """Saved ``x(t)`` and ``θ0 + x(t)`` laid out like ``θ0`` (diffrax may give them replicated)."""
    ys = jax.lax.with_sharding_constraint(ys, layout.stacked)
    theta = jax.tree_util.tree_map(lambda a, x: a[None] + x, theta0, ys)
    return ys, jax.lax.with_sharding_constraint(theta, layout.stacked)


def optimizer_trajectory(
    loss_fn: Callable[..., jax.Array],
    theta0: PyTree,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    args: tuple = (),
) -> PyTree:
    """Iterates ``θ_0 = θ0, …, θ_K`` of any optax optimizer on ``loss_fn`` (one ``lax.scan``).

    ``optax.sgd(η)`` is gradient descent ``θ_{k+1} = θ_k − η g(θ_k)`` (docs/theory.md §4).

    Returns:
      ``theta0``'s pytree with a leading ``num_steps + 1`` axis.
    """
    finite_leaves(theta0, "theta0")
    num_steps = positive_int(num_steps, "num_steps")
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        theta, state = carry
        updates, state = optimizer.update(grad_fn(theta, *args), state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), theta

    _, thetas = jax.lax.scan(step, (theta0, optimizer.init(theta0)), None, length=num_steps)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), theta0, thetas)


class SkillChange(NamedTuple):
    """``Δu = u(θ* + x) − u(θ*)`` at each displacement (:func:`skill_change`); all ``(T,)``.

    Attributes:
      delta_u: the line integral where its estimated error is the smaller,
        else ``direct``.
      error: estimated absolute error of ``delta_u`` (see :func:`skill_change`).
      direct: ``u(θ* + x) − u(θ*)`` as a plain difference (loses ``eps·|u|``
        and ``eps·|∇u|·|θ|``; accurate when ``Δu`` is large).
      used_direct: bool, where ``delta_u`` is ``direct``.
    """

    delta_u: jax.Array
    error: jax.Array
    direct: jax.Array
    used_direct: jax.Array


def _gauss_legendre(num: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Nodes and weights of ``num``-point Gauss–Legendre on ``[0, 1]``."""
    s, w = np.polynomial.legendre.leggauss(num)
    return jnp.asarray((s + 1) / 2, dtype), jnp.asarray(w / 2, dtype)


def _tree_sum(fn: Callable, *trees: PyTree) -> jax.Array:
    """``Σ_leaves sum(fn(*leaves))``."""
    leaves = [jax.tree_util.tree_leaves(t) for t in trees]
    return sum(jnp.sum(fn(*ls)) for ls in zip(*leaves, strict=True))


def _segment_terms(skill_loss: Callable, args: tuple, theta_star: PyTree, x: PyTree, s):
    """:func:`skill_change`'s integrand at node ``s`` and its two rounding scales.

    ``((∇u_s + ∇²u_s r_s)·x, Σ|∇u_s ⊙ x|, Σ|∇u_s ⊙ θ_s|)`` at ``θ_s = fl(θ* + s x)``.
    """
    sx = jax.tree_util.tree_map(lambda b: s * b, x)
    theta = jax.tree_util.tree_map(jnp.add, theta_star, sx)
    # what rounding θ* + sx dropped: exact (Sterbenz) while |sx| ≲ |θ*|
    r = jax.tree_util.tree_map(lambda v, th, a: v - (th - a), sx, theta, theta_star)

    def grad_u(theta):
        return jax.grad(skill_loss)(theta, *args)

    g, hr = jax.jvp(grad_u, (theta,), (r,))
    value = _tree_sum(lambda gi, hi, xi: (gi + hi) * xi, g, hr, x)
    scale_x = _tree_sum(lambda gi, xi: jnp.abs(gi * xi), g, x)
    scale_theta = _tree_sum(lambda gi, ti: jnp.abs(gi * ti), g, theta)
    return value, scale_x, scale_theta


def skill_change(
    skill_loss: Callable[..., jax.Array],
    theta_star: PyTree,
    xs: PyTree,
    *,
    args: tuple = (),
    nodes: int = 8,
) -> SkillChange:
    """``Δu(x) = u(θ* + x) − u(θ*)`` for displacements ``xs``, without cancellation, any model.

    ``Δu = ∫₀¹ ∇u(θ* + s x)·x ds`` by ``nodes``-point Gauss–Legendre in ``s``:
    no ``O(u)`` terms cancel, so ``Δu`` keeps its relative accuracy where it is
    far below ``eps·|u(θ*)|`` (``Δu = O(t⁴)`` along a flow, docs/theory.md §5,
    where the direct difference loses it all). The rule is exact for quadratic
    ``u`` (linear integrand) and spectrally accurate for smooth ``u``.

    ``u`` sees the rounded ``θ_s = fl(θ* + s x)``, off the segment by
    ``r_s = s x − (θ_s − θ*)`` (``|r_s| ≤ eps|θ*|``, computed exactly), which
    would cost ``‖∇²u‖eps|θ*|`` in each gradient: ``Δu`` then loses accuracy
    relative to ``Δu/‖x‖`` as ``|θ*|`` grows. Each node therefore takes the
    gradient back to the segment to first order, ``∇u(θ_s) + ∇²u(θ_s) r_s``
    (one forward-over-reverse ``jvp``; the remainder is ``O(eps²|θ*|²)``).

    Error estimate: ``|Q_m − Q_{⌈m/2⌉}|`` plus ``8·eps·max_s Σ|∇u_s ⊙ x|``
    (rounding of the dot products; the rounding inside ``∇u`` itself is not
    estimated). The direct difference's is ``8·eps·(|u(θ)| + |u(θ*)| +
    max_s Σ|∇u_s ⊙ θ_s|)``; where that is the smaller (large ``x``), the direct
    difference is returned (``used_direct``). Pure and traceable (``nodes``
    static); costs ``nodes + ⌈nodes/2⌉`` gradient-jvps and two losses per
    displacement (vmapped over nodes, ``lax.map`` over displacements).

    Args:
      skill_loss: ``u(θ, *args) -> scalar``, twice differentiable.
      theta_star: ``θ*`` (pytree of floating arrays).
      xs: displacements ``x = θ − θ*``: ``θ*``'s pytree with a leading ``T`` axis
        (:attr:`Flow.displacement`, or optimizer iterates minus ``θ*``).
      args: extra arguments for ``skill_loss``.
      nodes: Gauss–Legendre nodes (≥ 2).

    Returns:
      :class:`SkillChange`.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or nodes < 2:
        raise ValueError(f"nodes must be an integer >= 2, got {nodes!r}")
    finite_leaves(theta_star, "theta_star")
    finite_leaves(xs, "xs")
    dtype = jax.tree_util.tree_leaves(theta_star)[0].dtype
    s_hi, w_hi = _gauss_legendre(int(nodes), dtype)
    s_lo, w_lo = _gauss_legendre((int(nodes) + 1) // 2, dtype)
    s_all = jnp.concatenate([s_hi, s_lo])
    eps = jnp.finfo(dtype).eps
    u_star = skill_loss(theta_star, *args)

    def one(x):
        integrand = partial(_segment_terms, skill_loss, args, theta_star, x)
        values, scale_x, scale_theta = jax.vmap(integrand)(s_all)
        hi = jnp.dot(w_hi, values[: s_hi.size])
        lo = jnp.dot(w_lo, values[s_hi.size :])
        quad_err = jnp.abs(hi - lo) + 8 * eps * jnp.max(scale_x)
        u_x = skill_loss(jax.tree_util.tree_map(jnp.add, theta_star, x), *args)
        direct_err = 8 * eps * (jnp.abs(u_x) + jnp.abs(u_star) + jnp.max(scale_theta))
        return hi, quad_err, u_x - u_star, direct_err

    quad, quad_err, direct, direct_err = jax.lax.map(one, xs)
    use_direct = quad_err > direct_err
    return SkillChange(
        delta_u=jnp.where(use_direct, direct, quad),
        error=jnp.where(use_direct, direct_err, quad_err),
        direct=direct,
        used_direct=use_direct,
    )


class TrajectoryRecord(NamedTuple):
    """What a flow does to the skill, at each recorded time (all ``(T,)``).

    Attributes:
      t: times (flow time, or ``η k`` for discrete steps).
      delta_u: ``Δu(t) = u(θ* + x(t)) − u(θ*)`` by :func:`skill_change`.
      delta_u_error: its estimated absolute error (:attr:`SkillChange.error`).
      projected_loss: ``½‖F^{1/2}P x(t)‖²`` (Thm 6.1's lower bound).
      projected_norm: ``‖F^{1/2}P x(t)‖`` (Thm 6.2's drift, ``Ω(γt²)``).
      displacement_norm: ``‖x(t)‖``.
      subspace_angle: largest principal angle (radians) between ``M(θ*)`` and
        ``M(θ* + x(t))``, the top-``d`` eigenspaces of ``F``; ``None`` unless asked.
    """

    t: np.ndarray
    delta_u: np.ndarray
    delta_u_error: np.ndarray
    projected_loss: np.ndarray
    projected_norm: np.ndarray
    displacement_norm: np.ndarray
    subspace_angle: np.ndarray | None


def principal_angle(basis_a: np.ndarray, basis_b: np.ndarray) -> float:
    """Largest principal angle between the row spaces of two ``(d, n)`` orthonormal bases.

    ``atan2(sin, cos)`` with ``sin = ‖B − BAᵀA‖₂`` and ``cos = σ_min(ABᵀ)``: full
    relative accuracy for tiny angles, where ``arccos(σ_min)`` alone bottoms out
    at ``√eps ≈ 1e-8``.
    """
    A, B = np.asarray(basis_a, np.float64), np.asarray(basis_b, np.float64)
    if A.shape != B.shape or A.ndim != 2:
        raise ValueError(f"bases must both be (d, n), got {A.shape} and {B.shape}")
    cos = np.min(np.linalg.svd(A @ B.T, compute_uv=False))
    sin = np.max(np.linalg.svd(B - (B @ A.T) @ A, compute_uv=False))
    return float(np.arctan2(sin, cos))


def _flat_rows(tree: PyTree, name: str, rows: int | None, n: int) -> np.ndarray:
    """A pytree with a leading axis (or a 2-D array) as ``(rows, n)`` raveled rows."""
    finite_leaves(tree, name)
    try:
        flat = jax.vmap(lambda leaf: ravel_pytree(leaf)[0])(tree)
    except ValueError as err:  # leaves whose leading axes disagree
        raise ValueError(f"{name} must have one leading axis shared by all leaves: {err}") from None
    if flat.ndim != 2 or flat.shape[1] != n or (rows is not None and flat.shape[0] != rows):
        want = f"{rows if rows is not None else 'd'}, {n}"
        raise ValueError(f"{name} must hold ({want}) raveled rows, got {tuple(flat.shape)}")
    return np.asarray(flat, np.float64)


def _rotation_angles(
    fisher_vp: Callable, theta_star: PyTree, x: np.ndarray, V: np.ndarray, key, tol: float, allow
) -> np.ndarray:
    """Largest principal angle between ``M(θ* + x_i)`` and ``V``'s span, for each row ``x_i``.

    ``M(θ* + x_i)`` is recomputed by :func:`geomcollapse.linalg.top_eigenpairs`
    (certified unless ``allow`` accepts unconverged pairs).
    """
    flat_star, unravel = ravel_pytree(theta_star)
    angles = np.empty(x.shape[0])
    for i, k in enumerate(jax.random.split(key, x.shape[0])):
        theta_i = unravel(flat_star + jnp.asarray(x[i], flat_star.dtype))

        def matvec(v, th=theta_i):
            return ravel_pytree(fisher_vp(th, unravel(v)))[0]

        pairs = linalg.top_eigenpairs(matvec, flat_star, V.shape[0], key=k, tol=tol)
        Subspace.from_eigenpairs(pairs, allow_unconverged=allow)
        angles[i] = principal_angle(V, np.asarray(pairs.vectors))
    return angles


def record_trajectory(
    ts: Any,
    xs: PyTree,
    theta_star: PyTree,
    skill_loss: Callable[[PyTree], jax.Array],
    subspace: Subspace | tuple,
    *,
    fisher_vp: Callable[[PyTree, PyTree], PyTree] | None = None,
    key: jax.Array | None = None,
    tol: float | None = None,
    nodes: int = 8,
    allow_unconverged: bool = False,
) -> TrajectoryRecord:
    """The :class:`TrajectoryRecord` of displacements ``xs`` (any flow, GD or optimizer).

    Everything is computed from ``x = θ − θ*`` as given, never from ``θ − θ*``:
    pass :attr:`Flow.displacement`, or iterates minus ``θ*`` where the optimizer
    only has those. ``Δu`` is :func:`skill_change` (cancellation-free).

    Args:
      ts: ``(T,)`` times of the positions.
      xs: displacements, ``theta_star``'s pytree with a leading ``T`` axis.
      theta_star: ``θ*``.
      skill_loss: ``u(θ)``.
      subspace: ``M(θ*)`` as a :class:`geomcollapse.subspace.Subspace` (e.g.
        ``Subspace.from_eigenpairs(top_eigenpairs(...))``), or a
        ``(eigenvalues, basis)`` pair of exact eigenpairs; the basis is a
        ``(d, n)`` array of raveled rows or ``θ*``'s pytree with a leading ``d`` axis.
      fisher_vp: ``(θ, v) -> F(θ) v``; when given, ``M(θ* + x(t))`` is
        recomputed at every position with
        :func:`geomcollapse.linalg.top_eigenpairs` and the subspace rotation is
        recorded (``key`` required).
      key: ``jax.random`` key for those eigenpairs.
      tol: residual tolerance for those eigenpairs (default ``1e-8`` in float64,
        ``max(1e-8, 100·eps)`` otherwise).
      nodes: Gauss–Legendre nodes for ``Δu`` (:func:`skill_change`).
      allow_unconverged: accept an uncertified ``subspace`` or uncertified
        eigenpairs along the path instead of raising ``ValueError``.
    """
    times = _check_times(ts)
    finite_leaves(theta_star, "theta_star")
    flat_star = ravel_pytree(theta_star)[0]
    n = flat_star.size
    x = _flat_rows(xs, "xs", times.size, n)
    if not isinstance(subspace, Subspace):
        if not isinstance(subspace, tuple) or len(subspace) != 2:
            raise ValueError("subspace must be a Subspace or an (eigenvalues, basis) pair")
        subspace = Subspace.exact(*subspace)
    if not bool(subspace.converged) and not allow_unconverged:
        raise ValueError(
            "subspace is not converged (uncertified eigenpairs): pass allow_unconverged=True"
        )
    finite_leaves(subspace.values, "subspace values")
    lam = np.asarray(subspace.values, np.float64)
    V = _flat_rows(subspace.basis, "basis", lam.size, n)
    fpx = (x @ V.T) * np.sqrt(np.maximum(lam, 0.0))[None]
    change = skill_change(skill_loss, theta_star, xs, nodes=nodes)
    angles = None
    if fisher_vp is not None:
        key = prng_key(key)
        if tol is None:
            tol = max(1e-8, 100 * float(jnp.finfo(flat_star.dtype).eps))
        tol = positive_float(tol, "tol")
        angles = _rotation_angles(fisher_vp, theta_star, x, V, key, tol, allow_unconverged)
    norm = np.linalg.norm(fpx, axis=1)
    return TrajectoryRecord(
        t=times,
        delta_u=np.asarray(change.delta_u, np.float64),
        delta_u_error=np.asarray(change.error, np.float64),
        projected_loss=0.5 * norm**2,
        projected_norm=norm,
        displacement_norm=np.linalg.norm(x, axis=1),
        subspace_angle=angles,
    )
