"""Gradient descent against its closed form and the continuous flow (docs/theory.md §4).

With ``Pc = 0`` and step ``η``, ``½‖F^{1/2}Px_k‖² ≈ ⅛γ²η⁴k²(k−1)²``; the flow at
``t = ηk`` gives ``⅛γ²η⁴k⁴``, so GD / flow → ``(k−1)²/k²``. Exact GD iterates
(closed form, checked against the iteration in the tests), float64.

Run: ``python -m experiments.gd_vs_flow [--quick]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from experiments import _style as style
from experiments._common import Claim, cli, float64_main
from geomcollapse import landscapes, theory

NAME = "gd_vs_flow"


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    n: int = 128
    d: int = 4
    top: tuple[float, ...] = (4.0, 3.0, 2.0, 1.0)
    coupling: float = 1.0
    eta_times_norm: float = 1e-5  # η‖A‖
    max_steps: int = 1000  # so η‖A‖K = 1e-2: inside the onset regime
    tolerance: float = 0.02
    seed: int = 0


QUICK = Config(n=48)
TINY = Config(n=12, d=2, top=(2.0, 1.0), max_steps=200, eta_times_norm=5e-5)


def compute(config: Config) -> dict:
    """GD's exact projected loss, its closed form and the flow at ``t = ηk``; the payload."""
    L = landscapes.make_quadratic_landscape(
        jax.random.key(config.seed),
        config.n,
        config.d,
        top=config.top,
        tail_mass=0.0,
        epsilon=0.0,
        coupling=config.coupling,
    )
    r = L.aic(config.d)
    eta = config.eta_times_norm / float(np.linalg.norm(np.asarray(L.A), 2))
    ks = np.unique(np.round(np.logspace(np.log10(2), np.log10(config.max_steps), 60)))
    gd = np.asarray(L.gd_projected_loss(eta, ks))
    closed = theory.gd_projected_loss_approx(r.coupling, eta, ks)
    flow_at = np.asarray(L.projected_loss(eta * ks))
    return {
        "eta": eta,
        "max_error_vs_closed_form": float(np.max(np.abs(gd / closed - 1))),
        "max_error_vs_flow": float(np.max(np.abs(gd / flow_at / ((ks - 1) ** 2 / ks**2) - 1))),
        "steps": ks.tolist(),
        "gd": gd.tolist(),
        "closed_form": np.asarray(closed).tolist(),
        "flow": flow_at.tolist(),
    }


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """GD against its closed form and against the flow."""
    err_closed, err_flow = results["max_error_vs_closed_form"], results["max_error_vs_flow"]
    return [
        Claim(
            "docs/theory.md §4: GD's projected loss is ⅛γ²η⁴k²(k−1)² when Pc = 0",
            command,
            f"GD / closed form − 1 = O(ηk‖A‖) ≤ {config.tolerance:g}",
            f"max {err_closed:.1e} over k ∈ [2, {config.max_steps}] "
            f"(η‖A‖ = {config.eta_times_norm:g})",
            err_closed <= config.tolerance,
        ),
        Claim(
            "docs/theory.md §4: GD tracks the flow at t = ηk, ratio (k−1)²/k²",
            command,
            f"GD / (flow · (k−1)²/k²) − 1 ≤ {config.tolerance:g}",
            f"max {err_flow:.1e}",
            err_flow <= config.tolerance,
        ),
    ]


FIGURE_NEEDS = ("steps", "gd", "closed_form", "flow")


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """GD's projected loss per step against its closed form and the flow at ``t = ηk``."""
    ks = np.asarray(results["steps"])
    fig, axes = style.subplots(height=3.0)
    ax = axes[0, 0]
    ax.loglog(ks, results["gd"], "o", ms=2.5, label=r"GD: $\frac{1}{2}\|F^{1/2}Px_k\|^2$")
    ax.loglog(
        ks,
        results["closed_form"],
        "-",
        color=style.THEORY,
        lw=0.8,
        label=r"$\frac{1}{8}\gamma^2\eta^4k^2(k-1)^2$",
    )
    ax.loglog(ks, results["flow"], "--", label=r"flow at $t = \eta k$ ($\propto t^4$)")
    ax.set_xlabel(r"GD step $k$")
    ax.set_ylabel("projected loss")
    ax.set_title(rf"$\eta\|A\| = {style.sci(results['config']['eta_times_norm'])[1:-1]}$, $Pc = 0$")
    style.legend_below(fig, ncol=1)
    return style.save(fig, path)


main = float64_main(NAME, Config(), compute, figure, claims)


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
