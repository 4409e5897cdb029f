"""Inputs that once gave a plausible number, NaN or a bare traceback, and now a ValueError.

Each case was found by a bad-input probe of the user's path (measure the AIC or a
trace, diagnose, sweep, report, reload a saved diagnosis) and fails without its check.
"""

import json
import zipfile

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import geomcollapse as gc
from geomcollapse import aic, curvature, models, sweep
from geomcollapse.diagnosis import Diagnosis
from geomcollapse.subspace import Subspace

N = 20


@pytest.fixture(scope="module")
def psd():
    """A 20×20 PSD ``F``, its top-3 eigenvectors as rows and ``tr((I−P)F(I−P))``."""
    rng = np.random.default_rng(0)
    B = rng.standard_normal((N, N))
    F = B @ B.T
    lam, U = np.linalg.eigh(F)
    top = U[:, ::-1][:, :3].T
    return jnp.asarray(F), top, float(lam[:-3].sum())


def test_fisher_trace_deflated_by_its_top_rows_is_the_tail(psd):
    F, top, tail = psd
    value, stderr, matvecs = aic.fisher_trace(lambda v: F @ v, N, jnp.float64, deflate=top)
    assert value == pytest.approx(tail, rel=1e-12) and stderr == 0.0 and matvecs == N


@pytest.mark.parametrize(
    ("rows", "what"),
    [("random", "orthonormal"), ("doubled", "orthonormal"), ("nan", "orthonormal")],
)
def test_fisher_trace_refuses_deflate_rows_that_are_not_an_orthonormal_basis(psd, rows, what):
    F, top, _ = psd
    deflate = {
        "random": np.random.default_rng(1).standard_normal((3, N)),
        "doubled": 2 * top,
        "nan": np.full((3, N), np.nan),
    }[rows]
    with pytest.raises(ValueError, match=r"^deflate must have orthonormal rows"):
        aic.fisher_trace(lambda v: F @ v, N, jnp.float64, deflate=deflate)


def _norm_scaled(F):
    """``v ↦ Fv·(1 + ‖v‖²/n)``: symmetric on any two probes of equal norm (Rademacher), not
    linear: only the linearity probe sees it."""
    return lambda v: (F @ v) * (1.0 + jnp.sum(v * v) / N)


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("nan", lambda F: lambda v: v * jnp.nan, r"^matvec returned non-finite values"),
        ("negative", lambda F: lambda v: -(F @ v), r"^matvec is not positive semidefinite"),
        ("not-symmetric", lambda F: lambda v: jnp.triu(F) @ v, r"^matvec is not symmetric"),
        ("not-linear", _norm_scaled, r"^matvec is not linear"),
    ],
)
def test_fisher_trace_refuses_a_matvec_that_is_not_a_fisher(psd, name, make, match):
    F, _, _ = psd
    with pytest.raises(ValueError, match=match):
        aic.fisher_trace(make(F), N, jnp.float64)


@pytest.fixture(scope="module")
def mlp():
    p = models.mlp_problem(jax.random.key(0), (4, 8, 3), num_examples=32)

    def logits(params, x):
        return models.mlp_apply(params, x, p.activation)

    def loss(params, x, y):
        return models.softmax_cross_entropy(logits(params, x), y)

    return p, logits, loss


def test_measure_aic_refuses_a_loss_that_is_not_finite_at_theta(mlp):
    """Labels out of range: the loss is NaN, its gather's gradient finite (it was a γ)."""
    p, logits, loss = mlp
    with pytest.raises(ValueError, match=r"^loss_fn: its value at params is nan"):
        aic.measure_aic(
            curvature.fisher_vp(logits),
            loss,
            p.params,
            3,
            key=jax.random.key(1),
            fisher_args=(p.batch.x,),
            loss_args=(p.batch.x, p.batch.y - 5),
        )


def test_measure_aic_refuses_a_fisher_that_vanishes(mlp):
    p, _, loss = mlp

    def zero(params, v, x):
        return jax.tree.map(jnp.zeros_like, v)

    with pytest.raises(ValueError, match=r"^fisher_vp: the skill Fisher vanishes at params"):
        aic.measure_aic(
            zero,
            loss,
            p.params,
            3,
            key=jax.random.key(1),
            fisher_args=(p.batch.x,),
            loss_args=(p.batch.x, p.batch.y),
        )


