"""Watch alignment collapse while training: the Thm 6.1 bound, the overlap and M's rotation.

Every ``every`` steps the monitor measures, at the current ``θ_k``:

* the realised projected loss ``½‖F^{1/2}P(θ_k − θ*)‖²`` (Thm 6.1's lower bound
  on ``Δu``, with ``F`` and ``P`` of ``M(θ*)``; one ``(d, n)`` product);
* the overlap score ``‖P(θ_k − θ*)‖/‖θ_k − θ*‖`` (Section 7);
* the rotation of ``M``: the top-``d`` eigenspace ``M(θ_k)`` of ``F(θ_k)``
  found by traced Lanczos warm-started from the previous measurement's
  (docs/theory.md §7: curvature bends the trajectory back into a moving
  ``M``), compared with ``M(θ*)`` by its largest principal angle and by the
  mean squared cosine ``‖P(θ_k)P(θ*)‖_F²/d`` (1: same space; ``d/n``: random);
* with a :class:`geomcollapse.series.Series`, the forecast of the projected
  loss and of ``Δu`` at gradient-flow time ``t = time_per_step · k``
  (``lr · k`` for SGD) and whether ``t`` lies in the forecast's validity window.

A measurement past a user budget (on the projected loss, or on the angle)
warns or stops. Three entry points share one measurement:

* :func:`monitor_measure`: the pure measurement of one ``θ``;
* :func:`monitor`: an optax wrapper ``monitor(inner, subspace, every=k, …)`` whose
  updates are ``inner``'s, bit for bit, and whose state carries the log in
  fixed-size arrays (jit-able; the measurement runs under ``lax.cond``).
  Nothing can be raised inside ``jit``: past the budget the state records
  the first offending measurement and, with ``on_exceed='stop'``, sets
  ``stopped``, after which every update is zero and the inner state frozen
  (training halts at ``θ_k``). :func:`check_monitor` on the host turns that
  into a :class:`BudgetWarning` or a :class:`BudgetExceeded` exception;
  :func:`monitor_log` returns the log.
* :class:`MonitorCallback`: the same for a Python training loop, e.g.
  ``training.train(..., callback=MonitorCallback(...))``; it warns or raises
  at the measurement itself.

Cost of one measurement: the product above, plus (with a ``fisher_vp``)
one Lanczos run of ``F(θ_k)`` matvecs (``num_matvecs`` is logged); without a
``fisher_vp`` the rotation is not measured (NaN) and the monitor costs almost
nothing. ``benchmarks/monitor_overhead.py`` measures the overhead.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import (
    check_data,
    check_params,
    finite_leaves,
    positive_float,
    positive_int,
    prng_key,
    probe_operator,
    same_structure,
    tuple_arg,
)
from geomcollapse.series import Series, projected_from_coordinates
from geomcollapse.subspace import Subspace, fisher_product, subspace_arrays, warm_eigenpairs

__all__ = [
    "BudgetExceeded",
    "BudgetWarning",
    "Measurement",
    "MonitorCallback",
    "MonitorState",
    "check_monitor",
    "forecast_window",
    "monitor",
    "monitor_log",
    "monitor_measure",
    "rotation",
]

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
_ON_EXCEED = ("warn", "stop")


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=_HIGHEST)


class Measurement(NamedTuple):
    """One measurement at ``θ_k`` (all 0-d arrays; a log stacks them on a leading axis).

    Attributes:
      step: int32 ``k`` (``θ_k`` is the parameters after ``k`` updates; −1: empty slot).
      time: gradient-flow time ``t = time_per_step · k`` (NaN without ``time_per_step``).
      projected_loss: ``½‖F^{1/2}P(θ_k − θ*)‖²`` with ``F``, ``P`` of ``M(θ*)`` (Thm 6.1).
      overlap: ``‖P(θ_k − θ*)‖/‖θ_k − θ*‖`` (0 at ``θ*``; Section 7).
      displacement_norm: ``‖θ_k − θ*‖``.
      angle: largest principal angle between ``M(θ_k)`` and ``M(θ*)``, radians
        (NaN when the rotation was not measured).
      mean_cos2: ``‖P(θ_k)P(θ*)‖_F²/d``, the mean squared cosine of the principal angles.
      converged: bool, the Lanczos run for ``M(θ_k)`` met its tolerance (False: not measured).
      num_matvecs: int32 Fisher matvecs spent on ``M(θ_k)`` (0: not measured).
      forecast: the series' projected loss at ``t`` (NaN without a series).
      forecast_delta_u: the series' ``Δu`` at ``t`` (NaN without a series).
      in_window: bool, ``t`` ≤ the forecast's validity time (False without a series).
      exceeded: bool, ``projected_loss > budget`` or ``angle > angle_budget``;
        with a budget set, also a non-finite projected loss or displacement
        (diverged parameters are past any budget).
    """

    step: jax.Array
    time: jax.Array
    projected_loss: jax.Array
    overlap: jax.Array
    displacement_norm: jax.Array
    angle: jax.Array
    mean_cos2: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    forecast: jax.Array
    forecast_delta_u: jax.Array
    in_window: jax.Array
    exceeded: jax.Array

    def describe(self) -> str:
        """One line with the numbers, for warnings and logs (needs concrete values)."""
        text = (
            f"step {int(self.step)}: projected loss ½‖F^{{1/2}}P(θ−θ*)‖² = "
            f"{float(self.projected_loss):.4g}, overlap ‖PΔθ‖/‖Δθ‖ = {float(self.overlap):.4g}"
        )
        if np.isfinite(float(self.angle)):
            text += (
                f", rotation of M: largest angle {float(self.angle):.4g} rad, "
                f"mean cos² {float(self.mean_cos2):.4g}"
            )
        if np.isfinite(float(self.forecast)):
            ratio = float(self.projected_loss) / float(self.forecast) if self.forecast else math.inf
            window = "inside" if bool(self.in_window) else "outside"
            text += (
                f"; forecast {float(self.forecast):.4g} at t = {float(self.time):.4g} "
                f"(realised/forecast {ratio:.3g}, {window} the validity window)"
            )
        return text


class BudgetWarning(UserWarning):
    """A measurement went past the monitor's budget (``on_exceed='warn'``)."""


