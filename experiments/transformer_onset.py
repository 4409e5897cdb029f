"""The quartic onset on a real network: gradient flow from the aligned transformer θ*.

From ``θ*`` (float64), the gradient flow (diffrax Dopri8) of a benign task's
loss, (i) as is and (ii) with ``P g(θ*)`` removed, ``L̃(θ) = L(θ) − ⟨P g(θ*), θ⟩``
(docs/theory.md §5: same Hessian, ``P g̃ = 0``). ``P`` projects on the top-``d``
eigenvectors of the true skill Fisher. Along each flow: the projected loss
``½‖F^{1/2}P(θ(t) − θ*)‖²`` and ``Δu(t)``. Predicted: onset exponent 4 for (ii)
with ``t⁴`` coefficient ``⅛γ̃²``, ``γ̃ = ‖F^{1/2}PH(I−P)g‖`` (the AIC report of
``L̃``), and exponent 2 for (i), inside the windows set by ``t_c`` and ``1/‖H‖``.

Thm 6.1 on ``Δu`` itself uses the KL skill loss ``u = mean KL(p_{θ*} ‖ p_θ)``
(docs/theory.md §5.3: ``θ*`` an exact minimum, ``∇²u(θ*) = F``): the remainder
``Δu − ½xᵀFx`` against ``‖x‖³`` and ``⅙∇³u(θ*)[x̂,x̂,x̂]``, the lower bound, and
the order-4 Taylor forecast. ``Δu`` of the hard-target REFUSE NLL is reported
beside it as the behavioural measure.

Run: ``python -m experiments.transformer_onset [--full]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from matplotlib.lines import Line2D

from experiments import _style as style
from experiments._common import ROOT, Claim, cli, conclude, require_x64
from experiments._transformer import (
    SkillFisher,
    at_theta_path,
    read_at_theta,
    rows,
    skill_fisher,
    theta_digest,
    write_at_theta,
)
from geomcollapse import (
    aic,
    curvature,
    flow,
    linalg,
    pipeline,
    series,
    tasks,
    tensor_norm,
    theory,
    training,
)

NAME = "transformer_onset"
FULL_FLAG = True


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    size: str = "small"  # a key of experiments._transformer.ALIGNMENT
    tasks: tuple[str, ...] = tuple(tasks.BENIGN_TASKS)
    dims: tuple[int, ...] = (10, 50)  # dim M; the first is the figure's and the onset rows' d
    num_prompts: int = 128  # harmful prompts defining F and u
    task_examples: int = 64  # the fine-tuning loss is full-batch over these
    t_min: float = 1e-5
    t_max: float = 5e-3
    num_times: int = 14
    rtol: float = 1e-10
    exponent_tolerance: float = 0.05
    coefficient_tolerance: float = 0.02
    # Thm 6.1 on the KL skill loss (fixed before the first run)
    remainder_exponent_tolerance: float = 0.15
    cubic_tolerance: float = 0.05  # r/‖x‖³ vs ⅙∇³u[x̂,x̂,x̂] at the smallest t
    forecast_tolerance: float = 0.01  # order-4 Taylor forecast / Δu at the smallest times
    forecast_times: int = 3  # how many of the smallest times the forecast is checked at
    # with Pg removed: KL Δu on the tail's floor ½qt², and the crossover to the M-part
    floor_tolerance: float = 0.02  # Δu / (½qt²) at t_min
    crossover_tolerance: float = 0.2  # measured / predicted crossover 2q^{1/2}/γ̃, in the window
    stationarity_tolerance: float = 1e-10  # ‖∇u(θ*)‖ of the KL skill loss
    hessian_fisher_tolerance: float = 1e-8  # ‖∇²u v − F v‖/‖F v‖ on a random probe
    # Thm 6.1's lower bound with C, D fixed at θ* by SS-HOPM (docs/experiments.md, fixed
    # before its first run): (random starts, top-F eigenvector starts, screening iterations,
    # refined runs, their iteration cap) for C = max|⅙∇³u[v³]| and for D = max|∇⁴u[v⁴]|
    cubic_search: tuple[int, int, int, int, int] = (32, 10, 10, 4, 60)
    quartic_search: tuple[int, int, int, int, int] = (8, 10, 5, 2, 30)
    search_tol: float = 1e-6  # SS-HOPM stops when |λₖ₊₁ − λₖ| ≤ tol·|λₖ₊₁|
    informative_fraction: float = 0.1  # a flow tests the bound where B ≥ this × Δu
    seed: int = 0
    tag: str = ""  # results as transformer_onset[_small]_<tag>.json (set by --tasks)


QUICK = Config(size="tiny", tasks=("lookalike", "shift"))
TINY = Config(
    size="tiny-fast",
    tasks=("lookalike",),
    dims=(10, 20),
    num_prompts=32,
    task_examples=16,
    t_min=1e-6,
    num_times=13,
    t_max=1e-3,
    cubic_search=(4, 4, 3, 1, 10),  # the tests' model: fewer starts and steps (seconds)
    quartic_search=(2, 4, 2, 1, 4),
)


def times_for_windows(ts: np.ndarray, windows, min_points: int = 3, added: int = 6) -> np.ndarray:
    """The grid ``ts``, plus ``added`` log-spaced times across every window it samples too thinly.

    A fit needs ``min_points`` times in its window; a narrow window (a small
    ``t_c/100`` on a large model) can fall between grid points. Windows that
    already hold enough keep ``ts`` as it is (and its compiled flow).
    """
    extra = [
        np.logspace(np.log10(lo), np.log10(hi), added)
        for lo, hi in windows
        if hi > lo and np.sum((ts >= lo) & (ts <= hi)) < min_points
    ]
    return np.unique(np.concatenate([ts, *extra])) if extra else ts


def _loss_with_correction(logits):
    """``L̃(θ) = L(θ) − ⟨corr, θ⟩``; ``corr = 0`` gives ``L`` (one compiled flow for both).

    :func:`geomcollapse.subspace.orthogonalized` with the correction ``P g(θ*)``
    passed as an argument instead of closed over, so the raw and corrected
    flows of every task share one compiled ODE solve.
    """
    loss = training.sequence_loss(logits)

    def fn(theta, tokens, targets, mask, corr):
        shift = sum(
            jnp.vdot(c, t)
            for c, t in zip(jax.tree.leaves(corr), jax.tree.leaves(theta), strict=True)
        )
        return loss(theta, tokens, targets, mask) - shift

    return fn


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class _KL(NamedTuple):
    """The KL skill loss ``u = mean KL(p_{θ*} ‖ p_θ)`` (docs/theory.md §5.3) at ``θ*``, compiled.

    ``change``, ``quad`` and ``cubic`` map displacements ``xs`` (leading axis)
    to ``Δu``, ``xᵀFx`` and ``∇³u(θ*)[x̂, x̂, x̂]`` (``x̂ = x/‖x‖``);
    ``forecast(task_args)`` is the order-4 Taylor forecast's ``(c₀ … c₄)`` of
    ``Δu`` along the task loss's flow (``series.delta_u_series``, compiled once).
    """

    ref: pipeline.SkillReference
    u: Callable
    change: Callable
    quad: Callable
    cubic: Callable
    forecast: Callable
    grad_norm: float  # ‖∇u(θ*)‖: 0 up to rounding
    hessian_fisher_gap: float  # ‖∇²u(θ*) v − F v‖ / ‖F v‖ on a random probe v


def _kl(sf: SkillFisher, task_loss: Callable, key) -> _KL:
    """The KL skill loss of ``sf``'s prompts: its measurements and stationarity checks at ``θ*``."""
    params = sf.params
    ref = pipeline.skill_reference(sf.logits, params, sf.harmful)
    u = training.kl_skill_loss(sf.logits)
    du, d3 = training.kl_skill_change(sf.logits), tensor_norm.derivative_form(u, 3)
    fvp = curvature.fisher_vp(training.answer_logits(sf.logits))

    def unit(x):
        norm = jnp.sqrt(_tree_vdot(x, x))
        return jax.tree.map(lambda a: a / norm, x)

    def each(fn):  # vmapped over the displacements, weights and prompts as arguments
        return jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None, None)))

    change = each(du)
    quad = each(lambda p, x, t, s, z: _tree_vdot(x, fvp(p, x, t, s)))
    cubic = each(lambda p, x, t, s, z: d3(p, unit(x), t, s, z))
    forecast = jax.jit(
        lambda p, r, a: series.delta_u_series(u, task_loss, p, 4, skill_args=r, task_args=a).delta_u
    )
    grad = jax.jit(jax.grad(u))(params, *ref)
    v = ravel_pytree(params)[1](jax.random.normal(key, (ravel_pytree(params)[0].size,)))
    hv = jax.jit(curvature.hessian_vp(u))(params, v, *ref)
    fv = sf.fvp(v)
    gap = ravel_pytree(hv)[0] - ravel_pytree(fv)[0]
    return _KL(
        ref,
        u,
        lambda xs: change(params, xs, *ref),
        lambda xs: quad(params, xs, *ref),
        lambda xs: cubic(params, xs, *ref),
        lambda task_args: forecast(params, tuple(ref), task_args),
        float(jnp.linalg.norm(ravel_pytree(grad)[0])),
        float(jnp.linalg.norm(gap) / jnp.linalg.norm(ravel_pytree(fv)[0])),
    )