def _diagnose(mlp, **kw):
    """``diagnose`` of the MLP: its own loss as the skill, shifted labels as the task."""
    p, _, loss = mlp
    return gc.diagnose(
        loss,
        loss,
        p.params,
        skill_args=(p.batch.x[:16], p.batch.y[:16]),
        task_args=(p.batch.x[16:], (p.batch.y[16:] + 1) % 3),
        key=jax.random.key(1),
        **kw,
    )


def test_diagnose_dense_route_refuses_an_affine_custom_fisher(mlp):
    """``+ 1e-3`` for ``+ 1e-3·v``: its columns are symmetric, so only linearity sees it."""
    fvp = curvature.fisher_vp(mlp[1])

    def damped_wrong(params, v, x, y):
        return jax.tree.map(lambda t: t + 1e-3, fvp(params, v, x))

    with pytest.raises(ValueError, match=r"^fisher is not linear at params"):
        _diagnose(mlp, fisher=damped_wrong)


def _landscape_sweep(path, rows):
    header = {"sweep": "toy", "format": sweep.FORMAT_VERSION, "times": [0.1, 0.2]}
    lines = [json.dumps(header)]
    for i, (kappa, coupling) in enumerate(rows):
        row = {"id": i, "seed": i % 2, "n": 10, "d": 2, "top": 1.0, "tail_mass": 0.1}
        row.update(epsilon=0.1, kappa=kappa, aic={"coupling": coupling}, delta_u=[0.0, 1.0])
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_leaves_recorded_nones_out_of_each_mean_and_its_count(tmp_path):
    path = _landscape_sweep(tmp_path / "s.jsonl", [(1, 2.0), (1, 4.0), (2, None), (2, 6.0)])
    written = sweep.report(path, tmp_path / "out", x="kappa", y="aic.coupling")
    md = next(p for p in written if p.suffix == ".md").read_text()
    assert "| 1 | 2 | 3 |" in md and "| 2 | 1 | 6 |" in md


def test_read_rows_names_the_file_and_line_of_a_damaged_sweep(tmp_path):
    path = _landscape_sweep(tmp_path / "s.jsonl", [(1, 2.0), (2, 3.0), (3, 4.0)])
    whole = path.read_text()
    path.write_text(whole[: whole.rindex('"delta_u"')])  # killed mid-write: last line dropped
    assert [r["id"] for r in sweep.read_rows(path)[1]] == [0, 1]
    lines = whole.splitlines()
    row = json.loads(lines[2])
    del row["aic"]
    path.write_text("\n".join([lines[0], lines[1], json.dumps(row), lines[3]]) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl line 3 is not a sweep row \(missing aic\)"):
        sweep.read_rows(path)
    path.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"holds run id 0 twice \(lines 2 and 3\)"):
        sweep.read_rows(path)
    foreign = json.loads(lines[1])  # a row of a sweep with other times, appended by hand
    foreign.update(id=7, delta_u=[0.0, 1.0, 2.0, 3.0, 4.0])
    path.write_text("\n".join([*lines, json.dumps(foreign)]) + "\n")
    with pytest.raises(ValueError, match=r"line 5 is not a sweep row \(missing a delta_u of 2"):
        sweep.read_rows(path)  # before: an IndexError from the report's mean
    path.write_bytes(lines[0].encode() + b"\n\x9c\xff\xfe\n")
    with pytest.raises(ValueError, match=r"s\.jsonl is not a sweep output \(not UTF-8"):
        sweep.read_rows(path)


@pytest.fixture(scope="module")
def saved(mlp, tmp_path_factory):
    logits = mlp[1]
    dg = _diagnose(mlp, skill_logits=lambda params, x, y: logits(params, x))
    out = tmp_path_factory.mktemp("dg")
    dg.save(out, arrays=True)
    return out


