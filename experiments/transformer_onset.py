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
from experiments._common import ROOT, Claim, cli, finish, require_x64
from experiments._transformer import SkillFisher, rows, skill_fisher
from geomcollapse import aic, curvature, flow, linalg, pipeline, series, tasks, theory, training

NAME = "transformer_onset"
FULL_FLAG = True


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    size: str = "small"  # a key of experiments._transformer.ALIGNMENT
    tasks: tuple[str, ...] = tuple(tasks.BENIGN_TASKS)
    d: int = 10
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
    stationarity_tolerance: float = 1e-10  # ‖∇u(θ*)‖ of the KL skill loss
    hessian_fisher_tolerance: float = 1e-8  # ‖∇²u v − F v‖/‖F v‖ on a random probe
    seed: int = 0


QUICK = Config(size="tiny", tasks=("lookalike", "shift"))
TINY = Config(
    size="tiny-fast",
    tasks=("lookalike",),
    num_prompts=32,
    task_examples=16,
    t_min=1e-6,
    num_times=13,
    t_max=1e-3,
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


def _third_derivative(u: Callable) -> Callable:
    """``(θ*, v, *args) ↦ ∇³u(θ*)[v, v, v]``: three nested ``jvp`` of ``s ↦ u(θ* + s v)`` at 0."""

    def d3(params, v, *args):
        def along(s):
            return u(jax.tree.map(lambda p, w: p + s * w, params, v), *args)

        def derivative(f):
            return lambda s: jax.jvp(f, (s,), (jnp.ones_like(s),))[1]

        zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
        return derivative(derivative(derivative(along)))(zero)

    return d3


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
    du, d3 = training.kl_skill_change(sf.logits), _third_derivative(u)
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


class _Setup(NamedTuple):
    """What every task's flows share: the skill at ``θ*`` and the compiled measurements."""

    sf: SkillFisher
    loss: Callable  # L̃(θ, tokens, targets, mask, corr)
    hvp: Callable
    skill_change: Callable  # displacements → Δu of the REFUSE NLL (flow.skill_change)
    projected_loss: Callable  # displacements → ½‖F^{1/2}Px‖²
    grad_u: np.ndarray  # ∇u(θ*) of the REFUSE NLL, raveled
    kl: _KL  # the KL skill loss, the theory rows' u


def _setup(config: Config, outdir: Path, k_prompts, k_eig) -> _Setup:
    """The skill Fisher's top-``d`` at ``θ*``, ``∇u(θ*)`` and the jitted measurements."""
    sf = skill_fisher(
        config.size,
        outdir,
        num_prompts=config.num_prompts,
        k=config.d,
        prompt_key=k_prompts,
        lanczos_key=k_eig,
        tol=1e-8,
    )
    params, short = sf.params, sf.harmful.prompts_only()
    u = training.skill_loss(sf.logits)
    # Δu = u(θ* + x) − u(θ*) by the cancellation-free line integral (flow.skill_change)
    skill_change = jax.jit(
        lambda xs: flow.skill_change(u, params, xs, args=(short.tokens, short.answer_start))
    )
    grad_u = np.asarray(
        ravel_pytree(jax.jit(jax.grad(u))(params, short.tokens, short.answer_start))[0]
    )
    loss = _loss_with_correction(sf.logits)
    return _Setup(
        sf,
        loss,
        curvature.hessian_vp(training.sequence_loss(sf.logits)),
        skill_change,
        jax.jit(jax.vmap(sf.subspace.projected_loss)),
        grad_u,
        _kl(sf, loss, jax.random.fold_in(k_eig, 1)),
    )


def _reports(s: _Setup, data, key) -> tuple:
    """``P g(θ*)``, the AIC reports of the raw and corrected losses, and ``‖H‖`` at ``θ*``."""
    params, sf = s.sf.params, s.sf
    zero = jax.tree.map(jnp.zeros_like, params)
    g, Hg = aic.gradient_and_hg(s.loss, params, (*data, zero))
    g = np.asarray(g, np.float64)
    corr = sf.subspace.project(ravel_pytree(params)[1](jnp.asarray(g)))  # P g(θ*)
    g_t, Hg_t = aic.gradient_and_hg(s.loss, params, (*data, corr))  # g̃ = (I−P)g, H g̃
    tail_mass = sf.trace - sf.values.sum()
    raw = theory.aic_report(sf.subspace, g, np.asarray(Hg), tail_mass=tail_mass)
    ortho = theory.aic_report(sf.subspace, np.asarray(g_t), np.asarray(Hg_t), tail_mass=tail_mass)
    top = linalg.top_eigenpairs(
        jax.jit(lambda v: s.hvp(params, v, *data)), params, 1, key=key, tol=1e-3, which="magnitude"
    )
    return zero, corr, raw, ortho, float(np.abs(top.values[0]))


def _thm61(s: _Setup, ts, path: flow.Flow, projected, task_args, radius) -> dict:
    """Thm 6.1 on the KL ``Δu`` along one flow: remainder, cubic term, bound, Taylor forecast.

    ``r = Δu − ½xᵀFx`` against ``‖x‖³`` (fitted in the times ``≤ radius``,
    inside the series radius) and against ``⅙∇³u(θ*)[x̂,x̂,x̂]``; the lower bound
    ``Δu ≥ ½‖F^{1/2}Px‖² − C‖x‖³``, ``C = max_t |⅙∇³u[x̂,x̂,x̂]|``; and the order-4
    forecast ``series.delta_u_series`` against the realised ``Δu``.
    """
    kl, x = s.kl, path.displacement
    delta_u = np.asarray(kl.change(x), np.float64)
    remainder = delta_u - 0.5 * np.asarray(kl.quad(x), np.float64)
    norm = np.linalg.norm(rows(x), axis=1)
    cubic = np.asarray(kl.cubic(x), np.float64) / 6  # ⅙∇³u(θ*)[x̂,x̂,x̂]
    scaled = remainder / norm**3
    bound = projected - np.max(np.abs(cubic)) * norm**3
    coeffs = np.asarray(kl.forecast(task_args), np.float64)
    ratio = np.polynomial.polynomial.polyval(ts, coeffs) / delta_u
    inside = ts <= radius
    fit = (
        theory.fit_exponent(norm, np.abs(remainder), (norm[0], norm[inside][-1])).exponent
        if inside.sum() >= 3 and np.all(remainder[inside] != 0)
        else float("nan")
    )
    return {
        "delta_u": delta_u.tolist(),
        "remainder": remainder.tolist(),
        "displacement_norm": norm.tolist(),
        "remainder_exponent": fit,
        "remainder_sign_changes": int(np.sum(np.diff(np.sign(remainder[inside])) != 0)),
        # x̂ turns along the flow, so the cubic "constant" of r ≈ ⅙∇³u[x̂,x̂,x̂]‖x‖³ moves too
        "cubic_drift_in_window": float(cubic[inside][-1] / cubic[0]),
        "remainder_over_cubic": (scaled / cubic).tolist(),
        "cubic_term": cubic.tolist(),
        "bound_violations": int(np.sum(delta_u < bound)),
        "bound_violation_times": ts[delta_u < bound].tolist(),
        "bound_min_margin": float(np.min((delta_u - bound) / np.abs(delta_u))),
        "forecast_ratio": ratio.tolist(),
    }


def _variant(s: _Setup, config: Config, ts, data, corr, window, radius) -> dict:
    """One flow from ``θ*`` (correction ``corr``): projected loss, Δu and their onset fits."""
    path = flow.ode_flow(
        s.loss, s.sf.params, ts, args=(*data, corr), rtol=config.rtol, progress=True
    )
    projected = np.asarray(s.projected_loss(path.displacement), np.float64)
    kl = _thm61(s, ts, path, projected, (*data, corr), radius)
    delta_u = np.asarray(s.skill_change(path.displacement).delta_u, np.float64)
    first_order = rows(path.displacement) @ s.grad_u  # ∇u(θ*)ᵀx
    entry = {
        "window": list(window),
        "projected": projected.tolist(),
        "delta_u": delta_u.tolist(),
        "first_order_delta_u": first_order.tolist(),
        "projected_exponent": theory.fit_exponent(ts, projected, window).exponent,
        "local_slope_projected": theory.local_slope(ts, projected).tolist(),
        "kl": kl,
    }
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


def _task(s: _Setup, config: Config, grid, task: str, k_task, k_norm) -> dict:
    """Both flows (raw and with ``P g(θ*)`` removed) of one benign task's loss."""
    batch = tasks.benign_task(k_task, task, config.task_examples)
    data = (jnp.asarray(batch.tokens), jnp.asarray(batch.targets), jnp.asarray(batch.mask))
    zero, corr, raw, ortho, H_norm = _reports(s, data, k_norm)
    variants = (("orthogonalized", corr, ortho, "quartic"), ("raw", zero, raw, "quadratic"))
    windows = {
        name: theory.onset_window(report, H_norm, t_min=config.t_min, regime=regime)
        for name, _, report, regime in variants
    }
    ts = times_for_windows(grid, windows.values())
    out = {
        "report_raw": raw._asdict(),
        "report_orthogonalized": ortho._asdict(),
        "H_norm": H_norm,
        "times": ts.tolist(),
    }
    for name, c, _, _ in variants:
        out[name] = _variant(s, config, ts, data, c, windows[name], windows["orthogonalized"][1])
    o = out["orthogonalized"]
    o["coefficient_ratio"] = float(o["projected"][0] / (ortho.quartic_coefficient * ts[0] ** 4))
    return out


def compute(config: Config, outdir: Path) -> dict:
    """Both flows of every task from ``θ*`` and what they measure; the results payload."""
    k_prompts, k_eig, k_tasks, k_norm = jax.random.split(jax.random.key(config.seed + 2000), 4)
    s = _setup(config, outdir, k_prompts, k_eig)
    grid = np.logspace(np.log10(config.t_min), np.log10(config.t_max), config.num_times)
    results = {
        task: _task(
            s, config, grid, task, jax.random.fold_in(k_tasks, i), jax.random.fold_in(k_norm, i)
        )
        for i, task in enumerate(config.tasks)
    }
    grad_u_norm = float(np.linalg.norm(s.grad_u))
    return {
        "times": grid.tolist(),
        "eigenvalues": s.sf.values.tolist(),
        "trace": s.sf.trace,
        "grad_u_norm": grad_u_norm,
        "grad_u_fraction_in_M": float(np.linalg.norm(s.sf.basis @ s.grad_u) / grad_u_norm),
        "kl_grad_u_norm": s.kl.grad_norm,
        "kl_hessian_fisher_gap": s.kl.hessian_fisher_gap,
        "tasks": results,
    }


def _fmt(values: dict, spec: str = ".4f") -> str:
    return ", ".join(f"{t} {v:{spec}}" for t, v in values.items())


def _spans(windows: dict) -> str:
    return ", ".join(f"{t} [{w[0]:.0e}, {w[1]:.1e}]" for t, w in windows.items())


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Quartic onset and its coefficient with the correction, quadratic without; Δu reported."""
    tol, by_task = config.exponent_tolerance, results["tasks"]
    exp4 = {t: r["orthogonalized"]["projected_exponent"] for t, r in by_task.items()}
    exp2 = {t: r["raw"]["projected_exponent"] for t, r in by_task.items()}
    ratio = {t: r["orthogonalized"]["coefficient_ratio"] for t, r in by_task.items()}
    variants = ("orthogonalized", "raw")
    du_exp = {(t, v): r[v]["delta_u_exponent"] for t, r in by_task.items() for v in variants}
    windows = {t: r["orthogonalized"]["window"] for t, r in by_task.items()}
    windows_raw = {t: r["raw"]["window"] for t, r in by_task.items()}
    first_order_err = max(
        r[v]["first_order_max_rel_error"] for r in by_task.values() for v in variants
    )

    return [
        Claim(
            f"Cor. 6.3 on the {config.size} transformer: with P g(θ*) removed the projected "
            "alignment loss ½‖F^{1/2}P(θ(t)−θ*)‖² starts as t⁴",
            command,
            f"exponent 4 ± {tol} (d = {config.d}; windows [t_min, 1/(10‖H‖)]: {_spans(windows)})",
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
        Claim(
            "Behavioural: Δu of the hard-target REFUSE NLL along the transformer flows "
            "(θ* is not a stationary point of that u)",
            command,
            "reported: Δu ≈ ∇u(θ*)ᵀx + …, so a first-order term can hide the t⁴ onset",
            f"‖∇u(θ*)‖ = {results['grad_u_norm']:.3g} "
            f"(‖P∇u‖/‖∇u‖ = {results['grad_u_fraction_in_M']:.4f}); Δu = ∇u(θ*)ᵀx to "
            f"within {first_order_err:.1%} of max |Δu| in each window; Δu exponent there: "
            + ", ".join(
                f"{t}/{'ortho' if v == 'orthogonalized' else 'raw'} "
                + (f"{e:.2f}" if np.isfinite(e) else "n/a (Δu changes sign)")
                for (t, v), e in du_exp.items()
            ),
            True,
            labels=("measured", "measured"),
        ),
        *_kl_claims(results, config, command),
    ]


def _per_flow(by_task: dict, fn) -> dict:
    """``fn(kl entry)`` for every task and flow, keyed ``task/ortho`` and ``task/raw``."""
    return {
        f"{t}/{'ortho' if v == 'orthogonalized' else 'raw'}": fn(r[v]["kl"], r)
        for t, r in by_task.items()
        for v in ("orthogonalized", "raw")
    }


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
    )


def _kl_claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Thm 6.1 on ``Δu`` of the KL skill loss (θ* an exact minimum, ∇²u(θ*) = F)."""
    by_task, c = results["tasks"], config
    exps = _per_flow(by_task, lambda k, r: k["remainder_exponent"])
    drift = _per_flow(by_task, lambda k, r: k["cubic_drift_in_window"])
    cubic = _per_flow(by_task, lambda k, r: k["remainder_over_cubic"][0])
    violations = _per_flow(
        by_task,
        lambda k, r: (
            f"{k['bound_violations']}"
            + "".join(
                f" (t = {t:.1e}, 1/‖H‖ = {1 / r['H_norm']:.1e})"
                for t in k["bound_violation_times"][:1]
            )
        ),
    )
    n = c.forecast_times
    forecast = _per_flow(by_task, lambda k, r: max(abs(q - 1) for q in k["forecast_ratio"][:n]))
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
        Claim(
            "Thm 6.1, lower bound: Δu ≥ ½‖F^{1/2}Px‖² − C‖x‖³, C = max over the flow's "
            "directions of |⅙∇³u(θ*)[x̂,x̂,x̂]|",
            command,
            "0 violations at every saved time",
            _fmt(violations, "s") + " (first violating time shown)",
            all(
                r[v]["kl"]["bound_violations"] == 0
                for r in by_task.values()
                for v in ("raw", "orthogonalized")
            ),
        ),
        Claim(
            "§6 Taylor forecast of the KL Δu (series.delta_u_series, order 4) along the "
            "float64 flows",
            command,
            f"forecast / Δu = 1 ± {c.forecast_tolerance} at the {n} smallest times",
            "max |ratio − 1|: " + _fmt(forecast, ".1e"),
            all(q <= c.forecast_tolerance for q in forecast.values()),
        ),
    ]


