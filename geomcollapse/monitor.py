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
warns or stops. With an :class:`EarlyWarning` (a subspace fixed at ``θ*``, a
threshold ``τ`` in nats and a step, 16 by default) every measurement also
records ``E_k = ‖P(θ_k − θ*)‖`` and ``½‖F^{1/2}P(θ_k − θ*)‖²`` on that
subspace (never re-estimated), and the rule *fires* when at step ``at`` the
latter is ``≥ τ`` (docs/diagnose.md, "Before and during fine-tuning"): it
warns or stops as a budget does. Three entry points share one measurement:

* :func:`monitor_measure`: the pure measurement of one ``θ``;
* :func:`monitor`: an optax wrapper ``monitor(inner, subspace, every=k, …)`` (or
  ``monitor(inner, diagnosis, …)``, :func:`from_diagnosis`: the subspace, forecast
  and threshold a :func:`geomcollapse.diagnose` found) whose
  updates are ``inner``'s, bit for bit, and whose state carries the log in
  fixed-size arrays (jit-able; the measurement runs under ``lax.cond``).
  Nothing can be raised inside ``jit``: past the budget the state records
  the first offending measurement and, with ``on_exceed='stop'``, sets
  ``stopped``, after which every update is zero and the inner state frozen
  (training halts at ``θ_k``). ``state = check_monitor(state)`` on the host
  turns that into a :class:`BudgetWarning` (:class:`EarlyWarningFired` for the
  rule), each distinct one once, or a :class:`BudgetExceeded` exception;
  :func:`monitor_log` returns the log.
* :class:`MonitorCallback`: the same for a Python training loop, e.g.
  ``training.train(..., callback=MonitorCallback(...))``; it warns or raises
  at the measurement itself.

Cost of one measurement: the product above, plus (with a ``fisher_vp``)
one Lanczos run of ``F(θ_k)`` matvecs (``num_matvecs`` is logged); without a
``fisher_vp`` the rotation is not measured (NaN) and the monitor costs almost
nothing. ``benchmarks/monitor_overhead.py`` measures the overhead; the early-warning
rule adds one ``(d, n)`` product per measurement (``benchmarks/early_warning_overhead.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import (
    check_fisher_at,
    finite_leaves,
    positive_float,
    positive_int,
    prng_key,
    same_structure,
    tuple_arg,
)
from geomcollapse.curvature import check_layout, params_layout
from geomcollapse.diagnosis.report import Diagnosis
from geomcollapse.errors import warn_at_caller
from geomcollapse.series import Series, projected_from_coordinates
from geomcollapse.subspace import Subspace, fisher_product, subspace_arrays, warm_eigenpairs

__all__ = [
    "BudgetExceeded",
    "BudgetWarning",
    "EarlyWarning",
    "EarlyWarningFired",
    "Measurement",
    "MonitorCallback",
    "MonitorState",
    "check_monitor",
    "exceeded",
    "forecast_window",
    "from_diagnosis",
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
      early_norm: ``E_k = ‖P_e(θ_k − θ*)‖`` with ``P_e`` the :class:`EarlyWarning`'s
        subspace (NaN without one).
      early_projected_loss: ``½‖F^{1/2}P_e(θ_k − θ*)‖²`` on it, nats (NaN without one).
      early_fired: bool, the rule fired here: ``k`` is the rule's step and
        ``early_projected_loss ≥ threshold`` (or is not finite).
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
    early_norm: jax.Array
    early_projected_loss: jax.Array
    early_fired: jax.Array

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
        if np.isfinite(float(self.early_norm)):
            text += (
                f"; on the early-warning subspace E_k = ‖PΔθ‖ = {float(self.early_norm):.4g}, "
                f"½‖F^{{1/2}}PΔθ‖² = {float(self.early_projected_loss):.4g}"
            )
        return text


class EarlyWarning(NamedTuple):
    """The early-warning rule: flag the run when ``½‖F^{1/2}P(θ_at − θ*)‖² ≥ threshold``.

    ``P`` and ``F`` are those of ``subspace``, ``M(θ*)`` found once before
    fine-tuning (e.g. ``d = 50``, the study's; docs/diagnose.md, "Before and during
    fine-tuning"), never re-estimated. Given to :func:`monitor` as
    ``early_warning=``, it adds ``E_k = ‖P(θ_k − θ*)‖`` and that projected loss
    to every measurement (one ``(d, n)`` product), measures ``θ_at`` even when
    ``at`` is not a multiple of ``every``, and fires, at most once, at step ``at``.

    Attributes:
      subspace: a :class:`geomcollapse.subspace.Subspace` of ``M(θ*)`` (any ``d``).
      threshold: ``τ`` in nats (the projected loss's units, those of ``Δu``), ``> 0``.
      at: the step ``k ≥ 1`` at which the rule is read (16: the study's).
    """

    subspace: Subspace
    threshold: float
    at: int = 16


class _Early(NamedTuple):
    """A checked :class:`EarlyWarning`: ``(λ (d,), rows (d, n), τ, at)``."""

    values: jax.Array
    rows: jax.Array
    threshold: float
    at: int


def _early(early_warning: Any) -> _Early | None:
    if early_warning is None:
        return None
    if not isinstance(early_warning, EarlyWarning):
        raise ValueError(
            f"early_warning must be an EarlyWarning, got {type(early_warning).__name__}"
        )
    values, rows = subspace_arrays(early_warning.subspace)
    return _Early(
        values,
        rows,
        positive_float(early_warning.threshold, "early_warning.threshold"),
        positive_int(early_warning.at, "early_warning.at"),
    )


class BudgetWarning(UserWarning):
    """A measurement went past the monitor's budget (``on_exceed='warn'``)."""


class EarlyWarningFired(BudgetWarning):
    """The :class:`EarlyWarning` rule fired (``on_exceed='warn'``)."""


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
    early: _Early | None = None,
) -> Measurement:
    """:func:`monitor_measure` on a raveled displacement ``x`` and ``M(θ*)`` as ``(λ, rows)``."""
    dtype = x.dtype
    coords, projected = _project(values, reference, x)
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
        **_early_fields(early, x, step),
    )


