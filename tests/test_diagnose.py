"""``geomcollapse.diagnose`` against dense references, its warnings, the README example and the CLI.

Quadratic landscapes (docs/theory.md §4, §6) give every number in closed form;
the README's flax nnx classifier and a one-block transformer checkpoint are
checked against their dense Fisher (``Jᵀ(diag p − ppᵀ)J`` from ``jax.jacfwd``),
``numpy.linalg.eigh`` and dense gradients. Malformed CLI inputs fail before
any compute, each with one line naming the file and the problem.
"""

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import geomcollapse
from geomcollapse import checkpoint, cli, models, training
from tests import figure_checks
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parent.parent
N = 12
LR, STEPS, THRESHOLD = 1e-2, 20, 1e-2


# ------------------------------------------------------------------ quadratic landscapes


def skill_u(theta, F, b, theta_star):  # ½xᵀFx + bᵀx: a minimum at θ* iff b = 0
    x = theta - theta_star
    return 0.5 * x @ F @ x + b @ x


def task_L(theta, A, c, theta_star):  # ½xᵀAx + cᵀx: g(θ*) = c, H = A
    x = theta - theta_star
    return 0.5 * x @ A @ x + c @ x


def fisher_F(theta, v, F, b, theta_star):
    return F @ v


def _landscape(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((N, N)))
    B = rng.standard_normal((N, N))
    return (U * spectrum) @ U.T, (B + B.T) / 4, rng.standard_normal(N), rng.standard_normal(N)


def _diagnose_quadratic(F, A, c, b, **kw):
    theta_star = jnp.asarray(np.random.default_rng(7).standard_normal(N))
    return geomcollapse.diagnose(
        skill_u,
        task_L,
        theta_star,
        skill_args=(jnp.asarray(F), jnp.asarray(b), theta_star),
        task_args=(jnp.asarray(A), jnp.asarray(c), theta_star),
        fisher=fisher_F,
        key=jax.random.key(0),
        **kw,
    )


@pytest.fixture(scope="module")
def clean():
    """A quadratic with θ* the skill's minimum, a concentrated F and a plan inside the window."""
    F, A, c, _ = _landscape(np.r_[5.0, 3.0, 1.0, np.full(N - 3, 0.01)])
    dg = _diagnose_quadratic(
        F, A, c, np.zeros(N), lr=LR, steps=STEPS, threshold=THRESHOLD, spectrum="lanczos"
    )
    return dg, F, A, c


def _series_of(F, A, c, b):
    """Closed-form c₀ … c₄ of ``½xᵀFx + bᵀx`` along ``x(t) = −ct + ½Act² − ⅙A²ct³ + A³ct⁴/24``."""
    xs = [-c, 0.5 * A @ c, -A @ A @ c / 6, A @ A @ A @ c / 24]
    out = np.zeros(5)
    for i, xi in enumerate(xs, start=1):
        out[i] += b @ xi
        for j, xj in enumerate(xs, start=1):
            if i + j <= 4:
                out[i + j] += 0.5 * xi @ F @ xj
    return out, xs


