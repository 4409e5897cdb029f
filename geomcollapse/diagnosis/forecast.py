"""The forecast and the AIC at ``d``: the series, ``∇u(θ*)`` and the AIC report of Def. 5.1.

``x₁ … x_K`` come from :func:`geomcollapse.series.delta_u_series` (docs/theory.md
§6) in one compiled call with ``∇u(θ*)`` and the losses' values; ``g = −x₁``
and ``Hg = 2x₂`` feed :func:`geomcollapse.theory.aic_report` with the basis of
``M``, the tail mass and the tail's quadratic floor (:func:`geomcollapse.aic.tree_deflate`,
:func:`geomcollapse.aic.tree_tail_and_norm`). One route for every layout: params sharded on
a mesh keep every vector of ``R^n`` a pytree laid out like them; unsharded ones take the
same code as raveled ``(n,)`` vectors on a mesh of their one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import aic, series, theory
from geomcollapse._sharding import Layout, on_one_device_mesh, stack_combine, stack_dot, tree_norm
from geomcollapse.diagnosis.plan import ONE_SHOT, Request, one_shot_options
from geomcollapse.diagnosis.spectrum import Spectrum
from geomcollapse.subspace import Subspace

__all__ = ["AtD", "at_d"]

PyTree = Any


class AtD(NamedTuple):
    """What the forecast and the AIC at ``d`` hand on to the report (host numbers only)."""

    delta_u: np.ndarray  # (K+1,) float64, c₀ … c_K of Δu(t)
    time_scale: float
    validity_time: float
    report: theory.AICReport
    coordinates: np.ndarray  # (K, d) float64, ⟨v_i, x_k⟩
    skill_gradient_norm: float
    task_gradient_norm: float
    overlap: Callable[[float], tuple[np.ndarray, float]]  # t_h ↦ (Px(t_h) coordinates, ‖x(t_h)‖)
    route: str  # the series' Taylor engine, 'jet' or 'jvp' (series.Series.route)
    subspace: Subspace | None = None  # M(θ*) in the params' dtype (the monitor's)
    displacement: PyTree = None  # x₁ … x_K as the series returned them (leading (K,) axis)
    tail_quadratic: float = float("nan")  # gᵀ(I−P)F(I−P)g


def _check_derivatives(
    values: tuple[float, float], task_ok: bool, skill_gradient_ok: bool, delta_u: np.ndarray
) -> None:
    """Raise unless the losses' values ``(u(θ*), L(θ*))`` and derivatives at ``θ*`` are finite.

    The values first: a loss that is ``nan`` at ``θ*`` (the mean over an empty
    batch) can still have finite, zero, derivatives, and would forecast nothing.
    """
    for name, value in zip(("skill_loss", "task_loss"), values, strict=True):
        if not math.isfinite(value):
            raise ValueError(
                f"{name}: its value at params is {value}, not finite (e.g. a mean over an "
                f"empty batch in {name[:-5]}_args)"
            )
    checks = (("task_loss", task_ok), ("skill_loss", skill_gradient_ok))
    for name, ok in (*checks, ("skill_loss", bool(np.all(np.isfinite(delta_u))))):
        if not ok:
            raise ValueError(f"{name} has non-finite derivatives at params")


def at_d(req: Request, sp: Spectrum, done: Callable[[str], None]) -> AtD:
    """The series, ``∇u(θ*)`` and the AIC at ``sp.d`` for ``req``, one route for every
    layout; ``done('forecast')`` once the series is in.

    Sharded params: ``x_k``, ``g``, ``Hg`` and ``M``'s basis stay pytrees laid out like
    them. Unsharded: ``x₁ … x_K`` and the basis as ``(K, n)`` and ``(d, n)`` rows on a mesh
    of their one device. Only norms, ``(K+1,)`` coefficients and the ``(K, d)`` and
    ``(d,)`` coordinates come back to the host (``jax.device_get``). Projections,
    ``g``, ``Hg`` and the tail's quadratic are taken in float64 whenever x64 is on.
    """
    s, *at_theta = _forecast(req)
    grad_u_norm, grad_u_ok, values = jax.device_get(at_theta)
    d, lam, dtype = sp.d, sp.values, req.dtype
    layout, xs, basis, m_basis, put = _placed(req, sp, s.displacement)
    g, Hg, ys, xs_ok = _tree_task_vectors(xs, basis, layout)
    c_du = np.asarray(jax.device_get(s.delta_u), np.float64)
    values = tuple(float(v) for v in values)
    _check_derivatives(values, bool(jax.device_get(xs_ok)), bool(grad_u_ok), c_du)
    done("forecast")
    subspace = Subspace(
        values=put(np.asarray(lam[:d], dtype)),
        basis=m_basis,
        residuals=put(sp.residuals[:d]),
        converged=put(np.asarray(bool(np.all(sp.converged[:d])))),
    )
    g_perp = aic.tree_deflate(basis, g, layout)
    f_g_perp = sp.matvec(_tree_cast(g_perp, dtype, layout))
    tail_q, g_norm = jax.device_get(aic.tree_tail_and_norm(g_perp, f_g_perp, g))
    report = theory.aic_report(
        subspace,
        g,
        Hg,
        tail_mass=sp.tail + float(lam[d:].sum()),
        tail_quadratic=float(tail_q),
        compiled=True,
    )

    def overlap(horizon: float) -> tuple[np.ndarray, float]:
        powers = put(np.asarray(horizon ** np.arange(1, req.order + 1), _wide_dtype(dtype)))
        coords, x_norm = jax.device_get(_tree_overlap(xs, basis, powers, layout))
        return np.asarray(coords, np.float64), float(x_norm)

    return AtD(
        delta_u=c_du,
        time_scale=s.time_scale,
        validity_time=s.validity_time,
        report=report,
        coordinates=np.asarray(jax.device_get(ys), np.float64),
        skill_gradient_norm=float(grad_u_norm),
        task_gradient_norm=float(g_norm),
        overlap=overlap,
        route=str(s.route),
        subspace=subspace,
        displacement=s.displacement,
        tail_quadratic=float(tail_q),
    )


def _wide_dtype(dtype) -> np.dtype:
    """``dtype`` promoted to float64 when x64 is on (else as is)."""
    return np.dtype(jnp.promote_types(dtype, jnp.result_type(float)))


def _placed(req: Request, sp: Spectrum, displacement: PyTree) -> tuple:
    """``(layout, xs, basis, m_basis, put)``: where the vectors live. Sharded params: their
    layout, ``x₁ … x_K`` and the top ``d`` eigenvectors as stacks like them. Unsharded:
    ``(K, n)`` and ``(d, n)`` (float64 when x64 is on) rows on a mesh of one device, and
    ``M(θ*)``'s basis ``m_basis`` for the monitor uncommitted, like the params."""
    d, dtype = sp.d, req.dtype
    if req.layout is not None:
        basis = _tree_leading(sp.vectors, d, req.layout)
        return req.layout, displacement, basis, _tree_cast(basis, dtype, req.layout), req.layout.put
    layout = Layout(on_one_device_mesh(req.flat), "params")
    rows = np.asarray(sp.vectors[:d])
    basis = jax.device_put(rows.astype(_wide_dtype(dtype)), layout.stacked)
    xs = _raveled_rows(displacement, layout)
    return layout, xs, basis, jnp.asarray(rows, dtype), jnp.asarray