def _project(values: jax.Array, rows: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(⟨v_i, x⟩ (d,), ½Σ_i max(λ_i, 0)⟨v_i, x⟩²)`` in ``x``'s dtype."""
    coords = _dot(rows.astype(x.dtype), x)
    lam = jnp.maximum(values.astype(x.dtype), 0.0)
    return coords, 0.5 * jnp.sum(lam * coords**2)


def _early_fields(early: _Early | None, x: jax.Array, step: Any) -> dict:
    """The early-warning fields of a :class:`Measurement` (NaN / False without a rule)."""
    if early is None:
        nan = jnp.full((), jnp.nan, x.dtype)
        return {"early_norm": nan, "early_projected_loss": nan, "early_fired": jnp.bool_(False)}
    coords, projected = _project(early.values, early.rows, x)
    due = jnp.asarray(step) == early.at
    # NaN ≥ τ is False: a diverged θ_at is past any threshold
    fired = due & ((projected >= early.threshold) | ~jnp.isfinite(projected))
    return {
        "early_norm": jnp.linalg.norm(coords),
        "early_projected_loss": projected,
        "early_fired": fired,
    }


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
    early_warning: EarlyWarning | None = None,
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
      early_warning: an :class:`EarlyWarning`: its ``E_k`` and projected loss, and
        ``early_fired`` when ``step`` is its ``at``.

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
        early=_checked_early(_early(early_warning), n),
    )


def _checked_early(early: _Early | None, n: int) -> _Early | None:
    if early is not None and early.rows.shape[1] != n:
        raise ValueError(
            f"early_warning.subspace basis has {early.rows.shape[1]} parameters, params have {n}"
        )
    return early


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
      early_fired: the :class:`Measurement` at which the :class:`EarlyWarning` rule
        fired (``step`` −1: not fired, or no rule).
      early_threshold: ``()`` the rule's ``τ`` (NaN: no rule), for the host's message.
      early_values, early_rows: the rule's ``(d,)`` eigenvalues and ``(d, n)`` rows
        (``(0,)`` and ``(0, n)`` without a rule): arguments of the compiled step, not
        constants folded into it.
      reported: ``(2,)`` bool, what :func:`check_monitor` has said: the budget, the rule.
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
    early_fired: Measurement
    early_threshold: jax.Array
    early_values: jax.Array
    early_rows: jax.Array
    reported: jax.Array

    def __bool__(self):
        raise TypeError(
            "a MonitorState has no truth value: check_monitor returns the state; "
            "use monitor.exceeded(state) for whether a budget or the rule was passed"
        )


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
        early_norm=nan,
        early_projected_loss=nan,
        early_fired=false,
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
    early: _Early | None = None