def test_quadratic_diagnosis_equals_closed_forms_and_dense_eigh(clean):
    dg, F, A, c = clean
    lam, U = np.linalg.eigh(F)
    lam, U = lam[::-1], U[:, ::-1]
    k = len(dg.eigenvalues)
    np.testing.assert_allclose(dg.eigenvalues, lam[:k], rtol=1e-12)
    assert dg.spectrum_method == "lanczos" and dg.trace_method == "exact"
    assert rel_err(dg.trace, np.trace(F)) < 1e-13
    # d = None: the smallest d whose top-d eigenvalues hold 90 % of tr F (dense: 5, 3, 1 of 9.09)
    assert dg.d == int(np.argmax(np.cumsum(lam) >= 0.9 * np.trace(F))) + 1 == 3
    assert "90%" in dg.d_rule and dg.top_share == pytest.approx(lam[:3].sum() / np.trace(F))
    P = U[:, :3] @ U[:, :3].T
    r = dg.aic
    assert r.converged and max(r.eigen_residuals) < 1e-12
    tail_q = c @ (np.eye(N) - P) @ F @ (np.eye(N) - P) @ c
    gamma = np.sqrt((A @ c) @ P @ F @ P @ (A @ c))
    expected = {
        "tail_mass": lam[3:].sum(),
        "lambda_d": lam[2],
        "orthogonality": np.linalg.norm(P @ c),
        "fisher_orthogonality": np.sqrt(c @ P @ F @ P @ c),
        "coupling": gamma,
        "tail_crossover_time": 2 * np.sqrt(tail_q) / gamma,
    }
    for name, value in expected.items():
        assert rel_err(getattr(r, name), value) < 1e-10, name
    # docs/theory.md §6 on a quadratic: c₂ = ½cᵀFc, c₃ = −½cᵀFAc, c₄ = ⅛cᵀAFAc + ⅙cᵀFA²c
    c2, c3, c4 = (
        0.5 * c @ F @ c,
        -0.5 * c @ F @ A @ c,
        c @ A @ F @ A @ c / 8 + c @ F @ A @ A @ c / 6,
    )
    np.testing.assert_allclose(dg.delta_u_coefficients[2:], [c2, c3, c4], rtol=1e-12)
    assert dg.delta_u_coefficients[:2] == (0.0, 0.0) and math.isnan(dg.first_order_time)
    projected, xs = _series_of(P @ F @ P, A, c, np.zeros(N))
    np.testing.assert_allclose(dg.projected_coefficients, projected, rtol=1e-11, atol=1e-14)
    # the window: the t⁴ term is 10 % of the sum at validity_time, less just before it
    du = np.polynomial.polynomial.polyval
    t_v = dg.validity_time
    assert abs(c4) * t_v**4 / abs(du(t_v, dg.delta_u_coefficients)) == pytest.approx(0.1)
    assert abs(c4) * (0.99 * t_v) ** 4 < 0.1 * abs(du(0.99 * t_v, dg.delta_u_coefficients))
    # crossing step: SGD step k ↔ t = lr·k, checked by scanning k on the closed form
    ks = np.arange(1, int(t_v / LR) + 1)
    above = ks[du(LR * ks, [0, 0, c2, c3, c4]) >= THRESHOLD]
    assert dg.crossing_step == above[0] and dg.crossing_time == pytest.approx(LR * above[0])
    # overlap of the forecast update x(lr·steps) (inside the window)
    t_h = LR * STEPS
    assert dg.horizon_time == pytest.approx(t_h) and t_h < t_v
    x = sum(xi * t_h ** (i + 1) for i, xi in enumerate(xs))
    assert rel_err(dg.overlap_geometric, np.linalg.norm(P @ x) / np.linalg.norm(x)) < 1e-10
    assert rel_err(dg.overlap_fisher, 0.5 * x @ P @ F @ P @ x) < 1e-10
    assert rel_err(dg.overlap_gradient, np.linalg.norm(P @ c) / np.linalg.norm(c)) < 1e-12
    assert dg.overlap_baseline == pytest.approx(np.sqrt(3 / N))
    assert dg.skill_gradient_norm == 0.0 and dg.warnings == ()


def test_report_figure_shows_every_series_and_letters_its_panels(clean):
    """Δu and the projected loss agree on a concentrated F: both must stay visible; the
    legend's entries are what is drawn (the window is a shaded span); panels (a)-(c)."""
    dg = clean[0]
    fig = dg.figure()
    assert figure_checks.check(fig) == []
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert "validity window" in labels and r"forecast $\Delta u(t)$" in labels


def test_diagnosis_json_round_trip_and_markdown(clean):
    dg = clean[0]
    text = dg.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
    back = geomcollapse.Diagnosis.from_json(text)
    assert back.to_dict() == dg.to_dict() and back.aic == dg.aic
    assert json.loads(text)["first_order_time"] == "nan" and math.isnan(back.first_order_time)
    md = dg.to_markdown(figure="report.png")
    assert f"| γ = ‖F^{{1/2}}PHg‖ (coupling) | {dg.aic.coupling:.4g} |" in md
    assert f"step {dg.crossing_step}" in md and "![spectrum" in md
    with pytest.raises(ValueError, match="fields"):
        geomcollapse.Diagnosis.from_dict({"n": 3})