def _all_finite(tree: PyTree) -> jax.Array:
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    )


@partial(jax.jit, static_argnums=(1, 2))
def _tree_leading(stack: PyTree, d: int, layout: Layout) -> PyTree:
    """The first ``d`` vectors of a stack, laid out like the parameters."""
    return jax.lax.with_sharding_constraint(jax.tree.map(lambda b: b[:d], stack), layout.stacked)


def _wide(tree: PyTree) -> PyTree:
    """``tree`` in float64 when x64 is on (else as is): the dtype projections are taken in."""
    wide = jnp.result_type(float)
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, wide)), tree)


@partial(jax.jit, static_argnums=(1, 2))
def _tree_cast(tree: PyTree, dtype, layout: Layout) -> PyTree:
    """``tree`` (a vector or a stack laid out like the parameters) in ``dtype``."""
    out = jax.tree.map(lambda x: x.astype(dtype), tree)
    stacked = jax.tree.leaves(tree)[0].ndim > len(layout.shapes[0])
    return jax.lax.with_sharding_constraint(out, layout.stacked if stacked else layout.shardings)


@partial(jax.jit, static_argnums=1)
def _raveled_rows(displacement: PyTree, layout: Layout) -> jax.Array:
    """``x₁ … x_K`` (leaves with a leading ``K`` axis) as ``(K, n)`` rows (``ravel_pytree``
    order)."""
    leaves = jax.tree.leaves(displacement)
    rows = jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    return jax.lax.with_sharding_constraint(rows, layout.stacked)