class _Constants(NamedTuple):
    """Thm 6.1's constants at ``θ*``, fixed before any flow: ``C`` and ``D`` by SS-HOPM.

    ``C = max_{‖v‖=1} |⅙∇³u(θ*)[v,v,v]|``, ``D = max_{‖v‖=1} |∇⁴u(θ*)[v,v,v,v]|``
    of the KL skill loss (estimates: values attained, so never above the maxima);
    ``payload``: :func:`_constants_payload` (the results' ``thm61_constants``), which
    holds them; ``source``: where they come from (read from ``at_theta``, or searched in
    this run).
    """

    payload: dict
    source: str

    @property
    def C(self) -> float:
        return self.payload["C"]

    @property
    def D(self) -> float:
        return self.payload["D"]


def _search(kl: _KL, params, order: int, starts, spec, tol: float) -> tensor_norm.TensorMax:
    """SS-HOPM on ``∇ᵐu(θ*)`` (matrix-free contraction) from raveled ``starts``."""
    unravel = ravel_pytree(params)[1]
    contract = tensor_norm.derivative_contraction(kl.u, order)
    flat = jax.jit(lambda x: ravel_pytree(contract(params, unravel(x), *kl.ref))[0])
    _, _, screen, refine, cap = spec
    return tensor_norm.sshopm(
        flat,
        starts,
        order=order,
        screen_iterations=screen,
        refine=refine,
        max_iterations=cap,
        tol=tol,
    )


CONSTANTS = f"{NAME}_constants"  # the name of their files under experiments/results/at_theta
# Bump when the search, its starts, its random keys or the KL skill loss change in code:
# the key then names no stored file and C, D are searched again.
CONSTANTS_VERSION = 1
SKILL_LANCZOS_TOL = 1e-8  # F's top eigenvectors at θ*: the searches' starts


def constants_key(config: Config, theta32) -> dict:
    """What decides ``C`` and ``D``: ``θ*`` (``theta32``, its float32 values, by digest),
    the skill's prompts, ``F``'s basis (the starts), the searches, the code's version
    and JAX's (its random numbers)."""
    fields = ("size", "num_prompts", "cubic_search", "quartic_search", "search_tol", "seed")
    key = {f: getattr(config, f) for f in fields}
    return {
        **key,
        "lanczos_k": max(config.dims),
        "lanczos_tol": SKILL_LANCZOS_TOL,
        "version": CONSTANTS_VERSION,
        "jax": jax.__version__,
        "theta": theta_digest(theta32),
    }


def search_constants(sf: SkillFisher, kl: _KL, config: Config, key) -> dict:
    """``C`` and ``D`` by SS-HOPM from random starts and ``F``'s top eigenvectors (and, for
    ``D``, ``C``'s maximiser): :func:`_constants_payload`."""
    n = sf.basis.shape[1]

    def starts(k, spec, *extra):
        rand = jax.random.normal(k, (spec[0], n), jnp.float64)
        return jnp.concatenate([rand, jnp.asarray(sf.basis[: spec[1]]), *extra])

    k3, k4 = jax.random.split(key)
    c, tol = config.cubic_search, config.search_tol
    cubic = _search(kl, sf.params, 3, starts(k3, c), c, tol)
    best = ravel_pytree(cubic.vector)[0][None]
    q = config.quartic_search
    quartic = _search(kl, sf.params, 4, starts(k4, q, best), q, tol)
    return _constants_payload(cubic, quartic)