def test_warnings_fire_on_constructed_cases(clean):
    """Not a minimum (b ≠ 0), a flat spectrum with d capped, a plan past the window, no crossing."""
    F, A, c, b = _landscape(np.linspace(1.0, 0.5, N))
    steps = 10_000
    dg = _diagnose_quadratic(F, A, c, b, lr=LR, steps=steps, threshold=1e6, max_d=2)
    assert clean[0].warnings == ()  # the same functions on the clean landscape: none
    expected, _ = _series_of(F, A, c, b)
    np.testing.assert_allclose(dg.delta_u_coefficients, expected, rtol=1e-11)
    assert dg.spectrum_method == "dense" and rel_err(dg.trace, np.trace(F)) < 1e-13
    first, tail, window, crossing = dg.warnings
    # θ* not a minimum: c₁ = −bᵀc, dominating up to t₁ with |c₁|t₁ = Σ_{k≥2}|c_k|t₁^k
    t1 = dg.first_order_time
    assert np.abs(expected[1]) * t1 == pytest.approx(
        np.sum(np.abs(expected[2:]) * t1 ** np.arange(2, 5))
    )
    assert "not a minimum" in first and f"{-b @ c:.3g}" in first and f"t < {t1:.3g}" in first
    # tail: the rule reached its cap max_d = 2 with 2/12 of a flat spectrum
    share = np.sort(np.linalg.eigvalsh(F))[::-1][:2].sum() / np.trace(F)
    assert dg.d == 2 and "condition 1" in tail and f"{share:.1%}" in tail and "cap" in tail
    assert "window shorter than the plan" in window and f"steps = {steps}" in window
    assert dg.horizon_time == pytest.approx(dg.validity_time)  # overlap taken at the window's end
    assert "no crossing" in crossing and dg.crossing_step is None and dg.crossing_time is None


def test_hutchinson_trace_on_the_lanczos_route(clean):
    """The rule against a Hutchinson trace of the deflated tail (the route for n > 4096)."""
    _, F, A, c = clean
    dg = _diagnose_quadratic(F, A, c, np.zeros(N), spectrum="lanczos", trace="hutchinson")
    assert dg.trace_method == "hutchinson" and dg.trace_stderr > 0 and dg.d == 3
    assert abs(dg.trace - np.trace(F)) <= 4 * dg.trace_stderr
    tail = np.sort(np.linalg.eigvalsh(F))[::-1][3:].sum()
    assert abs(dg.aic.tail_mass - tail) <= 4 * dg.trace_stderr


Q = _landscape(np.r_[5.0, 3.0, 1.0, np.full(N - 3, 0.01)])


