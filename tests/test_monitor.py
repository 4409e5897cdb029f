"""The training monitor against dense twins (eigh of the explicit Fisher), float64."""

import itertools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, models, series
from geomcollapse import monitor as mon
from geomcollapse.series import Series, projected_from_coordinates
from geomcollapse.subspace import Subspace, orthogonalized
from tests.conftest import flat, run_optimizer

D, LR, STEPS = 2, 0.5, 7


class Setup:
    """A 4-6-3 tanh MLP (51 parameters): skill Fisher on one batch, SGD on shifted labels."""

    def __init__(self):
        # numpy-made weights and data: eager jax.random calls would compile one op at a time
        rng = np.random.default_rng(7)
        sizes = (4, 6, 3)
        params = [
            {"w": rng.standard_normal((a, b)) / np.sqrt(a), "b": 0.1 * rng.standard_normal(b)}
            for a, b in itertools.pairwise(sizes)
        ]
        y = rng.integers(0, 3, 20)
        x = rng.standard_normal((3, 4))[y] + rng.standard_normal((20, 4))
        p = models.MLPProblem(jax.tree.map(jnp.asarray, params), models.Batch(x, y), "tanh")
        self.problem, self.params, self.skill = p, p.params, p.batch
        self.task = models.Batch(x, (y + 1) % 3)
        self.flat, self.unravel = ravel_pytree(p.params)
        self.fvp = curvature.fisher_vp(p.logits)
        self.grad = jax.jit(jax.grad(p.loss))
        self.dense_fisher = jax.jit(self._dense_fisher)
        lam, V = self.top(self.flat)
        self.subspace = Subspace.exact(lam, V)
        self.thetas, self.updates, _ = run(optax.sgd(LR), self)

    def _dense_fisher(self, flat):
        """``Jᵀ(diag p − ppᵀ)J / N`` from the explicit Jacobian of the logits."""

        def logits(f):
            return self.problem.logits(self.unravel(f), self.skill)

        J = jax.jacfwd(logits)(flat)
        q = jax.nn.softmax(logits(flat), axis=-1)
        W = jax.vmap(lambda r: jnp.diag(r) - jnp.outer(r, r))(q)
        return jnp.einsum("kci,kcd,kdj->ij", J, W, J) / q.shape[0]

    def top(self, flat):
        """Top-``D`` eigenpairs of the dense Fisher at ``flat``: ``(λ (D,), rows (D, n))``."""
        lam, V = np.linalg.eigh(np.asarray(self.dense_fisher(flat)))
        return lam[::-1][:D], V[:, ::-1][:, :D].T

    def dense(self, k: int) -> dict:
        """The monitor's quantities at ``θ_k`` of the plain SGD run, from dense ``eigh``."""
        theta = flat(self.thetas[k])
        x = theta - np.asarray(self.flat)
        lam, V = np.asarray(self.subspace.values), np.asarray(self.subspace.basis)
        c = V @ x
        _, Vk = self.top(theta)
        return {
            "projected_loss": 0.5 * np.sum(lam * c**2),
            "overlap": np.linalg.norm(c) / np.linalg.norm(x),
            "angle": np.max(scipy.linalg.subspace_angles(Vk.T, V.T)),
            "mean_cos2": np.sum((Vk @ V.T) ** 2) / D,
            "rows": Vk,
        }


def run(opt, setup, steps: int = STEPS):
    """``steps`` jitted SGD-gradient steps of ``opt``: iterates θ_0 … θ_K, updates, states."""
    return run_optimizer(opt, setup.params, setup.grad, steps, setup.task)


def bitwise_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_rotation_equals_scipy_principal_angles_down_to_tiny_angles():
    rng = np.random.default_rng(7)
    n, d = 40, 3
    A = np.linalg.qr(rng.standard_normal((n, d)))[0].T
    B = np.linalg.qr(rng.standard_normal((n, d)))[0].T
    # a rotation by 1e-9 in the plane of a₁ and a unit vector w ⊥ A
    w = rng.standard_normal(n)
    w -= A.T @ (A @ w)
    w /= np.linalg.norm(w)
    R = A.copy()
    R[0] = np.cos(1e-9) * A[0] + np.sin(1e-9) * w
    angle, cos2 = jax.jit(jax.vmap(mon.rotation))(jnp.stack([A, R]), jnp.stack([B, A]))
    reference = scipy.linalg.subspace_angles(A.T, B.T)
    np.testing.assert_allclose(angle[0], np.max(reference), rtol=1e-12)
    np.testing.assert_allclose(cos2[0], np.sum(np.cos(reference) ** 2) / d, rtol=1e-12)
    # the tiny angle keeps its relative accuracy (arccos of a cosine would give ~1e-8)
    np.testing.assert_allclose(angle[1], 1e-9, rtol=1e-6)
    np.testing.assert_allclose(cos2[1], 1 - np.sin(1e-9) ** 2 / d, rtol=1e-15)