def _constants(sf: SkillFisher, kl: _KL, config: Config, key, outdir: Path) -> _Constants:
    """``C`` and ``D``, quantities of ``θ*`` alone: read where stored (``read_at_theta``:
    under ``outdir``, else committed for the main job's ``tiny``), else searched
    (:func:`search_constants`) and stored under ``outdir``."""
    theta32 = jax.tree.map(lambda a: a.astype(jnp.float32), sf.params)  # exact: θ* is float32
    at = constants_key(config, theta32)
    payload = read_at_theta(CONSTANTS, at, outdir, required=("C", "D"))
    source = f"read from experiments/results/at_theta/{at_theta_path(CONSTANTS, at, '').name}"
    if payload is None:
        payload = search_constants(sf, kl, config, key)
        write_at_theta(CONSTANTS, at, outdir, payload)
        source = "searched in this run"
    return _Constants(payload, source)


class _Setup(NamedTuple):
    """What every task's flows share: the skill at ``θ*`` and the compiled measurements."""

    sf: SkillFisher
    loss: Callable  # L̃(θ, tokens, targets, mask, corr)
    hvp: Callable
    skill_change: Callable  # displacements → Δu of the REFUSE NLL (flow.skill_change)
    projected_loss: Callable  # (subspace, displacements) → ½‖F^{1/2}Px‖²
    grad_u: np.ndarray  # ∇u(θ*) of the REFUSE NLL, raveled
    kl: _KL  # the KL skill loss, the theory rows' u
    constants: _Constants  # Thm 6.1's C and D at θ*, fixed before any flow


def _setup(config: Config, outdir: Path, k_prompts, k_eig) -> _Setup:
    """The skill Fisher's top ``max(dims)`` at ``θ*``, ``∇u(θ*)`` and the jitted measurements."""
    sf = skill_fisher(
        config.size,
        outdir,
        num_prompts=config.num_prompts,
        k=max(config.dims),
        prompt_key=k_prompts,
        lanczos_key=k_eig,
        tol=SKILL_LANCZOS_TOL,
    )
    params, short = sf.params, sf.harmful.prompts_only()
    u = training.skill_loss(sf.logits)
    # Δu = u(θ* + x) − u(θ*) by the cancellation-free line integral (flow.skill_change)
    skill_change = jax.jit(
        lambda xs: flow.skill_change(
            u, params, xs, args=(short.tokens, short.answer_start), nodes=4
        )
    )
    grad_u = np.asarray(
        ravel_pytree(jax.jit(jax.grad(u))(params, short.tokens, short.answer_start))[0]
    )
    loss = _loss_with_correction(sf.logits)
    # the subspace is an argument, not a closure constant: one compile for every d
    projected = jax.jit(jax.vmap(lambda sub, x: sub.projected_loss(x), in_axes=(None, 0)))
    kl = _kl(sf, loss, jax.random.fold_in(k_eig, 1))
    return _Setup(
        sf,
        loss,
        curvature.hessian_vp(training.sequence_loss(sf.logits)),
        skill_change,
        lambda sub, xs: np.asarray(projected(sub, xs), np.float64),
        grad_u,
        kl,
        _constants(sf, kl, config, jax.random.fold_in(k_eig, 2), outdir),
    )


class _Path(NamedTuple):
    """One flow from ``θ*`` and what is measured along it, independent of ``d``.

    ``kl_delta_u``, ``kl_quad`` (``xᵀFx``), ``cubic`` (``⅙∇³u(θ*)[x̂,x̂,x̂]``)
    and ``forecast`` (order-4 coefficients) are of the KL skill loss;
    ``nll_delta_u`` and ``first_order`` (``∇u(θ*)ᵀx``) of the REFUSE NLL, measured
    only where the behavioural row reads them (``None`` elsewhere).
    """

    displacement: object
    norm: np.ndarray
    kl_delta_u: np.ndarray
    kl_quad: np.ndarray
    cubic: np.ndarray
    forecast: np.ndarray
    nll_delta_u: np.ndarray | None
    first_order: np.ndarray | None


def _path(s: _Setup, config: Config, ts, data, corr, behavioural: bool) -> _Path:
    """The float64 flow of ``L̃`` (correction ``corr``) from ``θ*`` and its d-free measurements.

    ``behavioural``: also ``Δu`` of the REFUSE NLL and ``∇u(θ*)ᵀx``.
    """
    x = flow.ode_flow(
        s.loss, s.sf.params, ts, args=(*data, corr), rtol=config.rtol, progress=True
    ).displacement

    def f64(a):
        return np.asarray(a, np.float64)

    return _Path(
        x,
        np.linalg.norm(rows(x), axis=1),
        f64(s.kl.change(x)),
        f64(s.kl.quad(x)),
        f64(s.kl.cubic(x)) / 6,
        f64(s.kl.forecast((*data, corr))),
        f64(s.skill_change(x).delta_u) if behavioural else None,
        rows(x) @ s.grad_u if behavioural else None,
    )


def _reports(s: _Setup, data, g, Hg, d: int) -> tuple:
    """``M``, ``P g(θ*)``, the AIC reports raw and corrected, and ``q = g̃ᵀ(I−P)F(I−P)g̃``.

    ``g``, ``Hg``: the raw loss's, raveled (float64). ``q`` (the tail's
    quadratic, ``g̃ = (I−P)g``) sets the corrected report's ``tail_crossover_time``.
    """
    params, sf = s.sf.params, s.sf
    sub = sf.subspace.leading(d)
    unravel = ravel_pytree(params)[1]
    corr = sub.project(unravel(jnp.asarray(g)))  # P g(θ*)
    g_t, Hg_t = aic.gradient_and_hg(s.loss, params, (*data, corr))  # g̃ = (I−P)g, H g̃
    tail_mass = sf.trace - sf.values[:d].sum()

    def report(grad, hg):
        q = aic.tail_quadratic(_flat_fvp(sf, unravel), sf.basis[:d], grad, jnp.float64)
        return theory.aic_report(
            sub, grad, np.asarray(hg), tail_mass=tail_mass, tail_quadratic=q
        ), q

    raw, _ = report(g, Hg)
    ortho, q = report(np.asarray(g_t, np.float64), Hg_t)
    return sub, corr, raw, ortho, q


def _flat_fvp(sf: SkillFisher, unravel) -> Callable:
    """``v ↦ F v`` on raveled vectors."""
    return lambda v: ravel_pytree(sf.fvp(unravel(v)))[0]