def _copy(src, dest):
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_load_refuses_damaged_or_foreign_saved_arrays(saved, tmp_path):
    assert Diagnosis.load(saved).subspace is not None
    arrays = "subspace.npz"
    cut = _copy(saved, tmp_path / "cut")
    data = (cut / arrays).read_bytes()
    (cut / arrays).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^directory: .*subspace\.npz is damaged"):
        Diagnosis.load(cut)
    nan = _copy(saved, tmp_path / "nan")
    with np.load(nan / arrays) as z:
        a = {k: z[k] for k in z.files}
    a["values"] = np.full_like(a["values"], np.nan)
    np.savez(nan / arrays, **a)
    with pytest.raises(ValueError, match=r"does not hold the arrays of report\.json"):
        Diagnosis.load(nan)
    report = _copy(saved, tmp_path / "report")
    text = (report / "report.json").read_text()
    (report / "report.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"^directory: .*report\.json is damaged"):
        Diagnosis.load(report)
    assert zipfile.is_zipfile(saved / arrays)  # the original is untouched


def test_monitor_refuses_a_subspace_with_negative_eigenvalues(psd):
    """A negative ``λ`` reads as 0 in ``½‖F^{1/2}Px‖²``: a budget on it could never fire.
    A projection reads the basis alone: an indefinite (Hessian) subspace stays usable there."""
    import optax

    from geomcollapse import defences

    _, top, _ = psd
    sub = Subspace.exact(jnp.asarray([3.0, 2.0, 1.0]), jnp.asarray(top))
    gc.monitor.monitor(optax.sgd(0.1), sub, every=1)  # a Fisher's: accepted
    negative = sub._replace(values=-sub.values)
    with pytest.raises(ValueError, match=r"^subspace\.values must be a Fisher's eigenvalues"):
        gc.monitor.monitor(optax.sgd(0.1), negative, every=1)
    update = jnp.ones(N)
    projected, _ = defences.project_out(negative).update(update, None)
    np.testing.assert_allclose(projected, update - top.T @ (top @ update), atol=1e-12)


def test_a_confident_classifiers_float32_fisher_is_accepted():
    """``Jᵀ(p·Jv − p·Σp·Jv)`` with ``p₁ ≈ 1`` cancels to a few % in float32: still linear.
    A probe comparing ``A(v − 2u)`` with ``Av − 2Au`` refused it (2.6× its tolerance);
    doubling is exact, so ``A(2v) = 2Av`` holds bit for bit."""
    rng = np.random.default_rng(0)
    n, m = 40, 64
    z = rng.standard_normal((m, 3)) * 0.1
    z[:, 0] += 14.0
    J = rng.standard_normal((m, 3, n))

    def fisher(dtype):
        Jd, p = jnp.asarray(J, dtype), jax.nn.softmax(jnp.asarray(z, dtype), -1)

        def fvp(v):
            jv = jnp.einsum("mcn,n->mc", Jd, v)
            return jnp.einsum("mcn,mc->n", Jd, p * jv - p * jnp.sum(p * jv, -1, keepdims=True)) / m

        return fvp

    exact = aic.fisher_trace(fisher(jnp.float64), n, jnp.float64)[0]
    assert aic.fisher_trace(fisher(jnp.float32), n, jnp.float32)[0] == pytest.approx(
        exact, rel=1e-2
    )


def test_an_empty_deflate_is_no_deflation_and_a_bad_key_is_named(psd):
    F, _, _ = psd
    plain = aic.fisher_trace(lambda v: F @ v, N, jnp.float64)
    assert aic.fisher_trace(lambda v: F @ v, N, jnp.float64, deflate=np.zeros((0, N))) == plain
    with pytest.raises(ValueError, match=r"^key"):
        aic.fisher_trace(lambda v: F @ v, N, jnp.float64, key=0)


def test_diagnose_names_a_non_finite_fisher_as_such(mlp):
    fvp = curvature.fisher_vp(mlp[1])

    def nan_fisher(params, v, x, y):
        return jax.tree.map(lambda t: t * jnp.nan, fvp(params, v, x))

    with pytest.raises(ValueError, match=r"^fisher: the skill Fisher is not finite at params"):
        _diagnose(mlp, fisher=nan_fisher, spectrum="lanczos")


def test_arguments_are_checked_on_every_route(psd, saved, tmp_path):
    """``num_probes`` is checked even where the exact trace does not use it; a missing dtype
    and a file in the way of a saved diagnosis are named, not left to JAX or the OS."""
    F, _, _ = psd
    with pytest.raises(ValueError, match=r"^num_probes must be"):
        aic.fisher_trace(lambda v: F @ v, N, jnp.float64, method="exact", num_probes=0)
    with pytest.raises(ValueError, match=r"^dtype must be a floating dtype"):
        aic.fisher_trace(lambda v: F @ v, N, None)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^directory: .*a_file exists and is not a directory"):
        Diagnosis.load(saved).save(blocker)


def test_monitor_refuses_a_series_with_nan_displacement(saved):
    """NaN coefficients compare False with any bound: the check that the series belongs to
    this subspace passed them."""
    import optax

    dg = Diagnosis.load(saved)
    gc.monitor.monitor(optax.sgd(0.1), dg.subspace, every=1, series=dg.series, time_per_step=0.1)
    bad = dg.series._replace(displacement=dg.series.displacement * jnp.nan)
    with pytest.raises(ValueError, match=r"^series displacement holds non-finite values"):
        gc.monitor.monitor(optax.sgd(0.1), dg.subspace, every=1, series=bad, time_per_step=0.1)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("d", 2.5, r"data\['d'\] is malformed: it must be an integer"),
        ("d", 10**6, r"d = 1000000 is not in \[1, n\)"),
        ("eigenvalues", [1.0], r"1 eigenvalues and"),
        ("lr", -1.0, r"lr = -1.0 is not a positive number"),
        # each of these loaded, and the report or figure failed later (or the monitor took it)
        ("projected_coefficients", [0.0, 1.0], r"2 projected coefficients for order"),
        ("forecast_t", [1e-3] * 10, r"forecast curves of different lengths"),
        ("steps", -5, r"steps = -5 is not a count"),
        ("crossing_step", -3, r"crossing_step = -3 is not a count"),
        ("threshold", -1.0, r"threshold = -1.0 is not a positive number"),
        ("warnings", "oops", r"data\['warnings'\] is malformed: it must be a list of strings"),
        ("fisher", 5, r"data\['fisher'\] is malformed: it must be a string"),
        ("forecast_t", 1.0, r"data\['forecast_t'\] is malformed: it must be a list of numbers"),
        ("threshold", True, r"threshold = True is not a positive number"),
    ],
)
def test_from_dict_refuses_a_report_whose_fields_disagree(saved, field, value, match):
    data = json.loads((saved / "report.json").read_text())
    assert Diagnosis.from_dict(dict(data)).d == data["d"]
    with pytest.raises(ValueError, match=match):
        Diagnosis.from_dict({**data, field: value})


