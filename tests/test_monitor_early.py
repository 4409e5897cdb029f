"""The monitor's early-warning rule against a dense twin: explicit ``P`` and ``F`` in numpy.

A pytree quadratic (11 parameters in two leaves) trained by SGD; the rule's
subspace is the top 3 eigenvectors of an explicit PSD ``F`` (numpy ``eigh``),
the monitor's own subspace another (top 2 of another matrix). ``E_k =
‖P(θ_k − θ*)‖`` and ``½‖F^{1/2}P(θ_k − θ*)‖² = ½(θ_k−θ*)ᵀPFP(θ_k−θ*)`` are formed
from the dense matrices, not from the eigenpairs.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import monitor as mon
from geomcollapse.subspace import Subspace
from tests.conftest import flat, run_optimizer

LR, STEPS, EVERY, AT = 0.1, 8, 3, 4
RNG = np.random.default_rng(11)
N = 11
A = RNG.standard_normal((20, N)) / np.sqrt(N)
B = RNG.standard_normal(20)
PARAMS = {"a": jnp.asarray(RNG.standard_normal(5)), "b": jnp.asarray(RNG.standard_normal((3, 2)))}
_, UNRAVEL = ravel_pytree(PARAMS)


def _psd(seed: int) -> np.ndarray:
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))[0]
    return q @ np.diag(np.geomspace(4.0, 1e-3, N)) @ q.T


F_EARLY, F_MAIN = _psd(1), _psd(2)


def _top(F: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    lam, V = np.linalg.eigh(F)
    return lam[::-1][:d], V[:, ::-1][:, :d].T


def _subspace(F: np.ndarray, d: int) -> Subspace:
    lam, V = _top(F, d)
    return Subspace.exact(jnp.asarray(lam), jnp.asarray(V))


EARLY, MAIN = _subspace(F_EARLY, 3), _subspace(F_MAIN, 2)
P_EARLY = (lambda V: V.T @ V)(_top(F_EARLY, 3)[1])  # the dense projector


def _loss(params):
    r = jnp.asarray(A) @ ravel_pytree(params)[0] - jnp.asarray(B)
    return 0.5 * jnp.sum(r**2)


GRAD = jax.jit(jax.grad(_loss))


@pytest.fixture(scope="module")
def plain():
    """θ_0 … θ_K of plain SGD, and the twin's E_k and projected loss at every k."""
    thetas, updates, _ = run_optimizer(optax.sgd(LR), PARAMS, GRAD, STEPS)
    xs = [flat(t) - flat(PARAMS) for t in thetas]
    E = np.array([np.linalg.norm(P_EARLY @ x) for x in xs])
    proj = np.array([0.5 * x @ P_EARLY @ F_EARLY @ P_EARLY @ x for x in xs])
    assert np.all(np.diff(proj[1:]) > 0)  # the projected loss grows along this run
    return thetas, updates, E, proj


def _monitor(tau: float, **options):
    rule = mon.EarlyWarning(EARLY, threshold=tau, at=AT)
    return mon.monitor(optax.sgd(LR), MAIN, every=EVERY, early_warning=rule, **options)


