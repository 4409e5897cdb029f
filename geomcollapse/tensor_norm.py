"""The largest value of a symmetric tensor on the unit sphere, matrix-free (SS-HOPM).

Thm 6.1's remainder constant ``C = max_{‖v‖=1} |⅙∇³u(θ*)[v,v,v]|`` (and the
fourth-derivative constant of the next Taylor term) is the spectral norm of a
symmetric tensor ``T`` of order ``m``: ``max_{‖v‖=1} |T[vᵐ]|`` (for symmetric
tensors the best rank-1 approximation is symmetric, Banach 1938).
:func:`sshopm` estimates it by the shifted symmetric higher-order power method
(Kolda & Mayo 2011, SIAM J. Matrix Anal. Appl. 32(4)) from several starts, with
``T`` given only through its contraction ``v ↦ T[v, …, v, ·]``;
:func:`derivative_contraction` makes that contraction for ``T = ∇ᵐf(θ)`` from
``m − 1`` nested ``jvp`` and one ``grad``, never forming the tensor. docs/experiments.md
(transformer_onset) states how the transformer's Thm 6.1 row uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


def derivative_form(f: Callable, order: int) -> Callable:
    """``(params, v, *args) ↦ ∇ᵐf(params)[v, …, v]`` (``m = order``): nested ``jvp`` on a line.

    The ``m``-th derivative of ``s ↦ f(params + s v, *args)`` at ``s = 0``;
    ``v`` is a pytree like ``params``. Never forms a tensor.
    """
    _check_order(order, 1)

    def form(params, v, *args):
        def along(s):
            return f(jax.tree.map(lambda p, w: p + s * w, params, v), *args)

        g = along
        for _ in range(order):
            g = _derivative(g)
        return g(jnp.zeros((), jax.tree.leaves(params)[0].dtype))

    return form


def _derivative(g: Callable) -> Callable:
    return lambda s: jax.jvp(g, (s,), (jnp.ones_like(s),))[1]


def derivative_contraction(f: Callable, order: int) -> Callable:
    """``(params, v, *args) ↦ ∇ᵐf(params)[v, …, v, ·]`` (``m − 1`` copies of ``v``), a pytree.

    The gradient in ``params`` of ``∇ᵐ⁻¹f(params)[v^{m−1}]`` (``v`` held fixed):
    reverse mode over ``m − 1`` nested ``jvp``. ``order ≥ 2``. (The gradient in
    ``v`` of ``∇ᵐf[vᵐ]/m`` is the same vector over one ``jvp`` more: a program
    twice the size to compile and to run.)
    """
    _check_order(order, 2)
    form = derivative_form(f, order - 1)

    def contract(params, v, *args):
        return jax.grad(lambda p: form(p, v, *args))(params)

    return contract


class TensorMax(NamedTuple):
    """What :func:`sshopm` found: ``value = max |T[vᵐ]|`` over the runs, and where.

    Attributes:
      value: the largest ``|λ|``, ``λ = T[vᵐ]`` at a unit ``v``: a value attained,
        so never above the true maximum (up to rounding).
      eigenvalue: the signed ``λ`` there; ``vector``: that unit ``v`` (like a start).
      screened: ``(k,)`` the signed ``λ`` of every start after the screening
        iterations (for even orders, of the sign run that reached the larger ``|λ|``).
      refined: ``(r,)`` the signed ``λ`` of the refined runs; ``converged`` ``(r,)``
        whether each met the stopping rule; ``iterations`` ``(r,)`` their steps.
      contractions: contractions evaluated in all, rejected steps included.
    """

    value: jax.Array
    eigenvalue: jax.Array
    vector: PyTree
    screened: jax.Array
    refined: jax.Array
    converged: jax.Array
    iterations: jax.Array
    contractions: jax.Array


class _State(NamedTuple):
    x: jax.Array  # unit vector
    g: jax.Array  # T[x^{m−1}, ·]
    lam: jax.Array  # T[xᵐ]; −inf before the first contraction
    shift: jax.Array
    done: jax.Array


def _fresh(x: jax.Array) -> _State:
    """Unstarted runs from the rows of ``x``: the first step only evaluates ``T[x^{m−1},·]``."""
    k = x.shape[0]
    return _State(
        x / jnp.linalg.norm(x, axis=1, keepdims=True),
        jnp.zeros_like(x),
        jnp.full((k,), -jnp.inf, x.dtype),
        jnp.zeros((k,), x.dtype),
        jnp.zeros((k,), bool),
    )


def _step(contract: Callable, s: _State, sign, order: int, tol: float) -> _State:
    """One SS-HOPM step of ``sign·T``; rejected (and the shift raised) if it would lower ``λ``."""
    y = s.g + s.shift * s.x
    norm = jnp.linalg.norm(y)
    y = jnp.where(norm > 0, y / jnp.where(norm > 0, norm, 1), s.x)
    gy = sign * contract(y)
    lam_y = jnp.vdot(gy, y)
    if order % 2:  # odd: T[(−y)ᵐ] = −T[yᵐ] and T[(−y)^{m−1},·] = T[y^{m−1},·]: keep λ ≥ 0
        y, lam_y = jnp.where(lam_y < 0, -y, y), jnp.abs(lam_y)
    small = jnp.abs(lam_y - s.lam) <= tol * jnp.abs(lam_y)
    accept = (lam_y >= s.lam) & ~s.done
    raised = jnp.maximum(2 * s.shift, jnp.linalg.norm(s.g))
    return _State(
        jnp.where(accept, y, s.x),
        jnp.where(accept, gy, s.g),
        jnp.where(accept, lam_y, s.lam),
        jnp.where(accept | s.done, s.shift, raised),
        s.done | small | ((norm == 0) & jnp.isfinite(s.lam)),
    )


def _iterate(step: Callable, s: _State, sign, iterations: int) -> tuple[_State, int, np.ndarray]:
    """Up to ``iterations`` steps of the batch (one contraction each), until all are done."""
    calls, steps = 0, np.zeros(s.done.shape[0], int)
    for _ in range(iterations):
        if bool(jnp.all(s.done)):
            break
        steps += ~np.asarray(s.done)
        s = step(s, sign)
        calls += s.done.shape[0]
    return s, calls, steps


def _ascend(step, flat, sign, batch: int, screen: int, refine_iterations: int):
    """Screen every start in chunks of ``batch``, then refine the ``batch`` largest ``λ``."""
    k = flat.shape[0]
    padded = jnp.concatenate([flat, jnp.repeat(flat[-1:], -k % batch, axis=0)])
    chunks, calls = [], 0
    for c in range(0, padded.shape[0], batch):  # the first step evaluates the start
        done, n, _ = _iterate(step, _fresh(padded[c : c + batch]), sign, 1 + screen)
        chunks.append(done)
        calls += n
    screened = jax.tree.map(lambda *a: jnp.concatenate(a)[:k], *chunks)
    best = jnp.argsort(-screened.lam)[:batch]
    again = jax.tree.map(lambda a: a[best], screened)
    refined, n, steps = _iterate(step, again, sign, refine_iterations)
    return screened, refined, steps, calls + n


def sshopm(
    contract: Callable[[PyTree], PyTree],
    starts: PyTree,
    *,
    order: int,
    screen_iterations: int = 10,
    refine: int = 4,
    max_iterations: int = 60,
    tol: float = 1e-6,
) -> TensorMax:
    """Estimate ``max_{‖v‖=1} |T[vᵐ]|`` of a symmetric order-``m`` tensor by SS-HOPM.

    Iteration ``v ← (T[v^{m−1},·] + αv)/‖·‖``: the shift ``α`` starts at 0 and a
    step that would lower ``λ = T[vᵐ]`` is rejected with ``α ← max(2α, ‖T[v^{m−1},·]‖)``,
    so ``λ`` never decreases (a large enough shift makes the step an ascent on
    the sphere, Kolda & Mayo 2011 Thm 4.4). A run stops when
    ``|λₖ₊₁ − λₖ| ≤ tol·|λₖ₊₁|`` (a rejected step within that also ends it).
    Every start runs ``screen_iterations`` steps; the ``refine`` largest ``λ``
    then run up to ``max_iterations`` more. Odd ``m``: each iterate is signed so
    ``λ ≥ 0`` and ``λ`` is maximised (``max |λ| = max λ``). Even ``m``: runs on
    ``T`` and on ``−T`` (``refine`` each).

    The loop runs on the host around one compiled batch step (``refine`` runs
    at a time; the starts are screened in chunks of that size), so ``contract``
    is compiled once per call; ``sshopm`` itself is not traceable under ``jit``.

    Args:
      contract: ``v ↦ T[v, …, v, ·]`` (``m − 1`` copies), a pytree like ``v``;
        traceable; e.g. ``lambda v: derivative_contraction(f, m)(θ, v, *args)``.
      starts: a pytree like ``v`` with a leading axis of ``k ≥ 1`` start
        directions (any non-zero finite scale; normalised here).
      order: ``m ≥ 2``.
      screen_iterations, max_iterations: ``≥ 0``; refine: ``≥ 1`` (capped at ``k``);
      tol: relative stopping tolerance, ``> 0``.

    Returns:
      :class:`TensorMax`.

    Raises:
      ValueError: bad ``order``, ``starts`` (empty, non-floating, zero or non-finite
        rows), counts or ``tol``, a ``contract`` output unlike ``v``, or one that is
        never finite.
    """
    flat, unravel = _check(contract, starts, order, screen_iterations, refine, max_iterations, tol)
    batch = min(refine, flat.shape[0])

    def raveled(x):
        return ravel_pytree(contract(unravel(x)))[0]

    step = jax.jit(jax.vmap(lambda s, sign: _step(raveled, s, sign, order, tol), (0, None)))
    signs = (1.0,) if order % 2 else (1.0, -1.0)
    runs = [
        _ascend(step, flat, jnp.asarray(sign, flat.dtype), batch, screen_iterations, max_iterations)
        for sign in signs
    ]
    top = int(np.argmax([float(jnp.max(r[1].lam)) for r in runs]))
    screened, refined, steps, _ = runs[top]
    i, sign = int(jnp.argmax(refined.lam)), signs[top]
    if not np.isfinite(float(refined.lam[i])):  # a NaN step is never accepted: λ stays −inf
        raise ValueError(
            f"contract gave no finite T[vᵐ] from any start (best {float(refined.lam[i])}): "
            "a non-finite contraction, e.g. NaN parameters or data in it"
        )
    return TensorMax(
        refined.lam[i],
        sign * refined.lam[i],
        unravel(refined.x[i]),
        sign * screened.lam,
        sign * refined.lam,
        refined.done,
        jnp.asarray(steps),
        jnp.asarray(sum(r[3] for r in runs)),
    )


def _check_order(order, least: int) -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < least:
        raise ValueError(f"order must be an integer ≥ {least}, got {order!r}")


def _check(contract, starts, order, screen, refine, max_iter, tol):
    """Validate :func:`sshopm`'s inputs; the starts raveled ``(k, n)`` and one row's unravel."""
    _check_order(order, 2)
    for name, value, least in (
        ("screen_iterations", screen, 0),
        ("refine", refine, 1),
        ("max_iterations", max_iter, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    leaves = jax.tree.leaves(starts)
    if (
        not leaves
        or any(jnp.ndim(a) < 1 or jnp.shape(a)[0] != jnp.shape(leaves[0])[0] for a in leaves)
        or jnp.shape(leaves[0])[0] == 0
    ):
        raise ValueError("starts must be a pytree of arrays with one shared leading axis k ≥ 1")
    if any(not jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves):
        raise ValueError("starts must have floating leaves")
    first = jax.tree.map(lambda a: a[0], starts)
    unravel = ravel_pytree(first)[1]
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(starts)
    norms = np.linalg.norm(np.asarray(flat), axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("starts must be finite and non-zero in every row")
    out = jax.eval_shape(contract, first)
    if jax.tree.structure(out) != jax.tree.structure(first) or any(
        o.shape != jnp.shape(a)
        for o, a in zip(jax.tree.leaves(out), jax.tree.leaves(first), strict=True)
    ):
        raise ValueError("contract must map a direction v to a pytree like v (T[v, …, v, ·])")
    return flat, unravel