def _fixed_bound(ts, p: _Path, projected, radius, k: _Constants, fraction: float) -> dict:
    """Thm 6.1's bound ``B = ½‖F^{1/2}Px‖² − C‖x‖³ − (D/24)‖x‖⁴`` with ``C``, ``D`` fixed at θ*.

    Checked at the saved times of the local window where ``(D/24)‖x‖⁴ ≤ C‖x‖³``
    (``‖x‖ ≤ 24C/D``); informative where ``B ≥ fraction·Δu`` (docs/experiments.md).
    """
    delta_u, norm = p.kl_delta_u, p.norm
    bound = projected - k.C * norm**3 - k.D / 24 * norm**4
    window = (ts <= radius) & (norm <= 24 * k.C / k.D)
    margin = (delta_u - bound) / delta_u
    informative = window & (bound >= fraction * delta_u)
    return {
        "bound": bound.tolist(),
        "window_points": int(window.sum()),
        "window_end": float(ts[window][-1]) if window.any() else float("nan"),
        "min_margin": float(margin[window].min()) if window.any() else float("nan"),
        "violations": int(np.sum(window & (delta_u < bound))),
        "informative": bool(informative.any()),
        "informative_points": int(informative.sum()),
        "max_bound_over_delta_u": float((bound / delta_u)[window].max())
        if window.any()
        else float("nan"),
    }


def _thm61(ts, p: _Path, projected, radius) -> dict:
    """Thm 6.1 on the KL ``Δu`` along one flow: remainder, cubic term, bound, Taylor forecast.

    ``r = Δu − ½xᵀFx`` against ``‖x‖³`` (fitted in the local window ``t ≤
    radius``) and against ``⅙∇³u(θ*)[x̂,x̂,x̂]``; the lower bound
    ``Δu ≥ ½‖F^{1/2}Px‖² − C‖x‖³``, ``C = max_t |⅙∇³u[x̂,x̂,x̂]|`` (violations
    counted in the local window and beyond it); the order-4 forecast against ``Δu``.
    """
    delta_u, norm, cubic = p.kl_delta_u, p.norm, p.cubic
    remainder = delta_u - 0.5 * p.kl_quad
    bound = projected - np.max(np.abs(cubic)) * norm**3
    inside = ts <= radius
    fit = (
        theory.fit_exponent(norm, np.abs(remainder), (norm[0], norm[inside][-1])).exponent
        if inside.sum() >= 3 and np.all(remainder[inside] != 0)
        else float("nan")
    )
    violated = delta_u < bound
    return {
        "delta_u": delta_u.tolist(),
        "remainder": remainder.tolist(),
        "displacement_norm": norm.tolist(),
        "remainder_exponent": fit,
        "remainder_sign_changes": int(np.sum(np.diff(np.sign(remainder[inside])) != 0)),
        # x̂ turns along the flow, so the cubic "constant" of r ≈ ⅙∇³u[x̂,x̂,x̂]‖x‖³ moves too
        "cubic_drift_in_window": float(cubic[inside][-1] / cubic[0]),
        "remainder_over_cubic": (remainder / norm**3 / cubic).tolist(),
        "cubic_term": cubic.tolist(),
        "bound_violations": int(np.sum(violated & inside)),
        "bound_violations_beyond_window": int(np.sum(violated & ~inside)),
        "bound_violation_times": ts[violated].tolist(),
        "bound_min_margin": float(np.min((delta_u - bound)[inside] / np.abs(delta_u[inside]))),
        "forecast_ratio": (np.polynomial.polynomial.polyval(ts, p.forecast) / delta_u).tolist(),
    }


def _variant(s: _Setup, sub, ts, p: _Path, window, radius, fraction: float) -> dict:
    """One flow's numbers against ``M`` of dimension ``d``: projected loss, Δu and their fits."""
    projected = s.projected_loss(sub, p.displacement)
    entry = {
        "window": list(window),
        "projected": projected.tolist(),
        "projected_exponent": theory.fit_exponent(ts, projected, window).exponent,
        "local_slope_projected": theory.local_slope(ts, projected).tolist(),
        "kl": _thm61(ts, p, projected, radius),
        "fixed_bound": _fixed_bound(ts, p, projected, radius, s.constants, fraction),
    }
    if p.nll_delta_u is not None:
        entry.update(_behavioural(ts, p.nll_delta_u, p.first_order, window))
    return entry


def _behavioural(ts, delta_u, first_order, window) -> dict:
    """``Δu`` of the REFUSE NLL against its first-order term ``∇u(θ*)ᵀx``, in ``window``."""
    entry = {"delta_u": delta_u.tolist(), "first_order_delta_u": first_order.tolist()}
    in_window = (ts >= window[0]) & (ts <= window[1])
    # Relative to the window's largest |Δu|, not pointwise: Δu can cross
    # zero inside a window, where a pointwise ratio blows up.
    entry["first_order_max_rel_error"] = float(
        np.max(np.abs(delta_u[in_window] - first_order[in_window]))
        / np.max(np.abs(delta_u[in_window]))
    )
    if np.all(delta_u[in_window] > 0):
        entry["delta_u_exponent"] = theory.fit_exponent(ts, delta_u, window).exponent
    else:
        entry["delta_u_exponent"] = float("nan")
        entry["delta_u_sign_changes"] = int(np.sum(np.diff(np.sign(delta_u)) != 0))
    return entry


def _tail_to_m(ts, o: dict, report, q: float, radius) -> dict:
    """With ``Pg = 0``: KL ``Δu`` starts on the tail's floor ``½t²q``, ``q = gᵀ(I−P)F(I−P)g``.

    Its M-part ``½‖F^{1/2}Px‖²`` (``≈ ⅛γ̃²t⁴``) overtakes the rest ``Δu − M``
    at the measured crossover; predicted ``2q^{1/2}/γ̃`` (``tail_crossover_time``).
    """
    delta_u, m_part = np.asarray(o["kl"]["delta_u"]), np.asarray(o["projected"])
    rest = delta_u - m_part
    ok = np.cumprod((rest > 0) & (m_part > 0)).astype(bool)  # the prefix where both are > 0
    measured = theory.first_crossing(ts[ok], m_part[ok], rest[ok]) if ok.sum() >= 2 else np.nan
    return {
        "floor_ratio": float(delta_u[0] / (0.5 * q * ts[0] ** 2)),
        "tail_quadratic": float(q),
        "crossover_measured": float(measured),
        "crossover_predicted": float(report.tail_crossover_time),
        "crossover_in_window": bool(np.isfinite(measured) and measured <= radius),
    }


