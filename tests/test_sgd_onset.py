"""The analysis of ``experiments.sgd_onset`` on its tiny configuration (docs/sgd_onset.md).

The control-variate Monte Carlo of the quadratic row against the exact moment
recursion of ``E[x]``, ``E[xxᵀ]`` (with the ``Pg₀`` shift), the estimator's
algebra, and the three checks and the transformer row on synthetic power laws.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sgd_onset as so

CONFIG = so.TINY


def exact_expected_loss(p: dict, lr: float, batch: int, steps) -> tuple[np.ndarray, np.ndarray]:
    """``E[½xᵀFx]`` under SGD (with replacement) and ``½xᵀFx`` under GD at ``steps`` (dense)."""
    a, y, f, shift = p["a"], p["y"], p["f"], p["shift"]
    count, n = a.shape
    b = -a * y[:, None] - shift  # ∇ℓ_j(x) = a_j a_jᵀ x + b_j
    h, c = a.T @ a / count, b.mean(0)
    m, sec, gd = np.zeros(n), np.zeros((n, n)), np.zeros(n)
    out_sgd, out_gd, k = [], [], 0
    for target in steps:
        for _ in range(k, target):
            hsh = h @ sec @ h
            quad = np.einsum("jx,xy,jy->j", a, sec, a)
            e_hsh = hsh + (np.einsum("jx,j,jy->xy", a, quad, a) / count - hsh) / batch
            hmc = np.outer(h @ m, c)
            e_hmb = hmc + (np.einsum("jx,j,jy->xy", a, a @ m, b) / count - hmc) / batch
            e_bb = np.outer(c, c) + (b.T @ b / count - np.outer(c, c)) / batch
            mc = np.outer(m, c)
            sec = (
                sec
                - lr * (h @ sec + sec @ h + mc + mc.T)
                + lr**2 * (e_hsh + e_hmb + e_hmb.T + e_bb)
            )
            m = m - lr * (h @ m + c)
            gd = gd - lr * (h @ gd + c)
        k = target
        out_sgd.append(0.5 * np.trace(f @ sec))
        out_gd.append(0.5 * gd @ f @ gd)
    return np.array(out_sgd), np.array(out_gd)


def test_quadratic_monte_carlo_matches_the_exact_moments():
    p = so.regression_problem(CONFIG)
    k_n = so.two_term_k_n(CONFIG.lr, CONFIG.batch, p["trace_f_sigma"], p["gamma"])
    steps = np.unique(np.geomspace(1, 3 * k_n, 12).round().astype(np.int64))
    y, z, gd = so._quadratic_runs(
        *(jnp.asarray(p[k]) for k in ("a", "y", "f", "shift")),
        CONFIG.lr,
        jnp.asarray(steps),
        batch=CONFIG.batch,
        seeds=256,
        key=jax.random.key(1),
    )
    z_mean = 0.5 * CONFIG.lr**2 * steps * p["trace_f_sigma"] / CONFIG.batch
    mc = so.control_variate_mean(np.asarray(y).T, np.asarray(z).T, z_mean)
    exact, exact_gd = exact_expected_loss(p, CONFIG.lr, CONFIG.batch, steps)
    np.testing.assert_allclose(np.asarray(gd), exact_gd, rtol=1e-9, atol=1e-12 * exact_gd.max())
    est, se = np.asarray(mc["estimate"]), np.asarray(mc["se"])
    # k = 1: Y = Z exactly (Fg = 0, no tail), so the estimate is E[Z] itself
    assert est[0] == pytest.approx(exact[0], rel=1e-9) and se[0] <= 1e-9 * est[0]
    assert np.all(np.abs(est[1:] - exact[1:]) <= 4 * se[1:])
    assert np.all(se[1:] < np.asarray(mc["raw_se"])[1:])  # the control variate helps


def test_control_variate_algebra():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3))
    out = so.control_variate_mean(2 * z + 3, z, np.array([0.5, 0.0, -1.0]))
    np.testing.assert_allclose(out["estimate"], [4.0, 3.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(out["se"], 0, atol=1e-12)
    np.testing.assert_allclose(out["beta"], 2.0)
    np.testing.assert_allclose(out["raw_se"], 2 * z.std(0, ddof=1) / np.sqrt(50))


def power_law_row(alpha=1e-6, beta=1e-12, last=400):
    """``E = αk + βk⁴``, ``GD = βk⁴``: noise and deterministic parts cross at ``(α/β)^{1/3}``."""
    steps = np.unique(np.geomspace(1, last, 30).round())
    every = np.arange(1, last + 1.0)
    mc = {"estimate": alpha * steps + beta * steps**4, "se": np.full(steps.size, 1e-3)}
    mc["raw_mean"], mc["raw_se"] = mc["estimate"], mc["se"]
    fc = {
        "deterministic": beta * every**4,
        "noise": alpha * every,
        "grid_mean": mc["estimate"] * (1 + 1e-9),
        "grid_in_window": steps <= 300,
        "validity_step": 300.0,
    }
    return steps, mc, beta * steps**4, fc, (alpha / beta) ** (1 / 3)


def test_checks_on_power_laws():
    steps, mc, gd, fc, cross = power_law_row()
    c = so.checks(CONFIG, 1e-3, steps, mc, gd, fc, k_n=cross)
    assert c["exponent"] == pytest.approx(1, abs=2e-3)  # k ≤ k_n/10: βk³/α ≤ 1e-3
    assert c["crossover_measured"] == pytest.approx(cross, rel=1e-6)
    assert c["crossover_forecast"] == pytest.approx(cross, rel=1e-6)
    assert c["crossover_in_window"] and c["max_z"] < 1e-3
    claims = so._row_claims({"checks": c}, CONFIG, "cmd", "synthetic")
    assert [x.passed for x in claims] == [True, True, True]


def test_transformer_row_from_synthetic_rows():
    lr, batch, gamma, k_n = CONFIG.tf_lr, CONFIG.tf_batch, 2.0, 100.0
    trace = k_n**3 * batch * gamma**2 * lr**2 / 4  # the two-term law's k_n
    steps = np.unique(np.geomspace(1, 400, 30).round())
    gd = gamma**2 * (lr * steps) ** 4 / 8  # the deterministic quartic
    rng = np.random.default_rng(0)
    z = np.outer(1 + 0.1 * rng.normal(size=8), 0.5 * lr**2 * steps * trace / batch)
    y = z + gd  # the linear noise walk plus the quartic: they cross at k_n
    det = _gd_row(steps, gd, trace, gamma)
    runs = [{"seed": i, "projected": y[i], "control": z[i], "kl": y[i]} for i in range(8)]
    t = so.transformer_row(CONFIG, [det, *runs])
    assert t["k_n"] == pytest.approx(k_n, rel=1e-9)
    assert t["exponent"] == pytest.approx(1, abs=2e-3)  # k ≤ 10: the quartic is ≤ 1e-3
    assert t["crossover_measured"] == pytest.approx(k_n, rel=1e-6)  # β̂ = 1: exact
    assert so.transformer_row(CONFIG, [det]) is None


def _gd_row(steps, gd, trace, gamma, h_norm=1.0) -> dict:
    """A synthetic block −1 row: full-batch GD at ``steps`` and the numbers at ``θ*``."""
    return {
        "seed": -1,
        "steps": steps,
        "gd_projected": gd,
        "gd_kl": gd + 1e-9 * steps**2,
        "trace_fm_sigma": trace,
        "trace_f_sigma": trace,
        "gamma": gamma,
        "tail_quadratic": 1.0,
        "pg_norm": 0.0,
        "H_norm": h_norm,
    }


def synthetic_transformer(h_norm=1.0, scale=1.0):
    """Sweep rows (linear noise walk + quartic, crossing at ``k_n = 100``) and their forecast."""
    lr, batch, gamma, k_n = CONFIG.tf_lr, CONFIG.tf_batch, 2.0, 100.0
    trace = k_n**3 * batch * gamma**2 * lr**2 / 4
    steps = np.unique(np.geomspace(1, 400, 30).round())
    rng = np.random.default_rng(1)
    z = np.outer(1 + 0.1 * rng.normal(size=64), 0.5 * lr**2 * steps * trace / batch)
    gd = gamma**2 * (lr * steps) ** 4 / 8
    y = z + gd * (1 + 0.01 * rng.normal(size=z.shape))  # the residual has a positive SE
    det = _gd_row(steps, gd, trace, gamma, h_norm)
    runs = [{"seed": i, "projected": y[i], "control": z[i], "kl": y[i]} for i in range(64)]
    every = np.arange(1, 401.0)
    noise, det_fc = 0.5 * lr**2 * every * trace / batch, gamma**2 * (lr * every) ** 4 / 8
    forecast = {
        "mean": (scale * (noise + det_fc)).tolist(),
        "deterministic": det_fc.tolist(),
        "noise": noise.tolist(),
        "in_window": (every <= 300).tolist(),
        "validity_step": 300.0,
        "noise_rate": 0.5 * lr * trace / batch,
        "noise_coefficients": [0.0, 0.5 * trace],
    }
    return [det, *runs], forecast, k_n


@pytest.mark.parametrize(
    ("h_norm", "scale", "verdicts"),
    [(1.0, 1.0, [True, True]), (1e3, 1.0, [False, True]), (1.0, 1.05, [True, False])],
)
def test_transformer_forecast_checks_on_synthetic_rows(h_norm, scale, verdicts):
    """Checks 2 and 3 of row 2: crossover (outside the window when t_n‖H‖ > 0.2), 3 SE."""
    rows, forecast, k_n = synthetic_transformer(h_norm, scale)
    t = so.transformer_row(CONFIG, rows, forecast)
    c = t["checks"]
    assert c["crossover_forecast"] == pytest.approx(k_n, rel=1e-3)
    assert c["crossover_measured"] == pytest.approx(k_n, rel=0.05)
    assert t["t_n_H"] == pytest.approx(k_n * CONFIG.tf_lr * h_norm)
    assert c["in_window_steps"] == np.sum(np.asarray(t["steps"]) <= 300)
    assert (c["max_z"] <= 3) == (scale == 1.0)
    claims = so._transformer_claims(t, CONFIG, "cmd")
    pair = [x for x in claims if x.claim.startswith(("SGD noise/det", "series.sgd_delta_u"))]
    assert [x.passed for x in pair] == verdicts
    assert ("outside its window" in pair[0].measured) == (h_norm > 1)
    # without the committed forecast both checks are 'not run'
    bare = so._transformer_claims(so.transformer_row(CONFIG, rows), CONFIG, "cmd")
    assert [x.verdict for x in bare[1:3]] == ["not run", "not run"]


@pytest.mark.parametrize("first", [4e-27, 0.0, -2e-27])
def test_crossover_does_not_depend_on_the_sign_of_a_rounding_level_first_step(first):
    """GD's projected loss at k = 1 is 0 in exact arithmetic (⅛γ²η⁴k²(k−1)²): its computed
    value is rounding of either sign, and the measured crossover is the same for each."""
    steps, mc, gd, _, cross = power_law_row()
    gd = np.asarray(gd, np.float64).copy()
    gd[0] = first
    measured = so.first_step_over(steps, gd, np.asarray(mc["estimate"]) - gd)
    assert measured == pytest.approx(cross, rel=1e-6)
    # a non-positive value inside the run still ends it there (no crossing after it is used)
    a = np.array([1.0, 2.0, -1.0, 8.0, 16.0])
    b = np.array([4.0, 4.0, 4.0, 4.0, 4.0])
    assert np.isnan(so.first_step_over(np.arange(1.0, 6.0), a, b))
    assert np.isnan(so.first_step_over(np.arange(1.0, 6.0), -a, b))
