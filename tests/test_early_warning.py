"""The early-warning study (#27): its recorded column and its analysis on synthetic rows."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from experiments import early_warning as E
from experiments import prediction
from experiments._common import ROOT, committed_sweep_rows
from geomcollapse import stats
from tests.conftest import tol_for


def test_projected_loss_matches_dense_fisher():
    """``update_fisher_half_d{d}`` equals ½ vᵀ P_d F P_d v with ``F`` and ``P_d`` built densely."""
    rng = np.random.default_rng(0)
    n, k = 12, 5
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    spectrum = np.sort(rng.uniform(0.1, 3.0, n))[::-1]
    fisher = q @ np.diag(spectrum) @ q.T
    s = SimpleNamespace(basis=q[:, :k].T, values=spectrum[:k])
    v = rng.normal(size=n)
    out = prediction.projected_loss(s, (2, 5), v)
    for d in (2, 5):
        proj = q[:, :d] @ q[:, :d].T
        dense = 0.5 * v @ proj @ fisher @ proj @ v
        assert abs(out[f"update_fisher_half_d{d}"] - dense) <= tol_for(np.float64) * dense
    assert out["update_fisher_half_d5"] > out["update_fisher_half_d2"]


# ------------------------------------------------- the analysis on synthetic rows
HORIZONS = (1, 2, 4, 8, 16, 32, 64, 256)
FAST = E.Config(num_resamples=400)


def synthetic_rows(seed: int, seeds, *, shuffle: bool = False, scale: float = 1.0) -> list[dict]:
    """Rows of every cell whose E_k and projected loss track the dataset's harm_256 (or not).

    ``shuffle`` gives the early scores to the wrong datasets; ``scale`` multiplies them.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.0, 1.0, 26)  # each dataset's eventual harm
    early = rng.permutation(base) if shuffle else base
    rows = []
    for opt, method in E.CELLS:
        for d in range(26):
            for s in seeds:
                for K in HORIZONS:
                    grow = K / 256
                    noise = lambda: rng.normal(0.0, 0.02)  # noqa: E731
                    score = scale * (early[d] + noise())
                    rows.append(
                        {
                            "dataset": f"d{d:02d}",
                            "method": method,
                            "optimizer": opt,
                            "seed": s,
                            "K": K,
                            "harmfulness": float(np.clip(base[d] * grow + noise(), 0, 1)),
                            "delta_u": float(rng.uniform(0, 1)),
                            "update_p_d50": score,
                            "update_p_d10": score,
                            "update_fisher_half_d50": score,
                            "update_p_ratio_d10": float(rng.uniform(0, 1)),
                        }
                    )
    return rows


def thresholds_of(rows: list[dict]) -> tuple:
    """The plan's rule applied to ``rows``: a ``Config.thresholds`` value."""
    out = []
    for opt, method in E.CELLS:
        taus = []
        for rule in E.RULES:
            scores, harmful = E.run_scores(FAST, rows, opt, method, rule)
            taus.append(E.choose_threshold(scores, harmful, FAST.choice_false_alarms))
        out.append((opt, method, *taus))
    return tuple(out)


def test_scores_that_track_harm_pass_and_shuffled_ones_fail():
    exploration = synthetic_rows(0, (0, 1, 2))
    config = E.Config(num_resamples=400, thresholds=thresholds_of(exploration))
    good = E.analyse(config, exploration, synthetic_rows(0, (3, 4, 5)), None)
    claims = E.claims(good, config, "test")
    a = [c for c in claims if c.claim.startswith("(a)")]
    assert len(a) == 2 and all(c.verdict == "reproduced" for c in a)
    rho = good["tiny"]["cells"]["sgd/full"]["E"][HORIZONS.index(16)]
    assert rho["rho"] > 0.95 and rho["interval"][0] > 0.9
    assert all(c.verdict == "reproduced" for c in claims if c.claim.startswith("(b)"))
    f = next(c for c in claims if c.claim.startswith("(f) a stop"))
    assert f.verdict == "reproduced", f.measured
    assert all(c.verdict == "not run" for c in claims if c.claim.startswith(("(d)", "(e)")))

    bad = E.analyse(config, exploration, synthetic_rows(0, (3, 4, 5), shuffle=True), None)
    claims = E.claims(bad, config, "test")
    assert all(c.verdict == "NOT reproduced" for c in claims if c.claim.startswith("(a)"))
    shifted = E.analyse(config, exploration, synthetic_rows(0, (3, 4, 5), scale=10.0), None)
    f = next(c for c in E.claims(shifted, config, "test") if c.claim.startswith("(f) a stop"))
    assert f.verdict == "NOT reproduced"  # every run flagged: false alarms 1