def test_from_dict_refuses_an_aic_of_another_d_and_load_a_converged_flag_that_disagrees(
    saved, tmp_path
):
    data = json.loads((saved / "report.json").read_text())
    with pytest.raises(ValueError, match=r"aic.d = 5 but d = "):
        Diagnosis.from_dict({**data, "aic": {**data["aic"], "d": 5}})
    flipped = _copy(saved, tmp_path / "flipped")
    with np.load(flipped / "subspace.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["converged"] = ~arrays["converged"]
    np.savez(flipped / "subspace.npz", **arrays)
    with pytest.raises(ValueError, match=r"does not hold the arrays of report\.json"):
        Diagnosis.load(flipped)


def test_the_figure_says_which_forecast_it_could_not_draw(saved):
    """A forecast with no positive finite value left an empty curve and no word of it."""
    import dataclasses

    dg = Diagnosis.load(saved)

    def notes(d):
        return [
            t.get_text() for ax in d.figure().axes for t in ax.texts if "not drawn" in t.get_text()
        ]

    assert notes(dg) == []
    nan = dataclasses.replace(dg, forecast_delta_u=tuple(np.full(len(dg.forecast_t), np.nan)))
    assert len(notes(nan)) == 1 and "forecast" in notes(nan)[0]


def _landscape_config(**changes) -> dict:
    raw = {
        "output": "out.jsonl",
        "times": [0.1, 0.2],
        "grid": {"n": [8], "d": [2], "top": [[2.0, 1.0]], "tail_mass": [0.1], "epsilon": [0.0]},
        "seeds": [0, 1],
    }
    raw["grid"]["coupling"] = [1.0]
    for key, value in changes.items():
        (raw["grid"] if key in raw["grid"] or key == "kappa" else raw)[key] = value
    return raw


def _quartic_config(**grid) -> dict:
    return {"experiment": "quartic_quadratic", "output": "out.jsonl", "grid": grid}


@pytest.mark.parametrize(
    "raw, match",
    [
        # a repeated seed or grid value ran one cell twice and counted it as two samples
        (_landscape_config(seeds=[0, 0, 1]), r"seeds holds 0 twice"),
        (_landscape_config(tail_mass=[0.1, 0.1]), r"grid\['tail_mass'\] holds 0.1 twice"),
        (_landscape_config(epsilon=[1, 1.0]), r"grid\['epsilon'\] holds 1.0 twice"),
        (_landscape_config(top=[[2, 1], [2.0, 1.0]]), r"grid\['top'\] holds \[2.0, 1.0\] twice"),
        (_quartic_config(seed=[0, 0]), r"grid cells 0 and 1 \{'seed': 0\} resolve to the same"),
        (_quartic_config(tail_mass=[1, 1.0]), r"grid cells 0 and 1 .* resolve to the same"),
        (
            {**_quartic_config(top=[[2, 1], [2.0, 1.0]]), "base": {"d": 2}},
            r"grid cells 0 and 1 .* resolve to the same",
        ),
        # strings and bools were read as numbers
        (_landscape_config(tail_mass=["0.1", 0.2]), r"grid\['tail_mass'\] holds '0.1'"),
        (_landscape_config(times=["0.1", "1"]), r"times must be a list of numbers"),
        (_landscape_config(times=[True, 2]), r"times must be a list of numbers"),
        # an integer beyond 64 bits: a bare OverflowError at parse time or mid-sweep
        (_landscape_config(seeds=[2**63]), r"seeds\[0\] is 9223372036854775808"),
        (_quartic_config(seed=[0, 2**64]), r"does not fit a signed 64-bit integer"),
        # a float in an int field: a TypeError from numpy after cell 0 was written
        (_quartic_config(num_times=[21, 21.5]), r"num_times = 21.5 .* takes int"),
        (_quartic_config(num_times=[True]), r"num_times = True .* takes int"),
        # a TypeError joining the config's folder and 5
        (_landscape_config(output=5), r"output must name a file, got 5"),
    ],
)
def test_sweep_configs_that_ran_wrong_cells_are_refused(tmp_path, raw, match):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        sweep.load_config(path)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_refusals_leave_a_good_config_alone(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_landscape_config()))
    assert sweep.load_config(path).seeds == (0, 1)
    path.write_text(json.dumps(_quartic_config(seed=[0, 1], num_times=[21])))
    assert [c for c in sweep.load_config(path).grid["seed"]] == [0, 1]
    # a config built in Python: NumPy scalars are the numbers they hold
    raw = _quartic_config(seed=[np.int64(0), np.int64(1)], tail_mass=list(np.linspace(0.1, 0.2, 2)))
    config = sweep.parse_config(raw, tmp_path)
    assert [c.config.tail_mass for c in sweep.expand_cells(config)] == [0.1, 0.2, 0.1, 0.2]