class _TaskSetup(NamedTuple):
    """One benign task at ``θ*``: its data, ``‖H‖`` and, per ``d``, ``M``, ``P g`` and reports."""

    data: tuple
    H_norm: float
    reports: dict  # d -> (subspace, P g(θ*), raw report, corrected report, q)
    windows: dict  # d -> {"orthogonalized": (lo, hi), "raw": (lo, hi)}


def _task_setup(s: _Setup, config: Config, task: str, k_task, k_norm) -> _TaskSetup:
    """The task's batch, ``‖H‖`` (Lanczos), the AIC reports for every ``d`` and the fit windows."""
    batch = tasks.benign_task(k_task, task, config.task_examples)
    data = (jnp.asarray(batch.tokens), jnp.asarray(batch.targets), jnp.asarray(batch.mask))
    params = s.sf.params
    zero = jax.tree.map(jnp.zeros_like, params)
    g, Hg = (np.asarray(a, np.float64) for a in aic.gradient_and_hg(s.loss, params, (*data, zero)))
    top = linalg.top_eigenpairs(
        jax.jit(lambda v: s.hvp(params, v, *data)),
        params,
        1,
        key=k_norm,
        tol=1e-3,
        which="magnitude",
    )
    H_norm = float(np.abs(top.values[0]))
    reports = {d: _reports(s, data, g, Hg, d) for d in config.dims}
    windows = {
        d: {
            "orthogonalized": theory.onset_window(ortho, H_norm, t_min=config.t_min),
            "raw": theory.onset_window(raw, H_norm, t_min=config.t_min, regime="quadratic"),
        }
        for d, (_, _, raw, ortho, _) in reports.items()
    }
    return _TaskSetup(data, H_norm, reports, windows)


def _task(s: _Setup, config: Config, ts, t: _TaskSetup) -> dict:
    """The raw flow and, per ``d``, the flow with ``P g(θ*)`` removed, of one benign task's loss.

    The REFUSE NLL (behavioural row) is measured on the raw flow and the first
    ``d``'s corrected one.
    """
    first = config.dims[0]
    radius = 0.1 / t.H_norm  # the local window [t_min, 1/(10‖H‖)]
    zero = jax.tree.map(jnp.zeros_like, s.sf.params)
    raw_path = _path(s, config, ts, t.data, zero, behavioural=True)
    out = {"H_norm": t.H_norm, "times": ts.tolist(), "local_window": [config.t_min, radius]}
    for d, (sub, corr, raw, ortho, q) in t.reports.items():
        path = _path(s, config, ts, t.data, corr, behavioural=d == first)
        frac = config.informative_fraction
        o = _variant(s, sub, ts, path, t.windows[d]["orthogonalized"], radius, frac)
        o["coefficient_ratio"] = float(o["projected"][0] / (ortho.quartic_coefficient * ts[0] ** 4))
        o.update(_tail_to_m(ts, o, ortho, q, radius))
        raw_path_d = raw_path if d == first else raw_path._replace(nll_delta_u=None)
        out[f"d{d}"] = {
            "report_raw": raw._asdict(),
            "report_orthogonalized": ortho._asdict(),
            "raw": _variant(s, sub, ts, raw_path_d, t.windows[d]["raw"], radius, frac),
            "orthogonalized": o,
        }
    return out


def compute(config: Config, outdir: Path) -> dict:
    """Both flows of every task from ``θ*`` and what they measure; the results payload.

    Every task's flows share one time grid (the grid plus extra times in every
    thinly sampled window of every task), so the flow and its measurements compile once.
    """
    k_prompts, k_eig, k_tasks, k_norm = jax.random.split(jax.random.key(config.seed + 2000), 4)
    s = _setup(config, outdir, k_prompts, k_eig)
    grid = np.logspace(np.log10(config.t_min), np.log10(config.t_max), config.num_times)
    setups = {
        task: _task_setup(
            s, config, task, jax.random.fold_in(k_tasks, i), jax.random.fold_in(k_norm, i)
        )
        for i, task in enumerate(config.tasks)
    }
    windows = [w for t in setups.values() for by in t.windows.values() for w in by.values()]
    ts = times_for_windows(grid, windows)
    results = {task: _task(s, config, ts, t) for task, t in setups.items()}
    grad_u_norm = float(np.linalg.norm(s.grad_u))
    return {
        "times": grid.tolist(),
        "dims": list(config.dims),
        "eigenvalues": s.sf.values.tolist(),
        "trace": s.sf.trace,
        "grad_u_norm": grad_u_norm,
        "grad_u_fraction_in_M": {
            str(d): float(np.linalg.norm(s.sf.basis[:d] @ s.grad_u) / grad_u_norm)
            for d in config.dims
        },
        "kl_grad_u_norm": s.kl.grad_norm,
        "kl_hessian_fisher_gap": s.kl.hessian_fisher_gap,
        "thm61_constants": s.constants.payload,
        "thm61_constants_source": s.constants.source,
        "tasks": results,
    }


def _constants_payload(cubic: tensor_norm.TensorMax, quartic: tensor_norm.TensorMax) -> dict:
    """``C``, ``D``, the quartic radius ``24C/D`` and how SS-HOPM reached them."""

    def search(found: tensor_norm.TensorMax) -> dict:
        return {
            "value": float(found.value),
            "eigenvalue": float(found.eigenvalue),
            "screened": np.asarray(found.screened).tolist(),
            "refined": np.asarray(found.refined).tolist(),
            "converged": np.asarray(found.converged).tolist(),
            "iterations": np.asarray(found.iterations).tolist(),
            "contractions": int(found.contractions),
        }

    C, D = float(cubic.value) / 6, float(quartic.value)
    return {
        "C": C,
        "D": D,
        "quartic_radius": 24 * C / D,
        "cubic_search": search(cubic),
        "quartic_search": search(quartic),
    }


def _fmt(values: dict, spec: str = ".4f") -> str:
    return ", ".join(f"{t} {v:{spec}}" for t, v in values.items())


def _spans(windows: dict) -> str:
    return ", ".join(f"{t} [{w[0]:.0e}, {w[1]:.1e}]" for t, w in windows.items())