@partial(jax.jit, static_argnums=2)
def _tree_task_vectors(displacement: PyTree, basis: PyTree, layout: Layout):
    """``g = −x₁``, ``Hg = 2x₂`` (laid out like the parameters, float64 when x64 is on),
    the ``(K, d)`` coordinates ``⟨v_i, x_k⟩`` and whether every ``x_k`` is finite."""
    xs = _wide(displacement)
    g = jax.tree.map(lambda x: -x[0], xs)
    Hg = jax.tree.map(lambda x: 2.0 * x[1], xs)
    ys = jax.vmap(lambda x: stack_dot(_wide(basis), x))(xs)
    return (
        jax.lax.with_sharding_constraint(g, layout.shardings),
        jax.lax.with_sharding_constraint(Hg, layout.shardings),
        ys,
        _all_finite(displacement),
    )


@partial(jax.jit, static_argnums=3)
def _tree_overlap(displacement: PyTree, basis: PyTree, powers: jax.Array, layout: Layout):
    """``(⟨v_i, x(t_h)⟩ (d,), ‖x(t_h)‖)`` of ``x(t_h) = Σ_k t_h^k x_k`` (``powers`` ``(K,)``)."""
    x_h = stack_combine(powers, _wide(displacement))
    x_h = jax.lax.with_sharding_constraint(x_h, layout.shardings)
    return stack_dot(_wide(basis), x_h), tree_norm(x_h)


def _at_theta_star(skill_loss, task_loss, order, layout, params, skill_args, task_args):
    """The Taylor series (no subspace), ``‖∇u(θ*)‖``, whether ``∇u(θ*)`` is finite and
    ``(u(θ*), L(θ*))``; with a ``layout`` (sharded params) ``x₁ … x_K`` and ``∇u`` stay
    laid out like the parameters.

    ``u(θ*)`` comes with its gradient; ``L(θ*)`` is one forward pass in the same
    compiled call (the series differentiates ``L`` but never returns its value).
    """
    s = series.delta_u_series(
        skill_loss, task_loss, params, order, skill_args=skill_args, task_args=task_args
    )
    value, grad = jax.value_and_grad(skill_loss)(params, *skill_args)
    if layout is not None:
        grad = jax.lax.with_sharding_constraint(grad, layout.shardings)
        xs = jax.lax.with_sharding_constraint(s.displacement, layout.stacked)
        s = s._replace(displacement=xs)
    return s, tree_norm(_wide(grad)), _all_finite(grad), (value, task_loss(params, *task_args))


_JITTED_AT_THETA_STAR = {
    small: jax.jit(
        _at_theta_star, static_argnums=(0, 1, 2, 3), compiler_options=ONE_SHOT if small else {}
    )
    for small in (True, False)
}


def _forecast(req: Request):
    """:func:`_at_theta_star` for ``req``, compiled once per losses, order and shapes.

    ``g = −x₁`` and ``Hg = 2x₂`` come with the series, so the whole at-``θ*``
    differentiation is one compiled call. ``delta_u_series`` alone compiles
    afresh on every call; under this jit a second diagnosis with the same
    losses and shapes reuses it, whatever its ``d`` (the projected series is
    formed from ``x₁ … x_K`` outside, :func:`geomcollapse.series.projected_from_coordinates`).
    Unhashable losses: compiled per call.
    """
    options = one_shot_options(req.n)
    losses = (req.skill_loss, req.task_loss, req.order, req.layout)
    data = (req.params, req.skill_args, req.task_args)
    try:
        hash(losses)
    except TypeError:
        fn = jax.jit(partial(_at_theta_star, *losses), compiler_options=options)
        return fn(*data)
    return _JITTED_AT_THETA_STAR[bool(options)](*losses, *data)
