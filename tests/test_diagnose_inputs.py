"""``geomcollapse.diagnose`` on malformed input: one ``ValueError`` line naming the argument.

A small float64 MLP (4 → 10 → 3, 83 parameters, dense route unless asked
otherwise) with a KL skill loss minimal at ``θ*`` and a cross-entropy task.
Each case is a defect a probe found: a raw JAX error from the user's own
functions, a non-finite loss accepted, Lanczos-only options unchecked on the
dense route, a numpy scalar refused, a batch of keys accepted, a malformed
``aic`` entry in ``Diagnosis.from_dict``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import geomcollapse
from geomcollapse._checks import prng_key

RNG = np.random.default_rng(0)
D_IN, H, C = 4, 10, 3
PARAMS = {
    "W1": jnp.asarray(RNG.standard_normal((D_IN, H)) * 0.7),
    "b1": jnp.asarray(RNG.standard_normal(H) * 0.1),
    "W2": jnp.asarray(RNG.standard_normal((H, C)) * 0.7),
    "b2": jnp.asarray(RNG.standard_normal(C) * 0.1),
}
XS = jnp.asarray(RNG.standard_normal((40, D_IN)))
XT = jnp.asarray(RNG.standard_normal((40, D_IN)))
YT = jnp.asarray(RNG.integers(0, C, 40))


def logits(p, x):
    return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


REF = logits(PARAMS, XS)


def skill_kl(p, x, r):  # mean KL(p_θ* ‖ p_θ): minimal at θ*
    lp, lq = jax.nn.log_softmax(r), jax.nn.log_softmax(logits(p, x))
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def nll(p, x, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(p, x)), y[:, None], 1))


def skill_logits(p, x, *_):
    return logits(p, x)


GOOD = {
    "skill_args": (XS, REF),
    "task_args": (XT, YT),
    "skill_logits": skill_logits,
    "d": 3,
    "order": 2,
}


def _diagnose(**change):
    kw = {**GOOD, "key": jax.random.key(1), **change}
    skill, task = kw.pop("skill_loss", skill_kl), kw.pop("task_loss", nll)
    return geomcollapse.diagnose(skill, task, kw.pop("params", PARAMS), **kw)


# ------------------------------------------------------------------ key


@pytest.mark.parametrize("spectrum", ["dense", "lanczos"])
def test_a_batch_of_keys_is_refused_on_every_route(spectrum):
    with pytest.raises(ValueError, match=r"^key must be a single jax.random key .*\(2,\)"):
        _diagnose(key=jax.random.split(jax.random.key(0), 2), spectrum=spectrum)


def test_prng_key_takes_one_key_typed_or_raw():
    assert prng_key(jax.random.key(0)).shape == ()
    assert prng_key(jax.random.PRNGKey(0)).shape == (2,)
    with pytest.raises(ValueError, match=r"^key must be a single jax.random key .*\(3,\)"):
        prng_key(jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match=r"^seed must be a single jax.random key .*\(2, 2\)"):
        prng_key(jax.random.split(jax.random.PRNGKey(0), 2), "seed")
    with pytest.raises(ValueError, match=r"^key must be a jax.random key"):
        prng_key(jnp.array([1.0, 2.0]))


# ------------------------------------------------------------------ numbers


def test_numpy_scalars_are_numbers_strings_and_bools_are_not():
    """``share=np.float32(0.9)`` reads as 0.9 (it was refused); ``'0.9'``, ``b'0.9'``,
    ``True`` and ``np.True_`` stay refused, here and in ``positive_float``."""
    kw = {"d": None, "spectrum": "dense"}
    expected = _diagnose(share=0.9, **kw)
    for share in (np.float32(0.9), np.float64(0.9), jnp.float32(0.9)):
        dg = _diagnose(share=share, **kw)
        assert dg.share == pytest.approx(0.9) and dg.d == expected.d
    for share in ("0.9", b"0.9", True, np.True_, [0.9], None, 1.0, np.float32(0.0)):
        with pytest.raises(ValueError, match=r"^share must be a number in \(0, 1\)"):
            _diagnose(share=share, **kw)
    for lr in ("0.1", b"0.1", True, np.True_):
        with pytest.raises(ValueError, match=r"^lr must be a positive number"):
            _diagnose(lr=lr)
    assert _diagnose(lr=np.float32(0.5), steps=np.int64(2)).planned_time == pytest.approx(1.0)


# ------------------------------------------------------------------ the user's functions


def _raises(p, x, *_):
    raise RuntimeError("boom")


WITHOUT_B2 = {k: v for k, v in PARAMS.items() if k != "b2"}


@pytest.mark.parametrize(
    "change, pattern",
    [
        (  # wrong feature size: the logits (evaluated first) and then the loss trip over it
            {"skill_args": (XS[:, :3], REF)},
            r"^skill_logits: calling skill_logits\(params, \*skill_args\) failed: TypeError: "
            r"dot_general",
        ),
        (
            {"skill_args": (XS[:, :3], REF), "fisher": "empirical"},
            r"^skill_loss: calling skill_loss\(params, \*skill_args\) on one example failed: "
            r"TypeError: dot_general",
        ),
        (
            {"skill_args": (XS,)},
            r"^skill_loss: calling skill_loss\(params, \*skill_args\) failed: TypeError: "
            r"skill_kl\(\) missing 1 required positional argument: 'r'",
        ),
        (
            {"task_args": (XT[:, :3], YT)},
            r"^task_loss: calling task_loss\(params, \*task_args\) failed: TypeError: dot_general",
        ),
        (
            {"task_args": (XT,)},
            r"^task_loss: calling task_loss\(params, \*task_args\) failed: TypeError: nll\(\)",
        ),
        (
            {"params": WITHOUT_B2},
            r"^skill_logits: calling skill_logits\(params, \*skill_args\) failed: KeyError: 'b2'",
        ),
        (
            {"params": WITHOUT_B2, "fisher": "empirical"},
            r"^skill_loss: calling .* failed: KeyError: 'b2'",
        ),
        (
            {"skill_logits": _raises},
            r"^skill_logits: calling skill_logits\(params, \*skill_args\) failed: "
            r"RuntimeError: boom$",
        ),
        ({"skill_loss": _raises}, r"^skill_loss: calling .* failed: RuntimeError: boom$"),
        ({"task_loss": _raises}, r"^task_loss: calling .* failed: RuntimeError: boom$"),
        (  # mismatched example axes are named before skill_loss trips over them
            {"skill_args": (XS, REF[:10]), "fisher": "empirical"},
            r"^skill_args must hold arrays sharing one leading example axis .*\['10', '40'\]",
        ),
        (
            {"fisher": lambda p, v, *a: 1 / 0},
            r"^fisher: calling fisher\(params, v, \*skill_args\) failed: ZeroDivisionError",
        ),
    ],
)
def test_a_failing_user_function_is_one_value_error_naming_it(change, pattern):
    """Each user function is evaluated once abstractly up front (``jax.eval_shape``): what it
    raises becomes one ``ValueError`` line (was a raw TypeError/KeyError from deep inside JAX),
    chained from the original."""
    with pytest.raises(ValueError, match=pattern) as info:
        _diagnose(**change)
    assert "\n" not in str(info.value)
    if "calling" in str(info.value):
        assert info.value.__cause__ is not None  # the original, for debugging


# ------------------------------------------------------------------ non-finite losses


@pytest.mark.parametrize("spectrum", ["dense", "lanczos"])
def test_a_loss_that_is_not_finite_at_params_is_refused(spectrum):
    """An empty task batch makes the mean ``nan`` while its gradient is 0: diagnose returned
    ``time_scale = inf`` and every coefficient 0. Now refused at the boundary, naming the
    data; a loss ``nan`` at params for another reason is refused naming the loss."""
    with pytest.raises(ValueError, match=r"^task_args leaf 0 is empty \(shape \(0, "):
        _diagnose(task_args=(XT[:0], YT[:0]), spectrum=spectrum)
    with pytest.raises(ValueError, match=r"^task_loss: its value at params is nan, not finite"):
        _diagnose(task_loss=lambda p, x, y: nll(p, x, y) + jnp.nan, spectrum=spectrum)
    with pytest.raises(ValueError, match=r"^skill_loss: its value at params is inf, not finite"):
        _diagnose(skill_loss=lambda p, x, r: skill_kl(p, x, r) + jnp.inf, spectrum=spectrum)
    # a finite value with an infinite slope (√ at 0): the derivative check, as before
    with pytest.raises(ValueError, match=r"^task_loss has non-finite derivatives at params"):
        _diagnose(task_loss=lambda p, x, y: nll(p, x, y) + jnp.sqrt(p["b2"][0] - PARAMS["b2"][0]))


def test_a_correct_diagnosis_is_unchanged_by_the_checks():
    """The values checked come with the forecast's compiled call; the numbers are those of
    direct derivatives."""
    dg = _diagnose(d=None, order=4, lr=0.05, steps=30)
    g = jax.grad(nll)(PARAMS, XT, YT)
    g_norm = float(np.sqrt(sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g))))
    assert dg.task_gradient_norm == pytest.approx(g_norm, rel=1e-12)
    assert dg.skill_gradient_norm < 1e-12  # θ* is the KL's minimum
    assert np.all(np.isfinite(dg.delta_u_coefficients)) and np.isfinite(dg.time_scale)


# ------------------------------------------------------------------ Lanczos-only options


@pytest.mark.parametrize("spectrum", ["dense", "lanczos"])
@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"tol": -1.0}, r"^tol must be a finite number > 0, got -1.0"),
        ({"tol": float("nan")}, r"^tol must be a finite number > 0"),
        ({"tol": "1e-6"}, r"^tol must be a positive number, got '1e-6'"),
        ({"tol": 1e-17}, r"^tol=1e-17 is below what float64 can certify"),
        ({"max_matvecs": 0}, r"^max_matvecs must be an integer >= 1, got 0"),
        ({"max_matvecs": 2.5}, r"^max_matvecs must be an integer >= 1"),
        ({"max_matvecs": 2}, r"^max_matvecs=2 is smaller than k=3"),
        ({"num_probes": 0}, r"^num_probes must be an integer >= 1, got 0"),
        ({"num_probes": 1}, r"^num_probes must be ≥ 2 for a standard error"),
    ],
)
def test_lanczos_options_are_checked_on_every_route(change, pattern, spectrum):
    """The dense route reads none of them, but took invalid values silently."""
    with pytest.raises(ValueError, match=pattern):
        _diagnose(spectrum=spectrum, **change)


def test_a_hutchinson_trace_takes_the_lanczos_route_and_is_refused_on_the_dense_one():
    """The dense route reads ``tr F`` exactly off ``F``'s diagonal; ``trace='hutchinson'`` was
    ignored there (the result said ``trace_method='exact'``). ``spectrum='auto'`` now takes
    the route that honours it, ``spectrum='dense'`` refuses it."""
    with pytest.raises(
        ValueError, match=r"^trace='hutchinson' is the Lanczos route's .*spectrum='lanczos'"
    ):
        _diagnose(spectrum="dense", trace="hutchinson")
    assert _diagnose(spectrum="dense", trace="exact").trace_method == "exact"
    for spectrum in ("auto", "lanczos"):
        dg = _diagnose(spectrum=spectrum, trace="hutchinson", num_probes=8)
        assert dg.trace_method == "hutchinson" and dg.spectrum_method == "lanczos"


# ------------------------------------------------------------------ Diagnosis.from_dict


def _drop(key):
    return lambda aic: {k: v for k, v in aic.items() if k != key}


@pytest.mark.parametrize(
    "field, change, pattern",
    [
        ("aic", _drop("coupling"), r"^data\['aic'\] is malformed: it must hold exactly the fields"),
        ("aic", lambda aic: {**aic, "extra": 1}, r"^data\['aic'\] is malformed: .*'extra'"),
        ("aic", lambda aic: 3, r"^data\['aic'\] is malformed: .*got int$"),
        ("aic", lambda aic: None, r"^data\['aic'\] is malformed: .*got NoneType$"),
        ("aic", lambda aic: {**aic, "d": "three"}, r"^data\['aic'\] is malformed"),
        (
            "aic",
            lambda aic: {**aic, "tail_mass": [1]},
            r"^data\['aic'\] is malformed: tail_mass must be a number, got \[1\]$",
        ),
        (
            "aic",
            lambda aic: {**aic, "eigen_residuals": 0.0},
            r"^data\['aic'\] is malformed: eigen_residuals must be a list of numbers, got 0.0$",
        ),
        (
            "aic",
            lambda aic: {**aic, "eigen_residuals": [None]},
            r"^data\['aic'\] is malformed: eigen_residuals must be a list of numbers",
        ),
        (
            "aic",
            lambda aic: {**aic, "tail_mass": None},
            r"^data\['aic'\] is malformed: tail_mass must be a number, got None$",
        ),
        (
            "aic",
            lambda aic: {**aic, "coupling": True},
            r"^data\['aic'\] is malformed: coupling must be a number, got True$",
        ),
        (
            "aic",
            lambda aic: {**aic, "converged": 1.0},
            r"^data\['aic'\] is malformed: converged must be true or false, got 1.0$",
        ),
        ("n", lambda n: "x", r"^data\['n'\] is malformed"),
        ("n", lambda n: [n], r"^data\['n'\] is malformed"),
        ("trace", lambda t: {"value": t}, r"^data\['trace'\] is malformed"),
        ("eigenvalues", lambda e: "abc", r"^data\['eigenvalues'\] is malformed"),
    ],
)
def test_from_dict_refuses_a_malformed_entry_naming_it(diagnosis_dict, field, change, pattern):
    """A malformed ``aic`` raised TypeError/AttributeError, not the documented ValueError."""
    data = {**diagnosis_dict, field: change(diagnosis_dict[field])}
    with pytest.raises(ValueError, match=pattern):
        geomcollapse.Diagnosis.from_dict(data)
    back = geomcollapse.Diagnosis.from_dict(diagnosis_dict)
    assert back.to_dict() == diagnosis_dict


@pytest.fixture(scope="module")
def diagnosis_dict():
    return _diagnose().to_dict()