def test_a_jet_failure_is_said_and_recorded_and_changes_no_number(clean):
    """A task loss ``jet`` cannot expand (softplus, jax-ml/jax#30352, times 0): the series
    falls back to nested ``jvp`` with a warning, the report says ``'jvp'``, and every
    coefficient equals the ``jet`` route's on the same quadratic."""
    dg, F, A, c = clean
    assert dg.taylor_route == "jet" and "(Taylor route jet)" in dg.to_markdown()

    def task_softplus(theta, A, c, theta_star):
        return task_L(theta, A, c, theta_star) + 0.0 * jnp.sum(jax.nn.softplus(theta))

    theta_star = jnp.asarray(np.random.default_rng(7).standard_normal(N))
    with pytest.warns(geomcollapse.series.TaylorFallbackWarning, match="nested jax.jvp"):
        fallback = geomcollapse.diagnose(
            skill_u,
            task_softplus,
            theta_star,
            skill_args=(jnp.asarray(F), jnp.zeros(N), theta_star),
            task_args=(jnp.asarray(A), jnp.asarray(c), theta_star),
            fisher=fisher_F,
            key=jax.random.key(0),
            lr=LR,
            steps=STEPS,
            threshold=THRESHOLD,
            spectrum="lanczos",
        )
    assert fallback.taylor_route == "jvp"
    assert geomcollapse.Diagnosis.from_json(fallback.to_json()).taylor_route == "jvp"
    np.testing.assert_allclose(
        fallback.delta_u_coefficients, dg.delta_u_coefficients, rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(
        fallback.projected_coefficients, dg.projected_coefficients, rtol=1e-11, atol=1e-14
    )


def test_a_float32_model_s_projected_window_ignores_float32_rounding():
    """A rounding guard at the model's dtype. ``g = c`` with ``⟨v₁, g⟩ = 1e-6‖g‖``, within
    float32 rounding: the projected series' ``c₃`` is then ~1e-6 of ``c₄``, below float32's
    ``√eps`` (3.5e-4) and above float64's (1.5e-8). Judged at float32's, the float32 window
    equals the float64 one of ``Pg = 0`` exactly; at float64's, ``c₃`` would set a window of
    ~5e-6 (3e-5 of it)."""
    F, A, c, _ = _landscape(np.r_[5.0, 3.0, 1.0, np.full(N - 3, 0.01)])
    U = np.linalg.eigh(F)[1][:, ::-1][:, :3]
    c = c - U @ (U.T @ c)  # g = c ⟂ M
    out = {}
    for dtype, g in ((np.float64, c), (np.float32, c + 1e-6 * np.linalg.norm(c) * U[:, 0])):
        theta_star = jnp.asarray(np.random.default_rng(7).standard_normal(N), dtype)
        out[dtype] = geomcollapse.diagnose(
            skill_u,
            task_L,
            theta_star,
            skill_args=tuple(jnp.asarray(a, dtype) for a in (F, np.zeros(N), theta_star)),
            task_args=tuple(jnp.asarray(a, dtype) for a in (A, g, theta_star)),
            fisher=fisher_F,
            key=jax.random.key(0),
            d=3,
            order=5,
        )
    d64, d32 = out[np.float64], out[np.float32]
    assert d32.dtype == "float32" and 0 < d64.projected_validity_time < np.inf
    eps32 = np.finfo(np.float32).eps
    assert rel_err(d32.projected_validity_time, d64.projected_validity_time) < 100 * eps32
    by_float64_rule = geomcollapse.series.polynomial_validity_time(
        d32.projected_coefficients, time_scale=d32.time_scale
    )
    assert by_float64_rule < 1e-3 * d64.projected_validity_time


def test_a_not_symmetric_error_is_classified_by_its_class(monkeypatch):
    """Lanczos's :class:`geomcollapse.errors.NotSymmetricError` is refused as a bad Fisher;
    any other ``ValueError`` passes through unchanged, whatever its message says."""
    from geomcollapse import errors, linalg

    F, A, c, _ = Q
    assert issubclass(errors.NotSymmetricError, ValueError)
    B = jnp.asarray(F + np.triu(np.ones((N, N)), 1))
    with pytest.raises(errors.NotSymmetricError, match="matvec is not symmetric"):
        linalg.top_eigenpairs(lambda v: B @ v, jnp.zeros(N), 2, key=jax.random.key(0))
    for error, pattern in (
        (errors.NotSymmetricError("no words in common"), r"^fisher: .* is not symmetric"),
        (ValueError("matvec is not symmetric (a plain ValueError)"), r"^matvec is not sym"),
    ):

        def raising(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(linalg, "top_eigenpairs", raising)
        with pytest.raises(ValueError, match=pattern):
            _diagnose_quadratic(F, A, c, np.zeros(N), spectrum="lanczos")


TS = jnp.zeros(N)
GOOD = {
    "skill_args": (jnp.asarray(Q[0]), jnp.zeros(N), TS),
    "task_args": (jnp.asarray(Q[1]), jnp.asarray(Q[2]), TS),
    "fisher": fisher_F,
}


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"d": 0}, r"^d must be an integer >= 1"),
        ({"d": N}, rf"^d={N} must be smaller than n={N}"),
        ({"lr": -1.0}, r"^lr must be a finite number > 0"),
        ({"lr": float("nan")}, r"^lr must be"),
        ({"lr": "0.01"}, r"^lr must be a positive number, got '0.01'"),
        ({"lr": 0.1, "steps": 0}, r"^steps must be an integer >= 1"),
        ({"steps": 10}, r"^lr is required with steps"),
        ({"threshold": 1.0}, r"^lr is required with threshold"),
        ({"lr": 0.1, "threshold": -1.0}, r"^threshold must be"),
        ({"fisher": "bogus"}, r"^fisher must be 'true', 'empirical'"),
        ({"fisher": "true"}, r"^skill_logits is required for fisher='true'"),
        (
            {"fisher": "true", "skill_logits": lambda p, *a: jnp.sum(p)},
            r"^skill_logits must return",
        ),
        (  # (N,) logits would read as one categorical over N classes
            {"fisher": "true", "skill_logits": lambda p, *a: p},
            r"^skill_logits must return logits of shape \(N, \.\.\., C\) .* got shape \(12,\)",
        ),
        ({"fisher": lambda p, v, *a: v[:3]}, r"^fisher must return F v as a pytree like params"),
        (
            {"fisher": lambda p, v, *a: v.astype(jnp.int32)},
            r"^fisher must return F v as a pytree like params.* int32\[12\]",
        ),
        ({"fisher": lambda p, v, *a: -v}, r"^fisher: the skill Fisher is not positive semidef"),
        (  # tr F > 0 but one eigenvalue −1
            {"fisher": lambda p, v, *a: v * jnp.where(jnp.arange(N) == 0, -1.0, 1.0)},
            r"^fisher: the skill Fisher is not positive semidefinite .*smallest eigenvalue -1",
        ),
        (
            {"fisher": lambda p, v, *a: v.at[0].add(v[1])},
            r"^fisher: the skill Fisher's matvec is not symmetric",
        ),
        (
            {"fisher": lambda p, v, *a: v.at[0].add(v[1]), "spectrum": "lanczos"},
            r"^fisher: the skill Fisher's matvec is not symmetric",
        ),
        (
            {
                "fisher": "empirical",
                "skill_loss": lambda p, a, b: jnp.sum(p) + jnp.sum(a) + jnp.sum(b),
                "skill_args": (jnp.zeros((3, N)), jnp.zeros(N)),
            },
            r"^skill_args must hold arrays sharing one leading example axis",
        ),
        ({"key": None}, r"^key is required"),
        ({"share": 1.5}, r"^share must be a number in \(0, 1\)"),
        ({"max_d": 0}, r"^max_d must be an integer >= 1"),
        ({"order": 1}, r"^order must lie in \[2, 12\]"),
        ({"order": 40}, r"^order must lie in \[2, 12\]"),
        ({"trace": "bogus"}, r"^trace must be"),
        ({"spectrum": "eig"}, r"^spectrum must be 'auto', 'dense' or 'lanczos'"),
        ({"skill_args": jnp.zeros(N)}, r"^skill_args must be a tuple"),
        ({"params": TS.at[3].set(jnp.nan)}, r"^params has 1 non-finite"),
        ({"skill_loss": lambda p, *a: p}, r"^skill_loss must return a floating scalar"),
        ({"task_loss": "nll"}, r"^task_loss must be callable"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, pattern):
    kw = {**GOOD, "key": jax.random.key(0), **change}
    skill, task = kw.pop("skill_loss", skill_u), kw.pop("task_loss", task_L)
    with pytest.raises(ValueError, match=pattern):
        geomcollapse.diagnose(skill, task, kw.pop("params", TS), **kw)