def test_monitor_measures_every_k_steps_like_the_dense_twin_and_leaves_training_alone(setup):
    """Measured at θ₃, θ₆ (every 3) = dense eigh; updates = SGD's bit for bit; warns at θ₆."""
    d3, d6 = setup.dense(3), setup.dense(6)
    assert d3["projected_loss"] < d6["projected_loss"]
    budget = 0.5 * (d3["projected_loss"] + d6["projected_loss"])
    tx = mon.monitor(
        optax.sgd(LR),
        setup.subspace,
        every=3,
        fisher_vp=setup.fvp,
        key=jax.random.key(0),
        fisher_args=(setup.skill,),
        budget=budget,
        max_steps=16,
    )
    thetas, updates, states = run(tx, setup)
    for ours, plain in zip(updates, setup.updates, strict=True):
        assert bitwise_equal(ours, plain)  # monitoring does not change training
    assert bitwise_equal(thetas[-1], setup.thetas[-1])

    log = mon.monitor_log(states[-1])
    np.testing.assert_array_equal(log.step, [3, 6])
    for i, ref in enumerate((d3, d6)):
        rec = mon.Measurement(*(field[i] for field in log))
        assert rec.converged and 0 < rec.num_matvecs <= 16 + setup.subspace.dim  # + certification
        for name in ("projected_loss", "overlap", "mean_cos2"):
            np.testing.assert_allclose(getattr(rec, name), ref[name], rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(rec.angle, ref["angle"], rtol=1e-8)
        assert np.isnan(rec.forecast) and not rec.in_window
    assert d6["angle"] > 0.1  # M really rotated: a stale basis would fail above
    # the warm start of the next run is M(θ₆), as eigh finds it
    assert scipy.linalg.subspace_angles(np.asarray(states[-1].basis).T, d6["rows"].T).max() < 1e-8
    np.testing.assert_array_equal(log.exceeded, [False, True])

    # the budget surfaces at the first measurement past it, not before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.check_monitor(states[4])  # θ₅: only θ₃ measured
    assert not mon.exceeded(states[4]) and mon.exceeded(states[-1])
    number = re.escape(f"= {d6['projected_loss']:.4g}, overlap ‖PΔθ‖/‖Δθ‖ = {d6['overlap']:.4g}")
    with pytest.warns(mon.BudgetWarning, match="step 6: projected loss .*" + number) as rec:
        checked = mon.check_monitor(states[-1])
    assert {w.filename for w in rec} == {__file__}  # the caller's line
    # said once: the returned state remembers it (the chunk loop passes it on)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            checked = mon.check_monitor(checked)
    with pytest.raises(TypeError, match="exceeded"):  # the old bool idiom fails loudly
        bool(checked)


def test_stop_halts_training_at_the_first_measurement_past_the_budget(setup):
    """``on_exceed='stop'``: SGD's updates until θ₆ is measured, zeros after; raises on the host."""
    d4, d6 = setup.dense(4), setup.dense(6)
    # A hand-made forecast, to check that the monitor evaluates it at t = lr·k and windows it:
    # Δu = t² + b t⁴ (its t⁴ term reaches 10 % of the sum at t² = 1/(9b) = 2.5²) and a
    # one-term projected loss 0.1 t⁴, whose window falls back to Δu's. Its flow is made for
    # this subspace (the monitor checks): x₁ = 2β w ⊥ M, x₂ = β v₁ with ½λ₁β² = 0.1, so
    # ½Σλ_i⟨v_i, x(t)⟩² = 0.1 t⁴ exactly, and the time scale ‖x₁‖/‖x₂‖ is 2.
    b = 1 / 56.25
    V, lam = np.asarray(setup.subspace.basis), np.asarray(setup.subspace.values)
    w = np.random.default_rng(3).standard_normal(V.shape[1])
    w -= V.T @ (V @ w)
    w /= np.linalg.norm(w)
    beta = np.sqrt(0.2 / lam[0])
    zero = np.zeros_like(w)
    series = Series(
        jnp.asarray([0.0, 0.0, 1.0, 0.0, b]),
        jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.1]),
        jnp.asarray(np.stack([2 * beta * w, beta * V[0], zero, zero])),  # x₁ … x₄
    )
    tx = mon.monitor(
        optax.sgd(LR),
        setup.subspace,
        every=2,
        budget=0.5 * (d4["projected_loss"] + d6["projected_loss"]),
        on_exceed="stop",
        series=series,
        time_per_step=LR,
        capacity=2,
    )
    thetas, updates, states = run(tx, setup)
    for k in range(6):
        assert bitwise_equal(updates[k], setup.updates[k])
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(updates[6]))
    assert bitwise_equal(thetas[-1], setup.thetas[6])  # halted at θ₆
    assert not mon.exceeded(states[5])  # θ₆ is measured by update 6 (states[6])
    mon.check_monitor(states[5])  # nothing to say, nothing raised
    with pytest.raises(mon.BudgetExceeded, match="step 6") as err:
        mon.check_monitor(states[6])
    np.testing.assert_allclose(err.value.measurement.projected_loss, d6["projected_loss"])

    log = mon.monitor_log(states[-1])  # capacity 2: the last two measurements
    np.testing.assert_array_equal(log.step, [4, 6])
    np.testing.assert_allclose(log.projected_loss, [d4["projected_loss"], d6["projected_loss"]])
    assert np.all(np.isnan(log.angle))  # no fisher_vp: rotation not measured
    t = LR * np.array([4.0, 6.0])
    np.testing.assert_allclose(log.forecast, 0.1 * t**4, rtol=1e-15)
    np.testing.assert_allclose(log.forecast_delta_u, t**2 + b * t**4, rtol=1e-15)
    np.testing.assert_allclose(mon.forecast_window(series), 2.5, rtol=1e-12)
    np.testing.assert_array_equal(log.in_window, [True, False])  # t = 2, 3


