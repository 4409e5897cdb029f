"""Gradient flows: exact on quadratics, diffrax ODE flow and optax optimizers for any loss.

docs/theory.md §4: for ``L = ½xᵀAx + cᵀx`` the flow ``ẋ = −(Ax + c)``, ``x(0) = 0`` is
``x(t) = −t φ₁(−At) c`` with ``φ₁(z) = (eᶻ − 1)/z``. We evaluate it as
``x(t) = −t c + t² A φ₂(−At) c`` with ``φ₂(z) = (eᶻ − 1 − z)/z²``, so the
component of ``x`` in ``M`` when ``Pc = 0`` (``t² PAφ₂c``) is computed with full
relative accuracy at small ``t`` instead of as a difference of ``O(t)`` terms,
and a singular ``A`` needs no special case (``φ₂(0) = ½``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from geomcollapse import linalg
from geomcollapse._checks import floating_leaves, positive_float, positive_int, prng_key

PyTree = Any

_SERIES_BELOW = 1e-2  # |z| below which φ₁, φ₂ use their Taylor series (error < 1e-16)


def phi1(z: jax.Array) -> jax.Array:
    """``φ₁(z) = (eᶻ − 1)/z``, with ``φ₁(0) = 1``; elementwise, stable near 0."""
    small = jnp.abs(z) < _SERIES_BELOW
    zs = jnp.where(small, 0.0, z)
    series = 1 + z / 2 + z**2 / 6 + z**3 / 24 + z**4 / 120 + z**5 / 720
    return jnp.where(small, series, jnp.expm1(zs) / jnp.where(small, 1.0, zs))


def phi2(z: jax.Array) -> jax.Array:
    """``φ₂(z) = (eᶻ − 1 − z)/z²``, with ``φ₂(0) = ½``; elementwise, stable near 0."""
    small = jnp.abs(z) < _SERIES_BELOW
    zs = jnp.where(small, 1.0, z)
    series = 0.5 + z / 6 + z**2 / 24 + z**3 / 120 + z**4 / 720 + z**5 / 5040
    return jnp.where(small, series, (jnp.expm1(zs) - zs) / zs**2)


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
    n = c.shape[0]
    max_steps = min(n, 96) if max_steps is None else max_steps
    if not 1 <= max_steps <= n:
        raise ValueError(f"max_steps must be in [1, n={n}], got {max_steps}")
    tol = linalg.default_tol(c.dtype) if tol is None else tol
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
    """
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


def _check_times(ts: Any, name: str = "ts") -> np.ndarray:
    arr = np.asarray(ts, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of times, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr[0] < 0 or np.any(np.diff(arr) <= 0):
        raise ValueError(f"{name} must be finite, ≥ 0 and strictly increasing")
    return arr


class _GradientField(eqx.Module):
    """``x ↦ −∇L(θ0 + x)``: the gradient flow's vector field in the displacement ``x``."""

    loss_fn: Callable[..., jax.Array] = eqx.field(static=True)
    theta0: PyTree
    args: tuple

    def __call__(self, t, x, _):
        theta = jax.tree_util.tree_map(jnp.add, self.theta0, x)
        grad = jax.grad(self.loss_fn)(theta, *self.args)
        return jax.tree_util.tree_map(jnp.negative, grad)


def ode_flow(
    loss_fn: Callable[..., jax.Array],
    theta0: PyTree,
    ts: Any,
    *,
    args: tuple = (),
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dt: float | None = None,
    max_steps: int = 65536,
) -> PyTree:
    """Gradient flow ``dθ/dt = −∇L(θ)``, ``θ(0) = θ0``, integrated with diffrax.

    The state is the displacement ``x = θ − θ0`` (``x(0) = 0``), so the error
    control is relative to ``x`` itself: the ``t²``-small component of ``x`` in
    ``M`` is resolved at small ``t`` (it would be lost against ``|θ0|``).

    Args:
      loss_fn: ``loss_fn(θ, *args) -> scalar``.
      theta0: initial parameters ``θ*`` (a pytree of floating arrays).
      ts: ``(T,)`` strictly increasing save times ``≥ 0``.
      args: extra arguments for ``loss_fn``.
      solver: a diffrax solver (default ``Dopri8()``, order 8: at the tight
        tolerances theory checks need it takes far fewer steps than ``Tsit5``).
      rtol, atol: adaptive step-size tolerances (``PIDController``); default
        ``rtol = 1e-12`` in float64 (``1e-6`` in float32) and ``atol = 1e-4·rtol``:
        ``x`` starts at 0, so a loose ``atol`` would swamp its ``t²``-small part.
      dt: a fixed step instead of adaptive control (``ConstantStepSize``); used
        by the order test.
      max_steps: diffrax step budget; exceeding it raises.

    Returns:
      ``θ(t)`` for every ``t`` in ``ts``: ``theta0``'s pytree with a leading ``T`` axis.
    """
    floating_leaves(theta0, "theta0")
    times = _check_times(ts)
    dtype = jax.tree_util.tree_leaves(theta0)[0].dtype
    if rtol is None:
        rtol = 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6
    rtol = positive_float(rtol, "rtol")
    atol = 1e-4 * rtol if atol is None else positive_float(atol, "atol")
    if dt is None:
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), None
    else:
        controller, dt0 = diffrax.ConstantStepSize(), jnp.asarray(positive_float(dt, "dt"), dtype)
    x0 = jax.tree_util.tree_map(jnp.zeros_like, theta0)
    # Times, step and arrays enter as traced values and the vector field is a
    # module whose only static part is ``loss_fn``: diffrax's compiled solve is
    # reused across calls with the same loss (new times, steps or θ0 included).
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_GradientField(loss_fn, theta0, tuple(args))),
        diffrax.Dopri8() if solver is None else solver,
        t0=jnp.zeros((), dtype),
        t1=jnp.asarray(times[-1], dtype),
        dt0=dt0,
        y0=x0,
        saveat=diffrax.SaveAt(ts=jnp.asarray(times, dtype)),
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda a, x: a[None] + x, theta0, sol.ys)


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
    floating_leaves(theta0, "theta0")
    num_steps = positive_int(num_steps, "num_steps")
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        theta, state = carry
        updates, state = optimizer.update(grad_fn(theta, *args), state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), theta

    _, thetas = jax.lax.scan(step, (theta0, optimizer.init(theta0)), None, length=num_steps)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), theta0, thetas)


