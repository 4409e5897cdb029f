"""transformer_onset end to end on its tiny config (the main job's machinery, as in
tests/test_experiments.py, which runs the other experiments): in a file of its own so
that pytest-xdist runs it beside that one (``--dist loadfile``). The tiny run is in the
full tier (``make test-full``); the checks of the numbers and verdicts also run on the
main job's committed results in the default tier."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import reproduce, transformer_onset
from experiments._common import ROOT
from experiments._transformer import checkpoint_dir
from tests.test_experiments import FINDINGS, redraw_checked

ONSET_RESULTS = Path("experiments/results/transformer_onset.json")


@pytest.fixture(params=["committed", pytest.param("tiny", marks=pytest.mark.full)])
def onset_result(request) -> dict:
    """transformer_onset's results: the main job's committed ones, or this file's tiny run's
    (full tier: the tiny run takes 215 s on the 2-core machine)."""
    out = ROOT if request.param == "committed" else request.getfixturevalue("onset_run")[0]
    return json.loads((out / ONSET_RESULTS).read_text())


@pytest.fixture(scope="module")
def onset_run(tmp_path_factory, aligned_root):
    out = tmp_path_factory.mktemp("repro_onset")
    cached = checkpoint_dir("tiny-fast", aligned_root)  # the session's θ*: no retraining here
    shutil.copytree(cached, checkpoint_dir("tiny-fast", out))
    return out, reproduce.main(outdir=out, tiny=True, experiments=[transformer_onset])


@pytest.mark.full
def test_the_onset_rows_are_written_and_hold_unless_findings(onset_run):
    out, claims = onset_run
    text = (out / "paper_repro.md").read_text()
    assert text.count("\n| ") == len(claims) + 1  # header + one row per claim
    result = json.loads((out / "experiments/results/transformer_onset.json").read_text())
    assert [c.claim for c in claims] == [row["claim"] for row in result["claims"]]
    for c in claims:
        assert f"`{c.command}`" in text and c.verdict in text
    assert all(
        c.passed
        for c in claims
        if c.labels == ("reproduced", "NOT reproduced") and not c.claim.startswith(FINDINGS)
    )


@pytest.mark.full
def test_the_onset_run_writes_results_and_a_figure_that_redraws(onset_run, tmp_path, monkeypatch):
    out, _ = onset_run
    result = json.loads((out / "experiments/results/transformer_onset.json").read_text())
    assert (out / result["figure"]).stat().st_size > 10_000
    assert (out / result["figure"]).with_suffix(".pdf").stat().st_size > 5_000
    redraw_checked(transformer_onset, result, tmp_path, monkeypatch)
    assert (tmp_path / "transformer_onset.png").stat().st_size > 10_000


def test_onset_numbers(onset_result):
    """Exponents 4 and 2, the coefficient and floor ratios, orthogonality, raw flows equal."""
    onset = onset_result
    assert onset["dims"] == list(onset["config"]["dims"])
    for task in onset["tasks"].values():
        ts = np.asarray(task["times"])
        for d in onset["dims"]:
            by_d = task[f"d{d}"]
            o = by_d["orthogonalized"]
            assert abs(o["projected_exponent"] - 4) <= 0.05
            assert abs(by_d["raw"]["projected_exponent"] - 2) <= 0.05
            assert abs(o["coefficient_ratio"] - 1) <= 0.02
            # removing P g(θ*) leaves the gradient orthogonal to M
            report, raw = by_d["report_orthogonalized"], by_d["report_raw"]
            assert report["orthogonality"] <= 1e-10 * raw["orthogonality"] + 1e-12
            # KL Δu starts on the tail's floor ½qt², q from 2q^{1/2}/γ̃ = t×
            q = (report["tail_crossover_time"] * report["coupling"] / 2) ** 2
            assert o["floor_ratio"] == pytest.approx(o["kl"]["delta_u"][0] / (0.5 * q * ts[0] ** 2))
            assert abs(o["floor_ratio"] - 1) <= 0.02
        # the raw flow does not depend on d: its KL Δu is the same numbers for every d
        raws = [task[f"d{d}"]["raw"]["kl"]["delta_u"] for d in onset["dims"]]
        assert all(r == raws[0] for r in raws)
        # a larger M holds more of ½xᵀFx: the projected loss grows with d on the raw flow
        small, large = (np.asarray(task[f"d{d}"]["raw"]["projected"]) for d in onset["dims"][:2])
        assert np.all(large >= small * (1 - 1e-12))


def test_onset_fixed_bound_verdict_follows_from_its_numbers(onset_result):
    """Thm 6.1 with C, D by SS-HOPM: B recomputed per flow, margins, informative, verdict."""
    result = onset_result
    k, frac = result["thm61_constants"], result["config"]["informative_fraction"]
    # the estimates are values attained: C from the refined λ/6, D the larger |λ| of ∇⁴u
    assert k["C"] == pytest.approx(max(k["cubic_search"]["refined"]) / 6)
    assert k["D"] == pytest.approx(max(abs(v) for v in k["quartic_search"]["refined"]))
    informative = []
    for task in result["tasks"].values():
        ts = np.asarray(task["times"])
        for d in result["dims"]:
            for v in ("orthogonalized", "raw"):
                entry = task[f"d{d}"][v]
                kl, fb = entry["kl"], entry["fixed_bound"]
                du, norm = np.asarray(kl["delta_u"]), np.asarray(kl["displacement_norm"])
                bound = np.asarray(entry["projected"]) - k["C"] * norm**3 - k["D"] / 24 * norm**4
                np.testing.assert_allclose(fb["bound"], bound, rtol=1e-12, atol=1e-300)
                window = (ts <= task["local_window"][1]) & (norm <= 24 * k["C"] / k["D"])
                assert fb["window_points"] == window.sum()
                if window.any():
                    margin = ((du - bound) / du)[window].min()
                    assert fb["min_margin"] == pytest.approx(margin)
                assert fb["informative"] == bool(np.any(window & (bound >= frac * du)))
                if fb["informative"]:
                    informative.append(fb["min_margin"])
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in result["claims"]}
    verdict = verdicts["Thm 6.1, lower bound with constants fixed at θ* before the flows"]
    if not informative:
        assert verdict == "not testable"
    else:
        holds = all(m >= 0 for m in informative)
        assert verdict == ("reproduced" if holds else "NOT reproduced")


def test_onset_remainder_verdicts_follow_from_their_numbers(onset_result):
    """Thm 6.1 remainder (exponent 3 ± tol) and cubic-term (ratio 1 ± tol) rows, recomputed."""
    result = onset_result
    config = result["config"]
    kl = []
    for task in result["tasks"].values():
        kl += [task[f"d{d}"]["orthogonalized"]["kl"] for d in result["dims"]]
        kl.append(task[f"d{result['dims'][0]}"]["raw"]["kl"])
    exps = [k["remainder_exponent"] for k in kl]
    cubic = [k["remainder_over_cubic"][0] for k in kl]
    assert len(exps) == len(result["tasks"]) * (len(result["dims"]) + 1)
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in result["claims"]}
    tol_e, tol_c = config["remainder_exponent_tolerance"], config["cubic_tolerance"]
    remainder_holds = all(abs(e - 3) <= tol_e for e in exps)
    cubic_holds = all(abs(q - 1) <= tol_c for q in cubic)
    assert verdicts["Thm 6.1, remainder"] == ("reproduced" if remainder_holds else "NOT reproduced")
    assert verdicts["Thm 6.1, cubic term"] == ("reproduced" if cubic_holds else "NOT reproduced")
