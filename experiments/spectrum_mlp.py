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
import numpy as np
from matplotlib.ticker import MaxNLocator

from experiments import _style as style
from experiments._common import Claim, cli, float64_main
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


def _operators(problem, key) -> tuple[dict, float]:
    """The Hessian, Fisher and empirical-Fisher matvecs at the trained point, and ‖Fv − Gv‖/‖Gv‖."""
    params, batch = problem.params, problem.batch

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
        "empirical_fisher": lambda u: efvp(params, u, batch),
    }
    return ops, fisher_ggn_rel


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
    ops, fisher_ggn_rel = _operators(problem, key)
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
    return {
        "n": cv.num_params(params),
        "fisher_ggn_rel": fisher_ggn_rel,
        "top": top,
        "density": density,
        "gram": linalg.empirical_fisher_eigenpairs(grads, config.k),
        "seconds": seconds,
        "loss": float(problem.loss(params, batch)),
    }


def _trace_estimate(density: linalg.SpectralDensity, n: int) -> tuple[float, float]:
    """Hutchinson trace from SLQ: ``n · mean_p Σ_j w_pj θ_pj`` and its standard error."""
    per_probe = n * np.sum(density.weights * density.nodes, axis=1)
    return float(per_probe.mean()), float(per_probe.std(ddof=1) / np.sqrt(per_probe.size))


def compute(config: Config) -> dict:
    """Spectra of the three operators, the trace estimate and the route checks; the payload."""
    s = _spectra(config)
    top = s["top"]
    tr_f, tr_f_se = _trace_estimate(s["density"]["fisher"], s["n"])
    lanczos_vs_gram = float(
        np.max(np.abs(np.asarray(top["empirical_fisher"].values) - np.asarray(s["gram"].values)))
        / float(s["gram"].values[0])
    )
    return {
        "num_params": s["n"],
        "train_loss": s["loss"],
        "eigenvalues": {name: np.asarray(r.values).tolist() for name, r in top.items()},
        "gram_eigenvalues": np.asarray(s["gram"].values).tolist(),
        "max_relative_residual": {
            name: float(np.max(np.asarray(r.residuals)) / abs(float(r.values[0])))
            for name, r in top.items()
        },
        "matvecs": {name: r.num_matvecs for name, r in top.items()},
        "lanczos_seconds": s["seconds"],
        "fisher_trace": [tr_f, tr_f_se],
        "fisher_top_d_share": float(np.sum(np.asarray(top["fisher"].values)[: config.d]) / tr_f),
        "fisher_ggn_rel": s["fisher_ggn_rel"],
        "lanczos_vs_gram": lanczos_vs_gram,
        "densities": {
            name: {"nodes": np.asarray(d.nodes).tolist(), "weights": np.asarray(d.weights).tolist()}
            for name, d in s["density"].items()
        },
    }


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Fisher = GGN, Lanczos certified against the Gram route, and the concentration control."""
    rel, gram_gap = results["fisher_ggn_rel"], results["lanczos_vs_gram"]
    max_res = max(results["max_relative_residual"].values())
    share, (tr_f, tr_f_se) = results["fisher_top_d_share"], results["fisher_trace"]
    fisher_vals = results["eigenvalues"]["fisher"]
    return [
        Claim(
            "docs/theory.md §1: softmax Fisher F = GGN Jᵀ(diag p − ppᵀ)J of the cross-entropy",
            command,
            "‖Fv − Gv‖/‖Gv‖ = 0 (≤ 1e-12 in float64)",
            f"{rel:.1e}",
            rel <= 1e-12,
        ),
        Claim(
            "Engine: Lanczos top-k certified by residuals and equal to the exact Gram route",
            command,
            f"max ‖Av − λv‖/λ₁ ≤ {config.tol:g}; |λ_Lanczos − λ_Gram|/λ₁ ≤ 1e-8",
            f"max residual {max_res:.1e}; Gram gap {gram_gap:.1e}",
            max_res <= config.tol and gram_gap <= 1e-8,
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


FIGURE_NEEDS = ("eigenvalues", "num_params", "densities")
LABELS = {
    "hessian": r"Hessian $H$",
    "fisher": r"Fisher $F$ (= GGN)",
    "empirical_fisher": "empirical Fisher",
}


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Top-k eigenvalues of H, F and the empirical Fisher, and their SLQ densities."""
    config = results["config"]
    fig, axes = style.subplots(2, height=2.8)
    ax1, ax2 = axes[0]
    for (name, vals), marker in zip(results["eigenvalues"].items(), "os^", strict=True):
        vals = np.asarray(vals)
        idx = np.arange(1, vals.size + 1)
        ax1.semilogy(idx[vals > 0], vals[vals > 0], marker + "-", ms=3, label=LABELS[name])
    ax1.axvline(config["d"] + 0.5, color="gray", ls=":", lw=0.8)
    ax1.text(
        config["d"] + 0.7,
        0.97,
        f"$d = {config['d']}$",
        transform=ax1.get_xaxis_transform(),
        va="top",
    )
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel(r"eigenvalue index $i$")
    ax1.set_ylabel(r"$\lambda_i$ (Lanczos)")
    ax1.set_title(f"(a) top {config['k']}, {results['num_params']:,} parameters", loc="left")
    densities = {
        name: linalg.SpectralDensity(np.asarray(d["nodes"]), np.asarray(d["weights"]))
        for name, d in results["densities"].items()
    }
    lo = min(float(np.min(d.nodes)) for d in densities.values())
    hi = max(float(np.max(d.nodes)) for d in densities.values())
    grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 800)
    sigma = (hi - lo) / 80
    for name, dens in densities.items():
        ax2.semilogy(
            grid, linalg.density_on_grid(dens, grid, sigma=sigma) + 1e-12, label=LABELS[name]
        )
    ax2.set_ylim(1e-6, None)
    ax2.set_xlabel(r"eigenvalue $\lambda$")
    ax2.set_ylabel(rf"spectral density ($\sigma = {sigma:.2g}$)")
    ax2.set_title(
        f"(b) SLQ, {config['slq_probes']} probes × {config['slq_steps']} steps", loc="left"
    )
    style.legend_below(fig, ncol=3)
    return style.save(fig, path)


main = float64_main(NAME, Config(), compute, figure, claims)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
