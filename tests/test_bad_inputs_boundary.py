"""The shared boundary check (issue #28, "nothing silent"): each case was silent, hung or
surfaced as a deep JAX error before it, and now raises (or warns) naming the argument.

One small softmax regression, ``W (6, 3)`` on ``X (32, 6)``, so every case costs
seconds; each message is matched from its start (the argument's name first).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geomcollapse import aic, cli, curvature, diagnose, linalg, models, monitor, series
from geomcollapse.errors import BroadcastDataWarning, FlatLossWarning, NotSymmetricError
from geomcollapse.subspace import Subspace

N, P, C = 32, 6, 3
X = jax.random.normal(jax.random.key(0), (N, P))
Y = jax.random.randint(jax.random.key(1), (N,), 0, C)
W = 0.1 * jax.random.normal(jax.random.key(2), (P, C))
INF_X = X.at[0, 0].set(jnp.inf)
D_INDEF = jnp.array([1.0, -50.0] + [0.5] * (P * C - 2))  # tr = -41: no Fisher


def key():
    return jax.random.key(3)


def logits(w, x, *_):
    return x @ w


def ce(w, x, y):
    return -jnp.mean(jax.nn.log_softmax(x @ w)[jnp.arange(x.shape[0]), y])


def argmax_error(w, x, y):  # a 0/1 error rate: flat, its gradient is 0 everywhere
    return jnp.mean((jnp.argmax(x @ w, -1) != y).astype(w.dtype))


def vector_loss(w, x, y):
    return jnp.mean(x @ w, axis=0)


ASYM = np.eye(P * C) + 0.5 * np.triu(np.ones((P * C, P * C)), 1)  # PSD part I, not symmetric


def asymmetric(w, v, *_):
    return (jnp.asarray(ASYM, v.dtype) @ v.ravel()).reshape(v.shape)


def indefinite(w, v, *_):
    return (D_INDEF * v.ravel()).reshape(v.shape)


def nan_fvp(w, v, *_):
    return v * jnp.nan


def short_fvp(w, v, *_):
    return v.ravel()[:3]


def weighted(w, v, x, y):  # an empirical-Fisher-like matvec reading both arrays per example
    r = (x @ v) * (1.0 + y[:, None])
    return x.T @ r / x.shape[0]


FVP = curvature.fisher_vp(logits)
MIXED = {"a": W.astype(jnp.float32), "b": jnp.zeros(C, jnp.float64)}


def measure(params=W, fisher_vp=FVP, loss_fn=ce, fisher_args=(X,), loss_args=(X, Y)):
    return aic.measure_aic(
        fisher_vp, loss_fn, params, 2, key=key(), fisher_args=fisher_args, loss_args=loss_args
    )


def diag(params=W, task_loss=ce, task_args=(X, Y), **kw):
    return diagnose(
        ce, task_loss, params, skill_args=(X, Y), task_args=task_args, skill_logits=logits,
        d=2, key=key(), **kw,
    )  # fmt: skip


def diag_mixed():
    def mixed_logits(p, x, *_):
        return x.astype(jnp.float32) @ p["a"] + p["b"]

    def mixed_loss(p, x, y):
        return -jnp.mean(jax.nn.log_softmax(mixed_logits(p, x))[jnp.arange(x.shape[0]), y])

    return diagnose(
        mixed_loss, mixed_loss, MIXED, skill_args=(X, Y), task_args=(X, Y),
        skill_logits=mixed_logits, d=2, key=key(),
    )  # fmt: skip


def forecast(params=W, task_loss=ce, skill_args=(X, Y), task_args=(X, Y)):
    return series.delta_u_series(
        ce, task_loss, params, 2, skill_args=skill_args, task_args=task_args
    )


def sgd(example_loss):
    return series.sgd_delta_u(
        ce, example_loss, W, (X, Y), lr=0.1, batch_size=4, steps=[1], order=2, skill_args=(X, Y)
    )


def monitored(params=W, fisher_vp=FVP, fisher_args=(X,)):
    sub = Subspace(
        values=jnp.array([2.0, 1.0]), basis=jnp.eye(P * C)[:2], residuals=jnp.zeros(2),
        converged=jnp.array(True),
    )  # fmt: skip
    opt = monitor.monitor(
        optax.sgd(0.1), sub, every=1, fisher_vp=fisher_vp, key=key(), fisher_args=fisher_args
    )
    return opt.init(params)


def top(like):
    return linalg.top_eigenpairs(lambda v: jax.tree.map(lambda a: 2.0 * a, v), like, 1, key=key())


# (id, call, the message's start); "before" in the id's comment: what it did on main
CASES = [
    # tail mass −42.5 returned as a number (then: refused after Lanczos, from the tail mass)
    ("measure_aic-indefinite-fisher", lambda: measure(fisher_vp=indefinite, fisher_args=()),
     r"^fisher_vp is not positive semidefinite at params \(vᵀAv = -41 < 0"),
    # "matvec is not symmetric", naming no argument (then: "fisher_vp: matvec is not ...")
    ("measure_aic-asymmetric-fisher", lambda: measure(fisher_vp=asymmetric, fisher_args=()),
     r"^fisher_vp is not symmetric at params: uᵀAv − vᵀAu = "),
    # "matvec returned non-finite values (at matvec 1)", naming no argument
    ("measure_aic-nan-fisher_vp", lambda: measure(fisher_vp=nan_fvp, fisher_args=()),
     r"^fisher_vp returned non-finite values \(NaN or inf\) on a probe vector"),
    # "cannot reshape array of size 3 into shape (18,)"
    ("measure_aic-wrong-shape-fisher_vp", lambda: measure(fisher_vp=short_fvp, fisher_args=()),
     r"^fisher_vp's output F v leaf 0 has shape \(3,\), params has \(6, 3\)"),
    # a JAX IndexError/broadcasting error from inside the matvec
    ("measure_aic-fisher_args-axes", lambda: measure(fisher_vp=weighted, fisher_args=(X, Y[:5])),
     r"^fisher_vp: calling fisher_vp\(params, v, \*fisher_args\) failed \(the leading, "
     r"example, axes of fisher_args differ: \[32, 5\]\)"),
    # a NaN coupling in the report
    ("measure_aic-inf-loss_args", lambda: measure(loss_args=(INF_X, Y)),
     r"^loss_args has 1 non-finite"),
    # "matvec returned non-finite values", naming no argument
    ("measure_aic-inf-fisher_args", lambda: measure(fisher_args=(INF_X,)),
     r"^fisher_args has 1 non-finite"),
    # all zeros with converged=True
    ("measure_aic-empty-batch", lambda: measure(fisher_args=(X[:0],), loss_args=(X[:0], Y[:0])),
     r"^loss_args leaf 0 is empty \(shape \(0, 6\)\)"),
    # a report from bfloat16 rounding
    ("measure_aic-bfloat16", lambda: measure(params=W.astype(jnp.bfloat16)),
     r"^params has a bfloat16 leaf"),
    ("measure_aic-float16", lambda: measure(params=W.astype(jnp.float16)),
     r"^params has a float16 leaf"),
    # JAX's "Gradient only defined for scalar-output functions" (TypeError)
    ("measure_aic-vector-loss", lambda: measure(loss_fn=vector_loss),
     r"^loss_fn must return a floating scalar .* got \(3,\)"),
    # "eigenpairs are not converged" / "matvec is not symmetric"
    ("measure_aic-mixed-dtypes", lambda: measure(
        params=MIXED, fisher_vp=lambda p, v: v, fisher_args=(),
        loss_fn=lambda p, x, y: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)),
     r"^params mixes floating dtypes \(leaf 0 is float32, leaf 1 is float64\)"),
    # a broadcasting TypeError from inside the gradient
    ("measure_aic-example-axes", lambda: measure(loss_args=(X, Y[:5])),
     r"^loss_fn: calling loss_fn\(params, \*loss_args\) failed \(the leading, example, axes "
     r"of loss_args differ: \[32, 5\]\)"),
    # "data type bfloat16 not inexact"
    ("diagnose-bfloat16", lambda: diag(params=W.astype(jnp.bfloat16)),
     r"^params has a bfloat16 leaf"),
    # "fisher: the skill Fisher vanishes" / "task_loss: its value at params is nan"
    ("diagnose-empty-task_args", lambda: diag(task_args=(X[:0], Y[:0])),
     r"^task_args leaf 0 is empty"),
    ("diagnose-inf-task_args", lambda: diag(task_args=(INF_X, Y)),
     r"^task_args has 1 non-finite"),
    # "Incompatible shapes for broadcasting"
    ("diagnose-example-axes", lambda: diag(task_args=(X, Y[:5])),
     r"^task_loss: calling task_loss\(params, \*task_args\) failed \(the leading, example, "
     r"axes of task_args differ: \[32, 5\]\)"),
    # "the skill Fisher's matvec is not symmetric at params"
    ("diagnose-mixed-dtypes", diag_mixed, r"^params mixes floating dtypes"),
    # JAX's "Gradient only defined for scalar-output functions"
    ("delta_u_series-vector-loss", lambda: forecast(task_loss=vector_loss),
     r"^task_loss must return a floating scalar"),
    # all-zero coefficients
    ("delta_u_series-empty-skill_args", lambda: forecast(skill_args=(X[:0], Y[:0])),
     r"^skill_args leaf 0 is empty"),
    # nan coefficients
    ("delta_u_series-inf-skill_args", lambda: forecast(skill_args=(INF_X, Y)),
     r"^skill_args has 1 non-finite"),
    # bfloat16 coefficients
    ("delta_u_series-bfloat16", lambda: forecast(params=W.astype(jnp.bfloat16)),
     r"^params has a bfloat16 leaf"),
    # JAX's "Gradient only defined for scalar-output functions"
    ("sgd_delta_u-vector-example-loss", lambda: sgd(lambda w, x, y: x @ w),
     r"^example_loss must return a floating scalar .* got \(3,\)"),
    # an eigenvalue from float32-rounded leaves in a float64 run
    ("top_eigenpairs-mixed-like", lambda: top({"a": jnp.zeros(3, jnp.float32),
                                              "b": jnp.zeros(3, jnp.float64)}),
     r"^like mixes floating dtypes"),
    ("top_eigenpairs-bfloat16-like", lambda: top(jnp.zeros(4, jnp.bfloat16)),
     r"^like has a bfloat16 leaf"),
    # accepted: the traced Lanczos ran on it
    ("monitor-indefinite-fisher_vp", lambda: monitored(fisher_vp=indefinite, fisher_args=()),
     r"^fisher_vp is not positive semidefinite at params \(vᵀAv = -41 < 0"),
    # accepted silently: angles of ~1.4 rad logged with converged=False
    ("monitor-asymmetric-fisher_vp", lambda: monitored(fisher_vp=asymmetric, fisher_args=()),
     r"^fisher_vp is not symmetric at params"),
    # "cannot reshape array of size 3 into shape (18,)"
    ("monitor-wrong-shape-fisher_vp", lambda: monitored(fisher_vp=short_fvp, fisher_args=()),
     r"^fisher_vp's output F v leaf 0 has shape \(3,\)"),
    # NumPy's "zero-size array to reduction operation maximum"
    ("spectral_density-empty-like", lambda: linalg.spectral_density(
        lambda v: v, jnp.zeros(0), key=key()), r"^like has no elements"),
    # "k exceeds the operator dimension n=0", naming k
    ("top_eigenpairs-empty-like", lambda: top(jnp.zeros(0)), r"^like has no elements"),
    ("monitor-inf-fisher_args", lambda: monitored(fisher_args=(INF_X,)),
     r"^fisher_args has 1 non-finite"),
    ("monitor-bfloat16", lambda: monitored(params=W.astype(jnp.bfloat16)),
     r"^params has a bfloat16 leaf"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "match"), [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_the_boundary_check_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_flat_loss_is_said_to_be_flat_not_safe():
    """argmax's gradient is 0 everywhere: γ = 0 and every coefficient 0, with a warning
    (before: the same numbers, no warning: "no risk")."""
    with pytest.warns(UserWarning, match=r"^loss_fn: its gradient and Hg are exactly zero") as rec:
        got = measure(loss_fn=argmax_error)
    # at the caller's line, not inside the library (before: aic.py's)
    assert {w.filename for w in rec if issubclass(w.category, FlatLossWarning)} == {__file__}
    assert got.report.coupling == 0.0 and got.gradient_norm == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jet's fallback to jvp on argmax
        dg = diag(task_loss=argmax_error)
    assert np.all(np.asarray(dg.delta_u_coefficients) == 0.0)
    assert any(w.startswith("task_loss: its gradient and Hg are exactly zero") for w in dg.warnings)
    # a differentiable loss is not flagged
    assert not any("exactly zero" in w for w in diag().warnings)
    # the forecast alone says so too (before: all-zero coefficients, no warning)
    with pytest.warns(UserWarning, match=r"^task_loss: its gradient and Hg are exactly zero"):
        s = forecast(task_loss=argmax_error)
    assert np.all(np.asarray(s.delta_u) == 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert float(forecast().delta_u[2]) > 0.0  # a differentiable loss: no warning
    # the SGD forecast names its own argument, example_loss (before: "task_loss", which it
    # does not take), with the typed warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sgd(lambda w, x, y: argmax_error(w, x[None], y[None]))
    flat = [w for w in caught if issubclass(w.category, FlatLossWarning)]
    assert flat[0].filename == __file__
    assert len(flat) == 1 and str(flat[0].message).startswith(
        "example_loss: its gradient and Hg are exactly zero"
    )
    assert np.all(np.asarray(got.deterministic) == 0.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: measure(loss_args=(X, Y[:1])),
        lambda: diag(task_args=(X, Y[:1])),
        lambda: forecast(task_args=(X, Y[:1])),
    ],
    ids=["measure_aic", "diagnose", "delta_u_series"],
)
def test_a_length_one_example_axis_that_broadcasts_is_said(call):
    """Before: (X, Y[:1]) broadcast Y's one label over the 32 examples, silently. Now one
    typed warning, said once however many layers check the data."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        call()
    said = [w for w in caught if issubclass(w.category, BroadcastDataWarning)]
    assert len(said) == 1, [str(w.message) for w in said]
    assert re.match(
        r"\w+_args: leaf 1 has a leading axis of 1 while others have 32", str(said[0].message)
    )