def test_records_E_k_and_the_projected_loss_like_the_dense_twin(plain):
    thetas, updates, E, proj = plain
    tau = 0.5 * (proj[3] + proj[AT])  # fires at k = 4 (and would not have at k = 3)
    _, our_updates, states = run_optimizer(_monitor(tau), PARAMS, GRAD, STEPS)
    for a, b in zip(our_updates, updates, strict=True):  # training is untouched ('warn')
        assert np.array_equal(flat(a), flat(b))
    log = mon.monitor_log(states[-1])
    np.testing.assert_array_equal(log.step, [3, AT, 6])  # every 3, and the rule's step
    np.testing.assert_allclose(log.early_norm, E[[3, AT, 6]], rtol=1e-12)
    np.testing.assert_allclose(log.early_projected_loss, proj[[3, AT, 6]], rtol=1e-12)
    np.testing.assert_array_equal(log.early_fired, [False, True, False])
    # the monitor's own projected loss stays on its own subspace
    lam, V = _top(F_MAIN, 2)
    main = [0.5 * np.sum(lam * (V @ (flat(thetas[k]) - flat(PARAMS))) ** 2) for k in (3, AT, 6)]
    np.testing.assert_allclose(log.projected_loss, main, rtol=1e-12)
    assert int(states[-1].early_fired.step) == AT and not np.any(log.exceeded)

    # said once: repeated checks of the carried state say nothing more
    with pytest.warns(mon.EarlyWarningFired, match=f"step {AT} .*≥ τ = {tau:.4g}") as record:
        state = mon.check_monitor(states[-1])
    assert len(record) == 1 and mon.exceeded(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            state = mon.check_monitor(state)
    # before the rule's step, nothing to say
    assert not mon.exceeded(states[AT - 2])


def test_a_threshold_above_the_run_never_fires(plain):
    _, _, _, proj = plain
    states = run_optimizer(_monitor(proj[AT] * 1.01), PARAMS, GRAD, STEPS)[2]
    log = mon.monitor_log(states[-1])
    assert not np.any(log.early_fired) and int(states[-1].early_fired.step) == -1
    # the later, larger projected loss does not fire it either: the rule reads step `at` only
    assert log.early_projected_loss[-1] > proj[AT] * 1.01
    assert not mon.exceeded(states[-1])


def test_budget_and_rule_are_two_distinct_warnings_each_said_once(plain):
    _, _, _, proj = plain
    # a budget every measurement passes (from θ₃ on), and the rule firing at θ₄
    states = run_optimizer(_monitor(0.5 * proj[AT], budget=1e-12), PARAMS, GRAD, STEPS)[2]
    with pytest.warns(mon.BudgetWarning) as record:
        state = mon.check_monitor(states[-1])
    kinds = sorted(type(w.message).__name__ for w in record)
    assert kinds == ["BudgetWarning", "EarlyWarningFired"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.check_monitor(state)
    assert int(states[-1].first_exceeded.step) == EVERY


def test_stop_halts_training_at_the_rule_step(plain):
    thetas, updates, _, proj = plain
    tx = _monitor(0.5 * proj[AT], on_exceed="stop")
    ours, our_updates, states = run_optimizer(tx, PARAMS, GRAD, STEPS)
    for k in range(AT):
        assert np.array_equal(flat(our_updates[k]), flat(updates[k]))
    assert all(np.all(flat(u) == 0) for u in our_updates[AT:])  # update AT measured θ_AT
    np.testing.assert_array_equal(flat(ours[-1]), flat(thetas[AT]))
    with pytest.raises(mon.BudgetExceeded, match="early warning") as err:
        mon.check_monitor(states[-1])
    np.testing.assert_allclose(err.value.measurement.early_projected_loss, proj[AT], rtol=1e-12)


def test_callback_fires_once_at_the_rule_step(plain):
    thetas, _, _, proj = plain
    rule = mon.EarlyWarning(EARLY, threshold=0.5 * proj[AT], at=AT)
    cb = mon.MonitorCallback(PARAMS, MAIN, every=EVERY, early_warning=rule)
    with pytest.warns(mon.EarlyWarningFired) as record:
        for k in range(1, STEPS + 1):
            cb(k, thetas[k])
    assert len(record) == 1
    np.testing.assert_array_equal(mon.monitor_log(cb.state).step, [3, AT, 6])


def test_bad_early_warnings_are_refused_naming_the_field():
    cases = [
        ({"early_warning": (EARLY, 1.0, 16)}, "early_warning must be an EarlyWarning"),
        ({"early_warning": mon.EarlyWarning(EARLY, threshold=0.0)}, "early_warning.threshold"),
        ({"early_warning": mon.EarlyWarning(EARLY, threshold=1.0, at=0)}, "early_warning.at"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            mon.monitor(optax.sgd(LR), MAIN, every=EVERY, **options)
    wide = Subspace.exact(jnp.ones(1), jnp.eye(1, N + 1))
    tx = mon.monitor(optax.sgd(LR), MAIN, every=EVERY, early_warning=mon.EarlyWarning(wide, 1.0))
    with pytest.raises(ValueError, match=r"early_warning\.subspace"):
        tx.init(PARAMS)
