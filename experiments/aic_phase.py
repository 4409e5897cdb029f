"""AIC phase diagram: alignment loss after a fixed time over (coupling κ, orthogonality ε).

docs/theory.md §4 construction: ``A = B + κ(uwᵀ + wuᵀ)`` with ``B`` block-diagonal in
``range(P) ⊕ range(P)^⊥`` and ``c = εp + c_⊥``. Every cell shares ``B, u, w,
p, c_⊥`` (one key) and ``F`` has no tail, so ``Δu = ½‖F^{1/2}Px‖²`` exactly.
Claims: with ``ε = 0`` the skill is untouched iff ``κ = 0`` (orthogonality is
stable exactly when curvature coupling is absent), and otherwise
``Δu(T) ≈ ⅛γ²T⁴ ∝ κ²``; over the whole grid ``Δu(T) > 0`` iff the AIC report
has ``γ > 0`` or ``‖F^{1/2}Pc‖ > 0``, and the series ``c₂T² + c₃T³ + c₄T⁴``
from the report's numbers predicts every cell to ``O(T‖A‖)``.

Run: ``python -m experiments.aic_phase [--quick]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from experiments import _style as style
from experiments._common import Claim, cli, float64_main, theory_sweep_cell
from geomcollapse import landscapes, theory

NAME = "aic_phase"


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    n: int = 64
    d: int = 3
    top: tuple[float, ...] = (3.0, 2.0, 1.0)
    kappas: tuple[float, ...] = (0.0, *np.logspace(-4, 0, 9))
    epsilons: tuple[float, ...] = (0.0, *np.logspace(-7, -1, 7))
    T: float = 0.01
    series_tolerance: float = 0.05  # |Δu / series − 1| ≤ this (O(T‖A‖))
    zero_level: float = 1e-28  # "untouched": Δu(T) below this (rounding of Px = 0)
    seed: int = 0


QUICK = Config(n=32)
TINY = Config(n=12, kappas=(0.0, 1e-3, 1e-1, 1.0), epsilons=(0.0, 1e-5, 1e-2))


def compute(config: Config) -> dict:
    """Δu(T), its series and the AIC numbers on every (κ, ε) cell; the results payload."""
    K, E = len(config.kappas), len(config.epsilons)
    du, series, gamma, fisher_orth = (np.zeros((K, E)) for _ in range(4))
    A_norm = 0.0
    key = jax.random.key(config.seed)
    for i, kappa in enumerate(config.kappas):
        for j, eps in enumerate(config.epsilons):
            L = landscapes.make_quadratic_landscape(
                key, config.n, config.d, top=config.top, tail_mass=0.0, epsilon=eps, kappa=kappa
            )
            r = L.aic(config.d)
            gamma[i, j], fisher_orth[i, j] = r.coupling, r.fisher_orthogonality
            # = Δu here (no tail); computed through M's basis, so an untouched
            # skill reads 0 to rounding instead of F's own rounding (~1e-20)
            du[i, j] = float(L.projected_loss(np.array([config.T]))[0])
            S = np.asarray(L.subspace(config.d).fisher_half_rows)  # F^{1/2}P
            co = theory.series_coefficients(np.asarray(L.A), np.asarray(L.c), S)
            T = config.T
            series[i, j] = co.c2 * T**2 + co.c3 * T**3 + co.c4 * T**4
            A_norm = max(A_norm, float(np.linalg.norm(np.asarray(L.A), 2)))
    active = (gamma > 1e-12) | (fisher_orth > 1e-12)  # predicted by the AIC report
    return {
        "delta_u": du.tolist(),
        "series": series.tolist(),
        "coupling": gamma.tolist(),
        "fisher_orthogonality": fisher_orth.tolist(),
        "gamma_exponent": float(np.polyfit(np.log(gamma[1:, 0]), np.log(du[1:, 0]), 1)[0]),
        "max_series_error": float(np.max(np.abs(du[active] / series[active] - 1))),
        "a_norm": A_norm,
    }


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """The two verdicts of Def. 5.1 (3) and the phase diagram."""
    du, gamma = np.asarray(results["delta_u"]), np.asarray(results["coupling"])
    predicted_active = (gamma > 1e-12) | (np.asarray(results["fisher_orthogonality"]) > 1e-12)
    agree = int(np.sum(predicted_active == (du > config.zero_level)))
    cells, slope, series_err = du.size, results["gamma_exponent"], results["max_series_error"]
    col = du[1:, 0]  # ε = 0, κ > 0
    quartic_ratio = col / (gamma[1:, 0] ** 2 / 8 * config.T**4)
    return [
        Claim(
            "Def. 5.1 (3) / docs/theory.md §4: with Pc = 0 the skill is untouched iff curvature "
            "coupling is absent (κ = 0 ⇒ γ = 0 ⇒ Δu ≡ 0)",
            command,
            f"Δu(T) ≤ {config.zero_level:.0e} at κ = 0, ε = 0; > 0 for every κ > 0; "
            "Δu(T) ∝ γ² (exponent 2 ± 0.01)",
            f"Δu(T) = {du[0, 0]:.1e} at κ = 0; min over κ > 0: {col.min():.2e}; "
            f"exponent in γ {slope:.4f}; Δu/(⅛γ²T⁴) ∈ [{quartic_ratio.min():.3f}, "
            f"{quartic_ratio.max():.3f}]",
            bool(du[0, 0] <= config.zero_level and col.min() > config.zero_level)
            and abs(slope - 2) <= 0.01,
        ),
        Claim(
            "Def. 5.1 phase diagram: Δu(T) > 0 exactly where the AIC report has γ > 0 or "
            "‖F^{1/2}Pc‖ > 0, and its series predicts the size",
            command,
            f"{cells}/{cells} cells classified alike; |Δu/(c₂T² + c₃T³ + c₄T⁴) − 1| "
            f"≤ {config.series_tolerance} (T‖A‖ ≤ {config.T * results['a_norm']:.2f})",
            f"{agree}/{cells} alike; max series error {series_err:.2e}",
            agree == cells and series_err <= config.series_tolerance,
        ),
    ]


FIGURE_NEEDS = ("delta_u",)


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Heat map of log₁₀ Δu(T) over (κ, ε); cells where the skill is untouched read 0."""
    config, du = results["config"], np.asarray(results["delta_u"])
    (K, E), eps, kappas = du.shape, config["epsilons"], config["kappas"]
    fig, axes = style.subplots(height=3.1)
    ax = axes[0, 0]
    image = ax.imshow(np.log10(np.maximum(du, 1e-32)), origin="lower", aspect="auto")
    ax.set_xticks(range(E), ["0"] + [style.sci(e) for e in eps[1:]], rotation=90)
    ax.set_yticks(range(K), ["0"] + [style.sci(k) for k in kappas[1:]])
    ax.set_xlabel(r"initial orthogonality $\varepsilon = \|Pc\|$")
    ax.set_ylabel(r"coupling strength $\kappa$")
    fig.colorbar(image, ax=ax, label=rf"$\log_{{10}}\,\Delta u(T)$, $T = {config['T']:g}$")
    for i, j in zip(*np.nonzero(du <= config["zero_level"]), strict=True):
        ax.text(j, i, "0", ha="center", va="center", color="white")
    return style.save(fig, path)


main = float64_main(NAME, Config(), compute, figure, claims)


def check_config(config: Config) -> None:
    """Refuse a config ``compute`` cannot run (the sweep checks every cell up front)."""
    if len(config.kappas) < 3 or not config.epsilons or not config.T > 0:
        raise ValueError(
            f"need ≥ 3 kappas (the γ exponent fits κ > 0), epsilons and T > 0, got "
            f"kappas={config.kappas}, epsilons={config.epsilons}, T={config.T}"
        )
    for kappa in config.kappas:
        for eps in config.epsilons:
            landscapes.make_quadratic_landscape(
                jax.random.key(config.seed),
                config.n,
                config.d,
                top=config.top,
                tail_mass=0.0,
                epsilon=eps,
                kappa=kappa,
            )


sweep_cell = theory_sweep_cell(
    NAME, compute, claims, ("gamma_exponent", "max_series_error", "a_norm", "coupling", "delta_u")
)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