class TrajectoryRecord(NamedTuple):
    """What a flow does to the skill, at each recorded time (all ``(T,)``).

    Attributes:
      t: times (flow time, or ``η k`` for discrete steps).
      delta_u: ``Δu(θ(t)) = u(θ(t)) − u(θ*)``.
      projected_loss: ``½‖F^{1/2}P x(t)‖²``, ``x = θ − θ*`` (Thm 6.1's lower bound).
      projected_norm: ``‖F^{1/2}P x(t)‖`` (Thm 6.2's drift, ``Ω(γt²)``).
      displacement_norm: ``‖x(t)‖``.
      subspace_angle: largest principal angle (radians) between ``M(θ*)`` and
        ``M(θ(t))``, the top-``d`` eigenspaces of ``F``; ``None`` unless asked.
    """

    t: np.ndarray
    delta_u: np.ndarray
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


def record_trajectory(
    ts: Any,
    thetas: PyTree,
    theta_star: PyTree,
    skill_loss: Callable[[PyTree], jax.Array],
    eigenvalues: Any,
    basis: Any,
    *,
    fisher_vp: Callable[[PyTree, PyTree], PyTree] | None = None,
    key: jax.Array | None = None,
    tol: float = 1e-8,
) -> TrajectoryRecord:
    """The :class:`TrajectoryRecord` of positions ``thetas`` (any flow, GD or optimizer).

    Args:
      ts: ``(T,)`` times of the positions.
      thetas: pytree like ``theta_star`` with a leading ``T`` axis.
      theta_star: ``θ*``.
      skill_loss: ``u(θ)``.
      eigenvalues: ``(d,)`` top eigenvalues of ``F(θ*)``.
      basis: ``(d, n)`` orthonormal top-``d`` eigenvectors of ``F(θ*)`` (raveled rows).
      fisher_vp: ``(θ, v) -> F(θ) v``; when given, ``M(θ(t))`` is recomputed at
        every position with :func:`geomcollapse.linalg.top_eigenpairs` and the
        subspace rotation is recorded (``key`` required).
      tol: residual tolerance for those eigenpairs.
    """
    times = np.asarray(ts, np.float64)
    flat_star, unravel = ravel_pytree(theta_star)
    flat = jax.vmap(lambda th: ravel_pytree(th)[0])(thetas)
    if flat.shape != (times.size, flat_star.size):
        raise ValueError(
            f"thetas must hold {times.size} positions of {flat_star.size} parameters, "
            f"got {flat.shape}"
        )
    lam = np.asarray(eigenvalues, np.float64)
    V = np.asarray(basis, np.float64)
    if V.shape != (lam.size, flat_star.size):
        raise ValueError(f"basis must be ({lam.size}, {flat_star.size}), got {V.shape}")
    x = np.asarray(flat - flat_star[None], np.float64)
    fpx = (x @ V.T) * np.sqrt(np.maximum(lam, 0.0))[None]
    u_star = skill_loss(theta_star)
    delta_u = np.asarray(jax.vmap(lambda th: skill_loss(th) - u_star)(thetas), np.float64)
    angles = None
    if fisher_vp is not None:
        key = prng_key(key)
        angles = np.empty(times.size)
        for i, k in enumerate(jax.random.split(key, times.size)):
            theta_i = unravel(flat[i])

            def matvec(v, th=theta_i):
                return ravel_pytree(fisher_vp(th, unravel(v)))[0]

            pairs = linalg.top_eigenpairs(matvec, flat_star, lam.size, key=k, tol=tol)
            angles[i] = principal_angle(V, np.asarray(pairs.vectors))
    norm = np.linalg.norm(fpx, axis=1)
    return TrajectoryRecord(
        t=times,
        delta_u=delta_u,
        projected_loss=0.5 * norm**2,
        projected_norm=norm,
        displacement_norm=np.linalg.norm(x, axis=1),
        subspace_angle=angles,
    )