def _by(results: dict, variant: str, fn, dims=None) -> dict:
    """``fn(entry, task result)`` per task and ``d`` for one flow variant, keyed ``task d=…``."""
    dims = results["dims"] if dims is None else dims
    return {
        f"{t} d={d}": fn(r[f"d{d}"][variant], r) for t, r in results["tasks"].items() for d in dims
    }


def _flows(results: dict, fn) -> dict:
    """``fn(kl entry, task result)`` per distinct flow: each ``d``'s corrected one, and the raw one.

    The raw flow does not depend on ``d``; its d-free numbers are shown once.
    """
    first = results["dims"][0]
    out = {}
    for t, r in results["tasks"].items():
        for d in results["dims"]:
            out[f"{t}/ortho d={d}"] = fn(r[f"d{d}"]["orthogonalized"]["kl"], r)
        out[f"{t}/raw"] = fn(r[f"d{first}"]["raw"]["kl"], r)
    return out


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Quartic onset and its coefficient with the correction, quadratic without; Δu reported."""
    tol = config.exponent_tolerance
    exp4 = _by(results, "orthogonalized", lambda o, r: o["projected_exponent"])
    exp2 = _by(results, "raw", lambda o, r: o["projected_exponent"])
    ratio = _by(results, "orthogonalized", lambda o, r: o["coefficient_ratio"])
    windows = _by(results, "orthogonalized", lambda o, r: o["window"], results["dims"][:1])
    windows_raw = _by(results, "raw", lambda o, r: o["window"])
    return [
        Claim(
            f"Cor. 6.3 on the {config.size} transformer: with P g(θ*) removed the projected "
            "alignment loss ½‖F^{1/2}P(θ(t)−θ*)‖² starts as t⁴",
            command,
            f"exponent 4 ± {tol} (d ∈ {set(config.dims)}; windows [t_min, 1/(10‖H‖)]: "
            f"{_spans(windows)})",
            _fmt(exp4),
            all(abs(v - 4) <= tol for v in exp4.values()),
        ),
        Claim(
            "Cor. 6.3: the transformer's t⁴ coefficient is ⅛γ̃², γ̃ = ‖F^{1/2}PH(I−P)g‖ "
            "from the AIC report of the orthogonalised loss",
            command,
            f"projected / (⅛γ̃²t⁴) = 1 ± {config.coefficient_tolerance} "
            f"at t = {results['times'][0]:.0e}",
            _fmt(ratio),
            all(abs(v - 1) <= config.coefficient_tolerance for v in ratio.values()),
        ),
        Claim(
            "Without the correction (P g(θ*) ≠ 0) the transformer's projected loss starts as t²",
            command,
            f"exponent 2 ± {tol} (windows [t_min, t_c/100]: {_spans(windows_raw)})",
            _fmt(exp2),
            all(abs(v - 2) <= tol for v in exp2.values()),
        ),
        _behavioural_claim(results, command),
        *_kl_claims(results, config, command),
    ]


def _behavioural_claim(results: dict, command: str) -> Claim:
    """``Δu`` of the hard-target REFUSE NLL: first-order at ``θ*`` (reported)."""
    first = results["dims"][0]
    entries = {
        f"{t}/{'ortho' if v == 'orthogonalized' else 'raw'}": r[f"d{first}"][v]
        for t, r in results["tasks"].items()
        for v in ("orthogonalized", "raw")
    }
    first_order_err = max(e["first_order_max_rel_error"] for e in entries.values())
    return Claim(
        "Behavioural: Δu of the hard-target REFUSE NLL along the transformer flows "
        "(θ* is not a stationary point of that u)",
        command,
        "reported: Δu ≈ ∇u(θ*)ᵀx + …, so a first-order term can hide the t⁴ onset",
        f"‖∇u(θ*)‖ = {results['grad_u_norm']:.3g} (‖P∇u‖/‖∇u‖ = "
        f"{results['grad_u_fraction_in_M'][str(first)]:.4f}, d = {first}); Δu = ∇u(θ*)ᵀx to "
        f"within {first_order_err:.1%} of max |Δu| in each window; Δu exponent there: "
        + ", ".join(
            f"{k} "
            + (
                f"{e['delta_u_exponent']:.2f}"
                if np.isfinite(e["delta_u_exponent"])
                else "n/a (Δu changes sign)"
            )
            for k, e in entries.items()
        ),
        True,
        labels=("measured", "measured"),
    )


IDENTITY_LABELS = ("holds (control)", "FAILS (control)")  # an identity, not a paper claim


def _stationarity_claim(results: dict, c: Config, command: str) -> Claim:
    """The KL skill loss has ``∇u(θ*) = 0`` and ``∇²u(θ*) = F`` (docs/theory.md §5.3)."""
    grad, gap = results["kl_grad_u_norm"], results["kl_hessian_fisher_gap"]
    return Claim(
        "KL skill loss u = mean KL(p_θ* ‖ p_θ) at the first answer token: θ* is an exact "
        "minimum and ∇²u(θ*) = F, the skill Fisher",
        command,
        f"‖∇u(θ*)‖ ≤ {c.stationarity_tolerance:.0e}; ‖∇²u v − F v‖/‖F v‖ ≤ "
        f"{c.hessian_fisher_tolerance:.0e} (random probe v)",
        f"‖∇u(θ*)‖ = {grad:.2e}; Hessian–Fisher gap {gap:.2e}",
        grad <= c.stationarity_tolerance and gap <= c.hessian_fisher_tolerance,
        labels=IDENTITY_LABELS,  # true by construction of the KL loss: a control row
    )


def _bound_entries(results: dict, key: str) -> dict:
    """Every flow's ``key`` entry against every ``d``: ``task/ortho d=…``, ``task/raw d=…``."""
    return {
        f"{t}/{short} d={d}": r[f"d{d}"][v][key]
        for t, r in results["tasks"].items()
        for d in results["dims"]
        for v, short in (("orthogonalized", "ortho"), ("raw", "raw"))
    }


