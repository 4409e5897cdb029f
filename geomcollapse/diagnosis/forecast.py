"""The forecast and the AIC at ``d``: the series, ``∇u(θ*)`` and the AIC report of Def. 5.1.

``x₁ … x_K`` come from :func:`geomcollapse.series.delta_u_series` (docs/theory.md
§6) in one compiled call with ``∇u(θ*)`` and the losses' values; ``g = −x₁``
and ``Hg = 2x₂`` feed :func:`geomcollapse.theory.aic_report` with the basis of
``M``, the tail mass and the tail's quadratic floor
(:func:`geomcollapse.aic.tail_quadratic`, :func:`geomcollapse.aic.tree_deflate`).
Params sharded on a mesh keep every vector of ``R^n`` a pytree laid out like them.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse import aic, curvature, series, theory
from geomcollapse._sharding import Layout, stack_combine, stack_dot, tree_norm
from geomcollapse.diagnosis.plan import ONE_SHOT, Request, one_shot_options
from geomcollapse.diagnosis.spectrum import Spectrum
from geomcollapse.errors import FlatLossWarning
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


def _at_d_flat(
    sp, skill_loss, task_loss, order, params, skill_args, task_args, dtype, *, done
) -> AtD:
    """The series, ``∇u(θ*)`` and the AIC at ``d`` with vectors as float64 ``(n,)`` host rows."""
    s, grad_u, values = _forecast(skill_loss, task_loss, order, params, skill_args, task_args)
    c_du = np.asarray(s.delta_u, np.float64)
    xs = np.concatenate(  # x₁ … x_K as (K, n) rows, ravel_pytree order
        [np.reshape(a, (order, -1)) for a in jax.tree.leaves(s.displacement)], axis=1
    ).astype(np.float64)
    grad_u = np.asarray(grad_u, np.float64)
    g, Hg = -xs[0], 2.0 * xs[1]  # x₁ = −g, x₂ = ½Hg (docs/theory.md §6)
    _check_derivatives(
        tuple(float(v) for v in values),
        bool(np.all(np.isfinite(xs))),
        bool(np.all(np.isfinite(grad_u))),
        c_du,
    )
    done("forecast")
    d, lam, Vd = sp.d, sp.values, sp.vectors[: sp.d]
    subspace = Subspace(
        values=jnp.asarray(lam[:d], dtype),
        basis=jnp.asarray(Vd, dtype),
        residuals=jnp.asarray(sp.residuals[:d]),
        converged=jnp.asarray(bool(np.all(sp.converged[:d]))),
    )
    report = theory.aic_report(
        subspace,
        g,
        Hg,
        tail_mass=sp.tail + float(lam[d:].sum()),
        tail_quadratic=aic.tail_quadratic(sp.matvec, Vd, g, dtype),
    )

    def overlap(horizon: float) -> tuple[np.ndarray, float]:
        # x(t_h) = Σ_k x_k t_h^k in numpy: eager jnp ops would each compile
        x_h = (horizon ** np.arange(1, order + 1)) @ xs
        return Vd @ x_h, float(np.linalg.norm(x_h))

    return AtD(
        delta_u=c_du,
        time_scale=s.time_scale,
        validity_time=s.validity_time,
        report=report,
        coordinates=xs @ Vd.T,
        skill_gradient_norm=float(np.linalg.norm(grad_u)),
        task_gradient_norm=float(np.linalg.norm(g)),
        overlap=overlap,
        route=str(s.route),
        subspace=subspace,
        displacement=s.displacement,
    )


def _at_d_sharded(
    layout, sp, skill_loss, task_loss, order, params, skill_args, task_args, dtype, *, done
) -> AtD:
    """As :func:`_at_d_flat` for params sharded on a mesh: ``x_k``, ``g``, ``Hg`` and ``M``'s
    basis stay pytrees laid out like them; only norms, ``(K+1,)`` coefficients and the
    ``(K, d)`` and ``(d,)`` coordinates come back to the host (``jax.device_get``).
    """
    with warnings.catch_warnings():  # a flat task loss: diagnose says so once, in its report
        warnings.simplefilter("ignore", FlatLossWarning)
        s = series.delta_u_series(
            skill_loss, task_loss, params, order, skill_args=skill_args, task_args=task_args
        )
    grad_u_norm, grad_u_ok, values = jax.device_get(
        _tree_skill_gradient(
            curvature.keyed(skill_loss),
            curvature.keyed(task_loss),
            layout,
            params,
            skill_args,
            task_args,
        )
    )
    d, lam = sp.d, sp.values
    basis = _tree_leading(sp.vectors, d, layout)
    g, Hg, ys, xs_ok = _tree_task_vectors(s.displacement, basis, layout)
    c_du = np.asarray(jax.device_get(s.delta_u), np.float64)
    _check_derivatives(
        tuple(float(v) for v in values), bool(jax.device_get(xs_ok)), bool(grad_u_ok), c_du
    )
    done("forecast")
    put = layout.put
    subspace = Subspace(
        values=put(np.asarray(lam[:d], dtype)),
        basis=basis,
        residuals=put(sp.residuals[:d]),
        converged=put(np.asarray(bool(np.all(sp.converged[:d])))),
    )
    g_perp = aic.tree_deflate(basis, g, layout)
    tail_q, g_norm = jax.device_get(aic.tree_tail_and_norm(g_perp, sp.matvec(g_perp), g))
    report = theory.aic_report(
        subspace,
        g,
        Hg,
        tail_mass=sp.tail + float(lam[d:].sum()),
        tail_quadratic=float(tail_q),
        compiled=True,
    )

    def overlap(horizon: float) -> tuple[np.ndarray, float]:
        powers = put(np.asarray(horizon ** np.arange(1, order + 1), dtype))
        coords, x_norm = jax.device_get(_tree_overlap(s.displacement, basis, powers, layout))
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
    )


def _all_finite(tree: PyTree) -> jax.Array:
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    )


@partial(jax.jit, static_argnums=(0, 1, 2))
def _tree_skill_gradient(
    skill_loss, task_loss, layout: Layout, params: PyTree, skill_args: tuple, task_args: tuple
):
    """``‖∇u(θ*)‖``, whether ``∇u(θ*)`` is finite (``∇u`` laid out like ``params``) and the
    losses' values ``(u(θ*), L(θ*))``."""
    value, grad = jax.value_and_grad(skill_loss)(params, *skill_args)
    grad = jax.lax.with_sharding_constraint(grad, layout.shardings)
    return tree_norm(grad), _all_finite(grad), (value, task_loss(params, *task_args))


