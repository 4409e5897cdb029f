"""One call that diagnoses a model before fine-tuning: AIC, spectrum, forecast, overlap, warnings.

:func:`diagnose` is a composition (docs/theory.md §2, §5, §6): the arguments
checked once (:mod:`geomcollapse.diagnosis.plan`); the skill Fisher's top
eigenpairs, trace and ``d`` (:mod:`geomcollapse.diagnosis.spectrum`, on
:func:`geomcollapse.linalg.top_eigenpairs` and
:func:`geomcollapse.aic.fisher_trace`); the Taylor forecast of ``Δu(t)`` and
the AIC report of Def. 5.1 at ``d`` (:mod:`geomcollapse.diagnosis.forecast`, on
:func:`geomcollapse.series.delta_u_series` and
:func:`geomcollapse.theory.aic_report`); the window, overlap and crossing step
(:func:`geomcollapse.series.crossing_step`,
:func:`geomcollapse.series.first_order_time`); and a
:class:`~geomcollapse.diagnosis.report.Diagnosis` with warnings in plain words.

The skill Fisher ``F`` (``fisher``):

* ``'true'`` (default): ``Jᵀ(diag p − ppᵀ)J`` of the softmax of
  ``skill_logits(params, *skill_args)`` (:func:`geomcollapse.curvature.fisher_vp`):
  the Fisher of the model's output distribution the paper defines. It is
  the default because the *empirical* Fisher ``(1/m)Σ ∇ℓ_i∇ℓ_iᵀ`` vanishes
  at a minimum of a soft-label skill loss: for the loss whose Hessian at
  ``θ*`` is ``F`` (``u = mean KL(p_{θ*} ‖ p_θ)``, docs/theory.md §5.3) every
  per-example gradient is zero at ``θ*``, so the empirical ``F`` is 0 and
  there is no ``M`` to find.
* ``'empirical'``: from per-example gradients of ``skill_loss``
  (:func:`geomcollapse.curvature.empirical_fisher_vp`); every array in
  ``skill_args`` must carry the example axis first and ``skill_loss`` must
  be the mean of the per-example losses.
* a matvec ``fisher(params, v, *skill_args) -> F v`` (``v`` like ``params``).

The spectrum (``spectrum``): ``'dense'`` forms ``F`` from its ``n`` columns
``F e_i`` (one compiled, batched call) and diagonalises it with
``numpy.linalg.eigh``: exact, and cheaper than Lanczos for small models;
``'lanczos'`` finds the top eigenpairs by
:func:`geomcollapse.linalg.top_eigenpairs` (certified by residuals) and
``tr F`` by :func:`geomcollapse.aic.fisher_trace`; ``'auto'`` is dense for
``n ≤ 2048`` unless ``params`` are sharded over several devices.

The rule for ``d=None``: the smallest ``d ≤ max_d`` whose top-``d``
eigenvalues hold at least ``share`` (90 %) of ``tr F``, the trace measured
on ``F`` itself (the diagonal of the dense ``F``; or exactly by ``n``
matvecs for ``n ≤ 4096``, else by Hutchinson probes on ``(I−P)F(I−P)``
plus the top eigenvalues), never on the truncated spectrum. With Lanczos,
eigenpairs are computed for ``k = 8`` first, then ``k`` doubles until the
share is reached or ``k = max_d``. If even ``max_d`` falls short,
``d = max_d`` and a tail warning says so.

Warnings (each a stated rule):

* *θ* is not a minimum of u*: ``c₁ = −∇u(θ*)ᵀg`` is above rounding
  (:func:`geomcollapse.series.first_order_time`): Δu starts linearly, the
  first-order term dominating up to ``t₁`` where ``|c₁|t₁ = Σ_{k≥2}|c_k|t₁^k``.
* *u and F disagree in scale* (true Fisher, θ* a minimum of u): ``c₂ = ½gᵀ∇²u g``
  is more than 10× from ``½gᵀFg`` either way; at a minimum of ``u = mean KL``
  they are equal (``∇²u(θ*) = F``), and a ``u`` summed over ``N`` examples gives ``N``.
* *tail mass large, condition 1 fails*: ``Σ_{i≤d}λ_i < share · tr F``.
* *forecast window shorter than the plan*: ``lr·steps > validity_time``.
* *no crossing inside the window*, *eigenpairs not converged*.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import compilation_cache, series
from geomcollapse._checks import flat_loss
from geomcollapse.curvature import params_layout
from geomcollapse.diagnosis.forecast import AtD, at_d
from geomcollapse.diagnosis.plan import (
    DEFAULT_MAX_D,
    DEFAULT_ORDER,
    DEFAULT_SHARE,
    Request,
    check_request,
)
from geomcollapse.diagnosis.report import Diagnosis
from geomcollapse.diagnosis.spectrum import Spectrum, measure_spectrum
from geomcollapse.errors import FlatLossWarning
from geomcollapse.progress import progress_bar

__all__ = ["NUM_FORECAST_TIMES", "diagnose"]

PyTree = Any

NUM_FORECAST_TIMES = 96  # points of the stored forecast curve


def diagnose(
    skill_loss: Callable[..., jax.Array],
    task_loss: Callable[..., jax.Array],
    params: PyTree,
    *,
    skill_args: tuple = (),
    task_args: tuple = (),
    skill_logits: Callable[..., jax.Array] | None = None,
    fisher: str | Callable[..., PyTree] = "true",
    d: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    order: int = DEFAULT_ORDER,
    share: float = DEFAULT_SHARE,
    max_d: int = DEFAULT_MAX_D,
    key: jax.Array,
    tol: float | None = None,
    max_matvecs: int | None = None,
    num_probes: int = 64,
    trace: str = "auto",
    spectrum: str = "auto",
    progress: bool = False,
    batch_size: int | None = None,
    example_loss: Callable[..., jax.Array] | None = None,
) -> Diagnosis:
    """Diagnose ``θ* = params`` for a skill to keep and a fine-tuning task (docs/theory.md §2-§6).

    The skill Fisher's spectrum and trace, the AIC of Def. 5.1, the Taylor forecast of
    ``Δu(t)`` and of ``½‖F^{1/2}Px(t)‖²`` with its validity window, the overlap of the
    forecast update with ``M``, the SGD step where ``Δu`` crosses ``threshold`` (``t =
    lr·k``), and warnings: a :class:`geomcollapse.Diagnosis`. The choices of ``F``, the routes,
    the rule for ``d`` and the warnings' rules: :mod:`geomcollapse.diagnosis.run`, docs/diagnose.md.

    Args:
      skill_loss, task_loss: ``u(params, *skill_args)``, ``L(params, *task_args)`` -> scalar.
      params: ``θ*``, a pytree of finite floating arrays (flax nnx ``State`` included); leaves
        sharded over a mesh (``NamedSharding``, one dtype) keep every vector of ``R^n`` a
        pytree sharded like them (Lanczos route; ``spectrum='dense'`` is refused).
      skill_args, task_args: tuples of the losses' extra arguments (data).
      skill_logits: ``(params, *skill_args) -> (N, ..., C)`` logits, for ``fisher='true'``.
      fisher: ``'true'``, ``'empirical'`` or a matvec ``fisher(params, v, *skill_args)``.
      d: ``dim M`` (``1 ≤ d < n``), or ``None``: the smallest ``d ≤ max_d`` whose top
        eigenvalues hold ``share`` (in ``(0, 1)``) of ``tr F``.
      lr, steps, threshold: SGD learning rate (``t = lr·k``), planned steps and the ``Δu``
        level whose crossing is forecast (both need ``lr``).
      order: ``K`` in ``[2, 12]``, the forecast's highest power.
      key: ``jax.random`` key (Lanczos starts, Hutchinson probes).
      tol, max_matvecs: Lanczos tolerance (default as :func:`geomcollapse.aic.measure_aic`)
        and budget per run; num_probes: Hutchinson probes. Checked on every route.
      trace: ``'auto'``, ``'exact'`` or ``'hutchinson'`` (Lanczos route; the dense route reads
        ``tr F`` off ``F``'s diagonal, so ``'hutchinson'`` makes ``'auto'`` take Lanczos).
      spectrum: ``'auto'`` (dense for ``n ≤ 2048`` unsharded), ``'dense'`` or ``'lanczos'``.
      progress: a progress bar over the stages.
      batch_size, example_loss: ``B`` and ``example_loss(params, *row)`` (its mean over the rows
        of ``task_args`` is ``task_loss``): adds the SGD forecast (docs/theory.md §8).

    Raises:
      ValueError: a bad argument (named), non-finite ``params``, a user function that raises
        (evaluated once abstractly up front), a loss that is not a scalar or not finite with
        its derivatives at ``θ*``, or a skill Fisher that vanishes at ``θ*`` (or is no Fisher).
    """
    req = _check_sgd(check_request(**locals()), batch_size, example_loss)
    compilation_cache.enable()  # a second process loads these programs from disk
    bar = progress_bar(total=3, desc="diagnose", enabled=progress)

    def done(stage: str) -> None:
        bar.update(1)
        bar.set_postfix(stage=stage)

    try:
        sp = measure_spectrum(req)
        done("spectrum")
        m = at_d(req, sp, done)
        done("AIC")
        f = _window(req, sp, m)
    finally:  # the bar's end line, also when a stage raises
        bar.close()
    dg = _assemble(req, sp, m, f, _sgd(req, batch_size, example_loss))
    return _with_arrays(dg, req, m, f)


def _with_arrays(dg: Diagnosis, req: Request, m: AtD, f: _Window) -> Diagnosis:
    """``dg`` carrying ``M(θ*)`` and the forecast as a :class:`~geomcollapse.series.Series`
    of that subspace (what :func:`geomcollapse.monitor.from_diagnosis` watches)."""
    forecast = series.Series(
        delta_u=jnp.asarray(m.delta_u, req.dtype),
        projected=jnp.asarray(f.projected, req.dtype),
        displacement=m.displacement,
        route=m.route,
    )
    layout = params_layout(req.params)  # what the monitor checks its params against
    return dataclasses.replace(dg, subspace=m.subspace, series=forecast, params_layout=layout)


class _SGD(NamedTuple):
    """The minibatch-SGD forecast (docs/theory.md §8), host numbers."""

    batch_size: int
    noise_rate: float
    coefficients: tuple[float, ...]  # E[Δu] as a polynomial in t at this lr
    validity_time: float
    crossing: int | None


def _check_sgd(req: Request, batch_size: Any, example_loss: Any) -> Request:
    """``batch_size`` and ``example_loss`` come together, need ``lr`` and unsharded params,
    and the mean of ``example_loss`` over the rows of ``task_args`` is ``task_loss`` at θ*."""
    if batch_size is None and example_loss is None:
        return req
    if batch_size is None or not callable(example_loss):
        raise ValueError(
            "batch_size and example_loss go together: example_loss(params, *row) must be a "
            f"callable and batch_size an integer ≥ 1, got {batch_size!r}, {example_loss!r}"
        )
    if req.lr is None:
        raise ValueError("lr is required with batch_size: SGD steps map to flow time as t = lr·k")
    if req.layout is not None:
        raise ValueError("batch_size: the SGD forecast needs params on one device (not sharded)")
    mean = jax.vmap(lambda *row: example_loss(req.params, *row))(*req.task_args).mean()
    total = req.task_loss(req.params, *req.task_args)
    if not abs(float(mean) - float(total)) <= 1e-6 * max(abs(float(total)), 1e-30):
        raise ValueError(
            f"example_loss: its mean over the rows of task_args is {float(mean):.8g}, not "
            f"task_loss = {float(total):.8g} (the task loss must be the examples' mean)"
        )
    return req


def _sgd(req: Request, batch_size: int | None, example_loss: Callable | None) -> _SGD | None:
    """:func:`geomcollapse.series.sgd_delta_u` at ``θ*``, its crossing of ``threshold``."""
    if batch_size is None:
        return None
    with warnings.catch_warnings():  # a flat task loss: diagnose says so once, in its report
        warnings.simplefilter("ignore", FlatLossWarning)
        fc = series.sgd_delta_u(
            req.skill_loss,
            example_loss,
            req.params,
            req.task_args,
            lr=req.lr,
            batch_size=batch_size,
            steps=[1],
            order=req.order,
            skill_args=req.skill_args,
        )
    validity = fc.validity_time
    coeffs = np.asarray(fc.mean_coefficients, np.float64)
    crossing = None
    if req.threshold is not None and not math.isnan(validity):
        crossing = series.crossing_step(coeffs, req.threshold, req.lr, validity)
    return _SGD(
        batch_size, float(fc.noise_rate), tuple(float(c) for c in coeffs), validity, crossing
    )


class _Window(NamedTuple):
    """What the window, the plan and the threshold make of the series (host numbers)."""

    projected: np.ndarray  # (K+1,) float64, c₀ … c_K of ½‖F^{1/2}Px(t)‖²
    projected_validity: float
    t_plan: float | None
    horizon: float | None
    overlap_geometric: float | None
    overlap_fisher: float | None
    crossing: int | None
    first_order_time: float
    ts: np.ndarray  # (NUM_FORECAST_TIMES,) the forecast grid


def _horizon(t_plan: float | None, validity: float) -> float | None:
    """The planned time clipped to the window, or the window's end (``None``: neither)."""
    window = validity if math.isfinite(validity) else None
    if t_plan is not None:
        return t_plan if window is None or t_plan <= window else window
    return window


def _window(req: Request, sp: Spectrum, m: AtD) -> _Window:
    """The projected series, the overlap at the horizon, the crossing step and the grid."""
    lam = np.asarray(sp.values[: sp.d], np.float64)
    c_proj = series.projected_from_coordinates(lam, np.asarray(m.coordinates, np.float64))
    validity, tau = m.validity_time, m.time_scale
    # c_proj is float64 on the host: its rounding level is the model's, not float64's
    rtol = float(np.sqrt(np.finfo(req.dtype).eps))
    p_validity = series.polynomial_validity_time(c_proj, time_scale=tau, rtol=rtol)
    t_plan = None if req.lr is None or req.steps is None else req.lr * req.steps
    horizon = _horizon(t_plan, validity)
    ov_geo = ov_fisher = None
    if horizon is not None and not np.isnan(validity):
        coords, x_norm = m.overlap(horizon)
        ov_geo = float(np.linalg.norm(coords) / x_norm) if x_norm > 0 else 0.0
        ov_fisher = float(0.5 * np.sum(np.maximum(lam, 0.0) * coords**2))
    else:
        horizon = None
    crossing = None
    if req.threshold is not None and req.lr is not None and not np.isnan(validity):
        crossing = series.crossing_step(m.delta_u, req.threshold, req.lr, validity)
    finite = [t for t in (t_plan, validity, p_validity) if t is not None and math.isfinite(t)]
    top = 1.5 * max(finite) if finite else (tau if math.isfinite(tau) else 1.0)
    return _Window(
        projected=c_proj,
        projected_validity=p_validity,
        t_plan=t_plan,
        horizon=horizon,
        overlap_geometric=ov_geo,
        overlap_fisher=ov_fisher,
        crossing=crossing,
        first_order_time=series.first_order_time(m.delta_u, tau, req.dtype),
        ts=np.geomspace(top * 1e-4, top, NUM_FORECAST_TIMES),
    )


def _assemble(req: Request, sp: Spectrum, m: AtD, f: _Window, sgd: _SGD | None) -> Diagnosis:
    """The :class:`Diagnosis` of the measurements."""
    lam, d, report, g_norm = sp.values, sp.d, m.report, m.task_gradient_norm
    polyval = np.polynomial.polynomial.polyval
    sgd_fields = {}
    if sgd is not None:
        sgd_fields = {
            "batch_size": sgd.batch_size,
            "noise_rate": sgd.noise_rate,
            "sgd_coefficients": sgd.coefficients,
            "sgd_validity_time": sgd.validity_time,
            "sgd_crossing_step": sgd.crossing,
        }
    return Diagnosis(
        **sgd_fields,
        n=req.n,
        dtype=str(np.dtype(req.dtype)),
        fisher=req.fisher_name,
        d=d,
        d_rule=sp.d_rule,
        share=req.share,
        lr=req.lr,
        steps=req.steps,
        threshold=req.threshold,
        order=req.order,
        taylor_route=m.route,
        aic=report,
        eigenvalues=tuple(float(x) for x in lam),
        eigen_residuals=tuple(float(x) for x in sp.residuals),
        trace=float(sp.trace),
        trace_stderr=float(sp.trace_stderr),
        trace_method=sp.trace_method,
        spectrum_method=sp.method,
        top_share=float(lam[:d].sum() / sp.trace),
        skill_gradient_norm=m.skill_gradient_norm,
        task_gradient_norm=g_norm,
        delta_u_coefficients=tuple(float(x) for x in m.delta_u),
        projected_coefficients=tuple(float(x) for x in f.projected),
        validity_time=float(m.validity_time),
        projected_validity_time=float(f.projected_validity),
        time_scale=float(m.time_scale),
        forecast_t=tuple(float(x) for x in f.ts),
        forecast_delta_u=tuple(float(x) for x in polyval(f.ts, m.delta_u)),
        forecast_projected=tuple(float(x) for x in polyval(f.ts, f.projected)),
        first_order_time=f.first_order_time,
        horizon_time=None if f.horizon is None else float(f.horizon),
        overlap_gradient=float(report.orthogonality / g_norm) if g_norm > 0 else 0.0,
        overlap_baseline=float(np.sqrt(d / req.n)),
        overlap_geometric=f.overlap_geometric,
        overlap_fisher=f.overlap_fisher,
        crossing_step=f.crossing,
        crossing_time=None if f.crossing is None else float(req.lr * f.crossing),
        warnings=tuple(_warnings(req, sp, m, f)),
        num_matvecs=sp.num_matvecs + (0 if sp.method == "dense" else 1),
    )


def _warnings(req: Request, sp: Spectrum, m: AtD, f: _Window) -> list[str]:
    """The plain-language warnings, each from the rule stated in :mod:`.run`'s docstring."""
    out = []
    t1, lr, c_du = f.first_order_time, req.lr, m.delta_u
    # θ* not a minimum of u: c₁ = −∇u(θ*)ᵀg above rounding; it dominates Δu for t < t₁
    if math.isfinite(t1) or t1 == math.inf:
        until = (
            "at every t (no higher term)"
            if t1 == math.inf
            else f"for t < {t1:.3g}" + ("" if lr is None else f" (k < {t1 / lr:.3g} SGD steps)")
        )
        out.append(
            f"θ* is not a minimum of the skill loss u: ∇u(θ*) ≠ 0 (‖∇u‖ = "
            f"{m.skill_gradient_norm:.3g}) and the first-order term c₁t (c₁ = −∇u(θ*)ᵀg = "
            f"{c_du[1]:.3g}) dominates the forecast {until}: Δu starts linearly, not as the "
            "t²/t⁴ onset of Thm 6.2. Use a skill loss minimised at θ*, e.g. the KL from θ*'s "
            "own outputs."
        )
    flat = flat_loss("task_loss", m.task_gradient_norm)  # γ = 0 from a flat loss is no safety
    out += [flat] if flat else []
    return (
        out
        + _scale_warnings(req, sp, m, f)
        + _spectrum_warnings(req, sp, m)
        + _plan_warnings(req, m, f)
    )


SCALE_FACTOR = 10.0  # u's curvature along g off F's by more than this factor: warned


def _scale_warnings(req: Request, sp: Spectrum, m: AtD, f: _Window) -> list[str]:
    """``u`` and ``F`` on different scales: at a minimum of ``u = mean KL(p_θ* ‖ p_θ)``,
    ``∇²u(θ*) = F`` (the true Fisher, a mean over examples), so ``c₂ = ½gᵀ∇²u g`` equals
    ``½gᵀFg = ½(‖F^{1/2}Pg‖² + gᵀ(I−P)F(I−P)g)``; a factor past ``SCALE_FACTOR`` either
    way (e.g. ``u`` summed over ``N`` examples: ``N``) is warned. Not checked for an
    empirical or custom Fisher, off a minimum of ``u`` (``c₂`` has a ``∇u`` term), or
    where ``gᵀFg`` is below ``1e-6·λ₁‖g‖²`` (rounding)."""
    t1, c_du = f.first_order_time, m.delta_u
    if req.fisher_name != "true" or math.isfinite(t1) or t1 == math.inf or len(c_du) < 3:
        return []
    along_g = 0.5 * (m.report.fisher_orthogonality**2 + m.tail_quadratic)
    floor = 1e-6 * float(sp.values[0]) * m.task_gradient_norm**2
    if not (math.isfinite(along_g) and along_g > floor and math.isfinite(c_du[2])):
        return []
    ratio = float(c_du[2]) / along_g
    if 1 / SCALE_FACTOR <= ratio <= SCALE_FACTOR:
        return []
    return [
        f"the skill loss u and the Fisher F disagree in scale: u's curvature along the task "
        f"gradient is {ratio:.3g}× F's (c₂ of Δu = ½gᵀ∇²u g = {c_du[2]:.3g}, ½gᵀFg = "
        f"{along_g:.3g}), where u = mean KL(p_θ* ‖ p_θ) gives 1. F is a mean over the skill "
        "examples: make u a mean too (a sum over N examples gives N×), or the projected loss, "
        "its budget and the monitor read in other units than Δu."
    ]


def _spectrum_warnings(req: Request, sp: Spectrum, m: AtD) -> list[str]:
    """A top eigenvalue ≤ 0, a large tail (condition 1 fails), unconverged pairs."""
    out, d, lam = [], sp.d, sp.values
    top_share = float(lam[:d].sum() / sp.trace)
    if float(lam[0]) <= 0:
        out.append(f"the skill Fisher's top eigenvalue is {float(lam[0]):.3g} ≤ 0: it is not PSD")
    if top_share < req.share:
        capped = " (the rule's cap max_d)" if sp.d_rule != "given" and d == req.max_d else ""
        out.append(
            f"tail mass large: condition 1 of the AIC (low-rank concentration) fails: the top "
            f"d = {d}{capped} eigenvalues hold {top_share:.1%} of tr F = {sp.trace:.3g} (< "
            f"{req.share:.0%}; tail mass {m.report.tail_mass:.3g}). M misses much of F: Δu also "
            "grows through the tail's t² floor ½t²gᵀ(I−P)F(I−P)g, beyond the projected loss."
        )
    if not np.all(sp.converged):
        out.append(
            f"{int(np.sum(~sp.converged))} of {sp.converged.size} eigenpairs did not converge: "
            "M and the numbers measured against it are not certified (raise max_matvecs)"
        )
    return out


def _plan_warnings(req: Request, m: AtD, f: _Window) -> list[str]:
    """An unknown window, a window shorter than the plan, no crossing inside it."""
    out, validity, lr = [], m.validity_time, req.lr
    if math.isnan(validity):
        out.append(
            "the forecast window is unknown: Δu's series has a single non-zero term (raise order)"
        )
    elif f.t_plan is not None and f.t_plan > validity:
        out.append(
            f"forecast window shorter than the plan: the series is trusted up to t = "
            f"{validity:.3g} (k ≈ {validity / lr:.3g} SGD steps at lr = {lr:g}), the plan runs "
            f"steps = {req.steps} (t = {f.t_plan:.3g}); beyond the window it is no forecast "
            "(raise order, or diagnose again at an intermediate checkpoint)"
        )
    if req.threshold is not None and f.crossing is None:
        where = "" if math.isnan(validity) else f" (t ≤ {validity:.3g}, k ≤ {validity / lr:.3g})"
        out.append(
            f"no crossing: the forecast Δu does not reach threshold = {req.threshold:g} inside "
            f"the validity window{where}; crossing_step is None"
        )
    return out