def test_callback_warns_at_the_first_measured_step_past_the_budget(setup):
    d3, d6 = setup.dense(3), setup.dense(6)
    cb = mon.MonitorCallback(
        setup.params,
        setup.subspace,
        every=3,
        budget=0.5 * (d3["projected_loss"] + d6["projected_loss"]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(6):
            cb(k, setup.thetas[k])
    with pytest.warns(mon.BudgetWarning, match="step 6") as record:
        cb(6, setup.thetas[6])
    assert {w.filename for w in record} == {__file__}  # the caller's line
    log = mon.monitor_log(cb.state)
    np.testing.assert_array_equal(log.step, [3, 6])
    np.testing.assert_allclose(log.overlap, [d3["overlap"], d6["overlap"]], rtol=1e-12)
    stopping = mon.MonitorCallback(
        setup.params, setup.subspace, every=3, budget=d3["projected_loss"] / 2, on_exceed="stop"
    )
    with pytest.raises(mon.BudgetExceeded, match="step 3"):
        stopping(3, setup.thetas[3])


def test_monitor_measure_with_a_given_basis_is_the_dense_twin(setup):
    ref = setup.dense(6)

    @jax.jit
    def measure(theta, basis):
        return mon.monitor_measure(theta, setup.params, setup.subspace, step=6, basis=basis)

    m = measure(setup.thetas[6], jnp.asarray(ref["rows"]))
    for name in ("projected_loss", "overlap", "angle", "mean_cos2"):
        np.testing.assert_allclose(getattr(m, name), ref[name], rtol=1e-10, err_msg=name)
    m = mon.monitor_measure(setup.params, setup.params, setup.subspace)
    assert m.projected_loss == 0 and m.overlap == 0 and np.isnan(m.angle)


def test_bad_inputs_raise_naming_the_argument(setup):
    s, sgd, key = setup.subspace, optax.sgd(0.1), jax.random.key(0)
    cases = [
        (lambda: mon.monitor(sgd, s, every=0), "every"),
        (lambda: mon.monitor(sgd, s, every=2, on_exceed="halt"), "on_exceed"),
        (lambda: mon.monitor(sgd, s, every=2, budget=-1.0), "budget"),
        (lambda: mon.monitor(sgd, s, every=2, angle_budget=0.0), "angle_budget"),
        (lambda: mon.monitor(sgd, s, every=2, fisher_vp=setup.fvp), "key"),
        (lambda: mon.monitor(sgd, s, every=2, fisher_vp=3, key=key), "fisher_vp"),
        (lambda: mon.monitor(sgd, s, every=2, rotation_every=0), "rotation_every"),
        (lambda: mon.monitor(sgd, s, every=2, fisher_vp=setup.fvp, key=key, max_steps=1), "max_"),
        (lambda: mon.monitor(sgd, s, every=2, capacity=0), "capacity"),
        (lambda: mon.monitor(sgd, s, every=2, series="forecast", time_per_step=0.1), "series"),
        (lambda: mon.monitor(sgd, "M", every=2), "subspace"),
        (lambda: mon.monitor(sgd, s.leading(1)._replace(values=s.values), every=2), "subspace"),
        (lambda: mon.monitor(sgd, s, every=2).init({"w": jnp.zeros(3)}), "parameters"),
        (lambda: mon.monitor(sgd, s, every=2).update(setup.params, None), "params"),
        (lambda: mon.monitor_measure(setup.params, {"w": jnp.zeros(51)}, s), "theta_star"),
        (lambda: mon.monitor_measure(setup.params, setup.params, s, basis=jnp.ones(51)), "basis"),
        (lambda: mon.monitor_measure(setup.params, setup.params, s, basis=s.basis[:1]), "basis"),
        (lambda: mon.check_monitor(None), "state"),
        (lambda: mon.monitor_log({}), "state"),
        (lambda: mon.MonitorCallback(setup.params, s, every=-1), "every"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
    series = Series(jnp.zeros(3), None, jnp.zeros((2, 51)))
    with pytest.raises(ValueError, match="time_per_step"):
        mon.monitor(sgd, s, every=2, series=series)
    with pytest.raises(ValueError, match="time_per_step"):
        mon.monitor(sgd, s, every=2, series=series, time_per_step=-0.1)
    # the rotation's arguments without fisher_vp are refused, not ignored
    for extra in ({"key": key}, {"tol": 1e-3}, {"max_steps": 8}, {"rotation_every": 2}):
        with pytest.raises(ValueError, match=f"{next(iter(extra))} only apply .* fisher_vp"):
            mon.monitor(sgd, s, every=2, **extra)
        with pytest.raises(ValueError, match=f"{next(iter(extra))} only apply .* fisher_vp"):
            mon.MonitorCallback(setup.params, s, every=2, **extra)
    # a forecast must be of this subspace's projected loss
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 51)))

    def made(sub):
        return Series(jnp.zeros(3), projected_from_coordinates(sub.values, x @ sub.rows.T), x)

    mon.monitor(sgd, s, every=2, series=made(s), time_per_step=0.1)  # consistent: accepted
    other = Subspace.exact(np.asarray(s.values), np.asarray(s.basis)[::-1])
    for bad, what in (
        (Series(jnp.zeros(3), None, x), "no projected-loss forecast"),
        (Series(jnp.zeros(3), jnp.zeros(3), jnp.zeros((2, 50))), "50 parameters"),
        (made(other), "another subspace"),
    ):
        with pytest.raises(ValueError, match=what):
            mon.monitor(sgd, s, every=2, series=bad, time_per_step=0.1)


def test_a_float32_forecast_of_its_own_subspace_is_accepted_with_pg_zero(setup):
    """``delta_u_series(..., subspace=M)`` in float32 with ``Pg = 0`` (``y₁`` at rounding,
    the regime the theory is about) passes the series check; the same series is refused
    for ``M`` with its eigenvalues reordered."""
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), setup.params)
    s32 = Subspace.exact(
        jnp.asarray(setup.subspace.values, jnp.float32),
        jnp.asarray(setup.subspace.basis, jnp.float32),
    )
    task = orthogonalized(setup.problem.loss, s32, f32, setup.task)  # P g̃(θ*) = 0
    forecast = series.delta_u_series(
        setup.problem.loss,
        task,
        f32,
        4,
        subspace=s32,
        skill_args=(setup.skill,),
        task_args=(setup.task,),
    )
    assert abs(float(forecast.projected[2])) < 1e-10 < float(forecast.projected[4])
    mon.monitor(optax.sgd(LR), s32, every=2, series=forecast, time_per_step=LR)
    swapped = Subspace.exact(s32.values[::-1], s32.basis)
    with pytest.raises(ValueError, match="another subspace"):
        mon.monitor(optax.sgd(LR), swapped, every=2, series=forecast, time_per_step=LR)