def _bound_claim(results: dict, command: str) -> Claim:
    """Control: the bound with ``C`` read off the flow's own directions (cannot test Thm 6.1)."""
    by = _bound_entries(results, "kl")
    beyond = {k: e["bound_violations_beyond_window"] for k, e in by.items()}
    return Claim(
        "Control (C measured on the flow it bounds): Δu ≥ ½‖F^{1/2}Px‖² − C‖x‖³, C = max over "
        "the flow's own directions of |⅙∇³u(θ*)[x̂,x̂,x̂]|",
        command,
        "0 violations in the local window t ∈ [t_min, 1/(10‖H‖)]",
        _fmt({k: e["bound_violations"] for k, e in by.items()}, "d")
        + "; min (Δu − bound)/Δu: "
        + _fmt({k: e["bound_min_margin"] for k, e in by.items()})
        + "; beyond the window (reported, up to t_max): "
        + (_fmt({k: n for k, n in beyond.items() if n}, "d") or "none"),
        all(e["bound_violations"] == 0 for e in by.values()),
        labels=IDENTITY_LABELS,  # its C comes from the flow: a check of the machinery only
    )


NOT_TESTABLE = ("not testable", "not testable")


def _fixed_bound_claim(results: dict, c: Config, command: str) -> Claim:
    """Thm 6.1's lower bound with ``C``, ``D`` fixed at ``θ*`` (SS-HOPM), on informative flows."""
    k = results["thm61_constants"]
    by = _bound_entries(results, "fixed_bound")
    informative = {name: e for name, e in by.items() if e["informative"]}

    def show(e):
        if not e["window_points"]:
            return "no window point"
        tag = "informative" if e["informative"] else "not informative"
        return (
            f"{e['min_margin']:.3g} ({tag}, max B/Δu {e['max_bound_over_delta_u']:.3g}, "
            f"{e['window_points']} points to t = {e['window_end']:.2g})"
        )

    return Claim(
        "Thm 6.1, lower bound with constants fixed at θ* before the flows: Δu ≥ "
        "½‖F^{1/2}Px‖² − C‖x‖³ − (D/24)‖x‖⁴, C = max_v |⅙∇³u(θ*)[v,v,v]|, "
        "D = max_v |∇⁴u(θ*)[v,v,v,v]| (SS-HOPM)",
        command,
        f"min (Δu − B)/Δu ≥ 0 on every informative flow (B ≥ {c.informative_fraction:.0%} of Δu "
        "at a time of the window: the local window where (D/24)‖x‖⁴ ≤ C‖x‖³), "
        "at least one informative flow",
        f"C = {k['C']:.4g}, D = {k['D']:.4g}, 24C/D = {k['quartic_radius']:.3g} "
        f"({results.get('thm61_constants_source', 'searched in this run')}); "
        f"{len(informative)} of {len(by)} flows informative; min (Δu − B)/Δu: "
        + "; ".join(f"{name} {show(e)}" for name, e in by.items()),
        bool(informative) and all(e["min_margin"] >= 0 for e in informative.values()),
        labels=("reproduced", "NOT reproduced") if informative else NOT_TESTABLE,
    )


def _tail_claims(results: dict, c: Config, command: str) -> list[Claim]:
    """With ``Pg = 0``, KL ``Δu`` on the tail's ``t²`` floor, then the crossover to the M-part."""
    floor = _by(results, "orthogonalized", lambda o, r: o["floor_ratio"])
    cross = _by(
        results,
        "orthogonalized",
        lambda o, r: (o["crossover_measured"], o["crossover_predicted"], o["crossover_in_window"]),
    )
    inside = {k: m / p for k, (m, p, w) in cross.items() if w}
    return [
        Claim(
            "With P g(θ*) removed, KL Δu itself starts as t²: the tail's floor ½t²gᵀ(I−P)F(I−P)g",
            command,
            f"Δu / (½qt²) = 1 ± {c.floor_tolerance} at t = {results['times'][0]:.0e}",
            _fmt(floor),
            all(abs(v - 1) <= c.floor_tolerance for v in floor.values()),
        ),
        Claim(
            "With P g(θ*) removed, the M-part ½‖F^{1/2}Px‖² (t⁴) overtakes the rest of Δu at "
            "2(gᵀ(I−P)F(I−P)g)^{1/2}/γ̃",
            command,
            f"where the crossover falls in the local window: measured / predicted = 1 ± "
            f"{c.crossover_tolerance}",
            "measured / predicted crossover: "
            + ", ".join(
                f"{k} {m:.2e}/{p:.2e}" + (" (in window)" if w else " (beyond window)")
                for k, (m, p, w) in cross.items()
            ),
            bool(inside) and all(abs(q - 1) <= c.crossover_tolerance for q in inside.values()),
            labels=("reproduced", "NOT reproduced") if inside else ("measured", "measured"),
        ),
    ]


def _kl_claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Thm 6.1 on ``Δu`` of the KL skill loss (θ* an exact minimum, ∇²u(θ*) = F)."""
    c = config
    exps = _flows(results, lambda k, r: k["remainder_exponent"])
    drift = _flows(results, lambda k, r: k["cubic_drift_in_window"])
    cubic = _flows(results, lambda k, r: k["remainder_over_cubic"][0])
    n = c.forecast_times
    forecast = _flows(results, lambda k, r: max(abs(q - 1) for q in k["forecast_ratio"][:n]))
    return [
        _stationarity_claim(results, config, command),
        Claim(
            "Thm 6.1, remainder: r = Δu − ½xᵀFx of the KL skill loss scales as ‖x‖³",
            command,
            f"fitted exponent 3 ± {c.remainder_exponent_tolerance} in t ∈ [t_min, 1/(10‖H‖)]",
            _fmt(exps, ".3f")
            + "; ⅙∇³u[x̂,x̂,x̂] at the window's end / at t_min (x̂ turns): "
            + _fmt(drift, ".2f"),
            all(abs(e - 3) <= c.remainder_exponent_tolerance for e in exps.values()),
        ),
        Claim(
            "Thm 6.1, cubic term: r/‖x‖³ is ⅙∇³u(θ*)[x̂,x̂,x̂] (nested jvp), x̂ = x/‖x‖",
            command,
            f"ratio 1 ± {c.cubic_tolerance} at t = {results['times'][0]:.0e}",
            _fmt(cubic),
            all(abs(q - 1) <= c.cubic_tolerance for q in cubic.values()),
        ),
        _fixed_bound_claim(results, c, command),
        _bound_claim(results, command),
        *_tail_claims(results, c, command),
        Claim(
            "§6 Taylor forecast of the KL Δu (series.delta_u_series, order 4) along the "
            "float64 flows",
            command,
            f"forecast / Δu = 1 ± {c.forecast_tolerance} at the {n} smallest times",
            "max |ratio − 1|: " + _fmt(forecast, ".1e"),
            all(q <= c.forecast_tolerance for q in forecast.values()),
        ),
    ]


FIGURE_NEEDS = ("tasks", "dims")
TASKS_PER_ROW = 2  # 3 curves per task in panels (a) and (c): at most 6 per panel
# one meaning per line style in the whole figure (colour: the task)
MEASURED, RAW, PREDICTED, M_PART = ("-", "None"), ("--", "None"), (":", "None"), ("-", ".")
KEYS = (
    (MEASURED, r"measured, $Pg(\theta^*)$ removed"),
    (RAW, "measured, raw flow"),
    (PREDICTED, r"predicted: $\frac{1}{8}\tilde\gamma^2t^4$, floor $\frac{1}{2}qt^2$, crossover"),
    (M_PART, r"M-part $\frac{1}{2}\|F^{1/2}Px\|^2$, $Pg$ removed"),
)


def _width(i: int, first: int) -> float:
    """Line width of a chunk's ``i``-th task: the first drawn widest, so that where two
    tasks' curves coincide (e.g. two tail floors within 10 %) both colours stay in view."""
    return 1.0 + 0.9 * (TASKS_PER_ROW - 1 - (i - first))


