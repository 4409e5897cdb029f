"""``diagnose(..., batch_size=, example_loss=)``: the minibatch-SGD forecast in the report.

Checked against ``series.sgd_delta_u`` called directly and the dense
``½(lr/B)tr(FΣ)`` on a quadratic skill with a linear-regression task
(docs/theory.md §8); bad combinations are refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import geomcollapse
from geomcollapse import series
from geomcollapse.diagnosis import Diagnosis

LR, BATCH = 1e-3, 4


def quad_skill(theta, f):
    return 0.5 * theta @ f @ theta


def sq_loss(theta, a, y):
    return 0.5 * (a @ theta - y) ** 2


def task_loss(theta, a, y):
    return jnp.mean(jax.vmap(sq_loss, (None, 0, 0))(theta, a, y))


def fisher(theta, v, f):
    return f @ v


def problem(n=6, count=24):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(count, n)) * np.linspace(0.6, 1.6, n)
    y = rng.normal(size=count) + 0.5
    basis = np.linalg.qr(rng.normal(size=(n, n)))[0]
    f = (basis * np.array([2.0, 1.0] + [0.05] * (n - 2))) @ basis.T
    return jnp.asarray(a), jnp.asarray(y), jnp.asarray(f)


def run(threshold=None, **kw):
    a, y, f = problem()
    return geomcollapse.diagnose(
        quad_skill,
        task_loss,
        jnp.zeros(a.shape[1]),
        skill_args=(f,),
        task_args=(a, y),
        fisher=fisher,
        d=2,
        lr=LR,
        threshold=threshold,
        key=jax.random.key(0),
        **kw,
    )


def test_sgd_fields_match_sgd_delta_u_and_the_dense_noise_rate():
    a, y, f = problem()
    fc = series.sgd_delta_u(
        quad_skill, sq_loss, jnp.zeros(a.shape[1]), (a, y), lr=LR, batch_size=BATCH,
        steps=np.arange(1, 4001), order=geomcollapse.diagnosis.DEFAULT_ORDER, skill_args=(f,),
    )  # fmt: skip
    k0 = int(0.5 * fc.validity_step)
    threshold = float(fc.mean[k0 - 1])  # reached first at step k0 (E[Δu] grows here)
    dg = run(threshold, batch_size=BATCH, example_loss=sq_loss)
    np.testing.assert_allclose(dg.sgd_coefficients, fc.mean_coefficients, rtol=1e-12)
    assert dg.sgd_validity_time == pytest.approx(fc.validity_time, rel=1e-12)
    dev = -np.asarray(a) * np.asarray(y)[:, None]
    dev -= dev.mean(0)  # per-example gradient deviations at θ = 0
    dense = 0.5 * LR / BATCH * np.trace(np.asarray(f) @ dev.T @ dev / len(dev))
    assert dg.noise_rate == pytest.approx(dense, rel=1e-12)
    inside = np.asarray(fc.in_window)
    brute = np.flatnonzero((np.asarray(fc.mean) >= threshold) & inside)
    assert dg.sgd_crossing_step == int(fc.steps[brute[0]]) == k0
    assert Diagnosis.from_json(dg.to_json()).to_json() == dg.to_json()  # nan ≠ nan as floats
    assert Diagnosis.from_json(dg.to_json()).sgd_crossing_step == k0
    assert f"B = {BATCH}" in dg.to_markdown()


def test_without_batch_size_the_sgd_fields_are_none():
    dg = run()
    assert (dg.batch_size, dg.noise_rate, dg.sgd_crossing_step) == (None, None, None)
    assert "minibatch SGD" not in dg.to_markdown()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": BATCH}, "go together"),
        ({"example_loss": sq_loss}, "go together"),
        ({"batch_size": BATCH, "example_loss": lambda p, a, y: 2 * sq_loss(p, a, y)}, "mean"),
    ],
)
def test_bad_sgd_arguments_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        run(**kw)


def test_the_report_figure_draws_the_sgd_forecast_it_reports():
    """The forecast panel draws ``E[Δu]`` under SGD from ``sgd_coefficients`` (its points are
    the polynomial at the plotted times), labelled with ``B``, and passes the figure checks."""
    from tests import figure_checks

    dg = run(batch_size=BATCH, example_loss=sq_loss)
    fig = dg.figure()
    assert figure_checks.check(fig) == []
    panel = fig.axes[1]
    label = rf"$E[\Delta u]$ under SGD, B = {BATCH}"
    assert label in panel.get_legend_handles_labels()[1]
    line = next(ln for ln in panel.get_lines() if ln.get_label() == label)
    t, y = (np.asarray(a, np.float64) for a in line.get_data())
    expected = np.polyval(np.asarray(dg.sgd_coefficients)[::-1], t)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert t.max() <= dg.sgd_validity_time  # the solid part lies inside its window
    # without batch_size nothing of the kind is drawn
    bare = run().figure().axes[1].get_legend_handles_labels()[1]
    assert not any("SGD" in text for text in bare)