def test_a_token_file_refuses_unknown_keys(tmp_path):
    """Before: a misspelled "answer_strat" was ignored and the default start read."""
    from geomcollapse import token_files

    path = tmp_path / "skill.jsonl"
    rows = [{"tokens": [1, 2, 3, 4], "answer_strat": 1}, {"tokens": [1, 2, 3]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = models.TransformerConfig(vocab=8, context=6, d_model=4, heads=2, layers=1)
    with pytest.raises(ValueError, match=r"skill\.jsonl: line 1: unknown keys \['answer_strat'\]"):
        token_files.read_token_file(path, "skill", config)
    # an .npz archive (before: the misspelled array was ignored, the default start read)
    tokens = np.array([[1, 2, 3, 4], [1, 2, 3, 0]])
    npz = tmp_path / "skill.npz"
    np.savez(npz, tokens=tokens, answer_strat=np.array([1, 1]))
    with pytest.raises(ValueError, match=r"skill\.npz: unknown arrays \['answer_strat'\]"):
        token_files.read_token_file(npz, "skill", config)
    np.savez(npz, tokens=tokens, answer_start=np.array([1, 1]), harmful=np.array([1, 0]))
    got = token_files.read_token_file(npz, "skill", config)  # a TokenBatch's own arrays
    assert np.array_equal(np.asarray(got.answer_start), [1, 1])


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from flax import nnx

    from geomcollapse import checkpoint

    params = models.transformer_init(jax.random.key(0), "tiny")[1]
    pure = nnx.to_pure_dict(params)
    pure["head"]["kernel"] = pure["head"]["kernel"].at[0, 0].set(jnp.nan)
    nnx.replace_by_pure_dict(params, pure)
    with pytest.raises(ValueError, match=r"^params: head/kernel has 1 non-finite"):
        checkpoint.save_checkpoint(tmp_path / "ck", params, "tiny")
    assert not any(tmp_path.iterdir())  # nothing written


def _read_only_dir(tmp_path):
    """A directory no write can enter (chattr +i for root, whom chmod does not stop)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)]).returncode:
        pytest.skip("no way to make a read-only directory as root here")
    return ro


CHILD = textwrap.dedent(
    """
    import sys
    import jax
    from geomcollapse import checkpoint, models

    params = models.transformer_init(jax.random.key(0), "tiny")[1]
    if sys.argv[2] == "skip-check":  # reach orbax's own write, past the boundary check
        checkpoint.writable_directory = lambda *a: None
    try:
        checkpoint.save_checkpoint(sys.argv[1] + "/ck", params, "tiny")
    except Exception as err:
        print(type(err).__name__, str(err).splitlines()[0])
    """
)


def test_save_checkpoint_into_a_read_only_directory_refuses_and_exits(tmp_path):
    """Before: orbax raised PermissionError, then the process never exited (its background
    threads waited forever). Now the directory is checked first, and a failed write past
    the check (a race) still lets the process exit."""
    from geomcollapse import checkpoint

    params = models.transformer_init(jax.random.key(0), "tiny")[1]
    ro = _read_only_dir(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"^directory: .*ro is not writable"):
            checkpoint.save_checkpoint(ro / "ck", params, "tiny")
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        proc = subprocess.run(
            [sys.executable, str(script), str(ro), "skip-check"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("PermissionError"), proc.stdout
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)


def test_cli_refuses_an_outdir_that_is_a_file_before_running(tmp_path, capsys):
    """Before: the experiment ran (13 s), then a NotADirectoryError traceback."""
    file = tmp_path / "file"
    file.write_text("")
    assert cli.main(["run", "quartic_quadratic", "--outdir", str(file)]) == 2
    assert "--outdir: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing ran or was written


def test_an_asymmetric_fisher_is_the_typed_error_at_every_entry_point():
    """The boundary probe raises :class:`NotSymmetricError` (a ``ValueError``), as Lanczos
    does, so callers classify it by class (measure_aic documents it)."""
    for call in (
        lambda: measure(fisher_vp=asymmetric, fisher_args=()),
        lambda: monitored(fisher_vp=asymmetric, fisher_args=()),
    ):
        with pytest.raises(NotSymmetricError, match=r"^fisher_vp is not symmetric at params"):
            call()