def test_small_rows_give_rows_d_and_e():
    exploration = synthetic_rows(1, (0, 1, 2))
    config = E.Config(num_resamples=400, thresholds=thresholds_of(exploration))
    small = [r for r in synthetic_rows(2, (0, 1)) if r["method"] == "full"]
    claims = E.claims(E.analyse(config, exploration, None, small), config, "test")
    d = [c for c in claims if c.claim.startswith("(d)")]
    e = [c for c in claims if c.claim.startswith("(e)")]
    assert [c.verdict for c in d] == ["reproduced"] * 2
    assert [c.verdict for c in e] == ["NOT reproduced"] * 2  # the overlap score is noise here
    assert all(c.verdict == "not run" for c in claims if c.claim.startswith(("(a)", "(c)")))


def test_paired_difference():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=26), rng.normal(size=26)
    key = jax.random.key(0)
    same = E.paired_difference(x, x, y, key=key, num_resamples=300)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]
    const = E.paired_difference(y + 0.1 * x, np.zeros(26), y, key=key, num_resamples=300)
    assert const["difference"] == stats.spearman(y + 0.1 * x, y)  # a constant ranks nothing: 0
    assert const["interval"][0] > 0.5


def test_choose_threshold_and_rates():
    scores = np.arange(10.0)
    harmful = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1], bool)
    assert E.rates(scores, harmful, 6.0) == (0.8, 0.0)
    # τ = 4 flags every harmful run with false alarms 1/5 = 0.2 (allowed); τ = 3 makes it 0.4
    assert E.choose_threshold(scores, harmful, 0.2) == 4.0
    assert E.choose_threshold(scores, harmful, 0.1) == 6.0
    assert np.isnan(E.rates(scores, np.zeros(10, bool), 1.0)[0])
    assert E.floor_digits(0.15247754485784165) == 0.152477


def test_plan_thresholds_are_the_rule_on_the_exploration_rows():
    exploration = committed_sweep_rows(ROOT, Path(E.STUDY.exploration))
    if exploration is None:
        pytest.skip("the exploration rows are not in this checkout")
    E.check_thresholds(E.STUDY, exploration)
    moved = list(E.THRESHOLDS)
    moved[0] = ("sgd", "full", 0.15, *moved[0][3:])
    with pytest.raises(ValueError, match="thresholds"):
        E.check_thresholds(E.Config(thresholds=tuple(moved)), exploration)


def test_config_refuses_bad_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        E.Config(thresholds=(("sgd", "lora2", 1.0, 1.0, 1.0),))


@pytest.mark.full
def test_figure_draws_from_the_results_json_in_the_house_style(tmp_path, monkeypatch):
    """From ``FIGURE_NEEDS`` alone, in the figure style the main job's figures keep
    (≤ 6 curves per panel: the intervals are bars without caps, one line per series)."""
    from experiments import _style
    from tests.test_experiments import _check_style

    exploration = synthetic_rows(4, (0, 1, 2))
    small = [
        r for r in synthetic_rows(6, (0, 1)) if r["method"] == "full" and r["optimizer"] == "sgd"
    ]
    cases = ((None, None), (synthetic_rows(5, (3, 4, 5)), None), (None, small))
    for tiny, small_rows in cases:
        results = E.analyse(FAST, exploration, tiny, small_rows)
        stored = json.loads(json.dumps(results, default=float))  # what figure() reads back
        needed = {k: stored[k] for k in E.FIGURE_NEEDS}
        drawn = []
        save = _style.save

        def checked(fig, path, save=save, drawn=drawn):
            _check_style(fig)
            drawn.append(sum(len(ax.get_lines()) for ax in fig.axes))
            return save(fig, path)

        monkeypatch.setattr(_style, "save", checked)
        png, pdf = E.figure(needed, tmp_path / "early_warning.png")
        assert png.is_file() and pdf.is_file()
        # 4 cells × (3 + 2 series) data lines, plus two reference lines per panel; small:
        # a third row, its one committed cell's 3 series (full fine-tuning under SGD here)
        expected = 4 * (3 + 2) + 8 * 2 + (3 + 4 * 2 if small_rows else 0)
        assert drawn == [expected]
        drawn.clear()


def test_registered_in_the_main_job_with_the_plans_statistics():
    from experiments import reproduce
    from geomcollapse import registry

    assert E in reproduce.EXPERIMENTS and E.NAME in registry.EXPERIMENTS
    assert E.QUICK == E.STUDY  # the main job re-analyses with the plan's 4,000 resamples
    assert E.QUICK.num_resamples == 4000
    # the test configuration changes the resamples only, never a threshold
    assert dataclasses.replace(E.TINY, num_resamples=E.STUDY.num_resamples) == E.STUDY
