"""The figure checks can fail: each finds the defect planted in a small figure, and only it."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.lines import Line2D

from tests import figure_checks

ROOT = Path(__file__).resolve().parent.parent
T = np.linspace(1, 10, 20)


def _two_panels(titles=("(a) one", "(b) two")):
    fig, axes = plt.subplots(1, 2)
    for ax, title in zip(axes, titles, strict=True):
        ax.plot(T, T**2, "-", color="C0")
        ax.set_title(title, loc="left")
    return fig


def test_panel_letters():
    assert figure_checks.panel_letters(_two_panels()) == []
    assert figure_checks.panel_letters(_two_panels(("one", "two")))
    assert figure_checks.panel_letters(_two_panels(("(b) one", "(a) two")))
    single, ax = plt.subplots()
    ax.plot(T, T)
    assert figure_checks.panel_letters(single) == []  # one panel needs no letter
    plt.close("all")


def test_legend_entries_must_be_drawn_and_mean_one_thing():
    fig, ax = plt.subplots()
    ax.plot(T, T, "--", color="C0")
    ax.plot(T, T**2, "-.", color="C1")
    good = [
        Line2D([], [], color="gray", ls="--", label="raw"),
        Line2D([], [], color="C1", ls="-.", label="floor"),
    ]
    ax.legend(handles=good)
    assert figure_checks.legend_matches_marks(fig) == []
    # a grey key for dashed meaning "raw" in one place and "tail floor" in another
    ax.legend(handles=[*good, Line2D([], [], color="gray", ls="--", label="tail floor")])
    assert any("means both" in p for p in figure_checks.legend_matches_marks(fig))
    # a legend entry with a circle where the panel draws squares
    fig2, ax2 = plt.subplots()
    ax2.plot([0.5], [0.5], "s", color="C2", label="drawn")
    ax2.legend(handles=[Line2D([], [], color="C2", marker="o", ls="-", label="circle")])
    assert any("drawn nowhere" in p for p in figure_checks.legend_matches_marks(fig2))
    plt.close("all")


def test_hidden_series():
    fig, ax = plt.subplots()
    ax.loglog(T, T**2, color="C0", label="delta u")
    ax.loglog(T, T**2 * (1 + 1e-6), color="C2", label="projected")
    assert any("hidden" in p for p in figure_checks.no_hidden_series(fig))
    fig2, ax2 = plt.subplots()
    ax2.loglog(T, T**2, color="C0", label="delta u")
    ax2.loglog(T, T**2 * (1 + 1e-6), "--", color="C2", lw=2, label="projected")  # seen
    assert figure_checks.no_hidden_series(fig2) == []
    fig3, ax3 = plt.subplots()
    ax3.plot([0.5], [0.5], "o-", color="C1", label="one strength")
    ax3.plot([0.5], [0.5], "s", color="C1", markersize=6, label="strongest")
    assert any("hidden" in p for p in figure_checks.no_hidden_series(fig3))
    plt.close("all")


def _committed(name: str) -> dict | None:
    path = ROOT / "experiments" / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize(
    "module_name,result",
    [
        ("transformer_onset", "transformer_onset"),
        ("defences", "defences"),
        ("defences", "defences_study"),
        ("prediction", "prediction_study"),
        ("prediction", "prediction"),
    ],
)
def test_committed_figures_pass_the_checks(module_name, result, monkeypatch, tmp_path):
    """The figures these checks were written for, redrawn from the committed results."""
    import importlib

    from experiments import _style

    results = _committed(result)
    if results is None:
        pytest.skip(f"no committed {result}.json")
    module = importlib.import_module(f"experiments.{module_name}")
    seen = []
    save = _style.save

    def checked(fig, path):
        seen.extend(figure_checks.check(fig))
        return save(fig, path)

    monkeypatch.setattr(_style, "save", checked)
    module.figure(results, tmp_path / f"{result}.png")
    assert seen == []
