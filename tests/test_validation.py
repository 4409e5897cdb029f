"""The held-out validation of diagnose (experiments.validation): its parts against references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import validation as V
from geomcollapse import models, stats, training


def _tiny_transformer():
    config = models.TransformerConfig(vocab=5, context=3, d_model=4, heads=2, layers=1, mlp_ratio=2)
    graphdef, params = models.transformer_init(jax.random.key(0), config, dtype=jnp.float64)
    logits = models.transformer_logits(graphdef)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    data = (
        jax.random.randint(k1, (8, 3), 0, 5),
        jax.random.randint(k2, (8, 3), 0, 5),
        jnp.ones((8, 3), jnp.float64),
    )
    prompts = jax.random.randint(k3, (6, 3), 0, 5)
    start = jnp.full((6,), 2, jnp.int32)
    ref = (prompts, start, training.answer_logits(logits)(params, prompts, start))
    return params, logits, data, ref


def test_descent_is_gradient_descent_and_its_delta_u_the_skill_loss_change():
    params, logits, data, ref = _tiny_transformer()
    steps, lr = 5, 0.3
    idx = np.array([[0, 3, 5], [1, 2, 7], [4, 6, 0], [2, 3, 1], [7, 5, 6]])
    got = np.asarray(V._descent(logits, steps, lr)(params, data, jnp.asarray(idx), ref))
    grad = jax.jit(jax.grad(training.sequence_loss(logits)))
    u = jax.jit(training.kl_skill_loss(logits))
    theta, want = params, []
    for rows in idx:
        g = grad(theta, *(a[rows] for a in data))
        theta = jax.tree.map(lambda p, gi: p - lr * gi, theta, g)
        want.append(float(u(theta, *ref)))  # u(θ*) = 0: u(θ) is Δu (well above rounding here)
    assert min(want) > 1e-8
    np.testing.assert_allclose(got, want, rtol=1e-9)


def _computed(forecasts, realised, windows, lr=0.01, horizons=(1, 2, 4)):
    rows = [
        {
            "dataset": f"d{i}",
            "validity_time": w,
            "coefficients": [0.0, 0.0, 1.0 + i],
            "forecast": list(f),
            "gd": list(g),
            "sgd": list(g),
        }
        for i, (f, g, w) in enumerate(zip(forecasts, realised, windows, strict=True))
    ]
    return {"rows": rows, "lr": lr, "horizons": list(horizons)}


def test_only_in_window_cells_count_and_the_verdict_follows_the_median():
    config = V.Config(datasets=("label_noise", "shift_lookalike"), resamples=50)
    # windows 0.025 (t = 0.01, 0.02 in window) and 0.015 (only t = 0.01)
    ratios = [[1.2, 1.4, 100.0], [1.45, 100.0, 100.0]]
    computed = _computed([[r for r in rs] for rs in ratios], [[1.0] * 3, [1.0] * 3], [0.025, 0.015])
    res = V.analyse(config, computed, None)
    assert [c["t"] for c in res["cells"]] == pytest.approx([0.01, 0.02, 0.01])
    assert res["median_log_ratio"] == pytest.approx(math.log(1.4))
    assert V.claims(res, config, "cmd")[0].passed  # 1.4 ≤ 1.5
    worse = _computed([[1.6, 1.7, 1.0], [1.55, 1.0, 1.0]], [[1.0] * 3] * 2, [0.025, 0.015])
    assert not V.claims(V.analyse(config, worse, None), config, "cmd")[0].passed
    nothing = _computed([[1.0] * 3] * 2, [[1.0] * 3] * 2, [0.001, 0.001])
    assert not V.claims(V.analyse(config, nothing, None), config, "cmd")[0].passed


def test_the_ranking_is_spearman_of_the_forecast_at_the_common_time_against_harm():
    names = ("label_noise", "shift_lookalike", "delimited_all", "noisy_lookalike")
    config = V.Config(datasets=names, resamples=200)
    computed = _computed([[1.0] * 3] * 4, [[1.0] * 3] * 4, [0.03, 0.02, 0.05, 0.04])
    for i, r in enumerate(computed["rows"]):
        r["dataset"] = names[i]
    harm = dict(zip(names, [0.1, 0.5, 0.2, 0.3], strict=True))
    rank = V.analyse(config, computed, harm)["ranking"]
    assert rank["t0"] == 0.02
    x = np.array([(1.0 + i) * 0.02**2 for i in range(4)])  # c₂ t₀² per dataset
    np.testing.assert_allclose(rank["forecast"], x, rtol=1e-12)
    assert rank["rho"] == pytest.approx(float(stats.spearman(x, np.array([0.1, 0.5, 0.2, 0.3]))))
    assert rank["interval"][0] <= rank["rho"] <= rank["interval"][1]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="datasets"):
        V.Config(datasets=("no_such_dataset",))
    with pytest.raises(ValueError, match="horizons"):
        V.Config(horizons=(4, 2))
    with pytest.raises(ValueError, match="forecast_examples"):
        V.Config(forecast_examples=0)