def _observe(
    cfg: _Config, values, reference, state: MonitorState, params: PyTree, args: tuple
) -> MonitorState:
    """The measurement due at ``state.count`` (if any), written into the state."""
    count = state.count
    regular = count % cfg.every == 0
    due = (count > 0) & (regular if cfg.early is None else regular | (count == cfg.early.at))

    def measure(state: MonitorState) -> MonitorState:
        theta = ravel_pytree(params)[0]
        x = theta - state.theta_star.astype(theta.dtype)
        next_key, k_start, k_restart = jax.random.split(state.key, 3)
        d = reference.shape[0]
        zero = jnp.zeros((), jnp.int32)
        if cfg.fisher_vp is None:
            basis, converged, matvecs, measured = state.basis, jnp.bool_(False), zero, False
        else:
            measured = regular & ((count // cfg.every) % cfg.rotation_every == 0)

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
            early=None
            if cfg.early is None
            else cfg.early._replace(values=state.early_values, rows=state.early_rows),
        )
        slot = state.num_measured % state.log.step.shape[0]
        log = jax.tree_util.tree_map(lambda buf, v: buf.at[slot].set(v), state.log, rec)
        stopped = state.stopped | (cfg.stop & (rec.exceeded | rec.early_fired))
        return state._replace(
            basis=basis,
            key=next_key,
            log=log,
            num_measured=state.num_measured + 1,
            first_exceeded=_keep_first(state.first_exceeded, rec, rec.exceeded),
            early_fired=_keep_first(state.early_fired, rec, rec.early_fired),
            stopped=stopped,
        )

    return jax.lax.cond(due & ~state.stopped, measure, lambda s: s, state)


def _keep_first(old: Measurement, new: Measurement, hit: jax.Array) -> Measurement:
    """``new`` where ``hit`` and nothing was recorded yet (``old.step`` −1), else ``old``."""
    take = (old.step < 0) & hit
    return jax.tree_util.tree_map(lambda a, b: jnp.where(take, b, a), old, new)


def _optional(value: Any, check: Callable[[Any, str], Any], name: str) -> Any:
    return None if value is None else check(value, name)


def _config(
    *,
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
    if not bool(jax.device_get(jnp.all(jnp.isfinite(xs)))):  # NaN passes any "> bound"
        raise ValueError("series displacement holds non-finite values (NaN or inf)")
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
    if got.shape != expected.shape or not np.all(np.abs(got - expected) <= bound):
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


def _init_state(
    inner_state, params: PyTree, values, reference, key, capacity: int, early: _Early | None
) -> MonitorState:
    flat = ravel_pytree(params)[0]
    if reference.shape[1] != flat.size:
        raise ValueError(
            f"subspace basis has {reference.shape[1]} parameters, params have {flat.size}"
        )
    _checked_early(early, flat.size)
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
        early_fired=_empty(flat.dtype),
        early_threshold=jnp.asarray(jnp.nan if early is None else early.threshold, flat.dtype),
        early_values=jnp.zeros(0, flat.dtype) if early is None else early.values.astype(flat.dtype),
        early_rows=jnp.zeros((0, flat.size), flat.dtype)
        if early is None
        else early.rows.astype(flat.dtype),
        reported=jnp.zeros(2, bool),
    )


def _prepared(subspace, *, early_warning, capacity, key, **options):
    """``monitor``'s checked inputs: ``(values, reference, cfg, early, capacity, key)``.

    ``options``: :func:`monitor`'s other keyword arguments, by name (:func:`_config`).
    """
    layout = _layout_of(subspace)
    if isinstance(subspace, Diagnosis):
        subspace, *found = _diagnosis_inputs(
            subspace, options["budget"], options["series"], options["time_per_step"]
        )
        options.update(zip(("budget", "series", "time_per_step"), found, strict=True))
    values, reference = subspace_arrays(subspace)
    cfg = _config(**options)
    early = _early(early_warning)
    # the step sees τ and the step only: the rows travel in the state, as arguments
    cfg = cfg._replace(early=None if early is None else early._replace(values=None, rows=None))
    capacity = positive_int(capacity, "capacity")
    key = _key(cfg, key, values)
    _check_series(cfg.series, values, reference)
    return values, reference, cfg, early, capacity, key, layout


def _layout_of(subspace: Any) -> tuple | None:
    """The parameters' layout that ``subspace``'s rows were raveled from: a diagnosis'
    ``params_layout``, or a pytree basis' leaves without their leading ``d`` axis
    (``None``: raveled ``(d, n)`` rows say nothing of it)."""
    if isinstance(subspace, Diagnosis):
        return subspace.params_layout
    basis = getattr(subspace, "basis", None)
    if basis is None or isinstance(basis, jax.Array | np.ndarray):
        return None
    return tuple((p, shape[1:]) for p, shape in params_layout(basis))


def monitor(
    inner: optax.GradientTransformation,
    subspace: Subspace | Diagnosis,
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
    early_warning: EarlyWarning | None = None,
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
      subspace: ``M(θ*)``: ``(d,)`` eigenvalues and ``(d, n)`` (or pytree) basis; or the
        :class:`geomcollapse.Diagnosis` of ``θ*`` (:func:`from_diagnosis`: its subspace,
        and by default its forecast, ``lr`` and ``threshold``).
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
      early_warning: an :class:`EarlyWarning`: ``E_k`` and its projected loss at every
        measurement (and at its step ``at``); the rule firing warns or stops as a
        budget does (``on_exceed``).
    """
    values, reference, cfg, early, capacity, key, layout = _prepared(
        subspace, early_warning=early_warning, capacity=capacity, key=key, every=every,
        rotation_every=rotation_every, budget=budget, angle_budget=angle_budget,
        on_exceed=on_exceed, series=series, time_per_step=time_per_step, fisher_vp=fisher_vp,
        fisher_args=fisher_args, tol=tol, max_steps=max_steps,
    )  # fmt: skip

    def init(params: PyTree) -> MonitorState:
        if layout is not None:  # the rows pair the coordinates of θ* as it was diagnosed
            check_layout(params, layout, "params", "the diagnosed θ* (its subspace's rows)")
        check_fisher_at(params, cfg.fisher_vp, cfg.fisher_args, key)  # finite, PSD, symmetric
        return _init_state(inner.init(params), params, values, reference, key, capacity, early)

    update = functools.partial(_monitored_update, inner, cfg, values, reference)
    return optax.GradientTransformationExtraArgs(init, update)


def _diagnosis_inputs(
    diagnosis: Diagnosis, budget: Any, series: Any, time_per_step: Any
) -> tuple[Subspace, Any, Series | None, Any]:
    """``(subspace, budget, series, time_per_step)`` for :func:`monitor` from a diagnosis.

    ``budget`` ``None``: the diagnosis' ``threshold`` (the projected loss is a lower
    bound on ``Δu`` up to third order, Thm 6.1: past it, ``Δu`` is past the threshold
    to that order); ``math.inf``: none. ``time_per_step`` ``None``: its ``lr``.
    ``series`` ``None``: its forecast when a time per step is known; ``False``: none.
    """
    if diagnosis.subspace is None or diagnosis.series is None:
        raise ValueError(
            "diagnosis carries no subspace (read from JSON alone): use the Diagnosis that "
            "geomcollapse.diagnose returned, or Diagnosis.load(directory) of a report saved "
            "with save(directory, arrays=True)"
        )
    budget = diagnosis.threshold if budget is None else budget
    time_per_step = diagnosis.lr if time_per_step is None else time_per_step
    if series is None:
        series = diagnosis.series if time_per_step is not None else None
        if time_per_step is None:  # said, not dropped silently
            warn_at_caller(
                "monitor: the diagnosis was made without lr, so its forecast is not compared "
                "with the run; pass time_per_step=lr (or series=False to say you want none)",
                UserWarning,
            )
    elif series is False:
        series = None
    return diagnosis.subspace, budget, series, time_per_step


def from_diagnosis(
    inner: optax.GradientTransformation, diagnosis: Diagnosis, *, every: int, **options: Any
) -> optax.GradientTransformationExtraArgs:
    """:func:`monitor` of ``M(θ*)`` as :func:`geomcollapse.diagnose` found it, in one line.

    ``monitor(inner, diagnosis, every=k, …)`` is the same call. From the
    diagnosis: the subspace (``d`` of its rule), the forecast (a series of that
    very subspace) evaluated at ``t = lr·k``, and the budget ``threshold`` on the
    projected loss; each can be overridden (``budget=``, ``time_per_step=``,
    ``series=``: ``False`` for no forecast). Every other option is :func:`monitor`'s.
    ``ValueError`` naming ``diagnosis`` unless it is a :class:`geomcollapse.Diagnosis`
    that carries its arrays.
    """
    if not isinstance(diagnosis, Diagnosis):
        raise ValueError(
            f"diagnosis must be a geomcollapse Diagnosis, got {type(diagnosis).__name__}"
        )
    if diagnosis.subspace is None:
        _diagnosis_inputs(diagnosis, None, None, None)  # raises, naming what to do
    return monitor(inner, diagnosis, every=every, **options)


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


def _messages(state: MonitorState) -> list[tuple[int, Measurement, str]]:
    """``(index in reported, measurement, message)`` of what the state has recorded."""
    out = []
    first = jax.tree_util.tree_map(np.asarray, state.first_exceeded)
    if int(first.step) >= 0:
        out.append((0, first, "alignment monitor budget exceeded at " + first.describe()))
    fired = jax.tree_util.tree_map(np.asarray, state.early_fired)
    if int(fired.step) >= 0:
        tau = float(state.early_threshold)
        out.append(
            (
                1,
                fired,
                f"early warning: at step {int(fired.step)} the projected loss on the "
                f"early-warning subspace ½‖F^{{1/2}}P(θ−θ*)‖² = "
                f"{float(fired.early_projected_loss):.4g} ≥ τ = {tau:.4g} "
                f"(E = ‖P(θ−θ*)‖ = {float(fired.early_norm):.4g}); " + fired.describe(),
            )
        )
    return out


def exceeded(state: MonitorState) -> bool:
    """Whether a measurement went past a budget or the :class:`EarlyWarning` rule fired."""
    if not isinstance(state, MonitorState):
        raise ValueError(f"state must be a MonitorState, got {type(state).__name__}")
    return bool(_messages(state))


def check_monitor(state: MonitorState) -> MonitorState:
    """Surface the monitor's budget and early-warning rule on the host; returns the state.

    Call it between compiled chunks of steps as ``state = check_monitor(state)``:
    each distinct event (the first measurement past the budget; the rule
    firing) is said once, and the returned state records that it was said
    (``reported``; pass it on to the next chunk). With ``on_exceed='warn'``:
    a :class:`BudgetWarning` (:class:`EarlyWarningFired` for the rule) with the
    numbers. With ``on_exceed='stop'``, once training stopped: raises
    :class:`BudgetExceeded` (training has already halted inside ``jit``), every
    time it is called. :func:`exceeded` says whether anything was passed.
    """
    if not isinstance(state, MonitorState):
        raise ValueError(f"state must be a MonitorState, got {type(state).__name__}")
    events = _messages(state)
    if events and bool(state.stopped):
        _, first, message = min(events, key=lambda e: int(e[1].step))
        raise BudgetExceeded(message + "; training stopped there", first)
    reported = np.asarray(state.reported).copy()
    for index, _, message in events:
        if not reported[index]:
            category = EarlyWarningFired if index else BudgetWarning
            warn_at_caller(message, category)
            reported[index] = True
    return state._replace(reported=jnp.asarray(reported))


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

    Measures when ``step`` is a positive multiple of ``every`` or the
    :class:`EarlyWarning`'s step (other calls return at once), with the same
    compiled measurement as :func:`monitor`, and past the budget or when the rule
    fires warns (:class:`BudgetWarning`, :class:`EarlyWarningFired`;
    ``on_exceed='warn'``; each once) or raises :class:`BudgetExceeded` (``'stop'``)
    right there. Fits
    ``training.train(..., callback=cb)`` (called after every chunk of steps;
    use ``chunk = every``). ``cb.state`` is a :class:`MonitorState` (its inner
    optimizer ``optax.identity``): :func:`monitor_log` reads its log. Its one
    mutable piece is ``state``, replaced at each measurement (warm start and log).

    Arguments: ``theta_star`` (the aligned parameters), ``subspace`` and the
    keyword options of :func:`monitor` (``every`` required), checked as there.
    """

    def __init__(self, theta_star: PyTree, subspace: Subspace | Diagnosis, **options: Any):
        # the monitor itself around optax.identity: one validation, one compiled measurement
        tx = monitor(optax.identity(), subspace, **options)
        finite_leaves(theta_star, "theta_star")
        self.state = tx.init(theta_star)
        self.every = int(options["every"])
        early = options.get("early_warning")
        self._at = None if early is None else int(early.at)
        self._stop = options.get("on_exceed", "warn") == "stop"
        self._zeros = jax.tree_util.tree_map(jnp.zeros_like, theta_star)
        self._update = jax.jit(tx.update)

    def __call__(self, step: int, params: PyTree, *, fisher_args: tuple | None = None):
        """Measure ``θ_step = params`` if ``step`` is due; warn or raise past the budget."""
        step = _step(step)
        if step <= 0 or (step % self.every and step != self._at):
            return
        # any floating dtype: cast as monitor() casts it
        same_structure(self._zeros, params, "theta_star", "params", same_dtype=False)
        due = self.state._replace(count=jnp.int32(step))  # update `step` measures θ_step
        state = self._update(self._zeros, due, params, fisher_args=fisher_args)[1]
        reported = np.asarray(state.reported).copy()
        new = [e for e in _messages(state) if not reported[e[0]]]
        for index, _, _ in new:
            reported[index] = True
        self.state = state._replace(reported=jnp.asarray(reported))
        for index, first, message in new:
            if self._stop:
                raise BudgetExceeded(message, first)
            warn_at_caller(message, EarlyWarningFired if index else BudgetWarning)