FIGURE_NEEDS = ("tasks",)
TASKS_PER_ROW = 2  # 3 curves per task in panel (a): at most 6 per panel
VARIANTS = (
    ("-", r"$Pg(\theta^*)$ removed"),
    ("--", "raw"),
    (":", r"$\frac{1}{8}\tilde\gamma^2t^4$"),
)


def _onset_row(ax1, ax2, tasks_: list, first: int) -> None:
    """Panels (a) projected loss and (b) its local slope for up to ``TASKS_PER_ROW`` tasks."""
    for i, (_, r) in enumerate(tasks_, start=first):
        color = style.PALETTE[i % len(style.PALETTE)]
        o, w = r["orthogonalized"], r["raw"]
        ts = np.asarray(r["times"])
        quartic = r["report_orthogonalized"]["quartic_coefficient"] * ts**4
        for ys, (ls, _) in zip((o["projected"], w["projected"], quartic), VARIANTS, strict=True):
            ax1.loglog(ts, ys, ls, color=color, lw=0.9 if ls == ":" else None)
        ax2.semilogx(ts, o["local_slope_projected"], "-", color=color)
        ax2.semilogx(ts, w["local_slope_projected"], "--", color=color)
    ax1.set_ylabel(r"$\frac{1}{2}\|F^{1/2}P(\theta(t) - \theta^*)\|^2$")
    for level in (2, 4):
        ax2.axhline(level, color="gray", lw=0.5)
    ax2.set_ylabel(r"local slope $d\log(\cdot)/d\log t$")


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Projected loss of both flows per task against ⅛γ̃²t⁴, and its local log-log slope."""
    items, config = list(results["tasks"].items()), results["config"]
    chunks = range(0, len(items), TASKS_PER_ROW)
    fig, axes = style.subplots(2, len(chunks), height=2.8 * len(chunks) + 0.5)
    for (ax1, ax2), first in zip(axes, chunks, strict=True):
        _onset_row(ax1, ax2, items[first : first + TASKS_PER_ROW], first)
    for ax in axes[-1]:
        ax.set_xlabel(r"gradient-flow time $t$")
    axes[0, 0].set_title(f"(a) {config['size']} transformer, $d = {config['d']}$", loc="left")
    axes[0, 1].set_title("(b) onset exponent: 4 corrected, 2 raw", loc="left")
    handles = [
        Line2D([], [], color=style.PALETTE[i % len(style.PALETTE)], label=t.replace("_", " "))
        for i, (t, _) in enumerate(items)
    ] + [Line2D([], [], color="gray", ls=ls, label=label) for ls, label in VARIANTS]
    style.legend_below(fig, handles, [h.get_label() for h in handles], ncol=min(len(handles), 5))
    return style.save(fig, path)


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run both flows per task; write results and figure under ``outdir``."""
    require_x64(NAME)
    command = command or f"python -m experiments.{NAME}"
    results = compute(config, outdir)
    return finish(NAME, config, outdir, figure, claims(results, config, command), **results)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK, full_flag=True)
