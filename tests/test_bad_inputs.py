"""Bad inputs across the public API raise ``ValueError`` naming the argument.

Each case is a call with one bad argument (all others valid) and a regex the
message must match; the regex holds the argument's name, so a check that fires
for the wrong reason (or a NaN result, a TypeError from deep inside JAX) fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geomcollapse import (
    aic,
    checkpoint,
    curvature,
    flow,
    landscapes,
    linalg,
    models,
    subspace,
    sweep,
    tasks,
    theory,
)

NAN = float("nan")
N = 10
A = jnp.diag(jnp.arange(1.0, N + 1.0))
Z = jnp.zeros(N)
ONES = jnp.ones(N)
E2 = jnp.eye(N)[:2]  # an exact 2-D subspace basis (d, n)


def key():
    return jax.random.key(0)


def mv(v):
    return A @ v


def quad(x):
    return 0.5 * x @ A @ x + jnp.sum(x)


def fvp(params, v):
    return A @ v


def nan_at(i, n=N):
    return jnp.zeros(n).at[i].set(NAN)


def top(**kw):
    return linalg.top_eigenpairs(mv, kw.pop("like", Z), kw.pop("k", 2), **{"key": key(), **kw})


def traced(**kw):
    v0 = kw.pop("v0", ONES)
    return linalg.top_eigenpairs_traced(mv, v0, kw.pop("k", 2), **{"key": key(), **kw})


def slq(**kw):
    return linalg.spectral_density(mv, kw.pop("like", Z), **{"key": key(), **kw})


def grid(density=None, points=None, sigma=0.5):
    if density is None:
        density = linalg.SpectralDensity(np.ones((1, 2)), np.full((1, 2), 0.5))
    points = np.linspace(0.0, 2.0, 5) if points is None else points
    return linalg.density_on_grid(density, points, sigma=sigma)


def ode(theta0=Z, ts=(0.5, 1.0), **kw):
    return flow.ode_flow(quad, theta0, ts, **kw)


def gd(A_=A, c=ONES, eta=0.1, ks=None):
    return flow.quadratic_gd(A_, c, eta, jnp.arange(3.0) if ks is None else ks)


def krylov(c=ONES, ts=(0.5, 1.0), **kw):
    return flow.krylov_quadratic_flow(mv, c, jnp.asarray(ts), **kw)


def record(ts=(1.0,), xs=None, star=Z, sub=None, **kw):
    xs = jnp.zeros((len(ts), N)) if xs is None else xs
    sub = (jnp.ones(2), E2) if sub is None else sub
    return flow.record_trajectory(ts, xs, star, jnp.sum, sub, **kw)


def measure(params=Z, d=2, **kw):
    return aic.measure_aic(fvp, quad, params, d, **{"key": key(), **kw})


def fit(ts=None, ys=None, window=None):
    ts = np.arange(1.0, 10.0) if ts is None else ts
    return theory.fit_exponent(ts, ts**2 if ys is None else ys, window)


def onset(curvature_norm=1.0, **kw):
    report = landscapes.QuadraticLandscape(
        jnp.eye(4), jnp.ones(4), jnp.diag(jnp.array([2.0, 1.0, 0.0, 0.0]))
    ).aic(2)
    return theory.onset_window(report, curvature_norm, **{"t_min": 1e-3, **kw})


QUAD_ARGS = dict(top=(2.0, 1.0), tail_mass=0.1, epsilon=0.1, kappa=1.0)


def make_quad(n=6, d=2, **kw):
    return landscapes.make_quadratic_landscape(key(), n, d, **{**QUAD_ARGS, **kw})


def logistic(**kw):
    return landscapes.make_logistic_landscape(kw.pop("key", key()), kw.pop("n", 5), **kw)


def tconfig(**kw):
    return models.TransformerConfig(
        **{"vocab": 5, "context": 3, "d_model": 4, "heads": 2, "layers": 1, **kw}
    )


SWEEP = {
    "output": "out.jsonl",
    "grid": {
        "n": [6],
        "d": [2],
        "top": [[2.0, 1.0]],
        "tail_mass": [0.1],
        "epsilon": [0.1],
        "kappa": [1.0],
    },
    "seeds": [0],
    "times": [0.1, 1.0],
}


def parse(**kw):
    return sweep.parse_config({**SWEEP, **kw})


def parse_grid(**kw):
    return parse(grid={**SWEEP["grid"], **kw})


def exact_subspace(basis, values=(1.0, 1.0)):
    return subspace.Subspace.exact(jnp.asarray(values), basis)


def unconverged_pairs():
    return linalg.Eigenpairs(
        values=jnp.ones(2),
        vectors=E2,
        residuals=jnp.ones(2),
        converged=jnp.array([True, False]),
        found=jnp.array([True, True]),
        num_matvecs=3,
    )


CASES = [
    # linalg.top_eigenpairs
    ("top_eigenpairs-key-None", lambda: top(key=None), r"^key is required"),
    ("top_eigenpairs-tol-nan", lambda: top(tol=NAN), r"^tol must be"),
    ("top_eigenpairs-max_matvecs-0", lambda: top(max_matvecs=0), r"^max_matvecs must be"),
    ("top_eigenpairs-like-2d", lambda: top(like=jnp.zeros((2, 5))), r"^like must be a 1-D"),
    ("top_eigenpairs-which", lambda: top(which="smallest"), r"^which must be"),
    ("top_eigenpairs-k-above-n", lambda: top(k=N + 1), r"^k=11 exceeds"),
    # linalg.top_eigenpairs_traced
    ("traced-tol-negative", lambda: traced(tol=-1.0), r"^tol must be"),
    ("traced-tol-nan", lambda: traced(tol=NAN), r"^tol must be"),
    ("traced-v0-int", lambda: traced(v0=jnp.ones(N, jnp.int32)), r"^v0 must hold floating"),
    ("traced-v0-2d", lambda: traced(v0=jnp.ones((2, 5))), r"^v0 must be a 1-D"),
    ("traced-v0-nan", lambda: traced(v0=nan_at(3)), r"^v0 has 1 non-finite"),
    ("traced-key-None", lambda: traced(key=None), r"^key is required"),
    ("traced-k-float", lambda: traced(k=2.5), r"^k must be an integer"),
    ("traced-max_steps-0", lambda: traced(max_steps=0), r"^max_steps must be"),
    ("traced-max_steps-below-k", lambda: traced(k=4, max_steps=3), r"k=4, max_steps=3"),
    ("traced-check_every-0", lambda: traced(check_every=0), r"^check_every must be"),
    # linalg.spectral_density, density_on_grid
    ("slq-num_probes-0", lambda: slq(num_probes=0), r"^num_probes must be"),
    ("slq-num_steps-negative", lambda: slq(num_steps=-1), r"^num_steps must be"),
    ("slq-key-int", lambda: slq(key=0), r"^key must be a jax\.random key"),
    ("slq-like-int", lambda: slq(like=jnp.zeros(N, jnp.int32)), r"^like must hold floating"),
    ("density_on_grid-sigma-0", lambda: grid(sigma=0.0), r"^sigma must be"),
    ("density_on_grid-grid-nan", lambda: grid(points=np.array([0.0, NAN])), r"^grid must be"),
    ("density_on_grid-grid-2d", lambda: grid(points=np.ones((2, 2))), r"^grid must be"),
    ("density_on_grid-density-tuple", lambda: grid(density=(np.ones((1, 2)),)), r"^density must"),
    # linalg.empirical_fisher_eigenpairs
    (
        "empirical_fisher-grads-nan",
        lambda: linalg.empirical_fisher_eigenpairs(jnp.full((3, 5), NAN), 1),
        r"^per_example_grads has 15 non-finite",
    ),
    (
        "empirical_fisher-grads-int",
        lambda: linalg.empirical_fisher_eigenpairs(jnp.ones((3, 5), jnp.int32), 1),
        r"^per_example_grads must hold floating",
    ),
    (
        "empirical_fisher-grads-scalar",
        lambda: linalg.empirical_fisher_eigenpairs(jnp.ones(()), 1),
        r"^per_example_grads leaves must share",
    ),
    (
        "empirical_fisher-k-0",
        lambda: linalg.empirical_fisher_eigenpairs(jnp.ones((3, 5)), 0),
        r"^k must be",
    ),
    # curvature operators: v must match params
    (
        "hessian_vp-v-shape",
        lambda: curvature.hessian_vp(quad)(Z, jnp.zeros(N - 1)),
        r"^v leaf 0 has shape \(9,\), params has \(10,\)",
    ),
    (
        "ggn_vp-v-structure",
        lambda: curvature.ggn_vp(lambda p: p["a"], lambda z: jnp.sum(z**2))({"a": Z}, {"b": Z}),
        r"^v does not have the pytree structure of params",
    ),
    (
        "fisher_vp-v-dtype",
        lambda: curvature.fisher_vp(lambda p: p.reshape(2, 5))(Z, jnp.zeros(N, jnp.float32)),
        r"^v leaf 0 has dtype float32, params has float64",
    ),
    (
        "empirical_fisher_vp-v-shape",
        lambda: curvature.empirical_fisher_vp(lambda p, e: jnp.sum(p * e))(
            Z, jnp.zeros(3), jnp.ones((4, N))
        ),
        r"^v leaf 0 has shape",
    ),
    (
        "gradient-params-int",
        lambda: curvature.gradient(quad)(jnp.zeros(N, jnp.int32)),
        r"^params must hold floating",
    ),
    (
        "per_example_gradients-params-int",
        lambda: curvature.per_example_gradients(lambda p, e: jnp.sum(p * e))(
            jnp.zeros(N, jnp.int32), jnp.ones((4, N))
        ),
        r"^params must hold floating",
    ),
    # flow.ode_flow
    ("ode_flow-theta0-nan", lambda: ode(theta0=nan_at(0)), r"^theta0 has 1 non-finite"),
    ("ode_flow-theta0-inf", lambda: ode(theta0=Z.at[1].set(jnp.inf)), r"^theta0 has 1 non-finite"),
    ("ode_flow-theta0-int", lambda: ode(theta0=jnp.zeros(N, jnp.int32)), r"^theta0 must hold"),
    ("ode_flow-ts-empty", lambda: ode(ts=[]), r"^ts must be a non-empty 1-D"),
    ("ode_flow-ts-2d", lambda: ode(ts=[[0.1, 1.0]]), r"^ts must be a non-empty 1-D"),
    ("ode_flow-ts-decreasing", lambda: ode(ts=[0.5, 0.1]), r"^ts must be finite"),
    ("ode_flow-ts-nan", lambda: ode(ts=[0.1, NAN]), r"^ts must be finite"),
    ("ode_flow-ts-negative", lambda: ode(ts=[-0.1, 1.0]), r"^ts must be finite"),
    ("ode_flow-rtol-0", lambda: ode(rtol=0.0), r"^rtol must be"),
    ("ode_flow-atol-nan", lambda: ode(atol=NAN), r"^atol must be"),
    ("ode_flow-dt-inf", lambda: ode(dt=float("inf")), r"^dt must be"),
    ("ode_flow-dt-negative", lambda: ode(dt=-1.0), r"^dt must be"),
    ("ode_flow-max_steps-0", lambda: ode(max_steps=0), r"^max_steps must be"),
    # flow.quadratic_gd
    ("quadratic_gd-eta-nan", lambda: gd(eta=NAN), r"^eta must be"),
    ("quadratic_gd-eta-negative", lambda: gd(eta=-0.1), r"^eta must be"),
    ("quadratic_gd-ks-negative", lambda: gd(ks=jnp.array([-1.0])), r"^ks must be finite"),
    ("quadratic_gd-ks-fraction", lambda: gd(ks=jnp.array([0.5])), r"^ks must hold integer"),
    ("quadratic_gd-ks-2d", lambda: gd(ks=jnp.zeros((2, 2))), r"^ks must be a 1-D"),
    (
        "quadratic_gd-A-nonsymmetric",
        lambda: gd(A_=A + jnp.triu(jnp.ones((N, N)), 1)),
        r"^A is not symmetric",
    ),
    ("quadratic_gd-A-nan", lambda: gd(A_=A.at[0, 0].set(NAN)), r"^A has 1 non-finite"),
    ("quadratic_gd-c-size", lambda: gd(c=jnp.ones(N - 1)), r"^A must be \(n, n\) with n = c\.size"),
    ("quadratic_gd-c-nan", lambda: gd(c=nan_at(2)), r"^c has 1 non-finite"),
    # flow.optimizer_trajectory
    (
        "optimizer_trajectory-theta0-nan",
        lambda: flow.optimizer_trajectory(quad, nan_at(0), optax.sgd(0.1), 3),
        r"^theta0 has 1 non-finite",
    ),
    (
        "optimizer_trajectory-theta0-int",
        lambda: flow.optimizer_trajectory(quad, jnp.zeros(N, jnp.int32), optax.sgd(0.1), 3),
        r"^theta0 must hold floating",
    ),
    (
        "optimizer_trajectory-num_steps-0",
        lambda: flow.optimizer_trajectory(quad, Z, optax.sgd(0.1), 0),
        r"^num_steps must be",
    ),
    # flow.record_trajectory, skill_change
    ("record_trajectory-ts-nan", lambda: record(ts=(NAN,)), r"^ts must be finite"),
    ("record_trajectory-ts-decreasing", lambda: record(ts=(1.0, 0.5)), r"^ts must be finite"),
    ("record_trajectory-xs-nan", lambda: record(xs=nan_at(0)[None]), r"^xs has 1 non-finite"),
    ("record_trajectory-xs-rows", lambda: record(xs=jnp.zeros((2, N))), r"^xs must hold \(1"),
    ("record_trajectory-theta_star-nan", lambda: record(star=nan_at(0)), r"^theta_star has 1"),
    ("record_trajectory-subspace-list", lambda: record(sub=[jnp.ones(2), E2]), r"^subspace must"),
    (
        "record_trajectory-subspace-values-nan",
        lambda: record(sub=(jnp.array([1.0, NAN]), E2)),
        r"^subspace values has 1 non-finite",
    ),
    (
        "record_trajectory-basis-rows",
        lambda: record(sub=(jnp.ones(3), E2)),
        r"^values must be \(d,\) for the basis' d = 2 rows",
    ),
    ("record_trajectory-key-missing", lambda: record(fisher_vp=fvp), r"^key is required"),
    ("record_trajectory-nodes-1", lambda: record(nodes=1), r"^nodes must be"),
    (
        "record_trajectory-tol-negative",
        lambda: record(fisher_vp=fvp, key=key(), tol=-1.0),
        r"^tol must be",
    ),
    (
        "skill_change-xs-nan",
        lambda: flow.skill_change(jnp.sum, Z, nan_at(4)[None]),
        r"^xs has 1 non-finite",
    ),
    # flow.krylov_quadratic_flow
    ("krylov-max_steps-0", lambda: krylov(max_steps=0), r"^max_steps must be"),
    ("krylov-max_steps-above-n", lambda: krylov(max_steps=N + 1), r"^max_steps must be in"),
    ("krylov-tol-negative", lambda: krylov(tol=-1.0), r"^tol must be"),
    ("krylov-c-2d", lambda: krylov(c=jnp.ones((2, 5))), r"^c must be a 1-D"),
    ("krylov-c-int", lambda: krylov(c=jnp.ones(N, jnp.int32)), r"^c must hold floating"),
    ("krylov-c-nan", lambda: krylov(c=nan_at(1)), r"^c has 1 non-finite"),
    ("krylov-ts-negative", lambda: krylov(ts=(-1.0,)), r"^ts must be finite"),
    ("krylov-check_every-0", lambda: krylov(check_every=0), r"^check_every must be"),
    # aic.measure_aic, fisher_trace
    ("measure_aic-params-nan", lambda: measure(params=nan_at(5)), r"^params has 1 non-finite"),
    (
        "measure_aic-params-int",
        lambda: measure(params=jnp.zeros(N, jnp.int32)),
        r"^params must hold floating",
    ),
    ("measure_aic-d-0", lambda: measure(d=0), r"^d must be"),
    ("measure_aic-d-n", lambda: measure(d=N), r"^d=10 must be smaller than n=10"),
    ("measure_aic-key-None", lambda: measure(key=None), r"^key is required"),
    ("measure_aic-trace-unknown", lambda: measure(trace="bogus"), r"^trace must be"),
    (
        "measure_aic-num_probes-1",
        lambda: measure(trace="hutchinson", num_probes=1),
        r"^num_probes must be ≥ 2",
    ),
    (
        "measure_aic-num_probes-0",
        lambda: measure(trace="hutchinson", num_probes=0),
        r"^num_probes must be an integer",
    ),
    ("measure_aic-tol-negative", lambda: measure(tol=-1.0), r"^tol must be"),
    ("measure_aic-max_matvecs-0", lambda: measure(max_matvecs=0), r"^max_matvecs must be"),
    (
        "fisher_trace-n-0",
        lambda: aic.fisher_trace(lambda v: v, 0, jnp.float64, method="exact"),
        r"^n must be",
    ),
    (
        "fisher_trace-method",
        lambda: aic.fisher_trace(lambda v: v, N, jnp.float64, method="bogus"),
        r"^method must be",
    ),
    # subspace
    ("Subspace-basis-1d", lambda: exact_subspace(ONES).rows, r"^basis must be \(d, n\)"),
    (
        "Subspace-basis-leading-axes",
        lambda: exact_subspace({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}).rows,
        r"^basis leaves must share a leading d axis",
    ),
    ("Subspace-leading-0", lambda: exact_subspace(E2).leading(0), r"^d must be in \[1, 2\]"),
    (
        "Subspace-from_eigenpairs-unconverged",
        lambda: subspace.Subspace.from_eigenpairs(unconverged_pairs()),
        r"not converged .* allow_unconverged",
    ),
    (
        "orthogonalized-params-nan",
        lambda: subspace.orthogonalized(quad, exact_subspace(E2), nan_at(0)),
        r"^params has 1 non-finite",
    ),
    (
        "orthogonalized-subspace-size",
        lambda: subspace.orthogonalized(quad, exact_subspace(jnp.eye(N - 1)[:2]), Z),
        r"^subspace basis has 9 parameters, params have 10",
    ),
    # theory
    (
        "first_crossing-ts-decreasing",
        lambda: theory.first_crossing(np.array([2.0, 1.0, 3.0]), np.ones(3), np.ones(3)),
        r"^ts must be finite, positive and increasing",
    ),
    (
        "first_crossing-a-zero",
        lambda: theory.first_crossing(np.arange(1.0, 4.0), np.zeros(3), np.ones(3)),
        r"^a and b must be finite and positive",
    ),
    (
        "first_crossing-b-shape",
        lambda: theory.first_crossing(np.arange(1.0, 4.0), np.ones(3), np.ones(2)),
        r"^ts, a, b must be 1-D",
    ),
    ("fit_exponent-window-reversed", lambda: fit(window=(5.0, 2.0)), r"^window must satisfy"),
    ("fit_exponent-window-negative", lambda: fit(window=(-1.0, 5.0)), r"^window must satisfy"),
    ("fit_exponent-window-nan", lambda: fit(window=(NAN, 5.0)), r"^window must satisfy"),
    ("fit_exponent-window-2-points", lambda: fit(window=(1.0, 2.0)), r"^window .* holds 2 points"),
    ("fit_exponent-ys-negative", lambda: fit(ys=-np.arange(1.0, 10.0)), r"^ys must be finite"),
    ("fit_exponent-ys-length", lambda: fit(ys=np.ones(8)), r"^ts and ys must be 1-D"),
    (
        "fit_exponent-ys-float32-rounding",
        lambda: fit(ys=np.r_[1e-12, np.ones(8)].astype(np.float32)),
        r"^ys are float32",
    ),
    (
        "local_slope-ts-nan",
        lambda: theory.local_slope(np.r_[1.0, NAN, 3.0], np.ones(3)),
        r"finite ts and ys",
    ),
    (
        "local_slope-ys-nan",
        lambda: theory.local_slope(np.r_[1.0, 2.0, 3.0], np.r_[1.0, NAN, 3.0]),
        r"finite ts and ys",
    ),
    (
        "local_slope-length",
        lambda: theory.local_slope(np.r_[1.0, 2.0, 3.0], np.r_[1.0, 2.0]),
        r"^ts and ys must be 1-D of equal length",
    ),
    (
        "local_slope-ys-negative",
        lambda: theory.local_slope(np.r_[1.0, 2.0], -np.ones(2)),
        r"positive ts and ys",
    ),
    ("onset_window-regime", lambda: onset(regime="cubic"), r"^regime must be"),
    ("onset_window-t_min-nan", lambda: onset(t_min=NAN), r"^t_min must be"),
    ("onset_window-margin-0", lambda: onset(margin=0.0), r"^margin must be"),
    ("onset_window-curvature_norm-negative", lambda: onset(-1.0), r"^curvature_norm must be"),
    ("onset_window-curvature_norm-nan", lambda: onset(NAN), r"^curvature_norm must be"),
    # landscapes.make_quadratic_landscape: every numeric argument
    (
        "make_quadratic-key-None",
        lambda: landscapes.make_quadratic_landscape(None, 6, 2, **QUAD_ARGS),
        r"^key is required",
    ),
    ("make_quadratic-n-nan", lambda: make_quad(n=NAN), r"^n must be"),
    ("make_quadratic-d-nan", lambda: make_quad(d=NAN), r"^d must be"),
    ("make_quadratic-d-n", lambda: make_quad(d=6), r"^d=6 must be smaller than n=6"),
    ("make_quadratic-top-nan", lambda: make_quad(top=(NAN, 1.0)), r"^top must hold d=2"),
    ("make_quadratic-top-length", lambda: make_quad(top=(1.0,)), r"^top must hold d=2"),
    ("make_quadratic-tail_mass-nan", lambda: make_quad(tail_mass=NAN), r"^tail_mass must be"),
    ("make_quadratic-tail_mass-big", lambda: make_quad(tail_mass=10.0), r"^tail_mass=10"),
    ("make_quadratic-epsilon-nan", lambda: make_quad(epsilon=NAN), r"^epsilon must be"),
    ("make_quadratic-epsilon-negative", lambda: make_quad(epsilon=-1.0), r"^epsilon must be"),
    ("make_quadratic-kappa-nan", lambda: make_quad(kappa=NAN), r"^kappa must be"),
    (
        "make_quadratic-coupling-nan",
        lambda: make_quad(kappa=None, coupling=NAN),
        r"^coupling must be",
    ),
    (
        "make_quadratic-coupling-and-kappa",
        lambda: make_quad(coupling=1.0),
        r"one of coupling .* or kappa",
    ),
    ("make_quadratic-c_perp_norm-nan", lambda: make_quad(c_perp_norm=NAN), r"^c_perp_norm must"),
    (
        "make_quadratic-curvature_scale-nan",
        lambda: make_quad(curvature_scale=NAN),
        r"^curvature_scale must be",
    ),
    ("make_quadratic-dtype-int", lambda: make_quad(dtype=jnp.int32), r"^dtype must be"),
    # landscapes.QuadraticLandscape, quadratic_summary
    (
        "QuadraticLandscape-A-nonsymmetric",
        lambda: landscapes.QuadraticLandscape(
            jnp.eye(4) + jnp.triu(jnp.ones((4, 4)), 1), jnp.ones(4), jnp.eye(4)
        ),
        r"^A is not symmetric",
    ),
    (
        "QuadraticLandscape-c-nan",
        lambda: landscapes.QuadraticLandscape(jnp.eye(4), nan_at(1, 4), jnp.eye(4)),
        r"^c has 1 non-finite",
    ),
    (
        "QuadraticLandscape-F-not-psd",
        lambda: landscapes.QuadraticLandscape(jnp.eye(4), jnp.ones(4), -jnp.eye(4)),
        r"^F has a negative eigenvalue",
    ),
    (
        "QuadraticLandscape-c-size",
        lambda: landscapes.QuadraticLandscape(jnp.eye(4), jnp.ones(3), jnp.eye(4)),
        r"^shapes disagree: A \(4, 4\), F \(4, 4\), c \(3,\)",
    ),
    (
        "QuadraticLandscape-d-n",
        lambda: landscapes.QuadraticLandscape(jnp.eye(4), jnp.ones(4), jnp.eye(4), d=4),
        r"^d=4 must be smaller",
    ),
    (
        "quadratic_summary-d-0",
        lambda: landscapes.quadratic_summary(
            jnp.eye(4), jnp.ones(4), jnp.eye(4), 0, jnp.array([1.0])
        ),
        r"^d must be",
    ),
    # landscapes.make_logistic_landscape
    ("make_logistic-key-int", lambda: logistic(key=3), r"^key must be a jax\.random key"),
    ("make_logistic-n-0", lambda: logistic(n=0), r"^n must be"),
    ("make_logistic-classes-1", lambda: logistic(classes=1), r"^classes must be ≥ 2"),
    ("make_logistic-skill_examples-0", lambda: logistic(skill_examples=0), r"^skill_examples"),
    ("make_logistic-task_examples-0", lambda: logistic(task_examples=0), r"^task_examples"),
    ("make_logistic-feature_scale-nan", lambda: logistic(feature_scale=NAN), r"^feature_scale"),
    ("make_logistic-theta_scale-0", lambda: logistic(theta_scale=0.0), r"^theta_scale must"),
    ("make_logistic-task_shift-negative", lambda: logistic(task_shift=-1.0), r"^task_shift must"),
    ("make_logistic-orthogonalize_d-n", lambda: logistic(orthogonalize_d=5), r"^orthogonalize_d"),
    # models
    ("mlp_init-sizes-0", lambda: models.mlp_init(key(), [3, 0, 2]), r"^sizes\[i\] must be"),
    ("mlp_init-sizes-float", lambda: models.mlp_init(key(), [3, 2.5]), r"^sizes\[i\] must be"),
    ("mlp_init-sizes-short", lambda: models.mlp_init(key(), [3]), r"^sizes needs"),
    ("mlp_init-key-None", lambda: models.mlp_init(None, [3, 2]), r"^key is required"),
    (
        "mlp_apply-activation",
        lambda: models.mlp_apply(models.mlp_init(key(), [3, 2]), jnp.ones((1, 3)), "swish"),
        r"^activation must be one of",
    ),
    ("gaussian_mixture-dim-0", lambda: models.gaussian_mixture(key(), 10, 0, 3), r"^dim must"),
    (
        "TransformerConfig-heads",
        lambda: tconfig(d_model=5),
        r"^d_model=5 must be divisible by heads",
    ),
    ("TransformerConfig-vocab-0", lambda: tconfig(vocab=0), r"^vocab must be"),
    ("TransformerConfig-layers-float", lambda: tconfig(layers=1.5), r"^layers must be"),
    ("TransformerConfig-mlp_ratio-0", lambda: tconfig(mlp_ratio=0), r"^mlp_ratio must"),
    (
        "transformer_init-config-name",
        lambda: models.transformer_init(key(), "huge"),
        r"^config: unknown",
    ),
    ("transformer_config-type", lambda: models.transformer_config(3), r"^config must be"),
    (
        "transformer_init-key-None",
        lambda: models.transformer_init(None, "tiny"),
        r"^key is required",
    ),
    (
        "check_tokens-float",
        lambda: models.check_tokens(jnp.ones((1, 2)), models.SIZES["tiny"]),
        r"^tokens must be an integer array",
    ),
    (
        "lora_init-rank-0",
        lambda: models.lora_init(key(), {"w": jnp.ones((3, 3))}, 0, where="w"),
        r"^rank must be",
    ),
    (
        "lora_init-rank-too-big",
        lambda: models.lora_init(key(), {"w": jnp.ones((3, 3))}, 4, where="w"),
        r"^rank=4 exceeds",
    ),
    (
        "lora_init-where-int",
        lambda: models.lora_init(key(), {"w": jnp.ones((3, 3))}, 1, where=3),
        r"^where must be",
    ),
    (
        "lora_update-alpha-nan",
        lambda: models.lora_update({"w": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 3))}}, NAN),
        r"^alpha must be",
    ),
    (
        "lora_merge-adapters-unknown",
        lambda: models.lora_merge(
            {"w": jnp.ones((3, 3))}, {"v": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 3))}}, 1.0
        ),
        r"^adapters name leaves that params does not have: \['v'\]",
    ),
    # sweep.parse_config
    ("parse_config-batch_size-0", lambda: parse(batch_size=0), r"^batch_size must be"),
    ("parse_config-seeds-negative", lambda: parse(seeds=[-1]), r"^seeds must be"),
    (
        "parse_config-seeds-missing",
        lambda: sweep.parse_config({k: v for k, v in SWEEP.items() if k != "seeds"}),
        r"needs 'seeds'",
    ),
    ("parse_config-times-decreasing", lambda: parse(times=[1.0, 0.5]), r"^times must be"),
    ("parse_config-times-nan", lambda: parse(times=[0.1, NAN]), r"^times\[1\] is nan"),
    (
        "parse_config-times.start-negative",
        lambda: parse(times={"start": -1.0, "stop": 1.0, "num": 3}),
        r"^times\.start must be",
    ),
    (
        "parse_config-times.num-0",
        lambda: parse(times={"start": 1e-3, "stop": 1.0, "num": 0}),
        r"^times\.num must be",
    ),
    ("parse_config-grid-nan", lambda: parse_grid(epsilon=[NAN]), r"^grid\.epsilon\[0\] is nan"),
    ("parse_config-grid-empty", lambda: parse_grid(n=[]), r"^grid\['n'\] must be a non-empty"),
    ("parse_config-grid-unknown", lambda: parse_grid(bogus=[1]), r"\['bogus'\] in grid"),
    ("parse_config-grid-both", lambda: parse_grid(coupling=[1.0]), r"^grid needs exactly one"),
    ("parse_config-unknown-key", lambda: parse(bogus=1), r"\['bogus'\] in the sweep config"),
    # tasks
    ("base_tasks-num-0", lambda: tasks.base_tasks(key(), 0), r"^num must be"),
    ("base_tasks-tasks-unknown", lambda: tasks.base_tasks(key(), 2, ("poetry",)), r"in tasks"),
    (
        "refusal_skill-harmful_fraction",
        lambda: tasks.refusal_skill(key(), 2, 1.5),
        r"^harmful_fraction",
    ),
    (
        "refusal_skill-harmful_fraction-nan",
        lambda: tasks.refusal_skill(key(), 2, NAN),
        r"^harmful_fraction",
    ),
    ("benign_task-name", lambda: tasks.benign_task(key(), "poetry", 2), r"'poetry' in name"),
    ("benign_task-num-float", lambda: tasks.benign_task(key(), "shift", 2.0), r"^num must be"),
    ("harmful_prompts-key-None", lambda: tasks.harmful_prompts(None, 2), r"^key is required"),
]


@pytest.mark.parametrize(("call", "match"), [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_bad_input_raises_a_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_suite_covers_the_public_api():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)  # ids are unique


@pytest.fixture(scope="module")
def tiny_params():
    return models.transformer_init(jax.random.key(0), "tiny")[1]


def test_checkpoint_bad_inputs_name_the_argument(tiny_params, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        (lambda: checkpoint.save_checkpoint(tmp_path / "a", tiny_params, 3), r"^config must be"),
        (
            lambda: checkpoint.save_checkpoint(tmp_path / "b", tiny_params, "huge"),
            r"^config: unknown transformer size",
        ),
        (
            lambda: checkpoint.save_checkpoint(tmp_path / "c", tiny_params, "small"),
            r"^params do not match config",
        ),
        (
            lambda: checkpoint.save_checkpoint(tmp_path / "d", tiny_params, "tiny", {"x": NAN}),
            r"^metadata must be JSON-able",
        ),
        (
            lambda: checkpoint.save_checkpoint(existing, tiny_params, "tiny"),
            r"^checkpoint directory .*existing exists; pass overwrite=True",
        ),
        (lambda: checkpoint.load_checkpoint(tmp_path / "nothing"), r"^no checkpoint at .*nothing"),
        (lambda: checkpoint.read_metadata(existing), r"existing is not a geomcollapse"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # nothing was written by the refused saves
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