def _draw(ax, plot, ts, ys, key, color, lw: float) -> None:
    ls, marker = key
    getattr(ax, plot)(ts, ys, ls=ls, marker=marker, color=color, markersize=3, lw=lw)


def _onset_row(ax1, ax2, tasks_: list, first: int, d: int) -> None:
    """Projected loss (with ``⅛γ̃²t⁴``) and its local slope for up to ``TASKS_PER_ROW`` tasks."""
    for i, (_, r) in enumerate(tasks_, start=first):
        color, lw = style.PALETTE[i % len(style.PALETTE)], _width(i, first)
        by_d = r[f"d{d}"]
        o, w = by_d["orthogonalized"], by_d["raw"]
        ts = np.asarray(r["times"])
        quartic = by_d["report_orthogonalized"]["quartic_coefficient"] * ts**4
        for ys, key in ((o["projected"], MEASURED), (w["projected"], RAW), (quartic, PREDICTED)):
            _draw(ax1, "loglog", ts, ys, key, color, lw)
        _draw(ax2, "semilogx", ts, o["local_slope_projected"], MEASURED, color, lw)
        _draw(ax2, "semilogx", ts, w["local_slope_projected"], RAW, color, lw)
    ax1.set_ylabel(r"$\frac{1}{2}\|F^{1/2}P(\theta(t) - \theta^*)\|^2$")
    for level in (2, 4):
        ax2.axhline(level, color="gray", lw=0.5)
    ax2.set_ylabel(r"local slope $d\log(\cdot)/d\log t$")


def _kl_row(ax1, ax2, tasks_: list, first: int, d: int) -> None:
    """KL ``Δu`` with ``Pg`` removed, its ``t²`` floor and M-part; the cubic term's ratio."""
    for i, (_, r) in enumerate(tasks_, start=first):
        color, lw = style.PALETTE[i % len(style.PALETTE)], _width(i, first)
        o = r[f"d{d}"]["orthogonalized"]
        ts = np.asarray(r["times"])
        floor = 0.5 * o["tail_quadratic"] * ts**2
        for ys, key in (
            (o["kl"]["delta_u"], MEASURED),
            (floor, PREDICTED),
            (o["projected"], M_PART),
        ):
            _draw(ax1, "loglog", ts, ys, key, color, lw)
        if np.isfinite(o["crossover_predicted"]):
            ax1.axvline(o["crossover_predicted"], color=color, lw=lw / 2, ls=PREDICTED[0])
        for v, key in (("orthogonalized", MEASURED), ("raw", RAW)):
            cubic = r[f"d{d}"][v]["kl"]["remainder_over_cubic"]
            _draw(ax2, "semilogx", ts, cubic, key, color, lw)
        ax2.axvspan(r["local_window"][1], ts[-1], color=color, alpha=0.06, lw=0)
    ax1.set_ylabel(r"KL $\Delta u$ and its parts")
    ax2.axhline(1, color="gray", lw=0.5)
    ax2.set_ylabel(r"$r / (\frac{1}{6}\nabla^3u[\hat x,\hat x,\hat x]\|x\|^3)$")


TITLES = (
    "{letter} projected loss, $d = {d}$",
    "{letter} onset exponent: 4 corrected, 2 raw",
    r"{letter} KL $\Delta u$: $t^2$ floor, then $t^4$",
    "{letter} Thm 6.1 cubic term (shaded: t > window)",
)


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Per pair of tasks: projected loss and slope (first row), KL ``Δu``'s parts and cubic term.

    Line style means the same in every panel (``KEYS``); colour is the task; a chunk's first
    task is drawn wider (``_width``) so that coinciding curves of two tasks both show.
    """
    items, config = list(results["tasks"].items()), results["config"]
    d = results["dims"][0]
    chunks = range(0, len(items), TASKS_PER_ROW)
    fig, axes = style.subplots(2, 2 * len(chunks), height=2.6 * 2 * len(chunks) + 0.8)
    for k, first in enumerate(chunks):
        chunk = items[first : first + TASKS_PER_ROW]
        _onset_row(*axes[2 * k], chunk, first, d)
        _kl_row(*axes[2 * k + 1], chunk, first, d)
        for j, ax in enumerate([*axes[2 * k], *axes[2 * k + 1]]):
            letter = f"({chr(ord('a') + 4 * k + j)})"
            ax.set_title(TITLES[j].format(letter=letter, d=d), loc="left")
    for ax in axes[-1]:
        ax.set_xlabel(r"gradient-flow time $t$")
    fig.suptitle(f"{config['size']} transformer", x=0.01, ha="left")
    handles = [
        Line2D([], [], color=style.PALETTE[i % len(style.PALETTE)], label=t.replace("_", " "))
        for i, (t, _) in enumerate(items)
    ] + [
        Line2D([], [], color="gray", ls=ls, marker=m, markersize=3, label=label)
        for (ls, m), label in KEYS
    ]
    style.legend_below(fig, handles, [h.get_label() for h in handles], ncol=3)
    return style.save(fig, path)


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run both flows per task; write results and figure under ``outdir``."""
    require_x64(NAME)
    results = compute(config, outdir)
    return conclude(NAME, config, outdir, command, results, figure, claims)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK, full_flag=True)
