"""Crossover from quadratic to quartic onset as ``‖Pc‖ = ε`` varies (docs/theory.md §4).

For ``Pc ≠ 0`` the projected loss starts as ``½‖a‖²t²`` and the quartic term
takes over near ``t_c = 2‖a‖/γ`` (``a = F^{1/2}Pc``). The local log-log slope
of ``c₂t² + c₃t³ + c₄t⁴`` is exactly 3 where ``t² = c₂/c₄`` (the ``t³`` term
cancels), so ``t_c`` is the prediction up to ``c₄``'s ``O(ε)`` correction.
Measured: the time where the exact projected loss's local slope crosses 3.

Run: ``python -m experiments.crossover [--quick]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from experiments import _style as style
from experiments._common import Claim, cli, float64_main, theory_sweep_cell
from geomcollapse import landscapes, theory

NAME = "crossover"


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen experiment configuration."""

    n: int = 128
    d: int = 4
    top: tuple[float, ...] = (4.0, 3.0, 2.0, 1.0)
    coupling: float = 1.0
    epsilons: tuple[float, ...] = tuple(np.logspace(-6, -2, 9))
    num_times: int = 2001
    tolerance: float = 0.02  # verdict: max |t_measured/t_predicted − 1|
    seed: int = 0


QUICK = Config(n=48, epsilons=tuple(np.logspace(-6, -2, 5)), num_times=1201)
TINY = Config(n=12, d=2, top=(2.0, 1.0), epsilons=(1e-5, 1e-3), num_times=801)


def _slope3_time(ts: np.ndarray, ys: np.ndarray) -> float:
    """First time the local log-log slope reaches 3, interpolated in log t."""
    slope = theory.local_slope(ts, ys)
    i = int(np.argmax(slope >= 3))
    if i == 0:
        return float("nan")
    frac = (3 - slope[i - 1]) / (slope[i] - slope[i - 1])
    return float(np.exp(np.log(ts[i - 1]) + frac * np.log(ts[i] / ts[i - 1])))


def _landscape(config: Config, eps: float):
    """The config's quadratic landscape at ``ε = eps`` (no tail)."""
    return landscapes.make_quadratic_landscape(
        jax.random.key(config.seed),
        config.n,
        config.d,
        top=config.top,
        tail_mass=0.0,
        epsilon=float(eps),
        coupling=config.coupling,
        curvature_scale=0.1,
    )


def compute(config: Config) -> dict:
    """Predicted and measured crossover time for every ε; the results payload."""
    rows = []
    for eps in config.epsilons:
        L = _landscape(config, eps)
        r = L.aic(config.d)
        ts = np.logspace(
            np.log10(r.crossover_time) - 3, np.log10(r.crossover_time) + 2, config.num_times
        )
        measured = _slope3_time(ts, np.asarray(L.projected_loss(ts)))
        rows.append(
            {
                "epsilon": float(eps),
                "predicted": r.crossover_time,
                "measured": measured,
                "relative_error": measured / r.crossover_time - 1,
            }
        )
    worst = float(np.max([abs(row["relative_error"]) for row in rows]))
    return {"rows": rows, "max_relative_error": worst}


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """The crossover-time verdict."""
    errors = np.array([abs(row["relative_error"]) for row in results["rows"]])
    worst = results["max_relative_error"]
    return [
        Claim(
            "docs/theory.md §4: crossover t_c = 2‖F^{1/2}Pc‖/γ from t² to t⁴ onset",
            command,
            f"measured slope-3 time / t_c − 1 → 0 with ε (≤ {config.tolerance:g} over the sweep)",
            f"max {worst:.2e} over ε ∈ [{min(config.epsilons):.0e}, {max(config.epsilons):.0e}]"
            f" (at smallest ε: {errors[0]:.1e})",
            worst <= config.tolerance,
        )
    ]


FIGURE_NEEDS = ("rows",)
T_C = r"$t_c = 2\|F^{1/2}Pc\|/\gamma$"


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Measured vs predicted crossover time, and the relative error against ε."""
    rows = results["rows"]
    pred, meas, eps, err = (
        np.array([row[k] for row in rows], float)
        for k in ("predicted", "measured", "epsilon", "relative_error")
    )
    fig, axes = style.subplots(2, height=2.6)
    ax1, ax2 = axes[0]
    ax1.loglog(pred, pred, "-", color=style.THEORY, lw=0.8, label="measured = predicted")
    ax1.loglog(pred, meas, "o", label="measured (local slope 3)")
    ax1.set_xlabel("predicted " + T_C)
    ax1.set_ylabel(r"measured $t_c$")
    ax1.set_title("(a) crossover time", loc="left")
    style.legend_below(fig, ncol=2)
    ax2.loglog(eps, np.maximum(np.abs(err), 1e-16), "s-", color=style.PALETTE[1])
    ax2.set_xlabel(r"$\varepsilon = \|Pc\|$")
    ax2.set_ylabel(r"$|t_c^{\mathrm{meas}}/t_c^{\mathrm{pred}} - 1|$")
    ax2.set_title(r"(b) relative error: $O(\varepsilon)$ correction to $c_4$", loc="left")
    return style.save(fig, path)


main = float64_main(NAME, Config(), compute, figure, claims)


def check_config(config: Config) -> None:
    """Refuse a config ``compute`` cannot run (the sweep checks every cell up front)."""
    if not config.epsilons or config.num_times < 3:
        raise ValueError(
            f"need epsilons and num_times ≥ 3, got {config.epsilons}, {config.num_times}"
        )
    for eps in config.epsilons:
        _landscape(config, eps)


sweep_cell = theory_sweep_cell(NAME, compute, claims, ("max_relative_error", "rows"))


if __name__ == "__main__":
    cli(NAME, __doc__, main, Config(), QUICK)
