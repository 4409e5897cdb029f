"""The refusal skill's Fisher at θ* on a transformer, and the AIC for every benign task.

At the aligned transformer ``θ*`` (float64):

* the true skill Fisher ``F`` (labels from the model = GGN of ``u``) by the core
  engine's Fisher-VP + Lanczos (top-k), its exact trace from per-prompt logit
  Jacobians, hence the fraction of ``tr F`` held by the top ``d`` (low-rank
  concentration, AIC condition 1);
* the empirical Fisher ``GᵀG/N`` from per-prompt gradients of ``−log p(REFUSE)``
  (exact, via the Gram matrix) for comparison — at a minimum of ``u`` it
  vanishes, so it must not stand in for ``F``; agreement of the two top
  subspaces (overlap ``‖V_F V_Eᵀ‖²_F / d`` and largest principal angle);
* the AIC report (tail mass, ``λ_d``, ``‖Pg‖``, ``‖F^{1/2}Pg‖``, ``γ``) of every
  benign task's loss at ``θ*``, in one table; with the fine-tuning results of
  ``transformer_finetune`` present, the rank correlation of each AIC number
  with the measured harm.

Run: ``python -m experiments.transformer_fisher [--full]``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments._common import ROOT, Claim, cli, finish, require_x64
from experiments._transformer import aligned_model, flat, rows
from geomcollapse import aic, curvature, flow, linalg, models, pipeline, tasks, theory, training

NAME = "transformer_fisher"
FULL_FLAG = True


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    size: str = "small"  # a key of experiments._transformer.ALIGNMENT
    num_prompts: int = 128  # harmful prompts defining F
    top_k: int = 50
    d: int = 10  # dim M for the AIC
    concentration_top: int = 50  # claim: the top-k hold ≥ concentration_target of tr F
    concentration_target: float = 0.8
    tol: float = 1e-6
    task_examples: int = 128  # examples per benign task for g, Hg
    tasks: tuple[str, ...] = tuple(tasks.BENIGN_TASKS)
    seed: int = 0


QUICK = Config(size="tiny")
TINY = Config(
    size="tiny-fast",
    num_prompts=32,
    top_k=12,
    d=4,
    concentration_top=12,
    task_examples=32,
    tasks=("shift", "always_answer"),
)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Spectra, route agreement and AIC table; write results and figure under ``outdir``."""
    require_x64(NAME)
    command = command or f"python -m experiments.{NAME}"
    aligned = aligned_model(config.size, outdir)
    graphdef, params = aligned.as_dtype(jnp.float64)
    logits = models.transformer_logits(graphdef)
    k_prompts, k_eig, k_tasks = jax.random.split(jax.random.key(config.seed + 1000), 3)
    harmful = tasks.harmful_prompts(k_prompts, config.num_prompts)
    n = curvature.num_params(params)

    # true Fisher: Lanczos on the matrix-free Fisher-VP; exact trace from Jacobians
    fvp = pipeline.skill_fisher_vp(logits, params, harmful)
    pairs = linalg.top_eigenpairs(fvp, params, config.top_k, key=k_eig, tol=config.tol)
    lam = np.asarray(pairs.values, np.float64)
    V = rows(pairs.vectors)
    trace = pipeline.skill_fisher_trace(logits, params, harmful)
    # empirical Fisher: exact, from per-prompt gradients
    G = rows(pipeline.skill_per_example_gradients(logits, params, harmful))
    emp = linalg.empirical_fisher_eigenpairs(G, config.top_k)
    lam_e = np.asarray(emp.values, np.float64)
    V_e = np.asarray(emp.vectors, np.float64)
    trace_e = float(np.sum(G**2) / G.shape[0])

    dims = sorted({1, 5, config.d, 20, config.top_k} & set(range(1, config.top_k + 1)))
    frac = {d: float(lam[:d].sum() / trace) for d in dims}
    frac_e = {d: float(lam_e[:d].sum() / trace_e) for d in dims}
    overlap = {d: float(np.sum((V[:d] @ V_e[:d].T) ** 2) / d) for d in dims if d <= 10}
    angle = {d: flow.principal_angle(V[:d], V_e[:d]) for d in dims if d <= 10}

    # the AIC for each benign task's loss at θ*
    d = config.d
    Vd = V[:d]
    loss = training.sequence_loss(logits)
    unravel = ravel_pytree(params)[1]
    table = {}
    for i, task in enumerate(config.tasks):
        batch = tasks.benign_task(jax.random.fold_in(k_tasks, i), task, config.task_examples)
        batch = batch.truncated()
        g, Hg = aic.gradient_and_hg(loss, params, (batch.tokens, batch.targets, batch.mask))
        g, Hg = np.asarray(g, np.float64), np.asarray(Hg, np.float64)
        g_perp = g - Vd.T @ (Vd @ g)
        tail_q = float(g_perp @ np.asarray(flat(fvp(unravel(jnp.asarray(g_perp))))))
        report = theory.aic_report(
            np.append(lam[:d], trace - lam[:d].sum()), d, g, Hg, Vd, tail_quadratic=tail_q
        )
        table[task] = {
            **report._asdict(),
            "gradient_norm": float(np.linalg.norm(g)),
            "overlap_score": float(np.linalg.norm(Vd @ g) / np.linalg.norm(g)),
        }

    harm_corr = {}
    finetune_json = outdir / "experiments" / "results" / "transformer_finetune.json"
    if finetune_json.exists():
        ft = json.loads(finetune_json.read_text())
        harm = ft.get("harmfulness", {}).get("full", {})
        du = ft.get("delta_u_full", {})
        common = [t for t in config.tasks if t in du]
        if ft["config"]["size"] == config.size and len(common) >= 3:
            for key in ("orthogonality", "fisher_orthogonality", "coupling", "overlap_score"):
                x = np.array([table[t][key] for t in common])
                harm_corr[key] = {
                    "delta_u": _spearman(x, np.array([du[t] for t in common])),
                    "harmfulness": _spearman(x, np.array([harm[t] for t in common])),
                }

    top = config.concentration_top
    claims = [
        Claim(
            "Skill Fishers are sharply low-rank (Section 7; AIC condition 1) — true Fisher of "
            f"the refusal skill on the {config.size} transformer",
            command,
            f"top {top} of n = {n} eigenvalues hold ≥ {config.concentration_target:.0%} of tr F",
            "fraction of tr F in the top d: "
            + ", ".join(f"d={k}: {v:.3f}" for k, v in frac.items())
            + f" (tr F = {trace:.4g}, λ₁ = {lam[0]:.4g}, λ_{d} = {lam[d - 1]:.4g})",
            frac[top] >= config.concentration_target,
        ),
        Claim(
            "True (GGN) vs empirical skill Fisher at θ*: top subspaces and concentration",
            command,
            "reported; the empirical Fisher is not the default (it vanishes at a minimum of u)",
            "overlap ‖V_F V_Eᵀ‖²/d: "
            + ", ".join(f"d={k}: {v:.3f}" for k, v in overlap.items())
            + "; largest principal angle: "
            + ", ".join(f"d={k}: {v:.2f} rad" for k, v in angle.items())
            + f"; empirical tr = {trace_e:.4g} vs true {trace:.4g}, top-1 fraction "
            f"{frac_e[1]:.3f} vs {frac[1]:.3f}",
            True,
            labels=("measured", "measured"),
        ),
        Claim(
            f"AIC at θ* for every benign task (d = {d})",
            command,
            "reported: ‖Pg‖, ‖F^{1/2}Pg‖, γ = ‖F^{1/2}PHg‖ per task (table in results JSON)",
            "; ".join(
                f"{t}: ‖Pg‖ {r['orthogonality']:.3g}, γ {r['coupling']:.3g}"
                for t, r in table.items()
            )
            + (
                "; Spearman(γ, Δu after fine-tuning) = "
                f"{harm_corr['coupling']['delta_u']:.2f}, Spearman(‖F^{{1/2}}Pg‖, Δu) = "
                f"{harm_corr['fisher_orthogonality']['delta_u']:.2f}"
                if harm_corr
                else ""
            ),
            True,
            labels=("measured", "measured"),
        ),
    ]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    idx = np.arange(1, config.top_k + 1)
    ax.semilogy(idx, np.maximum(lam, 1e-300), "o-", ms=3, label="true Fisher (Lanczos)")
    ax.semilogy(idx, np.maximum(lam_e, 1e-300), "s-", ms=3, label="empirical Fisher (exact)")
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue λ_i")
    ax.set_title(f"Refusal-skill Fisher at θ*, top {config.top_k} of n = {n}")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(idx, np.cumsum(lam) / trace, "o-", ms=3, label="true Fisher")
    ax.plot(idx, np.cumsum(lam_e) / trace_e, "s-", ms=3, label="empirical Fisher")
    ax.axvline(d, color="gray", ls=":", lw=1, label=f"d = {d}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("d")
    ax.set_ylabel("fraction of the trace in the top d")
    ax.legend(fontsize=8)
    ax = axes[2]
    names = list(table)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [table[t]["coupling"] for t in names], 0.4, label="γ = ‖F^{1/2}PHg‖")
    ax.bar(pos + 0.2, [table[t]["fisher_orthogonality"] for t in names], 0.4, label="‖F^{1/2}Pg‖")
    ax.set_yscale("log")
    ax.set_xticks(pos, names, rotation=30, fontsize=7)
    ax.set_title(f"AIC at θ* per benign task (d = {d})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish(
        NAME,
        config,
        outdir,
        fig,
        claims,
        num_params=n,
        eigenvalues=lam.tolist(),
        eigenvalues_found=np.asarray(pairs.found).tolist(),
        lanczos_matvecs=int(pairs.num_matvecs),
        trace=trace,
        empirical_eigenvalues=lam_e.tolist(),
        empirical_trace=trace_e,
        fraction_of_trace=frac,
        empirical_fraction_of_trace=frac_e,
        subspace_overlap=overlap,
        principal_angle=angle,
        aic_table=table,
        rank_correlation_with_harm=harm_corr,
    )


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK, full_flag=True)
