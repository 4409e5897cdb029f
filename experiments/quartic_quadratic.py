"""Quartic onset on a quadratic landscape (Thm 6.1, Thm 6.2, Cor. 6.3; docs/theory.md §4).

With ``Pc = 0`` the projected loss ``½‖F^{1/2}Px(t)‖²`` follows ``⅛γ²t⁴`` from
``t = 0``; ``Δu`` adds the tail's quadratic floor until the quartic overtakes
it near ``2(cᵀ(I−P)F(I−P)c)^{1/2}/γ``. Exact flow, float64, ≥ 6 decades of t.
Writes ``experiments/results/quartic_quadratic.json`` and ``figures/quartic_quadratic.png``.

Run: ``python -m experiments.quartic_quadratic [--quick]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from experiments import _style as style
from experiments._common import Claim, cli, float64_main, theory_sweep_cell
from geomcollapse import landscapes, theory
from geomcollapse.subspace import Subspace

NAME = "quartic_quadratic"


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    n: int = 256
    d: int = 8
    top: tuple[float, ...] = (8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5)
    tail_mass: float = 0.5
    coupling: float = 1.0
    t_min: float = 1e-6
    t_max: float = 1.0
    num_times: int = 361
    seed: int = 0


QUICK = Config(n=64, d=4, top=(4.0, 3.0, 2.0, 1.0), tail_mass=0.2, num_times=241)
TINY = Config(n=16, d=2, top=(2.0, 1.0), tail_mass=0.1, num_times=121)


def _landscape(config: Config):
    """The config's quadratic landscape (ε = 0: ``Pc = 0``)."""
    return landscapes.make_quadratic_landscape(
        jax.random.key(config.seed),
        config.n,
        config.d,
        top=config.top,
        tail_mass=config.tail_mass,
        epsilon=0.0,
        coupling=config.coupling,
    )


def compute(config: Config) -> dict:
    """The exact flow's Δu and projected loss, the AIC report and the onset fit; the payload."""
    L = _landscape(config)
    r = L.aic(config.d)
    ts = np.logspace(np.log10(config.t_min), np.log10(config.t_max), config.num_times)
    projected = np.asarray(L.projected_loss(ts))
    delta_u = np.asarray(L.delta_u(ts))
    x = np.asarray(L.trajectory(ts))
    lam, V = np.linalg.eigh(np.asarray(L.F))
    # ½‖F^{1/2}(I−P)x‖²: the projected loss of the tail's own eigenpairs
    tail = Subspace.exact(lam[: -config.d], V[:, : -config.d].T)
    tail_part = np.asarray(jax.vmap(tail.projected_loss)(x))
    A_norm = float(np.linalg.norm(np.asarray(L.A), 2))
    window = theory.onset_window(r, A_norm, t_min=config.t_min)
    ratio = projected / (r.quartic_coefficient * ts**4)
    return {
        "aic": r._asdict(),
        "fit": theory.fit_exponent(ts, projected, window)._asdict(),
        "ratio_at_t_min": float(ratio[0]),
        "decomposition_gap": float(np.max(np.abs(delta_u - projected - tail_part) / delta_u)),
        "tail_slope3_time": float(ts[np.argmax(theory.local_slope(ts, delta_u) > 3)]),
        "times": ts.tolist(),
        "delta_u": delta_u.tolist(),
        "projected": projected.tolist(),
    }


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Onset exponent and coefficient, the exact decomposition and the tail crossover."""
    fit, r = results["fit"], results["aic"]
    window, ratio0, gap = fit["window"], results["ratio_at_t_min"], results["decomposition_gap"]
    t3, t_tail = results["tail_slope3_time"], r["tail_crossover_time"]
    return [
        Claim(
            "Thm 6.2 / Cor. 6.3: with Pg = 0 the projected loss starts as t⁴",
            command,
            "exponent 4 ± 0.01",
            f"{fit['exponent']:.4f} on t ∈ [{window[0]:.0e}, {window[1]:.1e}]",
            abs(fit["exponent"] - 4) <= 0.01,
        ),
        Claim(
            "Cor. 6.3: quartic coefficient is γ²/8 (docs/theory.md §4)",
            command,
            f"½‖F^{{1/2}}Px‖² / (⅛γ²t⁴) → 1 as t → 0 (γ = {r['coupling']:.3g})",
            f"ratio {ratio0:.6f} at t = {config.t_min:.0e}",
            abs(ratio0 - 1) <= 1e-3,
        ),
        Claim(
            "Thm 6.1 (quadratic u: no cubic remainder): Δu = ½‖F^{1/2}Px‖² + ½‖F^{1/2}(I−P)x‖²",
            command,
            "relative gap 0 (≤ 1e-10)",
            f"{gap:.1e} (max over {config.num_times} times)",
            gap <= 1e-10,
            labels=("holds (control)", "FAILS (control)"),  # an identity for a quadratic u
        ),
        Claim(
            "docs/theory.md §4: the tail's t² floor in Δu is passed near 2(cᵀ(I−P)F(I−P)c)^{1/2}/γ",
            command,
            f"Δu's local slope reaches 3 at t ≈ {t_tail:.3g}",
            f"t = {t3:.3g} (ratio {t3 / t_tail:.3f})",
            abs(np.log(t3 / t_tail)) <= np.log(1.25),
        ),
    ]


FIGURE_NEEDS = ("aic", "fit", "times", "delta_u", "projected")


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Δu and the projected loss along the exact flow, with the t⁴ law and the tail's t² floor."""
    ts, delta_u = np.asarray(results["times"]), np.asarray(results["delta_u"])
    projected, r, fit = np.asarray(results["projected"]), results["aic"], results["fit"]
    fig, axes = style.subplots(height=3.4)
    ax = axes[0, 0]
    ax.loglog(ts, delta_u, label=r"$\Delta u(t)$ (exact flow)")
    ax.loglog(ts, projected, label=r"$\frac{1}{2}\|F^{1/2}Px(t)\|^2$")
    quartic = r"$\frac{1}{8}\gamma^2 t^4$"
    ax.loglog(ts, r["quartic_coefficient"] * ts**4, "--", color=style.THEORY, lw=0.8, label=quartic)
    floor = delta_u[0] / ts[0] ** 2 * ts**2
    ax.loglog(ts, floor, ":", color=style.THEORY, lw=0.8, label=r"tail floor $\propto t^2$")
    ax.axvline(r["tail_crossover_time"], color="gray", lw=0.8, ls="-.", label="tail crossover")
    ax.axvspan(
        *fit["window"],
        color=style.PALETTE[2],
        alpha=0.12,
        lw=0,
        label=rf"fit window: exponent {fit['exponent']:.3f}",
    )
    ax.set_ylim(max(projected.min(), 1e-30), delta_u.max() * 10)
    ax.set_xlabel(r"gradient-flow time $t$")
    ax.set_ylabel("loss increase")
    style.legend_below(fig, ncol=2)
    return style.save(fig, path)


main = float64_main(NAME, Config(), compute, figure, claims)


def check_config(config: Config) -> None:
    """Refuse a config ``compute`` cannot run (the sweep checks every cell up front)."""
    if not 0 < config.t_min < config.t_max or config.num_times < 2:
        raise ValueError(
            f"need 0 < t_min < t_max and num_times ≥ 2, got t_min={config.t_min}, "
            f"t_max={config.t_max}, num_times={config.num_times}"
        )
    _landscape(config)


sweep_cell = theory_sweep_cell(
    NAME, compute, claims, ("aic", "fit", "ratio_at_t_min", "decomposition_gap", "tail_slope3_time")
)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
