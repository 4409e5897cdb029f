"""Displays that do not select: the prediction study's tables and rows (c), (d).

On synthetic rows: the tables show the pre-registered primary d = 10 column first, next
to the d = 50 one; row (c) calls a predictor better than the controls only where every
paired bootstrap interval of ρ(predictor) − ρ(control) lies above 0; row (d) lists every
in-window ratio.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import prediction as P
from geomcollapse import tasks

CONFIG = dataclasses.replace(
    P.QUICK,
    datasets=tuple(tasks.DATASET_FAMILY)[:20],
    methods=("full",),
    horizons=(1, 4),
    primary_horizon=4,
    num_resamples=300,
)


def _rows(config, fill, seed=0):
    """One row per (dataset, seed, K); ``fill(rng, harm, rows_by_name)`` sets predictors."""
    rng = np.random.default_rng(seed)
    harm = rng.uniform(0.0, 1.0, len(config.datasets))
    base = {p: rng.uniform(size=len(config.datasets)) for p in P._predictor_names(config, False)}
    fill(rng, harm, base)
    rows = []
    for i, name in enumerate(config.datasets):
        for s in config.seeds:
            for K in config.horizons:
                row = {
                    "dataset": name,
                    "method": "full",
                    "optimizer": "sgd",
                    "seed": s,
                    "K": K,
                    "harmfulness": float(harm[i]),
                    "delta_u": 1.0 + i + K,
                    "accuracy": 0.5,
                    "locality": 0.1,
                    "eta_K": 0.03 * K,
                    "forecast_validity_time": 1.0,
                    "forecast": 1.3 * (1.0 + i + K),
                }
                row.update({p: float(v[i]) for p, v in base.items()})
                rows.append(row)
    return rows


def _analysed(fill, seed=0):
    results = P.analyse(CONFIG, _rows(CONFIG, fill, seed))
    return results, P.claims(results, CONFIG, "cmd")


def _row_c(claims):
    (c,) = [c for c in claims if "best predictor available" in c.claim]
    return c


def test_the_tables_show_the_primary_d10_column_first_next_to_d50():
    cols = P.table_columns(CONFIG.dims)
    assert cols[0] == ("update_p_ratio_d10", "‖PΔθ‖/‖Δθ‖ d=10")
    names = [c for c, _ in cols]
    for name in names:  # every d = 50 column stands right after its d = 10 column
        if name.endswith("_d50"):
            assert names[names.index(name) - 1] == name[: -len("50")] + "10"
    assert "update_p_d10" in names and "update_p_d50" in names
    results, _ = _analysed(lambda rng, harm, b: None)
    text = P.study_tables(dict(results, config=dataclasses.asdict(CONFIG)))
    head = next(line for line in text.splitlines() if line.startswith("| method"))
    titles = [t.strip() for t in head.strip("|").split("|")][4:]
    assert titles[0] == "‖PΔθ‖/‖Δθ‖ d=10" and titles[1] == "‖PΔθ‖/‖Δθ‖ d=50"
    assert titles.index("‖PΔθ‖ d=10") + 1 == titles.index("‖PΔθ‖ d=50")


def test_row_c_shows_the_primary_d10_first_when_d50_ranks_best():
    def fill(rng, harm, b):
        b["at_g_p_ratio_d50"] = harm  # only the d = 50 column ranks harm

    _, claims = _analysed(fill)
    text = _row_c(claims).measured
    assert "K=4: at_g_p_ratio d = 10 ρ = " in text
    assert text.index("d = 10 ρ = ") < text.index(
        "d = 50 ρ = 1.00 [1.00, 1.00] (largest at d = 50)"
    )


def test_a_control_plus_noise_is_not_called_better():
    def fill(rng, harm, b):
        b["at_task_loss"] = harm + rng.normal(0, 0.3, harm.size)  # a good control
        # the predictor is that control plus noise: it beats ‖g‖ and random, not L(θ*)
        b["at_g_fisher_p_d10"] = b["at_task_loss"] + rng.normal(0, 0.1, harm.size)

    results, claims = _analysed(fill)
    versus = results["table"]["sgd/full/4"]["versus_controls"]
    v = versus["at_g_fisher_p_d10"]
    assert set(v) == set(P.CONTROLS)
    lo, hi = v["at_task_loss"]["interval"]
    assert lo <= 0 <= hi  # the paired interval against L(θ*) straddles 0
    assert v["at_grad_norm"]["interval"][0] > 0 and v["random"]["interval"][0] > 0
    assert not P._better(v)  # better needs every control beaten
    c = _row_c(claims)
    assert "better than every control: none" in c.measured
    assert c.verdict == "measured"


def test_a_predictor_that_ranks_harm_beats_noise_controls():
    def fill(rng, harm, b):
        b["at_g_fisher_p_d10"] = harm**2  # the exact ranking; the controls are noise

    results, claims = _analysed(fill)
    v = results["table"]["sgd/full/4"]["versus_controls"]["at_g_fisher_p_d10"]
    assert v["at_task_loss"]["difference"] == pytest.approx(
        1.0 - results["table"]["sgd/full/4"]["correlations"]["at_task_loss"]["rho"]
    )
    assert v["random"]["control"] == "at_g_random_p_ratio_d10"
    assert all(x["interval"][0] > 0 for x in v.values()) and P._better(v)
    assert "better than every control: at_g_fisher_p_d10" in _row_c(claims).measured
    # the controls are never compared with themselves
    versus = results["table"]["sgd/full/4"]["versus_controls"]
    assert not {"at_task_loss", "at_grad_norm", "at_g_random_p_ratio_d10"} & set(versus)


def test_row_d_lists_every_in_window_ratio():
    results, claims = _analysed(lambda rng, harm, b: None)
    inside = [c for c in results["forecast"]["cells"] if c["inside"]]
    assert len(inside) == 2 * len(CONFIG.datasets) > 8
    (d,) = [c for c in claims if "Taylor forecast" in c.claim]
    listed = d.measured.split("(ratios ")[1].split(")")[0].split(", ")
    assert listed == [f"{c['ratio']:.2f}" for c in inside]


def _validation_computed(n_rows=3):
    """Validation rows: forecast = c₂t², GD ratio 1.1, SGD ratio 2 (1 on the last dataset)."""
    from experiments import validation as V

    lr, horizons = 0.01, [1, 2, 4, 8]
    rows = []
    for i in range(n_rows):
        f = [(1.0 + i) * (lr * k) ** 2 for k in horizons]
        sgd_ratio = 1.0 if i == n_rows - 1 else 2.0
        rows.append(
            {
                "dataset": V.Config().datasets[i],
                "d": 14,
                "validity_time": 1.0,
                "coefficients": [0.0, 0.0, 1.0 + i],
                "forecast": f,
                "gd": [x / 1.1 for x in f],
                "sgd": [x / sgd_ratio for x in f],
            }
        )
    return {"rows": rows, "lr": lr, "horizons": horizons}


def test_validation_lists_every_ratio_and_the_sgd_comparison_at_every_horizon():
    from experiments import validation as V

    config = V.Config(resamples=50)
    res = V.analyse(config, _validation_computed(), None)
    (a,) = V.claims(res, config, "cmd")
    listed = a.measured.split("ratios ")[1].split(";")[0].split(", ")
    assert listed == ["1.1"] * 12  # all 12 in-window cells, not a prefix
    text = V.results_table(res, config.factor)
    head = text.splitlines()[0]
    assert head.count("K=8") == 2  # forecast / GD and forecast / SGD at every horizon
    assert text.count("| 1.1 | 2 | 2 | 2 | 2 |") == 2 and "0.693, 4 of 12 within ×1.5" in text


def test_identity_rows_are_control_rows_and_their_verdict_follows_the_numbers():
    from experiments import quartic_quadratic as Q
    from experiments import transformer_onset as T
    from experiments._common import Claim

    res = Q.compute(Q.TINY)
    (row,) = [c for c in Q.claims(res, Q.TINY, "cmd") if "no cubic remainder" in c.claim]
    assert row.labels != Claim.labels and row.verdict == "holds (control)"
    broken = dict(res, decomposition_gap=1e-6)
    (row,) = [c for c in Q.claims(broken, Q.TINY, "cmd") if "no cubic remainder" in c.claim]
    assert row.verdict == "FAILS (control)"
    # the other quartic rows stay claims of the paper
    assert sum(c.labels == Claim.labels for c in Q.claims(res, Q.TINY, "cmd")) == 3
    c = T.Config()
    ok = {"kl_grad_u_norm": 0.0, "kl_hessian_fisher_gap": 0.0}
    assert T._stationarity_claim(ok, c, "cmd").verdict == "holds (control)"
    bad = dict(ok, kl_grad_u_norm=10 * c.stationarity_tolerance)
    assert T._stationarity_claim(bad, c, "cmd").verdict == "FAILS (control)"