def _softmax_regression(scale: float, soft: bool):
    """Mean cross-entropy × ``scale`` of a 5 → 3 softmax regression on 20 points: against
    the model's own probabilities at θ* (``soft``, θ* its minimum, every per-example
    gradient 0 up to rounding) or against hard labels (far from a minimum)."""
    rng = np.random.default_rng(4)
    theta = {"W": jnp.asarray(rng.standard_normal((5, 3))), "b": jnp.asarray([0.1, -0.2, 0.3])}
    x = jnp.asarray(rng.standard_normal((20, 5)))

    def logits(p, x):
        return x @ p["W"] + p["b"]

    target = jax.nn.softmax(logits(theta, x)) if soft else jax.nn.one_hot(np.arange(20) % 3, 3)

    def loss(p, x, q):
        return -scale * jnp.mean(jnp.sum(q * jax.nn.log_softmax(logits(p, x)), -1))

    return loss, theta, (x, target)


def test_empirical_fisher_at_rounding_level_is_refused_whatever_its_symmetry():
    """The noise test alone (not the asymmetry check): ``v₁ᵀFv₁`` redrawn by a 4-ulp move
    of θ* is refused; a real empirical Fisher, even of a loss scaled by 1e-12, is kept."""
    from geomcollapse.diagnosis.fisher import empirical_fvp, refuse_rounding_noise

    def along_top(loss, theta, args):
        fvp = jax.jit(empirical_fvp(loss))
        flat, unravel = ravel_pytree(theta)
        F = np.stack([ravel_pytree(fvp(theta, unravel(e), *args))[0] for e in jnp.eye(flat.size)])
        v1 = unravel(jnp.asarray(np.linalg.eigh(0.5 * (F + F.T))[1][:, -1]))
        return lambda p: float(ravel_pytree(v1)[0] @ ravel_pytree(fvp(p, v1, *args))[0])

    loss, theta, args = _softmax_regression(1.0, soft=True)
    with pytest.raises(ValueError, match=r"vanishes at params .*4 units in the last place"):
        refuse_rounding_noise(along_top(loss, theta, args), theta, 1e-32, jax.random.key(0))
    for scale in (1.0, 1e-12):
        loss, theta, args = _softmax_regression(scale, soft=False)
        refuse_rounding_noise(along_top(loss, theta, args), theta, 1.0, jax.random.key(0))
        dg = geomcollapse.diagnose(
            loss, loss, theta, skill_args=args, task_args=args, fisher="empirical", d=2,
            key=jax.random.key(0),
        )  # fmt: skip
        assert dg.eigenvalues[0] > 0