def test_diverged_parameters_are_past_any_budget_and_only_a_budget(setup):
    """NaN/inf θ_k give a NaN projected loss, and ``NaN > budget`` is False: counted as past it."""
    nan_params = jax.tree.map(lambda a: a * jnp.nan, setup.params)
    stopping = mon.MonitorCallback(setup.params, setup.subspace, every=5, budget=1e3)
    with pytest.warns(mon.BudgetWarning, match="step 5"):
        stopping(5, nan_params)
    for budgets in ({"budget": 1e3}, {"angle_budget": 1.0}):
        tx = mon.monitor(optax.sgd(LR), setup.subspace, every=1, on_exceed="stop", **budgets)
        state = tx.init(setup.params)
        zeros = jax.tree.map(jnp.zeros_like, setup.params)
        inf_params = jax.tree.map(lambda a: a + jnp.inf, setup.params)
        update = jax.jit(tx.update)  # in a compiled step (eagerly, inf params are refused)
        _, state = update(zeros, state, setup.params)  # θ₀: not measured
        _, state = update(zeros, state, inf_params)
        assert bool(state.stopped)
        with pytest.raises(mon.BudgetExceeded, match="step 1"):
            mon.check_monitor(state)
    # without a budget nothing is "exceeded": the NaN is in the log for the user to read
    measure = jax.jit(mon.monitor_measure, static_argnames="budget")  # eagerly NaN is refused
    m = measure(nan_params, setup.params, setup.subspace)
    assert np.isnan(m.projected_loss) and not bool(m.exceeded)
    assert bool(measure(nan_params, setup.params, setup.subspace, budget=1.0).exceeded)
    m = measure(setup.thetas[1], setup.params, setup.subspace, budget=1e3)
    assert np.isfinite(m.projected_loss) and not bool(m.exceeded)  # finite, under the budget


