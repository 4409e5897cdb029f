"""Closed forms of docs/theory.md §2-§4: the AIC report, flow series, crossover, exponent fits.

Symbols: ``x = θ − θ*``, fine-tuning loss ``L = ½xᵀAx + cᵀx`` (``g(θ*) = c``,
``H = A``), skill loss ``u = ½xᵀFx``, ``P`` the projector onto the top-``d``
eigenvectors of ``F``, ``a = F^{1/2}Pc``, ``b = F^{1/2}PAc``, ``γ = ‖b‖``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse._checks import finite_float, positive_float
from geomcollapse.errors import warn_at_caller
from geomcollapse.subspace import Subspace

__all__ = [
    "AICMeasures",
    "AICReport",
    "ExponentFit",
    "SeriesCoefficients",
    "aic_measures",
    "aic_report",
    "crossover_time",
    "first_crossing",
    "fit_exponent",
    "gd_projected_loss_approx",
    "local_slope",
    "onset_window",
    "orthogonalized_report",
    "report_from_measures",
    "series_coefficients",
]


class AICReport(NamedTuple):
    """The Alignment Instability Condition's numbers (Def. 5.1) and their predictions.

    Attributes:
      d: dimension of the sensitive subspace ``M``.
      tail_mass: ``Σ_{j>d} λ_j`` (condition 1).
      lambda_d: ``λ_d`` (condition 1).
      orthogonality: ``‖P g(θ*)‖``, exactly as Def. 5.1 (2) states it.
      fisher_orthogonality: ``‖F^{1/2} P g(θ*)‖`` (= ``‖a‖``), the Fisher-weighted form.
      coupling: ``γ = ‖F^{1/2} P H g(θ*)‖`` (condition 3).
      quartic_coefficient: ``γ²/8``, the ``t⁴`` coefficient of the projected loss
        when ``Pg = 0`` (Cor. 6.3).
      crossover_time: ``t_c = 2‖F^{1/2}Pg‖/γ``, where the quartic term overtakes
        the quadratic one (``inf`` when ``γ = 0``; 0 when ``Pg = 0``).
      tail_crossover_time: ``2 (gᵀ(I−P)F(I−P)g)^{1/2}/γ``, where the quartic
        overtakes the tail's quadratic floor in ``Δu``.
      converged: the eigenpairs spanning ``M`` were certified (always True for
        a dense ``eigh``).
      eigen_residuals: ``‖F v_i − λ_i v_i‖`` of those pairs (empty when exact).
    """

    d: int
    tail_mass: float
    lambda_d: float
    orthogonality: float
    fisher_orthogonality: float
    coupling: float
    quartic_coefficient: float
    crossover_time: float
    tail_crossover_time: float
    converged: bool = True
    eigen_residuals: tuple[float, ...] = ()


class AICMeasures(NamedTuple):
    """The measured AIC numbers (Def. 5.1) as arrays: traceable, vmappable (all ``()``).

    ``tail_quadratic`` is ``gᵀ(I−P)F(I−P)g`` (NaN when not measured).
    """

    tail_mass: jax.Array
    lambda_d: jax.Array
    orthogonality: jax.Array
    fisher_orthogonality: jax.Array
    coupling: jax.Array
    tail_quadratic: jax.Array


def aic_measures(
    subspace: Subspace,
    g: jax.Array,
    Hg: jax.Array,
    *,
    tail_mass: jax.Array,
    tail_quadratic: jax.Array = float("nan"),
) -> AICMeasures:
    """The one computation of the AIC numbers from ``M``'s eigenpairs, ``g``, ``Hg`` and the tail.

    Pure ``jnp`` (jit/vmap inside batch summaries). ``orthogonality = ‖Pg‖``,
    ``fisher_orthogonality = ‖F^{1/2}Pg‖``, ``coupling = γ = ‖F^{1/2}PHg‖``
    (``P`` commutes with ``F``, so ``F^{1/2}P = diag(√λ)Vᵀ`` in ``M``'s basis),
    ``lambda_d = λ_d``.

    Args:
      subspace: the top-``d`` eigenpairs of ``F``.
      g, Hg: ``(n,)`` (or pytrees like ``θ*``) fine-tuning gradient and ``H g`` at ``θ*``.
      tail_mass: ``Σ_{j>d} λ_j`` (e.g. ``tr F − Σ_{i≤d} λ_i``).
      tail_quadratic: ``gᵀ(I−P)F(I−P)g`` when known.
    """
    pg = subspace.coordinates(g)
    return AICMeasures(
        tail_mass=jnp.asarray(tail_mass),
        lambda_d=subspace.values[-1],
        orthogonality=jnp.linalg.norm(pg),
        fisher_orthogonality=jnp.linalg.norm(subspace.sqrt_values * pg),
        coupling=jnp.linalg.norm(subspace.fisher_half(Hg)),
        tail_quadratic=jnp.asarray(tail_quadratic),
    )


@jax.jit
def _compiled_measures(values, basis, g, Hg, tail_mass, tail_quadratic) -> AICMeasures:
    subspace = Subspace(values, basis, jnp.zeros_like(values), jnp.asarray(True))
    return aic_measures(subspace, g, Hg, tail_mass=tail_mass, tail_quadratic=tail_quadratic)


def crossover_time(fisher_orthogonality: float, coupling: float) -> float:
    """``t_c = 2‖F^{1/2}Pc‖ / γ`` (docs/theory.md §4); ``inf`` when ``γ = 0``."""
    if coupling == 0:
        return float("inf") if fisher_orthogonality > 0 else 0.0
    return 2.0 * fisher_orthogonality / coupling


def aic_report(
    subspace: Subspace,
    g: Any,
    Hg: Any,
    *,
    tail_mass: float,
    tail_quadratic: float = float("nan"),
    compiled: bool = False,
) -> AICReport:
    """The :class:`AICReport` (Def. 5.1) from ``M``'s eigenpairs, ``g``, ``Hg`` and the tail.

    The single path every AIC in the library takes (landscapes, batch
    summaries through :func:`aic_measures`, :func:`geomcollapse.aic.measure_aic`).

    Args:
      subspace: :class:`geomcollapse.subspace.Subspace` of the top-``d`` eigenpairs of ``F``.
      g: ``(n,)`` (or a pytree) fine-tuning gradient at ``θ*``.
      Hg: ``H(θ*) g`` like ``g``.
      tail_mass: ``Σ_{j>d} λ_j``.
      tail_quadratic: ``gᵀ(I−P)F(I−P)g`` when known (needs ``F`` beyond ``M``);
        it sets ``tail_crossover_time``, else NaN.
      compiled: evaluate :func:`aic_measures` as one compiled call (for ``M``,
        ``g`` and ``Hg`` sharded over a mesh: eager indexing would move index
        arrays between devices); only the numbers come back, explicitly.
    """
    if compiled:
        m = jax.device_get(
            _compiled_measures(
                subspace.values, subspace.basis, g, Hg, np.float64(tail_mass), tail_quadratic
            )
        )
    else:
        m = aic_measures(subspace, g, Hg, tail_mass=tail_mass, tail_quadratic=tail_quadratic)
    residuals = np.asarray(jax.device_get(subspace.residuals), np.float64)
    return report_from_measures(
        subspace.dim,
        **{f: float(v) for f, v in m._asdict().items()},
        converged=bool(jax.device_get(subspace.converged)),
        eigen_residuals=tuple(float(r) for r in residuals)
        if np.all(np.isfinite(residuals))
        else (),
    )


def orthogonalized_report(
    subspace: Subspace,
    g: Any,
    Hg: Any,
    HPg: Any,
    *,
    tail_mass: float,
    tail_quadratic: float = float("nan"),
) -> AICReport:
    """The :class:`AICReport` of the orthogonalised loss ``L̃ = L − ⟨P g(θ*), θ − θ*⟩``.

    docs/theory.md §5.2: ``∇L̃(θ*) = (I−P)g`` and ``H̃ = H``, so ``L̃``'s gradient
    is ``g − Pg`` and its ``H̃∇L̃`` is ``Hg − H(Pg)``. Its ``coupling`` is
    ``γ̃ = ‖F^{1/2}PH(I−P)g‖`` and its ``quartic_coefficient`` ``⅛γ̃²``, the ``t⁴``
    coefficient of the projected loss of the flow of ``L̃`` (Cor. 6.3; the
    forecast ``experiments.transformer_onset`` tests); its ``orthogonality`` is
    ``‖P(I−P)g‖ = 0`` to rounding. ``tail_quadratic`` is the one of ``g``:
    ``(I−P)(g − Pg) = (I−P)g``.

    Args:
      subspace: the top-``d`` eigenpairs of ``F`` (``P`` and ``F^{1/2}P``).
      g: ``(n,)`` (or a pytree) gradient of ``L`` at ``θ*``.
      Hg: ``H(θ*) g`` like ``g``.
      HPg: ``H(θ*) (P g)`` like ``g`` (one more Hessian-vector product).
      tail_mass, tail_quadratic: as in :func:`aic_report`.
    """
    g_perp = jax.tree_util.tree_map(jnp.subtract, g, subspace.project(g))
    Hg_perp = jax.tree_util.tree_map(jnp.subtract, Hg, HPg)
    return aic_report(subspace, g_perp, Hg_perp, tail_mass=tail_mass, tail_quadratic=tail_quadratic)


def report_from_measures(
    d: int,
    *,
    tail_mass: float,
    lambda_d: float,
    orthogonality: float,
    fisher_orthogonality: float,
    coupling: float,
    tail_quadratic: float = float("nan"),
    converged: bool = True,
    eigen_residuals: tuple[float, ...] = (),
) -> AICReport:
    """The :class:`AICReport` from its measured numbers, adding the predictions.

    ``quartic_coefficient = γ²/8``, ``crossover_time = 2‖F^{1/2}Pg‖/γ`` and,
    when ``tail_quadratic = gᵀ(I−P)F(I−P)g`` is finite,
    ``tail_crossover_time = 2 (tail_quadratic)^{1/2}/γ`` (else NaN).
    """
    tail_q = float(tail_quadratic)
    return AICReport(
        d=int(d),
        tail_mass=float(tail_mass),
        lambda_d=float(lambda_d),
        orthogonality=float(orthogonality),
        fisher_orthogonality=float(fisher_orthogonality),
        coupling=float(coupling),
        quartic_coefficient=float(coupling) ** 2 / 8.0,
        crossover_time=crossover_time(float(fisher_orthogonality), float(coupling)),
        tail_crossover_time=crossover_time(float(np.sqrt(max(tail_q, 0.0))), float(coupling))
        if np.isfinite(tail_q)
        else float("nan"),
        converged=bool(converged),
        eigen_residuals=tuple(eigen_residuals),
    )


class SeriesCoefficients(NamedTuple):
    """``½‖F^{1/2}Px(t)‖² = c2 t² + c3 t³ + c4 t⁴ + O(t⁵)`` (docs/theory.md §4)."""

    c2: float
    c3: float
    c4: float


def series_coefficients(A: np.ndarray, c: np.ndarray, S: np.ndarray) -> SeriesCoefficients:
    """Taylor coefficients of ``½‖S x(t)‖²`` along the exact gradient flow.

    ``S = F^{1/2}P`` gives the projected loss; ``S = F^{1/2}`` gives ``Δu``.
    With ``a = Sc``, ``b = SAc``: ``c2 = ½‖a‖²``, ``c3 = −½⟨a,b⟩``,
    ``c4 = ⅛‖b‖² + ⅙⟨a, SA²c⟩``.
    """
    a = S @ c
    b = S @ (A @ c)
    b2 = S @ (A @ (A @ c))
    return SeriesCoefficients(
        c2=0.5 * float(a @ a),
        c3=-0.5 * float(a @ b),
        c4=0.125 * float(b @ b) + float(a @ b2) / 6.0,
    )


def gd_projected_loss_approx(coupling: float, eta: float, k: np.ndarray) -> np.ndarray:
    """``⅛ γ² η⁴ k²(k−1)²``: GD's projected loss at step ``k`` if ``Pc = 0`` (docs/theory.md §4)."""
    k = np.asarray(k, np.float64)
    return 0.125 * coupling**2 * eta**4 * k**2 * (k - 1) ** 2


def local_slope(ts: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Local log-log slope ``d log y / d log t`` (second-order finite differences)."""
    ts, ys = np.asarray(ts, np.float64), np.asarray(ys, np.float64)
    if ts.ndim != 1 or ts.shape != ys.shape or ts.size < 2:
        raise ValueError(
            f"ts and ys must be 1-D of equal length ≥ 2, got shapes {ts.shape}, {ys.shape}"
        )
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(ys))):
        raise ValueError("local_slope needs finite ts and ys")
    if np.any(ts <= 0) or np.any(ys <= 0):
        raise ValueError("local_slope needs positive ts and ys (it works in log-log)")
    return np.gradient(np.log(ys), np.log(ts))


class ExponentFit(NamedTuple):
    """Least-squares fit ``log y = exponent · log t + log prefactor`` over a window."""

    exponent: float
    prefactor: float
    window: tuple[float, float]
    num_points: int
    max_abs_residual: float


def fit_exponent(
    ts: np.ndarray, ys: np.ndarray, window: tuple[float, float] | None = None
) -> ExponentFit:
    """Fit a power law ``y ≈ C tᵖ`` to the points with ``t`` in ``window``.

    Raises ``ValueError`` for non-positive values, fewer than 3 points in the
    window, or a float32/float16 ``ys`` whose window reaches values at its
    rounding level (``≤ 10³ · eps · max|y|``): there the fit measures rounding,
    not the law (docs/theory.md §5: exponent fits need float64).
    """
    ts_arr = np.asarray(ts)
    ys_arr = np.asarray(ys)
    if ts_arr.shape != ys_arr.shape or ts_arr.ndim != 1:
        raise ValueError(
            f"ts and ys must be 1-D of equal length, got {ts_arr.shape}, {ys_arr.shape}"
        )
    lo, hi = window if window is not None else (float(ts_arr.min()), float(ts_arr.max()))
    if not 0 < lo < hi:
        raise ValueError(f"window must satisfy 0 < lo < hi, got {window}")
    mask = (ts_arr >= lo) & (ts_arr <= hi)
    if mask.sum() < 3:
        raise ValueError(f"window {window} holds {int(mask.sum())} points; need at least 3")
    y = ys_arr[mask]
    if np.any(y <= 0) or np.any(~np.isfinite(y)):
        raise ValueError("ys must be finite and positive inside the window")
    if np.issubdtype(ys_arr.dtype, np.floating) and np.finfo(ys_arr.dtype).bits < 64:
        floor = 1e3 * np.finfo(ys_arr.dtype).eps * float(np.max(np.abs(ys_arr)))
        if float(np.min(y)) <= floor:
            raise ValueError(
                f"ys are {ys_arr.dtype} and the window reaches values ≤ {floor:.2g}, the "
                "rounding level of that dtype: compute the flow in float64 (jax_enable_x64)"
            )
    lt, ly = np.log(ts_arr[mask].astype(np.float64)), np.log(y.astype(np.float64))
    slope, intercept = np.polyfit(lt, ly, 1)
    resid = ly - (slope * lt + intercept)
    return ExponentFit(
        exponent=float(slope),
        prefactor=float(np.exp(intercept)),
        window=(float(lo), float(hi)),
        num_points=int(mask.sum()),
        max_abs_residual=float(np.max(np.abs(resid))),
    )


def first_crossing(ts: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """First time ``a(t)`` overtakes ``b(t)``, interpolated linearly in ``log t``.

    ``log(a/b)`` is interpolated between the last saved time with ``a < b`` and
    the next one with ``a ≥ b`` (exact for power laws ``a = αtᵖ``, ``b = βt^q``).
    Returns NaN when ``a < b`` at every time, and ``ts[0]`` when ``a ≥ b`` from
    the start. ``ts`` ``(T,)`` increasing; ``a``, ``b`` ``(T,)`` positive.
    """
    ts, a, b = (np.asarray(v, np.float64) for v in (ts, a, b))
    if ts.ndim != 1 or a.shape != ts.shape or b.shape != ts.shape:
        raise ValueError(
            f"ts, a, b must be 1-D of equal length, got {ts.shape}, {a.shape}, {b.shape}"
        )
    if not (np.all(np.isfinite(ts)) and np.all(ts > 0) and np.all(np.diff(ts) > 0)):
        raise ValueError("ts must be finite, positive and increasing")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a > 0) and np.all(b > 0)):
        raise ValueError("a and b must be finite and positive (the crossing is found in log-log)")
    gap = np.log(a) - np.log(b)
    above = np.flatnonzero(gap >= 0)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(ts[0])
    frac = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(np.exp(np.log(ts[i - 1]) + frac * np.log(ts[i] / ts[i - 1])))


def onset_window(
    report: AICReport,
    curvature_norm: float,
    *,
    t_min: float,
    regime: str = "quartic",
    margin: float | None = None,
) -> tuple[float, float]:
    """Window ``[lo, hi]`` where one power law of the projected loss should hold.

    ``'quartic'``: past the crossover, ``[max(t_min, margin·t_c), radius/margin]``
    (for ``Pg = 0``, ``t_c = 0`` and the window starts at ``t_min``).
    ``'quadratic'``: before it, ``[t_min, min(t_c, radius)/margin]``. The series'
    radius is taken as ``1/‖A‖``. ``margin`` defaults to 10 (quartic) and 100
    (quadratic: the ``t³`` term shifts the local slope by ``≈ 2t/t_c``, so the
    window must end far below ``t_c`` for a 1 % exponent). Warns when empty.
    """
    t_min = positive_float(t_min, "t_min")
    if finite_float(curvature_norm, "curvature_norm") < 0:
        raise ValueError(f"curvature_norm must be ≥ 0, got {curvature_norm}")
    if margin is None:
        margin = 10.0 if regime == "quartic" else 100.0
    margin = positive_float(margin, "margin")
    radius = 1.0 / max(curvature_norm, 1e-300)
    if regime == "quartic":
        lo, hi = max(t_min, margin * report.crossover_time), radius / margin
    elif regime == "quadratic":
        lo, hi = t_min, min(report.crossover_time, radius) / margin
    else:
        raise ValueError(f"regime must be 'quartic' or 'quadratic', got {regime!r}")
    if hi <= lo:
        warn_at_caller(f"{regime} window is empty: [{lo:.3g}, {hi:.3g}]", RuntimeWarning)
    return (lo, hi)
