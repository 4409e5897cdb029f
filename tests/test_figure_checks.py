"""The figure checks can fail: each finds the defect planted in a small figure, and only it."""

import dataclasses
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


def _committed_figures() -> list[tuple[str, str]]:
    """``(module, results name)`` of every committed figure: ``figures/NAME.png`` drawn from
    ``experiments/results/NAME.json`` by the experiment whose name prefixes ``NAME``."""
    from geomcollapse import registry

    pairs = []
    for png in sorted((ROOT / "figures").glob("*.png")):
        owners = [m for m in registry.EXPERIMENTS if png.stem == m or png.stem.startswith(f"{m}_")]
        pairs.append((max(owners, key=len), png.stem))
    return pairs


COMMITTED = _committed_figures()


def test_every_committed_figure_is_checked():
    """Each committed figure has its results file and an experiment that draws it."""
    assert len(COMMITTED) == len(list((ROOT / "figures").glob("*.png"))) >= 21
    for _, result in COMMITTED:
        assert _committed(result) is not None, result


@pytest.mark.full
@pytest.mark.parametrize("module_name,result", COMMITTED, ids=[r for _, r in COMMITTED])
def test_committed_figures_pass_the_checks(module_name, result, monkeypatch, tmp_path):
    """Every committed figure, redrawn from its committed results (the data decide what
    overlaps: two tasks' equal tail floors, seed means with their standard errors)."""
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


def _drawn(module, results: dict, tmp_path, monkeypatch, optional=()) -> list:
    """``module.figure``'s figure of ``results``' ``FIGURE_NEEDS`` (and ``optional`` keys),
    checked by :func:`figure_checks.check`, kept open."""
    from experiments import _style

    kept = []

    def keep(fig, path):
        kept.append(fig)
        return [path]

    monkeypatch.setattr(_style, "save", keep)
    keys = ("config", *module.FIGURE_NEEDS, *optional)
    module.figure(json.loads(json.dumps({k: results[k] for k in keys})), tmp_path / "f.png")
    (fig,) = kept
    assert figure_checks.check(fig) == []
    return fig


def _bars(ax) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every error-bar container's (x, y) segment extents of ``ax``: ``(n, 2)`` lows/highs."""
    out = []
    for c in ax.containers:
        for bars in c.lines[2]:
            seg = np.array(bars.get_segments())  # (n, 2 ends, xy)
            out.append(seg)
    return out


def test_prediction_seed_means_show_the_seeds_range(tmp_path, monkeypatch):
    """Panel (a): one point per dataset at the seed mean, bars spanning the seeds' min–max."""
    from experiments import prediction as P
    from geomcollapse import tasks

    config = dataclasses.replace(
        P.QUICK,
        datasets=tuple(tasks.DATASET_FAMILY)[:5],
        seeds=(0, 1, 2),
        horizons=(1, 4),
        primary_horizon=4,
        num_resamples=50,
    )
    rng = np.random.default_rng(0)
    rows = []
    for method in config.methods:
        for d in config.datasets:
            for seed in config.seeds:
                for K in config.horizons:
                    row = {p: float(rng.uniform()) for p in P._predictor_names(config, False)}
                    row.update(dataset=d, method=method, optimizer="sgd", seed=seed, K=K)
                    row.update(harmfulness=float(rng.uniform()), delta_u=1.0, accuracy=0.5)
                    row.update(locality=0.1, intruder_count=1, update_intruder_p_ratio=0.0)
                    row.update(update_intruder_fisher_half=0.0, eta_K=0.03 * K, forecast=1.0)
                    row.update(forecast_validity_time=1.0)
                    rows.append(row)
    results = dict(P._results(config, rows), config=dataclasses.asdict(config))
    fig = _drawn(P, results, tmp_path, monkeypatch)
    full = [r for r in rows if r["method"] == "full" and r["K"] == 4]
    want = {}
    for i, field in enumerate(("update_p_ratio_d10", "harmfulness")):
        v = np.array([[r[field] for r in full if r["dataset"] == d] for d in config.datasets])
        want[i] = (v.min(axis=1), v.max(axis=1))
    xbars, ybars = _bars(fig.axes[0])[:2]  # the first method's (full) x and y bars
    np.testing.assert_allclose(xbars[:, :, 0], np.column_stack(want[0]), rtol=1e-12)
    np.testing.assert_allclose(ybars[:, :, 1], np.column_stack(want[1]), rtol=1e-12)
    assert "range of 3 seeds" in fig.get_suptitle()
    plt.close("all")


def test_validation_ranking_shows_the_seeds_range_of_harm(tmp_path, monkeypatch):
    """Panel (b): the study's seed-mean harm per held-out dataset with the seeds' range."""
    from experiments import validation as V

    names = ("label_noise", "shift_lookalike", "delimited_all", "noisy_lookalike")
    rows = [
        {"dataset": d, "validity_time": 0.02 + 0.01 * i, "coefficients": [0.0, 0.0, 1.0 + i],
         "forecast": [1.0, 1.0], "gd": [1.1, 0.9], "sgd": [1.0, 1.0]}
        for i, d in enumerate(names)
    ]  # fmt: skip
    harms = {
        d: [0.1 * (i + 1), 0.1 * (i + 1) + 0.05, 0.1 * (i + 1) + 0.2] for i, d in enumerate(names)
    }
    config = V.Config(datasets=names, resamples=50)
    computed = {"rows": rows, "lr": 0.01, "horizons": [1, 2]}
    mean = {d: float(np.mean(h)) for d, h in harms.items()}
    results = dict(V.analyse(config, computed, mean, harms), config=dataclasses.asdict(config))
    fig = _drawn(V, results, tmp_path, monkeypatch, optional=("ranking",))
    (ybars,) = _bars(fig.axes[1])
    np.testing.assert_allclose(
        ybars[:, :, 1], [[min(harms[d]), max(harms[d])] for d in names], rtol=1e-12
    )
    plt.close("all")
