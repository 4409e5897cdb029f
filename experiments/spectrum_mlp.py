"""Curvature spectra of a small MLP classifier: Hessian, Fisher (= GGN) and empirical Fisher.

Checks, with the core engine only: the softmax Fisher-VP equals the GGN-VP of
the cross-entropy (docs/theory.md §1); Lanczos top-k is certified by its residuals and
agrees with the independent Gram route on the empirical Fisher; how much of
the Fisher's trace sits in its top ``d`` eigenvalues (low-rank concentration,
Def. 5.1 (1); Section 7 finds skill Fishers sharply low-rank). Writes
``experiments/results/spectrum_mlp.json`` and ``figures/spectrum_mlp.png``.

Run: ``python -m experiments.spectrum_mlp [--quick]``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from experiments._common import ROOT, Claim, cli, finish, require_x64
from geomcollapse import curvature as cv
from geomcollapse import linalg, models

NAME = "spectrum_mlp"


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    sizes: tuple[int, ...] = (784, 128, 128, 10)
    num_examples: int = 512
    gd_steps: int = 5
    learning_rate: float = 0.1
    k: int = 30  # eigenpairs per operator
    d: int = 9  # M's dimension: C − 1 outliers expected for C classes
    tol: float = 1e-8
    slq_probes: int = 16
    slq_steps: int = 80
    concentration_threshold: float = 0.5  # verdict: top-d share of tr(F) at least this
    seed: int = 0


QUICK = Config(sizes=(784, 64, 64, 10), k=20, slq_probes=8, slq_steps=60)
TINY = Config(sizes=(20, 16, 16, 5), num_examples=64, k=8, d=4, slq_probes=4, slq_steps=20)


def _spectra(config: Config) -> dict:
    key = jax.random.key(config.seed)
    problem = models.mlp_problem(
        key,
        config.sizes,
        config.num_examples,
        gd_steps=config.gd_steps,
        learning_rate=config.learning_rate,
        dtype=jnp.float64,
    )
    params, batch = problem.params, problem.batch
    n = cv.num_params(params)

    def ce(z, b):
        return models.softmax_cross_entropy(z, b.y)

    hvp = jax.jit(cv.hessian_vp(problem.loss))
    fvp = jax.jit(cv.fisher_vp(problem.logits))
    ggn = jax.jit(cv.ggn_vp(problem.logits, ce))
    efvp = jax.jit(cv.empirical_fisher_vp(problem.example_loss))

    # Fisher-VP = GGN-VP for softmax cross-entropy (docs/theory.md §1).
    flat, unravel = cv.ravel(params)
    v = unravel(jax.random.normal(jax.random.fold_in(key, 1), flat.shape, flat.dtype))
    f_v, g_v = cv.ravel(fvp(params, v, batch))[0], cv.ravel(ggn(params, v, batch))[0]
    fisher_ggn_rel = float(jnp.linalg.norm(f_v - g_v) / jnp.linalg.norm(g_v))

    ops = {
        "hessian": lambda u: hvp(params, u, batch),
        "fisher": lambda u: fvp(params, u, batch),
        "empirical_fisher": lambda u: efvp(
            params,
            u,
            batch,
        ),
    }
    top, density, seconds = {}, {}, {}
    for i, (name, op) in enumerate(ops.items()):
        t0 = time.perf_counter()
        top[name] = linalg.top_eigenpairs(
            op, params, config.k, key=jax.random.fold_in(key, 10 + i), tol=config.tol, progress=True
        )
        seconds[name] = time.perf_counter() - t0
        density[name] = linalg.spectral_density(
            op,
            params,
            key=jax.random.fold_in(key, 20 + i),
            num_probes=config.slq_probes,
            num_steps=config.slq_steps,
            progress=True,
        )
    grads = jax.jit(cv.per_example_gradients(problem.example_loss))(params, batch)
    gram = linalg.empirical_fisher_eigenpairs(grads, config.k)
    return {
        "n": n,
        "fisher_ggn_rel": fisher_ggn_rel,
        "top": top,
        "density": density,
        "gram": gram,
        "seconds": seconds,
        "loss": float(problem.loss(params, batch)),
    }


def _trace_estimate(density: linalg.SpectralDensity, n: int) -> tuple[float, float]:
    """Hutchinson trace from SLQ: ``n · mean_p Σ_j w_pj θ_pj`` and its standard error."""
    per_probe = n * np.sum(density.weights * density.nodes, axis=1)
    return float(per_probe.mean()), float(per_probe.std(ddof=1) / np.sqrt(per_probe.size))


def _figure(config: Config, s: dict):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"hessian": "o-", "fisher": "s-", "empirical_fisher": "^-"}
    labels = {
        "hessian": "Hessian H",
        "fisher": "Fisher F (= GGN)",
        "empirical_fisher": "empirical Fisher",
    }
    for name, res in s["top"].items():
        vals = np.asarray(res.values)
        idx = np.arange(1, vals.size + 1)
        pos = vals > 0
        ax1.semilogy(idx[pos], vals[pos], styles[name], ms=4, label=labels[name])
    ax1.axvline(config.d + 0.5, color="gray", ls=":", label=f"d = {config.d}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("eigenvalue index i")
    ax1.set_ylabel(f"λ_i (Lanczos, tol {config.tol:.0e})")
    ax1.set_title(
        f"Top-{config.k} eigenvalues, MLP {'-'.join(map(str, config.sizes))} ({s['n']:,} params)"
    )
    ax1.legend(fontsize=8)
    lo = min(float(np.min(d.nodes)) for d in s["density"].values())
    hi = max(float(np.max(d.nodes)) for d in s["density"].values())
    grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 800)
    sigma = (hi - lo) / 80
    for name, dens in s["density"].items():
        ax2.semilogy(
            grid, linalg.density_on_grid(dens, grid, sigma=sigma) + 1e-12, label=labels[name]
        )
    ax2.set_ylim(1e-6, None)
    ax2.set_xlabel("eigenvalue λ")
    ax2.set_ylabel(f"spectral density (SLQ, σ = {sigma:.2g})")
    ax2.set_title(f"SLQ densities ({config.slq_probes} probes × {config.slq_steps} steps)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(config: Config = Config(), outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run the experiment; write results and figure under ``outdir``; return the results."""
    require_x64(NAME)
    s = _spectra(config)
    top = s["top"]
    tr_f, tr_f_se = _trace_estimate(s["density"]["fisher"], s["n"])
    fisher_vals = np.asarray(top["fisher"].values)
    share = float(np.sum(fisher_vals[: config.d]) / tr_f)
    lanczos_vs_gram = float(
        np.max(np.abs(np.asarray(top["empirical_fisher"].values) - np.asarray(s["gram"].values)))
        / float(s["gram"].values[0])
    )
    max_res = {
        name: float(np.max(np.asarray(r.residuals)) / abs(float(r.values[0])))
        for name, r in top.items()
    }
    claims = [
        Claim(
            "docs/theory.md §1: softmax Fisher F = GGN Jᵀ(diag p − ppᵀ)J of the cross-entropy",
            command,
            "‖Fv − Gv‖/‖Gv‖ = 0 (≤ 1e-12 in float64)",
            f"{s['fisher_ggn_rel']:.1e}",
            s["fisher_ggn_rel"] <= 1e-12,
        ),
        Claim(
            "Engine: Lanczos top-k certified by residuals and equal to the exact Gram route",
            command,
            f"max ‖Av − λv‖/λ₁ ≤ {config.tol:g}; |λ_Lanczos − λ_Gram|/λ₁ ≤ 1e-8",
            f"max residual {max(max_res.values()):.1e}; Gram gap {lanczos_vs_gram:.1e}",
            max(max_res.values()) <= config.tol and lanczos_vs_gram <= 1e-8,
        ),
        Claim(
            f"Control for Def. 5.1 (1): is a whole-task classifier Fisher concentrated in its "
            f"top d = {config.d}? (Sec. 7 claims it for skill Fishers: issue #4)",
            command,
            f"concentrated means Σ_{{i≤d}} λ_i / tr F ≥ {config.concentration_threshold}",
            f"{share:.3f} (tr F = {tr_f:.4g} ± {tr_f_se:.2g}, Hutchinson/SLQ); "
            f"λ_d/λ_(d+1) = {fisher_vals[config.d - 1] / fisher_vals[config.d]:.2f}",
            share >= config.concentration_threshold,
            labels=("concentrated", "not concentrated (control)"),
        ),
    ]
    fig = _figure(config, s)
    return finish(
        NAME,
        config,
        outdir,
        fig,
        claims,
        num_params=s["n"],
        train_loss=s["loss"],
        eigenvalues={name: np.asarray(r.values).tolist() for name, r in top.items()},
        gram_eigenvalues=np.asarray(s["gram"].values).tolist(),
        max_relative_residual=max_res,
        matvecs={name: r.num_matvecs for name, r in top.items()},
        lanczos_seconds=s["seconds"],
        fisher_trace=[tr_f, tr_f_se],
        fisher_top_d_share=share,
        fisher_ggn_rel=s["fisher_ggn_rel"],
    )


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
