"""The quartic onset on a real network: gradient flow from the aligned transformer θ*.

From ``θ*`` (float64), the gradient flow (diffrax Dopri8) of a benign task's
loss, (i) as is and (ii) with ``P g(θ*)`` removed, ``L̃(θ) = L(θ) − ⟨P g(θ*), θ⟩``
(docs/theory.md §5: same Hessian, ``P g̃ = 0``). ``P`` projects on the top-``d``
eigenvectors of the true skill Fisher. Along each flow: the projected loss
``½‖F^{1/2}P(θ(t) − θ*)‖²`` and ``Δu(t)``. Predicted: onset exponent 4 for (ii)
with ``t⁴`` coefficient ``⅛γ̃²``, ``γ̃ = ‖F^{1/2}PH(I−P)g‖`` (the AIC report of
``L̃``), and exponent 2 for (i), inside the windows set by ``t_c`` and ``1/‖H‖``.

Run: ``python -m experiments.transformer_onset [--full]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments._common import ROOT, Claim, cli, finish, require_x64
from experiments._transformer import rows, skill_fisher
from geomcollapse import aic, curvature, flow, linalg, tasks, theory, training

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


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run both flows per task; write results and figure under ``outdir``."""
    require_x64(NAME)
    command = command or f"python -m experiments.{NAME}"
    k_prompts, k_eig, k_tasks, k_norm = jax.random.split(jax.random.key(config.seed + 2000), 4)
    sf = skill_fisher(
        config.size,
        outdir,
        num_prompts=config.num_prompts,
        k=config.d,
        prompt_key=k_prompts,
        lanczos_key=k_eig,
        tol=1e-8,
    )
    params, logits, harmful = sf.params, sf.logits, sf.harmful
    lam, V, trace = sf.values, sf.basis, sf.trace
    _, unravel = ravel_pytree(params)
    short = harmful.prompts_only()
    u = training.skill_loss(logits)
    # Δu = u(θ* + x) − u(θ*) by the cancellation-free line integral (flow.skill_change)
    skill_change = jax.jit(
        lambda xs: flow.skill_change(u, params, xs, args=(short.tokens, short.answer_start))
    )
    grad_u = np.asarray(
        ravel_pytree(jax.jit(jax.grad(u))(params, short.tokens, short.answer_start))[0]
    )
    grid = np.logspace(np.log10(config.t_min), np.log10(config.t_max), config.num_times)
    loss = _loss_with_correction(logits)
    hvp = curvature.hessian_vp(training.sequence_loss(logits))
    projected_loss = jax.jit(jax.vmap(sf.subspace.projected_loss))  # ½‖F^{1/2}Px(t)‖²

    results = {}
    for i, task in enumerate(config.tasks):
        batch = tasks.benign_task(jax.random.fold_in(k_tasks, i), task, config.task_examples)
        data = (jnp.asarray(batch.tokens), jnp.asarray(batch.targets), jnp.asarray(batch.mask))
        zero = jax.tree.map(jnp.zeros_like, params)
        g, Hg = aic.gradient_and_hg(loss, params, (*data, zero))
        g = np.asarray(g, np.float64)
        corr = sf.subspace.project(unravel(jnp.asarray(g)))  # P g(θ*)
        g_t, Hg_t = aic.gradient_and_hg(loss, params, (*data, corr))  # g̃ = (I−P)g, H g̃
        tail_mass = trace - lam.sum()
        raw = theory.aic_report(sf.subspace, g, np.asarray(Hg), tail_mass=tail_mass)
        ortho = theory.aic_report(
            sf.subspace, np.asarray(g_t), np.asarray(Hg_t), tail_mass=tail_mass
        )
        H_norm = float(
            np.abs(
                linalg.top_eigenpairs(
                    jax.jit(lambda v, data=data: hvp(params, v, *data)),
                    params,
                    1,
                    key=jax.random.fold_in(k_norm, i),
                    tol=1e-3,
                    which="magnitude",
                ).values[0]
            )
        )
        variants = (
            ("orthogonalized", corr, ortho, "quartic"),
            ("raw", zero, raw, "quadratic"),
        )
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
            window = windows[name]
            path = flow.ode_flow(loss, params, ts, args=(*data, c), rtol=config.rtol)
            X = rows(path.displacement)
            projected = np.asarray(projected_loss(path.displacement), np.float64)
            delta_u = np.asarray(skill_change(path.displacement).delta_u, np.float64)
            first_order = X @ grad_u  # ∇u(θ*)ᵀx
            fit = theory.fit_exponent(ts, projected, window)
            entry = {
                "window": list(window),
                "projected": projected.tolist(),
                "delta_u": delta_u.tolist(),
                "first_order_delta_u": first_order.tolist(),
                "projected_exponent": fit.exponent,
                "local_slope_projected": theory.local_slope(ts, projected).tolist(),
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
            if name == "orthogonalized":
                entry["coefficient_ratio"] = float(
                    projected[0] / (ortho.quartic_coefficient * ts[0] ** 4)
                )
            out[name] = entry
        results[task] = out

    tol = config.exponent_tolerance
    exp4 = {t: r["orthogonalized"]["projected_exponent"] for t, r in results.items()}
    exp2 = {t: r["raw"]["projected_exponent"] for t, r in results.items()}
    ratio = {t: r["orthogonalized"]["coefficient_ratio"] for t, r in results.items()}
    du_exp = {
        (t, v): r[v]["delta_u_exponent"]
        for t, r in results.items()
        for v in ("orthogonalized", "raw")
    }
    windows = {t: r["orthogonalized"]["window"] for t, r in results.items()}
    windows_raw = {t: r["raw"]["window"] for t, r in results.items()}
    grad_u_norm = float(np.linalg.norm(grad_u))
    first_order_err = max(
        r[v]["first_order_max_rel_error"]
        for r in results.values()
        for v in ("orthogonalized", "raw")
    )
    grad_u_in_M = float(np.linalg.norm(V @ grad_u) / grad_u_norm)

    def fmt(values: dict, spec: str = ".4f") -> str:
        return ", ".join(f"{t} {v:{spec}}" for t, v in values.items())

    claims = [
        Claim(
            f"Cor. 6.3 on the {config.size} transformer: with P g(θ*) removed the projected "
            "alignment loss ½‖F^{1/2}P(θ(t)−θ*)‖² starts as t⁴",
            command,
            f"exponent 4 ± {tol} (d = {config.d}; windows [t_min, 1/(10‖H‖)]: "
            + ", ".join(f"{t} [{w[0]:.0e}, {w[1]:.1e}]" for t, w in windows.items())
            + ")",
            fmt(exp4),
            all(abs(v - 4) <= tol for v in exp4.values()),
        ),
        Claim(
            "Cor. 6.3: the transformer's t⁴ coefficient is ⅛γ̃², γ̃ = ‖F^{1/2}PH(I−P)g‖ "
            "from the AIC report of the orthogonalised loss",
            command,
            f"projected / (⅛γ̃²t⁴) = 1 ± {config.coefficient_tolerance} at t = {grid[0]:.0e}",
            fmt(ratio),
            all(abs(v - 1) <= config.coefficient_tolerance for v in ratio.values()),
        ),
        Claim(
            "Without the correction (P g(θ*) ≠ 0) the transformer's projected loss starts as t²",
            command,
            f"exponent 2 ± {tol} (windows [t_min, t_c/100]: "
            + ", ".join(f"{t} [{w[0]:.0e}, {w[1]:.1e}]" for t, w in windows_raw.items())
            + ")",
            fmt(exp2),
            all(abs(v - 2) <= tol for v in exp2.values()),
        ),
        Claim(
            "Δu itself along the transformer flows (θ* is not a stationary point of u)",
            command,
            "reported: Δu ≈ ∇u(θ*)ᵀx + …, so a first-order term can hide the t⁴ onset",
            f"‖∇u(θ*)‖ = {grad_u_norm:.3g} (‖P∇u‖/‖∇u‖ = {grad_u_in_M:.4f}); Δu = ∇u(θ*)ᵀx to "
            f"within {first_order_err:.1%} of max |Δu| in each window; Δu exponent there: "
            + ", ".join(
                f"{t}/{'ortho' if v == 'orthogonalized' else 'raw'} "
                + (f"{e:.2f}" if np.isfinite(e) else "n/a (Δu changes sign)")
                for (t, v), e in du_exp.items()
            ),
            True,
            labels=("measured", "measured"),
        ),
    ]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, (task, r) in enumerate(results.items()):
        o, w = r["orthogonalized"], r["raw"]
        gamma2 = r["report_orthogonalized"]["quartic_coefficient"]
        ts = np.asarray(r["times"])
        axes[0].loglog(ts, o["projected"], f"C{i}-", label=f"{task}: (ii) P g removed")
        axes[0].loglog(ts, w["projected"], f"C{i}--", label=f"{task}: (i) raw")
        axes[0].loglog(ts, gamma2 * ts**4, f"C{i}:", lw=1, label=f"{task}: ⅛γ̃²t⁴")
        axes[1].semilogx(ts, o["local_slope_projected"], f"C{i}-")
        axes[1].semilogx(ts, w["local_slope_projected"], f"C{i}--")
    axes[0].set_xlabel("gradient-flow time t")
    axes[0].set_ylabel("½‖F^{1/2}P(θ(t) − θ*)‖²")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{config.size} transformer, d = {config.d}")
    for level in (2, 4):
        axes[1].axhline(level, color="gray", lw=0.6)
    axes[1].set_xlabel("gradient-flow time t")
    axes[1].set_ylabel("local slope d log / d log t")
    axes[1].set_title("onset exponent: 4 with P g removed, 2 without")
    fig.tight_layout()
    return finish(
        NAME,
        config,
        outdir,
        fig,
        claims,
        times=grid.tolist(),
        eigenvalues=lam.tolist(),
        trace=trace,
        grad_u_norm=grad_u_norm,
        grad_u_fraction_in_M=grad_u_in_M,
        tasks=results,
    )


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK, full_flag=True)
