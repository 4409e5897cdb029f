"""The one-page figure of a :class:`geomcollapse.Diagnosis` (the library's only plotting module).

Built on :class:`matplotlib.figure.Figure` directly, never ``pyplot``: no
global figure state, and the Agg canvas needs no display.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

# Okabe & Ito colour-blind-safe palette: blue, vermilion, bluish green, orange, reddish purple
BLUE, VERMILION, GREEN, ORANGE, PURPLE = "#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7"


def _positive(ts: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(ys) & (ys > 0)
    return ts[keep], ys[keep]


def diagnosis_figure(dg) -> Figure:
    """Three panels: the skill spectrum with ``d`` and its cumulative share of ``tr F``; the
    forecast of ``Δu`` and the projected loss with the validity window, plan and threshold
    (and ``E[Δu]`` under SGD when the diagnosis has a ``batch_size``); the AIC numbers."""
    fig = Figure(figsize=(11.0, 3.6), layout="constrained")
    ax_spec, ax_fc, ax_aic = fig.subplots(1, 3)

    lam = np.asarray(dg.eigenvalues, np.float64)
    idx = np.arange(1, lam.size + 1)
    ax_spec.bar(
        idx, np.where(lam > 0, lam, np.nan), color=[BLUE if i <= dg.d else "0.7" for i in idx]
    )
    ax_spec.set_yscale("log")
    ax_spec.set_xlabel("eigenvalue index i")
    ax_spec.set_ylabel(r"$\lambda_i$ of the skill Fisher")
    share = ax_spec.twinx()
    share.plot(idx, np.cumsum(lam) / dg.trace, color=VERMILION, marker=".", lw=1)
    share.axhline(dg.share, color=VERMILION, lw=0.5)  # thin solid: a level, not a curve
    share.set_ylim(0, 1.05)
    share.set_ylabel(r"$\sum_{j\leq i}\lambda_j\ /\ \mathrm{tr}\,F$", color=VERMILION)
    ax_spec.axvline(dg.d + 0.5, color="black", lw=0.6)
    ax_spec.set_title(f"(a) spectrum: d = {dg.d}, top-d share {dg.top_share:.0%}", loc="left")

    _forecast_panel(ax_fc, dg)

    r = dg.aic
    names = ["tail mass", r"$\lambda_d$", r"$\|Pg\|$", r"$\|F^{1/2}Pg\|$", r"$\gamma$"]
    values = np.array(
        [r.tail_mass, r.lambda_d, r.orthogonality, r.fisher_orthogonality, r.coupling], np.float64
    )
    shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    y = np.arange(len(names))[::-1]
    ax_aic.barh(y, shown, color=[ORANGE, BLUE, GREEN, GREEN, VERMILION])
    ax_aic.set_yticks(y, names)
    finite = shown[np.isfinite(shown)]
    if finite.size:
        ax_aic.set_xscale("log")
        ax_aic.set_xlim(finite.min() / 3, finite.max() * 20)  # room for the labels
    for yi, v, bar in zip(y, values, shown, strict=True):
        at = bar if np.isfinite(bar) else (finite.min() / 3 if finite.size else 0.0)
        ax_aic.annotate(
            f"{v:.3g}", (at, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7
        )
    ax_aic.set_title("(c) AIC (Def. 5.1)", loc="left")
    fig.suptitle(f"geomcollapse diagnosis: n = {dg.n}, {len(dg.warnings)} warning(s)", fontsize=10)
    return fig


def _forecast_panel(ax_fc, dg) -> None:
    """Panel (b): the forecast curves (solid inside their windows, dotted past them), the
    window as a shaded span, the planned step and the threshold with its crossing."""
    ts = np.asarray(dg.forecast_t, np.float64)
    window = dg.validity_time if math.isfinite(dg.validity_time) else math.inf
    # Δu wide underneath, the projected loss narrow on top: both stay visible where they agree
    past = False
    curves = [(np.asarray(dg.forecast_delta_u), r"forecast $\Delta u(t)$", BLUE, 2.4, window)]
    if dg.sgd_coefficients is not None:  # between the two: its own window, narrower line
        sgd = np.polyval(np.asarray(dg.sgd_coefficients, np.float64)[::-1], ts)
        end = dg.sgd_validity_time
        sgd_window = end if end is not None and math.isfinite(end) else math.inf
        label = rf"$E[\Delta u]$ under SGD, B = {dg.batch_size}"
        curves.append((sgd, label, PURPLE, 1.6, sgd_window))
    curves.append(
        (np.asarray(dg.forecast_projected), r"$\frac{1}{2}\|F^{1/2}Px(t)\|^2$", GREEN, 1.0, window)
    )
    undrawn = []
    for ys, label, color, lw, end in curves:
        t, y = _positive(ts, ys)
        if not t.size:  # said on the panel, not left as a silently empty curve
            undrawn.append(label)
        inside = t <= end  # past the window the truncated series is no forecast: dotted
        if np.any(inside):
            ax_fc.loglog(t[inside], y[inside], color=color, lw=lw, label=label)
        if np.any(~inside):
            ax_fc.loglog(t[~inside], y[~inside], color=color, ls=":", lw=lw)
            past = True
    if math.isfinite(dg.validity_time):
        span = (ts[0], min(dg.validity_time, ts[-1]))
        ax_fc.axvspan(*span, color=BLUE, alpha=0.08, lw=0, label="validity window")
    if past:
        ax_fc.plot([], [], color="0.5", ls=":", label="past the window (no forecast)")
    if dg.planned_time is not None:
        ax_fc.axvline(dg.planned_time, color=ORANGE, ls="--", lw=0.8, label=f"{dg.steps} steps")
    if dg.threshold is not None:
        ax_fc.axhline(dg.threshold, color=VERMILION, ls="-.", lw=0.8, label="threshold")
    if dg.crossing_time is not None:
        ax_fc.plot([dg.crossing_time], [dg.threshold], "o", color=VERMILION, ms=4)
    ax_fc.set_xlabel("flow time t" + ("" if dg.lr is None else f" (SGD step k = t / {dg.lr:g})"))
    ax_fc.set_ylabel("forecast")
    ax_fc.set_title(f"(b) Taylor forecast, order {dg.order}", loc="left")
    if undrawn:
        note = "no positive finite value, not drawn: " + "; ".join(undrawn)
        ax_fc.text(0.02, 0.02, note, transform=ax_fc.transAxes, fontsize=6, color=VERMILION)
    if ax_fc.get_legend_handles_labels()[0]:
        ax_fc.legend(fontsize=7, loc="upper left")
