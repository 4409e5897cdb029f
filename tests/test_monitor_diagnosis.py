"""One path from ``diagnose`` to ``monitor``: the diagnosis carries ``M(θ*)`` and its forecast.

A quadratic landscape with an explicit skill Fisher ``F`` (``u = ½xᵀFx``,
``L = ½xᵀAx + cᵀx``, ``x = θ − θ*``): the monitor built from the diagnosis in
one line measures ``½xᵀPFPx`` with ``P`` of numpy's ``eigh`` of ``F``, evaluates
the diagnosis' own forecast at ``t = lr·k``, and takes its threshold as the budget.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import geomcollapse
from geomcollapse import monitor as mon
from geomcollapse.diagnosis import ARRAYS_FILE, Diagnosis
from tests.conftest import run_optimizer

N, D, LR, STEPS, EVERY = 12, 3, 0.05, 12, 2
RNG = np.random.default_rng(3)
U = np.linalg.qr(RNG.standard_normal((N, N)))[0]
F = (U * np.r_[5.0, 3.0, 1.0, np.full(N - 3, 0.01)]) @ U.T
A = (lambda B: (B + B.T) / 4 + np.eye(N))(RNG.standard_normal((N, N)))
C = RNG.standard_normal(N)
THETA_STAR = jnp.asarray(RNG.standard_normal(N))


def skill_u(theta, F, theta_star):
    x = theta - theta_star
    return 0.5 * x @ F @ x


def task_L(theta, A, c, theta_star):
    x = theta - theta_star
    return 0.5 * x @ A @ x + c @ x


def fisher_F(theta, v, F, theta_star):
    return F @ v


GRAD = jax.jit(jax.grad(task_L))
TASK = (jnp.asarray(A), jnp.asarray(C), THETA_STAR)


def _dense_projected() -> np.ndarray:
    """``½xᵀPFPx`` at θ_0 … θ_K of plain SGD, ``P`` the top-``D`` eigenspace of ``F`` (eigh)."""
    V = np.linalg.eigh(F)[1]
    P = V[:, -D:] @ V[:, -D:].T
    x, out = np.zeros(N), [0.0]
    for _ in range(STEPS):
        x = x - LR * (A @ x + C)
        out.append(0.5 * x @ P @ F @ P @ x)
    return np.array(out)


PROJECTED = _dense_projected()
THRESHOLD = float(0.5 * (PROJECTED[4] + PROJECTED[6]))  # passed between θ₄ and θ₆


@pytest.fixture(scope="module")
def diagnosis():
    return geomcollapse.diagnose(
        skill_u,
        task_L,
        THETA_STAR,
        skill_args=(jnp.asarray(F), THETA_STAR),
        task_args=TASK,
        fisher=fisher_F,
        d=D,
        lr=LR,
        steps=STEPS,
        threshold=THRESHOLD,
        key=jax.random.key(0),
    )


def _log(tx):
    states = run_optimizer(tx, THETA_STAR, GRAD, STEPS, *TASK)[2]
    return mon.monitor_log(states[-1]), states[-1]


def test_monitor_of_a_diagnosis_in_one_line_matches_the_dense_twin(diagnosis):
    log, state = _log(mon.monitor(optax.sgd(LR), diagnosis, every=EVERY))
    steps = np.arange(EVERY, STEPS, EVERY)  # θ_K, the last iterate, is not measured
    np.testing.assert_array_equal(log.step, steps)
    np.testing.assert_allclose(log.projected_loss, PROJECTED[steps], rtol=1e-10)
    # the diagnosis' forecast at t = lr·k (its lr), windowed as the diagnosis windows it
    delta_u, projected = diagnosis.forecast(LR * steps)
    np.testing.assert_allclose(log.forecast, projected, rtol=1e-12)
    np.testing.assert_allclose(log.forecast_delta_u, delta_u, rtol=1e-12)
    np.testing.assert_array_equal(log.in_window, LR * steps <= diagnosis.projected_validity_time)
    # the budget is the diagnosis' threshold on Δu, which the projected loss bounds from below
    np.testing.assert_array_equal(log.exceeded, PROJECTED[steps] > THRESHOLD)
    assert int(state.first_exceeded.step) == 6
    # from_diagnosis is the same call; series=False drops the forecast, budget= overrides
    same, _ = _log(mon.from_diagnosis(optax.sgd(LR), diagnosis, every=EVERY))
    np.testing.assert_array_equal(same.projected_loss, log.projected_loss)
    bare, bare_state = _log(
        mon.from_diagnosis(optax.sgd(LR), diagnosis, every=EVERY, series=False, budget=np.inf)
    )
    assert np.all(np.isnan(bare.forecast)) and not mon.exceeded(bare_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.check_monitor(bare_state)


def test_a_saved_report_rebuilds_what_the_monitor_needs(diagnosis, tmp_path):
    paths = diagnosis.save(tmp_path / "with", arrays=True)
    assert paths[-1].name == ARRAYS_FILE
    loaded = Diagnosis.load(tmp_path / "with")
    assert loaded.to_json() == diagnosis.to_json()  # every reported number (NaN ≠ NaN in ==)
    ours, _ = _log(mon.monitor(optax.sgd(LR), loaded, every=EVERY))
    theirs, _ = _log(mon.monitor(optax.sgd(LR), diagnosis, every=EVERY))
    for name in ("projected_loss", "forecast", "exceeded"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
    # a report saved without arrays (or read from JSON) says what to do
    diagnosis.save(tmp_path / "without")
    bare = Diagnosis.load(tmp_path / "without")
    assert bare.subspace is None and bare.to_json() == diagnosis.to_json()
    for make in (
        lambda: mon.monitor(optax.sgd(LR), bare, every=EVERY),
        lambda: mon.from_diagnosis(optax.sgd(LR), bare, every=EVERY),
        lambda: bare.save(tmp_path / "never", arrays=True),
    ):
        with pytest.raises(ValueError, match="carries no subspace"):
            make()
    assert not (tmp_path / "never").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="diagnosis must be"):
        mon.from_diagnosis(optax.sgd(LR), diagnosis.subspace, every=EVERY)
    with pytest.raises(ValueError, match="directory"):
        Diagnosis.load(tmp_path / "nowhere")