# ------------------------------------------------------------------ the README example


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use on your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README section has one python example"
    return blocks[0]


def _dense_fisher(logits_fn, flat, unravel, *args):
    """``(1/m) Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i`` over the logit rows of ``logits_fn`` (dense)."""

    def rows(f):
        z = logits_fn(unravel(f), *args)
        return z.reshape(-1, z.shape[-1])

    z, J = jax.jit(lambda f: (rows(f), jax.jacfwd(rows)(f)))(flat)
    z, J = np.asarray(z, np.float64), np.asarray(J, np.float64)  # (m, C), (m, C, n)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    lam = p[:, :, None] * np.eye(p.shape[1]) - p[:, :, None] * p[:, None, :]
    return np.einsum("mci,mcd,mdj->ij", J, lam, J) / p.shape[0]


def test_readme_example_on_a_user_flax_nnx_classifier(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), ns)
    dg, params = ns["diagnosis"], ns["params"]
    assert {p.name for p in (tmp_path / "diagnosis").iterdir()} == {
        "report.json",
        "report.md",
        "report.png",
    }
    # dense references on the user's model: F = Jᵀ(diag p − ppᵀ)J, g, eigh, the d rule, c₂
    flat, unravel = ravel_pytree(params)
    x_skill, reference = ns["x_skill"], ns["reference"]
    F = _dense_fisher(ns["logits"], flat, unravel, x_skill)
    lam = np.linalg.eigvalsh(F)[::-1]
    k = len(dg.eigenvalues)
    np.testing.assert_allclose(dg.eigenvalues, lam[:k], rtol=1e-8, atol=1e-10 * lam[0])
    assert rel_err(dg.trace, np.trace(F)) < 1e-10
    assert dg.d == int(np.argmax(np.cumsum(lam) >= 0.9 * np.trace(F))) + 1
    g = jax.jit(jax.grad(lambda f: ns["nll"](unravel(f), ns["x_task"], ns["y_task"])))(flat)
    g = np.asarray(g)
    # θ* minimises the KL skill loss: c₁ is rounding, c₂ = ½gᵀFg (docs/theory.md §6)
    assert abs(dg.delta_u_coefficients[1]) < 1e-12 * dg.delta_u_coefficients[2]
    assert rel_err(dg.delta_u_coefficients[2], 0.5 * g @ F @ g) < 1e-9
    assert dg.aic.converged and math.isnan(dg.first_order_time)
    # the README's claim: with the hard-target skill loss, c₁ ≠ 0 and a warning says so;
    # here with the empirical Fisher GᵀG/m of its per-example gradients (dense twin below)
    x_y = (x_skill, ns["y_skill"])
    hard = geomcollapse.diagnose(
        ns["nll"],
        ns["nll"],
        params,
        skill_args=x_y,
        task_args=(ns["x_task"], ns["y_task"]),
        fisher="empirical",
        key=jax.random.key(0),
    )
    assert hard.fisher == "empirical" and "not a minimum" in hard.warnings[0]

    def losses(f):  # the per-example skill losses ℓ_i(θ)
        return jax.vmap(lambda x, y: ns["nll"](unravel(f), x[None], y[None]))(*x_y)

    G = np.asarray(jax.jit(jax.jacrev(losses))(flat))  # (m, n) per-example gradients
    lam_emp = np.linalg.eigvalsh(G.T @ G / G.shape[0])[::-1]
    k = len(hard.eigenvalues)
    np.testing.assert_allclose(hard.eigenvalues, lam_emp[:k], rtol=1e-9, atol=1e-12 * lam_emp[0])
    grad_u = G.mean(axis=0)
    assert rel_err(hard.delta_u_coefficients[1], -grad_u @ g) < 1e-10  # c₁ = −∇u(θ*)ᵀg
    # the default is the true Fisher because the empirical one vanishes at the KL minimum
    with pytest.raises(ValueError, match="vanishes at params"):
        geomcollapse.diagnose(
            ns["skill_kl"],
            ns["nll"],
            params,
            skill_args=(x_skill, reference),
            task_args=(ns["x_task"], ns["y_task"]),
            fisher="empirical",
            key=jax.random.key(0),
        )


# ------------------------------------------------------------------ the CLI