def test_callback_checks_params_and_step_like_the_optax_monitor(setup):
    cb = mon.MonitorCallback(setup.params, setup.subspace, every=2)
    wrong_shape = [dict(layer) for layer in setup.params]
    wrong_shape[1]["b"] = jnp.zeros(4)
    as_int = jax.tree.map(lambda a: a.astype(jnp.int32), setup.params)
    for params, what in ((wrong_shape, "params leaf 2 has shape"), (as_int, "floating-point")):
        with pytest.raises(ValueError, match=what):
            cb(2, params)
    # another floating dtype is cast, as monitor() casts it: the float32 iterate is measured
    as_f32 = jax.tree.map(lambda a: a.astype(jnp.float32), setup.thetas[2])
    single = mon.MonitorCallback(setup.params, setup.subspace, every=2)
    single(2, as_f32)
    cast = jax.tree.map(lambda a: a.astype(jnp.float64), as_f32)
    expected = mon.monitor_measure(cast, setup.params, setup.subspace).projected_loss
    np.testing.assert_allclose(mon.monitor_log(single.state).projected_loss, [expected])
    for step in (2.0, 10.7, "10", True, np.array([2])):
        with pytest.raises(ValueError, match="step must be an integer"):
            cb(step, setup.thetas[2])
    assert mon.monitor_log(cb.state).step.size == 0
    for step in (np.int64(2), jnp.int32(4)):  # integer scalars of numpy and jax are steps
        cb(step, setup.thetas[int(step)])
    np.testing.assert_array_equal(mon.monitor_log(cb.state).step, [2, 4])
    with pytest.raises(ValueError, match="budget must be a positive number"):
        mon.monitor(optax.sgd(LR), setup.subspace, every=2, budget=np.array([np.inf, 1.0]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_basis_that_is_not_orthonormal_is_refused(setup, dtype):
    """``Subspace.exact`` and every consumer of a Subspace (monitor, defences) check ``VVᵀ = I``."""
    lam, V = np.asarray(setup.subspace.values), np.asarray(setup.subspace.basis)
    Subspace.exact(lam.astype(dtype), V.astype(dtype))  # eigh's rows, rounded: accepted
    for bad in (V + 1e-2 * V[::-1], np.ones_like(V), 2 * V):
        with pytest.raises(ValueError, match="basis must have orthonormal rows"):
            Subspace.exact(lam, bad.astype(dtype))
        made = Subspace(jnp.asarray(lam), jnp.asarray(bad, dtype), jnp.full(2, jnp.nan), True)
        with pytest.raises(ValueError, match=r"subspace\.basis must have orthonormal rows"):
            mon.monitor(optax.sgd(LR), made, every=2)
    # a zero row (a pair the solver could not reach, found = False) is not a defect
    zero_row = np.concatenate([V[:1], np.zeros_like(V[1:])])
    Subspace.exact(lam, zero_row.astype(dtype))
    # rows orthonormal only to float32 rounding (a float32 solver's, cast up): accepted
    nearly = V + 3e-6 * V[::-1]
    Subspace.exact(lam, nearly.astype(dtype))
    mon.monitor(optax.sgd(LR), Subspace.exact(lam, nearly.astype(dtype)), every=2)