def test_the_monitor_refuses_params_laid_out_unlike_the_diagnosed_theta(mlp, saved):
    """The same n in another leaf order was accepted: the saved (d, n) rows then paired
    other coordinates (a probe's projected loss came out 51× too small, silently)."""
    import optax

    p = mlp[0]
    dg = Diagnosis.load(saved)  # the layout travels through save and load
    assert dg.params_layout == curvature.params_layout(p.params)
    tx = gc.monitor.monitor(optax.sgd(0.1), dg, every=1, series=False)
    tx.init(p.params)
    leaves = jax.tree_util.tree_leaves(p.params)
    reordered = {f"leaf{i}": x for i, x in enumerate(reversed(leaves))}  # same n
    assert sum(x.size for x in leaves) == dg.n
    with pytest.raises(ValueError, match=r"^params is laid out unlike the diagnosed θ\*"):
        tx.init(reordered)
    with pytest.raises(ValueError, match=r"1 leaves against"):
        tx.init({"a": jnp.zeros(dg.n)})
    # why it matters: the rows' coordinates of the reordered θ* are other numbers
    x = jax.flatten_util.ravel_pytree(p.params)[0]
    y = jax.flatten_util.ravel_pytree(reordered)[0]
    assert not np.allclose(dg.subspace.basis @ x, dg.subspace.basis @ y)
    # a pytree basis carries the layout itself; raveled rows alone say nothing of it
    basis = jax.vmap(jax.flatten_util.ravel_pytree(p.params)[1])(dg.subspace.basis)
    tree = dg.subspace._replace(basis=basis)
    with pytest.raises(ValueError, match="laid out unlike"):
        gc.monitor.monitor(optax.sgd(0.1), tree, every=1).init(reordered)
    gc.monitor.monitor(optax.sgd(0.1), tree, every=1).init(p.params)
    gc.monitor.monitor(optax.sgd(0.1), dg.subspace, every=1).init(reordered)