CONFIG = models.TransformerConfig(vocab=5, context=4, d_model=4, heads=2, layers=1, mlp_ratio=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A one-block transformer checkpoint (n = 249), its skill (.npz) and task (.jsonl) files,
    and an orbax checkpoint of something that is not a transformer."""
    root = tmp_path_factory.mktemp("diagnose_cli")
    rng = np.random.default_rng(0)
    _, abstract = models.transformer_abstract(CONFIG)  # random weights without eager init ops
    params = jax.tree.map(
        lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), abstract
    )
    checkpoint.save_checkpoint(root / "ckpt", params, CONFIG)
    np.savez(
        root / "skill.npz",
        tokens=rng.integers(0, CONFIG.vocab, (6, 4)),
        answer_start=np.array([1, 2, 3, 2, 3, 1]),
    )
    rows = [list(map(int, rng.integers(0, CONFIG.vocab, 2 + i % 3))) for i in range(6)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        ck.save(root / "other", {"w": np.zeros(3, np.float32)})
        ck.wait_until_finished()
    return root, params, rows


def test_cli_diagnose_writes_reports_equal_to_dense_references(ckpt, capsys):
    root, params32, rows = ckpt
    out = root / "out"
    args = ["diagnose", "--checkpoint", str(root / "ckpt"), "--skill", str(root / "skill.npz")]
    args += ["--task", str(root / "task.jsonl"), "--lr", "0.01", "--steps", "5", "--order", "2"]
    args += ["--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "[diagnose] started" in captured.err and "[diagnose] done" in captured.err
    assert str(out / "report.json") in captured.out
    # order 2 at the KL minimum: c₁ is rounding, c₂ alone cannot bound its error
    assert "warning: the forecast window is unknown" in captured.out
    dg = geomcollapse.Diagnosis.from_json((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# geomcollapse diagnosis")
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # dense references in float64 from the files' documented meaning
    graphdef, _ = models.transformer_abstract(CONFIG, jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
    flat, unravel = ravel_pytree(params)
    assert dg.n == flat.size and dg.fisher == "true" and dg.dtype == "float64" and dg.order == 2
    logits = models.transformer_logits(graphdef)
    skill = np.load(root / "skill.npz")
    first = training.answer_logits(logits)
    F = _dense_fisher(
        first, flat, unravel, jnp.asarray(skill["tokens"]), jnp.asarray(skill["answer_start"])
    )
    lam = np.linalg.eigvalsh(F)[::-1]
    np.testing.assert_allclose(
        dg.eigenvalues, lam[: len(dg.eigenvalues)], rtol=1e-7, atol=1e-9 * lam[0]
    )
    assert rel_err(dg.trace, np.trace(F)) < 1e-10
    assert dg.d == int(np.argmax(np.cumsum(lam) >= 0.9 * np.trace(F))) + 1
    T = max(len(r) for r in rows)  # .jsonl: right-padded, loss on each row's own targets
    tokens = np.array([r + [0] * (T - len(r)) for r in rows])
    targets = np.concatenate([tokens[:, 1:], np.zeros((len(rows), 1), int)], axis=1)
    mask = (np.arange(T)[None] < np.array([len(r) - 1 for r in rows])[:, None]).astype(float)
    loss = training.sequence_loss(logits)
    g = np.asarray(jax.jit(jax.grad(lambda f: loss(unravel(f), tokens, targets, mask)))(flat))
    assert rel_err(dg.task_gradient_norm, np.linalg.norm(g)) < 1e-10
    assert rel_err(dg.delta_u_coefficients[2], 0.5 * g @ F @ g) < 1e-8
    assert math.isnan(dg.validity_time) and dg.horizon_time is None and dg.crossing_step is None


def _write(path: Path, content) -> Path:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    return path


BAD_FILES = {
    "missing file": ("skill", "nothing.npy", None, "no such file"),
    "empty file": ("task", "t.jsonl", "", "empty file"),
    "unknown format": ("skill", "s.txt", "1 2 3", "unsupported format '.txt'"),
    "wrong shape": ("skill", "s.npy", np.zeros(4, np.int64), "must be a 2-D (N, T) array"),
    "not integers": (
        "task",
        "t.npy",
        np.zeros((2, 3)),
        "must be integer token ids, got dtype float64",
    ),
    "id out of range": ("skill", "s.npy", np.full((2, 3), 5), "must lie in [0, 5)"),
    "negative id": ("task", "t.npy", np.array([[0, -1, 2]]), "got ids in [-1, 2]"),
    "past the context": (
        "task",
        "t.npy",
        np.zeros((2, 5), np.int64),
        "exceed the checkpoint's context of 4",
    ),
    "bad json": ("task", "t.jsonl", "[1, 2]\n[1, 2\n", "line 2: not valid JSON"),
    "json not a list": (
        "skill",
        "s.jsonl",
        '{"ids": [1]}\n',
        "line 1: an object must have a 'tokens' list",
    ),
    "no tokens array": ("skill", "s.npz", {"ids": np.zeros((2, 2), np.int64)}, "no 'tokens' array"),
    "answer_start": (
        "skill",
        "s.npz",
        {"tokens": np.zeros((2, 3), np.int64), "answer_start": np.array([0, 3])},
        "answer_start must lie in [0, row length)",
    ),
    "no target": ("task", "t.jsonl", "[1]\n[2]\n", "need at least 2 tokens"),
    "huge id": ("task", "t.jsonl", "[1, 99999999999999999999]\n", "out of range"),
    "mask past the end": (
        "task",
        "t.npz",
        {"tokens": np.ones((1, 3), np.int64), "mask": np.array([[0, 0, 1]])},
        "no next token",
    ),
    "mask empty": (
        "task",
        "t.npz",
        {"tokens": np.ones((2, 3), np.int64), "mask": np.zeros((2, 3))},
        "selects no target",
    ),
    # before: the row dropped out of the loss's mean without a word
    "a row with no target": ("task", "t.jsonl", "[1, 2, 3]\n[1]\n", "row 1 (of 1 such rows)"),
    "answer at the end": (
        "task",
        "t.npz",
        {"tokens": np.ones((2, 3), np.int64), "answer_start": np.array([0, 2])},
        "row 1 (of 1 such rows) has no target position",
    ),
    # before: numpy's message alone, naming no file
    "pickled array": (
        "skill",
        "s.npz",
        {"tokens": np.array([[1, 2], [3]], dtype=object)},
        "not a readable .npz file (Object arrays cannot be loaded",
    ),
}


@pytest.mark.parametrize(
    "case", [*BAD_FILES, "missing checkpoint", "not a transformer", "damaged checkpoint"]
)
def test_cli_malformed_input_is_one_line_naming_the_file(case, ckpt, tmp_path, capsys):
    root = ckpt[0]
    files = {"checkpoint": root / "ckpt", "skill": root / "skill.npz", "task": root / "task.jsonl"}
    if case == "missing checkpoint":
        role, files["checkpoint"], problem = "checkpoint", tmp_path / "no", "no such checkpoint"
    elif case == "not a transformer":
        role, files["checkpoint"] = "checkpoint", root / "other"
        problem = "not a geomcollapse transformer checkpoint"
    elif case == "damaged checkpoint":  # its integrity manifest deleted
        role, files["checkpoint"] = "checkpoint", tmp_path / "damaged"
        shutil.copytree(root / "ckpt", files["checkpoint"])
        next(files["checkpoint"].rglob(checkpoint._MANIFEST)).unlink()
        problem = ": checkpoint has no integrity manifest"
    else:
        role, name, content, problem = BAD_FILES[case]
        files[role] = tmp_path / name if content is None else _write(tmp_path / name, content)
    args = ["diagnose", "--out", str(tmp_path / "out"), "--no-progress"]
    for flag, path in files.items():
        args += [f"--{flag}", str(path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geomcollapse diagnose: error: ")
    assert str(files[role]) in err and problem in err, err
    assert not (tmp_path / "out").exists()


def test_a_custom_fisher_of_another_floating_dtype_is_cast_to_the_params():
    """A float64 ``F v`` for float32 params (e.g. from a numpy ``F``) is cast, not refused."""
    F = np.asarray(Q[0])
    p32 = jnp.zeros(N, jnp.float32)
    args32 = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32),
        {"skill_args": GOOD["skill_args"], "task_args": GOOD["task_args"]},
    )
    runs = [
        geomcollapse.diagnose(skill_u, task_L, p32, fisher=fisher, key=jax.random.key(0), **args32)
        for fisher in (
            lambda p, v, *a: jnp.asarray(F, jnp.float32) @ v,
            lambda p, v, *a: jnp.asarray(F, jnp.float64) @ v.astype(jnp.float64),
        )
    ]
    np.testing.assert_allclose(runs[1].eigenvalues, runs[0].eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(runs[1].eigenvalues[:3], np.linalg.eigvalsh(F)[::-1][:3], rtol=1e-5)