class BudgetExceeded(RuntimeError):
    """A measurement went past the monitor's budget and training stopped (``on_exceed='stop'``).

    Attributes:
      measurement: the first :class:`Measurement` past the budget (numpy values).
    """

    def __init__(self, message: str, measurement: Measurement):
        super().__init__(message)
        self.measurement = measurement


# --------------------------------------------------------------------------- measurement


def rotation(rows: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(largest principal angle, mean cos²)`` between the row spaces of two ``(d, n)`` bases.

    With ``C = A Bᵀ`` (``A = rows``, ``B = reference``, orthonormal rows):
    ``cos θ_max = σ_min(C)``, ``sin θ_max = ‖A − C B‖₂`` (from the ``d × d``
    Gram matrix of ``A − CB``, so a tiny angle keeps its relative accuracy,
    which ``arccos`` alone loses below ``√eps``), ``θ_max = atan2(sin, cos)``;
    mean cos² ``= ‖C‖_F²/d = ‖P_A P_B‖_F²/d``. Jit-able.
    """
    a, b = rows, reference.astype(rows.dtype)
    c = _dot(a, b.T)
    outside = a - _dot(c, b)
    sin2 = jnp.max(jnp.linalg.eigvalsh(_dot(outside, outside.T)))
    cos = jnp.min(jnp.linalg.svd(c, compute_uv=False))
    angle = jnp.arctan2(jnp.sqrt(jnp.maximum(sin2, 0.0)), cos)
    return angle, jnp.sum(c * c) / a.shape[0]


def forecast_window(series: Series) -> float:
    """The time up to which the series' projected-loss forecast is trusted (host-side).

    :attr:`Series.projected_validity_time` when it is a number, else (one
    non-zero term, as with ``Pg = 0`` at order 4, or no subspace)
    :attr:`Series.validity_time` of ``Δu``'s series, which shares the
    displacement's truncation.
    """
    window = series.projected_validity_time
    return float(series.validity_time) if np.isnan(window) else float(window)


def _forecast(series: Series | None, t: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    if series is None:
        nan = jnp.full((), jnp.nan, dtype)
        return nan, nan
    # only the coefficient arrays: the displacement x₁ … x_K stays out of jit's constants
    values = Series(series.delta_u, series.projected, None).evaluate(t)
    projected = jnp.nan if values.projected is None else values.projected
    return jnp.asarray(projected, dtype), jnp.asarray(values.delta_u, dtype)


def _measure_flat(
    x: jax.Array,
    values: jax.Array,
    reference: jax.Array,
    *,
    step: Any,
    basis: jax.Array | None,
    measured: Any = True,
    converged: Any,
    num_matvecs: Any,
    series: Series | None,
    time: Any,
    validity_time: float,
    budget: float,
    angle_budget: float,
) -> Measurement:
    """:func:`monitor_measure` on a raveled displacement ``x`` and ``M(θ*)`` as ``(λ, rows)``."""
    dtype = x.dtype
    coords = _dot(reference.astype(dtype), x)
    lam = jnp.maximum(values.astype(dtype), 0.0)
    projected = 0.5 * jnp.sum(lam * coords**2)
    norm = jnp.linalg.norm(x)
    overlap = jnp.where(norm > 0, jnp.linalg.norm(coords) / jnp.where(norm > 0, norm, 1.0), 0.0)
    nan = jnp.full((), jnp.nan, dtype)
    if basis is None:
        angle = mean_cos2 = nan
    else:
        angle, mean_cos2 = rotation(basis.astype(dtype), reference)
        # a rotation not measured this time is NaN, not the previous one
        angle, mean_cos2 = jnp.where(measured, angle, nan), jnp.where(measured, mean_cos2, nan)
    t = jnp.full((), jnp.nan, dtype) if time is None else jnp.asarray(time, dtype)
    forecast, forecast_du = _forecast(series, t, dtype)
    in_window = (series is not None) & (t <= validity_time)
    exceeded = (projected > budget) | (jnp.nan_to_num(angle, nan=-1.0) > angle_budget)
    if budget < math.inf or angle_budget < math.inf:  # NaN > budget is False: diverged is past it
        exceeded = exceeded | ~(jnp.isfinite(projected) & jnp.isfinite(norm))
    return Measurement(
        step=jnp.asarray(step, jnp.int32),
        time=t,
        projected_loss=projected,
        overlap=overlap,
        displacement_norm=norm,
        angle=angle,
        mean_cos2=mean_cos2,
        converged=jnp.asarray(converged, bool),
        num_matvecs=jnp.asarray(num_matvecs, jnp.int32),
        forecast=forecast,
        forecast_delta_u=forecast_du,
        in_window=jnp.asarray(in_window),
        exceeded=exceeded,
    )


def monitor_measure(
    params: PyTree,
    theta_star: PyTree,
    subspace: Subspace,
    *,
    step: Any = 0,
    basis: Any = None,
    converged: Any = True,
    series: Series | None = None,
    time: Any = None,
    validity_time: float = math.inf,
    budget: float = math.inf,
    angle_budget: float = math.inf,
) -> Measurement:
    """Measure ``θ_k = params`` against ``θ*`` and ``M(θ*) = subspace``; pure and jit-able.

    Args:
      params, theta_star: ``θ_k`` and ``θ*``, pytrees of the same structure (or ``(n,)``).
      subspace: ``M(θ*)``: ``(d,)`` eigenvalues ``λ_i`` and ``(d, n)`` (or pytree) basis.
      step: ``k``, recorded as is.
      basis: ``(d', n)`` orthonormal rows (or a pytree with a leading axis) of
        ``M(θ_k)``, e.g. ``top_eigenpairs(...).vectors``; ``None``: rotation not
        measured (NaN).
      converged: recorded with the rotation (whether ``basis`` was certified).
      series: a :class:`Series` made with the same ``subspace``; its forecast at ``time``.
      time: gradient-flow time ``t`` of ``θ_k`` (``lr · k`` for SGD).
      validity_time: end of the forecast's window (see :func:`forecast_window`).
      budget, angle_budget: ``exceeded`` is ``projected_loss > budget`` or
        ``angle > angle_budget``.

    Returns:
      A :class:`Measurement` (0-d arrays; ``num_matvecs`` 0).
    """
    values, reference = subspace_arrays(subspace)
    x, n = _displacement(params, theta_star)
    if reference.shape[1] != n:
        raise ValueError(f"subspace basis has {reference.shape[1]} parameters, params have {n}")
    rows = None
    if basis is not None:
        rows = _rows(basis, "basis")
        if rows.shape != reference.shape:
            raise ValueError(
                f"basis must be {reference.shape} rows like the subspace's, got {rows.shape}"
            )
    return _measure_flat(
        x,
        values,
        reference,
        step=step,
        basis=rows,
        converged=converged,
        num_matvecs=0,
        series=_series(series),
        time=time,
        validity_time=validity_time,
        budget=_budget(budget, "budget"),
        angle_budget=_budget(angle_budget, "angle_budget"),
    )


def _rows(basis: Any, name: str) -> jax.Array:
    if isinstance(basis, (jax.Array, np.ndarray)):
        if np.ndim(basis) != 2:
            raise ValueError(f"{name} must be (d, n) rows, got shape {np.shape(basis)}")
        rows = jnp.asarray(basis)
    else:
        rows = jax.vmap(lambda b: ravel_pytree(b)[0])(basis)
    finite_leaves(rows, name)
    return rows


def _displacement(params: PyTree, theta_star: PyTree) -> tuple[jax.Array, int]:
    """``(x = θ − θ*`` raveled, ``n)``; raises on mismatched pytrees."""
    finite_leaves(params, "params")
    finite_leaves(theta_star, "theta_star")
    a, b = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(theta_star)
    if a != b:
        raise ValueError(f"params and theta_star have different pytree structures: {a} vs {b}")
    flat, _ = ravel_pytree(params)
    star, _ = ravel_pytree(theta_star)
    if flat.shape != star.shape:
        raise ValueError(f"params have {flat.size} entries, theta_star {star.size}")
    return flat - star.astype(flat.dtype), flat.size


def _series(series: Any) -> Series | None:
    if series is not None and not isinstance(series, Series):
        raise ValueError(f"series must be a geomcollapse Series, got {type(series).__name__}")
    return series


def _budget(value: Any, name: str) -> float:
    if value is None or (np.ndim(value) == 0 and value == math.inf):
        return math.inf
    return positive_float(value, name)


# --------------------------------------------------------------------------- optax wrapper


class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    Attributes:
      inner: the wrapped optimizer's state.
      count: ``()`` int32, updates seen (the ``params`` of update ``c`` are ``θ_c``).
      theta_star: ``(n,)`` ``θ*`` raveled (the ``params`` given to ``init``).
      basis: ``(d, n)`` rows of the last measured ``M(θ_k)`` (``M(θ*)`` before
        the first): the warm start of the next Lanczos run.
      key: PRNG key of the next Lanczos run.
      log: :class:`Measurement` with a leading ``(capacity,)`` axis, a ring
        buffer (slot ``i`` holds measurement ``i mod capacity``; see :func:`monitor_log`).
      num_measured: ``()`` int32, measurements taken.
      first_exceeded: the first :class:`Measurement` past the budget (``step`` −1: none).
      stopped: ``()`` bool; with ``on_exceed='stop'``, updates are zero from then on.
    """

    inner: optax.OptState
    count: jax.Array
    theta_star: jax.Array
    basis: jax.Array
    key: jax.Array
    log: Measurement
    num_measured: jax.Array
    first_exceeded: Measurement
    stopped: jax.Array


def _empty(dtype, shape: tuple = ()) -> Measurement:
    nan = jnp.full(shape, jnp.nan, dtype)
    false = jnp.zeros(shape, bool)
    zero = jnp.zeros(shape, jnp.int32)
    return Measurement(
        step=zero - 1,
        time=nan,
        projected_loss=nan,
        overlap=nan,
        displacement_norm=nan,
        angle=nan,
        mean_cos2=nan,
        converged=false,
        num_matvecs=zero,
        forecast=nan,
        forecast_delta_u=nan,
        in_window=false,
        exceeded=false,
    )


class _Config(NamedTuple):
    every: int
    rotation_every: int
    budget: float
    angle_budget: float
    stop: bool
    series: Series | None
    validity_time: float
    time_per_step: float | None
    fisher_vp: Callable[..., PyTree] | None
    fisher_args: tuple
    tol: float | None
    max_steps: int | None


def _observe(
    cfg: _Config, values, reference, state: MonitorState, params: PyTree, args: tuple
) -> MonitorState:
    """The measurement due at ``state.count`` (if any), written into the state."""
    count = state.count
    due = (count > 0) & (count % cfg.every == 0)

    def measure(state: MonitorState) -> MonitorState:
        theta = ravel_pytree(params)[0]
        x = theta - state.theta_star.astype(theta.dtype)
        next_key, k_start, k_restart = jax.random.split(state.key, 3)
        d = reference.shape[0]
        zero = jnp.zeros((), jnp.int32)
        if cfg.fisher_vp is None:
            basis, converged, matvecs, measured = state.basis, jnp.bool_(False), zero, False
        else:
            measured = (count // cfg.every) % cfg.rotation_every == 0

            def lanczos():
                pairs = warm_eigenpairs(
                    cfg.fisher_vp,
                    params,
                    args,
                    state.basis,
                    d,
                    (k_start, k_restart),
                    cfg.tol,
                    cfg.max_steps,
                )
                return pairs.vectors.astype(state.basis.dtype), pairs.certified, pairs.num_matvecs

            basis, converged, matvecs = jax.lax.cond(
                measured, lanczos, lambda: (state.basis, jnp.bool_(False), zero)
            )
        rec = _measure_flat(
            x,
            values,
            reference,
            step=count,
            basis=None if cfg.fisher_vp is None else basis,
            measured=measured,
            converged=converged,
            num_matvecs=matvecs,
            series=cfg.series,
            time=None if cfg.time_per_step is None else count.astype(x.dtype) * cfg.time_per_step,
            validity_time=cfg.validity_time,
            budget=cfg.budget,
            angle_budget=cfg.angle_budget,
        )
        slot = state.num_measured % state.log.step.shape[0]
        log = jax.tree_util.tree_map(lambda buf, v: buf.at[slot].set(v), state.log, rec)
        first = state.first_exceeded.step < 0
        first_exceeded = jax.tree_util.tree_map(
            lambda old, new: jnp.where(first & rec.exceeded, new, old), state.first_exceeded, rec
        )
        stopped = state.stopped | (cfg.stop & rec.exceeded)
        return state._replace(
            basis=basis,
            key=next_key,
            log=log,
            num_measured=state.num_measured + 1,
            first_exceeded=first_exceeded,
            stopped=stopped,
        )

    return jax.lax.cond(due & ~state.stopped, measure, lambda s: s, state)


def _optional(value: Any, check: Callable[[Any, str], Any], name: str) -> Any:
    return None if value is None else check(value, name)


def _config(
    every,
    rotation_every,
    budget,
    angle_budget,
    on_exceed,
    series,
    time_per_step,
    fisher_vp,
    fisher_args,
    tol,
    max_steps,
) -> _Config:
    if on_exceed not in _ON_EXCEED:
        raise ValueError(f"on_exceed must be one of {_ON_EXCEED}, got {on_exceed!r}")
    series = _series(series)
    if series is not None and time_per_step is None:
        raise ValueError("time_per_step is required with a series (t = time_per_step · k)")
    return _Config(
        every=positive_int(every, "every"),
        rotation_every=positive_int(rotation_every, "rotation_every"),
        budget=_budget(budget, "budget"),
        angle_budget=_budget(angle_budget, "angle_budget"),
        stop=on_exceed == "stop",
        series=series,
        validity_time=math.inf if series is None else forecast_window(series),
        time_per_step=None
        if time_per_step is None
        else positive_float(time_per_step, "time_per_step"),
        fisher_vp=None if fisher_vp is None else fisher_product(fisher_vp),
        fisher_args=tuple_arg(fisher_args, "fisher_args"),
        tol=_optional(tol, positive_float, "tol"),
        max_steps=_optional(max_steps, positive_int, "max_steps"),
    )


def _key(cfg: _Config, key: Any, values: jax.Array) -> jax.Array:
    """The Lanczos key (checked; a fixed unused one without ``fisher_vp``); checks ``max_steps``.

    Without ``fisher_vp`` there is no rotation, and any of its arguments set is
    refused rather than silently ignored.
    """
    if cfg.fisher_vp is None:
        given = {
            "key": key is not None,
            "tol": cfg.tol is not None,
            "max_steps": cfg.max_steps is not None,
            "fisher_args": bool(cfg.fisher_args),
            "rotation_every": cfg.rotation_every != 1,
        }
        unused = [name for name, set_ in given.items() if set_]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} only apply to the rotation of M, which needs fisher_vp; "
                "pass fisher_vp or drop them"
            )
        return jax.random.key(0)
    d = values.shape[0]
    if cfg.max_steps is not None and cfg.max_steps < d:
        raise ValueError(f"max_steps={cfg.max_steps} must be at least d={d}, the subspace's rank")
    return prng_key(key)


def _check_series(series: Series | None, values: jax.Array, reference: jax.Array) -> None:
    """A forecast must be of the projected loss on this very ``M``: made by
    ``delta_u_series(..., subspace=subspace)`` with the monitor's ``subspace``.

    Its projected coefficients are recomputed from its ``x₁ … x_K`` and the
    subspace and must agree to rounding. The coordinates ``y_ik = ⟨v_i, x_k⟩``
    are formed on the device in the series' dtype (only ``(K, d)`` numbers come
    back), each trusted to ``δ_ik = (2 log₂n + 2)·eps·Σ_j |v_ij x_kj|``: a
    summation's rounding bound with room (measured in float32 at ``n`` = 10⁴ to
    4·10⁶: at most 0.42·eps·Σ|v x|), plus the rounding of ``v`` to that dtype.
    Then ``|Δc_m| ≤ ½Σ_i λ_i Σ_{j+l=m} (|y_j|δ_l + δ_j|y_l| + δ_jδ_l)`` plus the
    rounding of that sum itself; a forecast of another subspace differs by
    the size of the ``y``.
    """
    if series is None:
        return
    if series.projected is None:
        raise ValueError(
            "series has no projected-loss forecast: make it with "
            "delta_u_series(..., subspace=<the monitor's subspace>)"
        )
    xs = jax.vmap(lambda x: ravel_pytree(x)[0])(series.displacement)
    n = reference.shape[1]
    if xs.ndim != 2 or xs.shape[1] != n:
        raise ValueError(
            f"series displacement has {xs.shape[-1] if xs.ndim else 0} parameters, the "
            f"subspace {n}: the series belongs to another model"
        )
    ys, sizes = _coordinates(xs, reference.astype(xs.dtype))
    lam = np.maximum(np.asarray(values, np.float64), 0.0)
    expected = projected_from_coordinates(lam, ys)
    got = np.asarray(series.projected, np.float64)
    eps = float(jnp.finfo(xs.dtype).eps)
    delta = (2 * np.log2(max(n, 2)) + 2) * eps * sizes  # (K, d)
    bound = np.zeros_like(expected)
    for m in range(2, expected.size):  # t^m collects y_j y_l, j + l = m (as the series)
        for j in range(1, m):
            a, b = np.abs(ys[j - 1]), np.abs(ys[m - j - 1])
            dj, dl = delta[j - 1], delta[m - j - 1]
            bound[m] += 0.5 * np.sum(lam * (a * dl + dj * b + dj * dl + 10 * eps * a * b))
    if got.shape != expected.shape or np.any(np.abs(got - expected) > bound):
        raise ValueError(
            "series was made with another subspace: its projected-loss coefficients "
            f"{np.array2string(got, precision=3)} differ from those of this subspace "
            f"{np.array2string(expected, precision=3)}"
        )


@jax.jit
def _coordinates_device(xs: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(xs, rows.T, precision=hi), jnp.matmul(
        jnp.abs(xs), jnp.abs(rows).T, precision=hi
    )


def _coordinates(xs: jax.Array, rows: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(⟨v_i, x_k⟩, Σ_j |v_ij x_kj|)``, each ``(K, d)`` float64 on the host."""
    ys, sizes = jax.device_get(_coordinates_device(xs, rows))
    return np.asarray(ys, np.float64), np.asarray(sizes, np.float64)


def _init_state(inner_state, params: PyTree, values, reference, key, capacity: int) -> MonitorState:
    flat = ravel_pytree(params)[0]
    if reference.shape[1] != flat.size:
        raise ValueError(
            f"subspace basis has {reference.shape[1]} parameters, params have {flat.size}"
        )
    return MonitorState(
        inner=inner_state,
        count=jnp.zeros((), jnp.int32),
        theta_star=flat,
        basis=reference.astype(flat.dtype),
        key=key,
        log=_empty(flat.dtype, (capacity,)),
        num_measured=jnp.zeros((), jnp.int32),
        first_exceeded=_empty(flat.dtype),
        stopped=jnp.bool_(False),
    )


def monitor(
    inner: optax.GradientTransformation,
    subspace: Subspace,
    *,
    every: int,
    fisher_vp: Callable[..., PyTree] | None = None,
    key: jax.Array | None = None,
    fisher_args: tuple = (),
    budget: float | None = None,
    angle_budget: float | None = None,
    on_exceed: str = "warn",
    series: Series | None = None,
    time_per_step: float | None = None,
    rotation_every: int = 1,
    capacity: int = 256,
    tol: float | None = None,
    max_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so that every ``every`` steps ``θ_k`` is measured (module docstring).

    The updates are ``inner``'s, unchanged (bit for bit) until a budget stops
    training. The update call with count ``c`` sees ``params = θ_c``; ``θ_k`` is
    measured at ``k = every, 2·every, …`` (``θ_0 = θ*`` is not), so the last
    iterate after the final update is not: measure it with
    :func:`monitor_measure` if needed. ``θ*`` is the ``params`` given to
    ``init``; ``update`` needs ``params``.

    Args:
      inner: the optimizer (any ``GradientTransformation``; extra args pass through).
      subspace: ``M(θ*)``: ``(d,)`` eigenvalues and ``(d, n)`` (or pytree) basis.
      every: steps between measurements ``k ≥ 1``.
      fisher_vp: ``fisher_vp(params, v, *fisher_args) -> F(params) v``; with it
        ``M(θ_k)`` is found by traced Lanczos (top ``d``, warm-started from the
        previous measurement, ``M(θ*)`` at first) and its rotation measured.
        ``None``: no rotation (NaN), no matvecs.
      key: PRNG key of the Lanczos start vectors and restarts (required with ``fisher_vp``).
      fisher_args: default extra arguments of ``fisher_vp`` (replace per call with
        ``update(..., fisher_args=...)``).
      budget: projected-loss budget (``Δu``'s units); ``None``: no budget.
      angle_budget: budget on the largest principal angle, radians; ``None``: none.
      on_exceed: ``'warn'`` (record only; :func:`check_monitor` warns) or
        ``'stop'`` (also zero every later update and freeze ``inner``'s state).
      series: a forecast made with the same ``subspace``
        (:func:`geomcollapse.series.delta_u_series`); needs ``time_per_step``.
      time_per_step: gradient-flow time per step (the learning rate for SGD:
        ``t = lr · k``; GD matches the flow to first order in ``lr``).
      rotation_every: measure the rotation at every ``rotation_every``-th
        measurement only (the Lanczos run dominates the cost); others log NaN.
      capacity: measurements kept in the state's ring buffer.
      tol, max_steps: passed to :func:`geomcollapse.linalg.top_eigenpairs_traced`
        (defaults ``100·eps`` and ``min(n, max(4d, 64))``); ``converged`` is logged.
    """
    values, reference = subspace_arrays(subspace)
    cfg = _config(
        every,
        rotation_every,
        budget,
        angle_budget,
        on_exceed,
        series,
        time_per_step,
        fisher_vp,
        fisher_args,
        tol,
        max_steps,
    )
    capacity = positive_int(capacity, "capacity")
    key = _key(cfg, key, values)
    _check_series(cfg.series, values, reference)

    def init(params: PyTree) -> MonitorState:
        check_params(params)
        if cfg.fisher_vp is not None:  # one probe matvec at θ*: finite, vᵀFv ≥ 0
            fargs = check_data(cfg.fisher_args, "fisher_args")
            fvp = functools.partial(cfg.fisher_vp, params)
            probe_operator(lambda v: fvp(v, *fargs), params, "fisher_vp", psd=True, key=key)
        return _init_state(inner.init(params), params, values, reference, key, capacity)

    update = functools.partial(_monitored_update, inner, cfg, values, reference)
    return optax.GradientTransformationExtraArgs(init, update)


def _monitored_update(
    inner: optax.GradientTransformation,
    cfg: _Config,
    values: jax.Array,
    reference: jax.Array,
    updates: PyTree,
    state: MonitorState,
    params: PyTree = None,
    *,
    fisher_args: tuple | None = None,
    **extra_args: Any,
):
    """:func:`monitor`'s ``update``: measure when due, then ``inner``'s (frozen once stopped)."""
    if params is None:
        raise ValueError("monitor needs params in update: call update(updates, state, params)")
    args = cfg.fisher_args if fisher_args is None else tuple_arg(fisher_args, "fisher_args")
    observed = _observe(cfg, values, reference, state, params, args)
    new_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    if cfg.stop:
        halt = observed.stopped
        new_updates = jax.tree_util.tree_map(
            lambda u: jnp.where(halt, jnp.zeros_like(u), u), new_updates
        )
        inner_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(halt, old, new), state.inner, inner_state
        )
    new_state = observed._replace(inner=inner_state, count=optax.safe_int32_increment(state.count))
    return new_updates, new_state


def monitor_log(state: MonitorState) -> Measurement:
    """The logged measurements in order (oldest kept first), as numpy arrays (host-side)."""
    if not isinstance(state, MonitorState):
        raise ValueError(f"state must be a MonitorState, got {type(state).__name__}")
    log = jax.tree_util.tree_map(np.asarray, state.log)
    taken = int(state.num_measured)
    capacity = log.step.shape[0]
    order = np.arange(max(0, taken - capacity), taken) % capacity
    return Measurement(*(field[order] for field in log))


def check_monitor(state: MonitorState) -> bool:
    """Surface the monitor's budget on the host: whether a measurement went past it.

    Past the budget with ``on_exceed='warn'``: a :class:`BudgetWarning` with the
    numbers of the first offending measurement, and ``True``. With
    ``on_exceed='stop'``: raises :class:`BudgetExceeded` (training has already
    halted inside ``jit``). ``False`` otherwise. Call it between compiled chunks
    of steps.
    """
    if not isinstance(state, MonitorState):
        raise ValueError(f"state must be a MonitorState, got {type(state).__name__}")
    first = jax.tree_util.tree_map(np.asarray, state.first_exceeded)
    if int(first.step) < 0:
        return False
    message = "alignment monitor budget exceeded at " + first.describe()
    if bool(state.stopped):
        raise BudgetExceeded(message + "; training stopped there", first)
    warnings.warn(message, BudgetWarning, stacklevel=2)
    return True


# --------------------------------------------------------------------------- host callback


def _step(value: Any) -> int:
    """A training step: a Python, numpy or 0-d array integer (not a bool, float or string)."""
    if (
        isinstance(value, (bool, np.bool_))
        or np.ndim(value) != 0
        or not np.issubdtype(np.asarray(value).dtype, np.integer)
    ):
        raise ValueError(f"step must be an integer, got {value!r}")
    return int(value)


class MonitorCallback:
    """The monitor for a Python training loop: ``callback(step, params)`` (host-side).

    Measures when ``step`` is a positive multiple of ``every`` (other calls
    return at once), with the same compiled measurement as :func:`monitor`, and
    past the budget warns (:class:`BudgetWarning`, ``on_exceed='warn'``) or
    raises :class:`BudgetExceeded` (``'stop'``) right there. Fits
    ``training.train(..., callback=cb)`` (called after every chunk of steps;
    use ``chunk = every``). ``cb.state`` is a :class:`MonitorState` (its inner
    optimizer ``optax.identity``): :func:`monitor_log` reads its log. Its one
    mutable piece is ``state``, replaced at each measurement (warm start and log).

    Arguments: ``theta_star`` (the aligned parameters), ``subspace`` and the
    keyword options of :func:`monitor` (``every`` required), checked as there.
    """

    def __init__(self, theta_star: PyTree, subspace: Subspace, **options: Any):
        # the monitor itself around optax.identity: one validation, one compiled measurement
        tx = monitor(optax.identity(), subspace, **options)
        finite_leaves(theta_star, "theta_star")
        self.state = tx.init(theta_star)
        self.every = int(options["every"])
        self._stop = options.get("on_exceed", "warn") == "stop"
        self._zeros = jax.tree_util.tree_map(jnp.zeros_like, theta_star)
        self._update = jax.jit(tx.update)

    def __call__(self, step: int, params: PyTree, *, fisher_args: tuple | None = None):
        """Measure ``θ_step = params`` if ``step`` is due; warn or raise past the budget."""
        step = _step(step)
        if step <= 0 or step % self.every:
            return
        # any floating dtype: cast as monitor() casts it
        same_structure(self._zeros, params, "theta_star", "params", same_dtype=False)
        before = int(self.state.first_exceeded.step)
        due = self.state._replace(count=jnp.int32(step))  # update `step` measures θ_step
        state = self._update(self._zeros, due, params, fisher_args=fisher_args)[1]
        self.state = state
        if before < 0 and int(state.first_exceeded.step) >= 0:
            first = jax.tree_util.tree_map(np.asarray, state.first_exceeded)
            message = "alignment monitor budget exceeded at " + first.describe()
            if self._stop:
                raise BudgetExceeded(message, first)
            warnings.warn(message, BudgetWarning, stacklevel=2)