@partial(jax.jit, static_argnums=(1, 2))
def _tree_leading(stack: PyTree, d: int, layout: Layout) -> PyTree:
    """The first ``d`` vectors of a stack, laid out like the parameters."""
    return jax.lax.with_sharding_constraint(jax.tree.map(lambda b: b[:d], stack), layout.stacked)


@partial(jax.jit, static_argnums=2)
def _tree_task_vectors(displacement: PyTree, basis: PyTree, layout: Layout):
    """``g = −x₁``, ``Hg = 2x₂`` (laid out like the parameters), the ``(K, d)``
    coordinates ``⟨v_i, x_k⟩`` and whether every ``x_k`` is finite."""
    g = jax.tree.map(lambda x: -x[0], displacement)
    Hg = jax.tree.map(lambda x: 2.0 * x[1], displacement)
    ys = jax.vmap(lambda x: stack_dot(basis, x))(displacement)
    return (
        jax.lax.with_sharding_constraint(g, layout.shardings),
        jax.lax.with_sharding_constraint(Hg, layout.shardings),
        ys,
        _all_finite(displacement),
    )


@partial(jax.jit, static_argnums=3)
def _tree_overlap(displacement: PyTree, basis: PyTree, powers: jax.Array, layout: Layout):
    """``(⟨v_i, x(t_h)⟩ (d,), ‖x(t_h)‖)`` of ``x(t_h) = Σ_k t_h^k x_k`` (``powers`` ``(K,)``)."""
    x_h = stack_combine(powers, displacement)
    x_h = jax.lax.with_sharding_constraint(x_h, layout.shardings)
    return stack_dot(basis, x_h), tree_norm(x_h)


def _at_theta_star(skill_loss, task_loss, order, params, skill_args, task_args):
    """The Taylor series (no subspace), the raveled ``∇u(θ*)`` and ``(u(θ*), L(θ*))``.

    ``u(θ*)`` comes with its gradient; ``L(θ*)`` is one forward pass in the same
    compiled call (the series differentiates ``L`` but never returns its value).
    """
    s = series.delta_u_series(
        skill_loss, task_loss, params, order, skill_args=skill_args, task_args=task_args
    )
    value, grad = jax.value_and_grad(skill_loss)(params, *skill_args)
    return s, ravel_pytree(grad)[0], (value, task_loss(params, *task_args))


_JITTED_AT_THETA_STAR = {
    small: jax.jit(
        _at_theta_star, static_argnums=(0, 1, 2), compiler_options=ONE_SHOT if small else {}
    )
    for small in (True, False)
}


def _forecast(skill_loss, task_loss, order, params, skill_args, task_args):
    """:func:`series.delta_u_series` (no subspace), ``∇u(θ*)`` and the losses' values at
    ``θ*``, compiled once per losses, order and shapes.

    ``g = −x₁`` and ``Hg = 2x₂`` come with the series, so the whole at-``θ*``
    differentiation is one compiled call. ``delta_u_series`` alone compiles
    afresh on every call; under this jit a second diagnosis with the same
    losses and shapes reuses it, whatever its ``d`` (the projected series is
    formed from ``x₁ … x_K`` outside, :func:`geomcollapse.series.projected_from_coordinates`).
    Unhashable losses: compiled per call.
    """
    options = one_shot_options(ravel_pytree(params)[0].size)
    try:
        hash((skill_loss, task_loss))
    except TypeError:
        fn = jax.jit(
            partial(_at_theta_star, skill_loss, task_loss, order), compiler_options=options
        )
        return fn(params, skill_args, task_args)
    jitted = _JITTED_AT_THETA_STAR[bool(options)]
    return jitted(skill_loss, task_loss, order, params, skill_args, task_args)


def at_d(req: Request, sp: Spectrum, done: Callable[[str], None]) -> AtD:
    """The forecast and the AIC at ``sp.d`` for ``req``'s losses and params (sharded or not);
    ``done('forecast')`` once the series is in."""
    args = (sp, req.skill_loss, req.task_loss, req.order, req.params)
    args = (*args, req.skill_args, req.task_args, req.dtype)
    if req.layout is None:
        return _at_d_flat(*args, done=done)
    return _at_d_sharded(req.layout, *args, done=done)