def test_from_json_names_a_path_given_for_its_text(saved):
    """A path was parsed as JSON: 'Expecting value: line 1 column 1'."""
    text = (saved / "report.json").read_text()
    assert Diagnosis.from_json(text) == Diagnosis.load(saved)
    for path in (saved / "report.json", str(saved / "report.json"), str(saved)):
        with pytest.raises(ValueError, match=r"^text: .* is a path, not JSON text"):
            Diagnosis.from_json(path)


def test_a_skill_loss_summed_over_examples_is_warned_with_its_factor():
    """u = Σ KL instead of the mean: Δu and the projected loss N× apart, and no word."""
    import re

    from geomcollapse import model_spec
    from tests import spec_mlp

    fields = spec_mlp.spec()
    x, reference = fields["skill_args"]
    n_examples = x.shape[0]

    def summed(params, x, reference):
        return x.shape[0] * spec_mlp.skill_loss(params, x, reference)

    mean = model_spec.diagnose_spec(model_spec.model_spec(fields), key=jax.random.key(0))
    total = model_spec.diagnose_spec(
        model_spec.model_spec({**fields, "skill_loss": summed}), key=jax.random.key(0)
    )
    assert not [w for w in mean.warnings if "disagree in scale" in w]
    (warning,) = [w for w in total.warnings if "disagree in scale" in w]
    ratio = float(re.search(r"gradient is ([\d.]+)× F's", warning).group(1))
    # the dense twin: ∇²u(θ*) of the mean KL is F, so the ratio is N exactly
    flat, unravel = jax.flatten_util.ravel_pytree(fields["params"])
    F = jax.hessian(lambda f: spec_mlp.skill_loss(unravel(f), x, reference))(flat)
    g = jax.grad(lambda f: spec_mlp.task_loss(unravel(f), *fields["task_args"]))(flat)
    dense = n_examples * 0.5 * float(g @ F @ g)
    assert total.delta_u_coefficients[2] == pytest.approx(dense, rel=1e-10)
    assert ratio == pytest.approx(n_examples, rel=1e-2)  # printed to 3 digits


def test_a_monitor_of_a_diagnosis_without_lr_says_that_it_compares_no_forecast(saved):
    """The forecast was dropped without a word when the diagnosis had no lr."""
    import warnings

    import optax

    dg = Diagnosis.load(saved)
    assert dg.lr is None and dg.series is not None
    said = r"made without lr, so its forecast is not compared"
    with pytest.warns(UserWarning, match=said) as direct:
        gc.monitor.monitor(optax.sgd(0.1), dg, every=1)
    with pytest.warns(UserWarning, match=said) as through:  # one frame deeper in the library
        gc.monitor.from_diagnosis(optax.sgd(0.1), dg, every=1)
    # each points at the user's line (before: from_diagnosis's pointed into monitor.py)
    assert {w.filename for w in [*direct, *through] if "without lr" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.monitor.monitor(optax.sgd(0.1), dg, every=1, time_per_step=0.1)
        gc.monitor.monitor(optax.sgd(0.1), dg, every=1, series=False)
