"""The one operator type (geomcollapse.curvature.LinearOperator) against dense twins, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import aic, linalg
from geomcollapse import curvature as cv
from tests.conftest import rel_err

TOL64 = 1e-10


def _random_like(params, seed):
    flat, unravel = cv.ravel(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def _explicit_fisher(problem):
    J, z = problem.dense_jacobian, problem.dense_logits
    p = jax.nn.softmax(z, axis=-1)
    middle = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    return jnp.einsum("icn,icd,idm->nm", J, middle, J) / J.shape[0]


def _columns(op) -> np.ndarray:
    """The operator built column by column through its raveled form (``(n, n)``)."""
    flat = op.raveled()
    eye = jnp.eye(op.n, dtype=op.dtype)
    return np.asarray(jax.jit(jax.vmap(lambda o, e: o(e), in_axes=(None, 0)))(flat, eye)).T


def test_bound_hvp_and_fisher_match_dense_twins(mlp64):
    p = mlp64
    hop = cv.hessian_vp(p.loss).bind(p.params, p.batch)
    fop = cv.fisher_vp(p.logits).bind(p.params, p.batch)
    assert isinstance(hop, cv.LinearOperator) and hop.n == p.flat.size
    assert hop.dtype == jnp.float64
    v = _random_like(p.params, 0)
    assert rel_err(cv.ravel(cv.apply(hop, v))[0], p.dense_hessian @ cv.ravel(v)[0]) <= TOL64
    F = _explicit_fisher(p)
    assert rel_err(cv.ravel(cv.apply(fop, v))[0], F @ cv.ravel(v)[0]) <= TOL64
    assert rel_err(_columns(hop), p.dense_hessian) <= TOL64
    assert rel_err(_columns(fop), F) <= TOL64


def test_every_factory_binds_to_the_same_numbers_as_its_call_form(mlp64):
    p = mlp64
    out_loss = lambda z, b: jnp.mean(jnp.sum(z**4, -1)) / 4  # noqa: E731
    factories = {
        "hvp": (cv.hessian_vp(p.loss), (p.batch,)),
        "ggn": (cv.ggn_vp(p.logits, out_loss), (p.batch,)),
        "fisher": (cv.fisher_vp(p.logits), (p.batch,)),
        "empirical": (cv.empirical_fisher_vp(p.example_loss), (p.batch,)),
        "blocks": (cv.block_diagonal(cv.fisher_vp(p.logits), "layer"), (p.batch,)),
    }
    v = _random_like(p.params, 1)
    for name, (fvp, args) in factories.items():
        assert isinstance(fvp, cv.VectorProduct), name
        old = cv.ravel(jax.jit(fvp)(p.params, v, *args))[0]
        new = cv.ravel(cv.apply(fvp.bind(p.params, *args), v))[0]
        assert rel_err(new, old) <= TOL64, name
        assert float(jnp.linalg.norm(old)) > 0, name


def test_jit_of_an_operator_compiles_once_for_new_params_and_data(mlp64):
    p = mlp64
    fvp = cv.fisher_vp(p.logits)
    traces = []

    @jax.jit
    def quad(op, v):
        traces.append(1)
        return jnp.vdot(_flat(v), _flat(op(v)))

    v = _random_like(p.params, 2)
    params2 = jax.tree_util.tree_map(lambda x: 1.1 * x, p.params)
    batch2 = jax.tree_util.tree_map(lambda x: x[::-1], p.batch)
    a = quad(fvp.bind(p.params, p.batch), v)
    b = quad(fvp.bind(params2, batch2), v)
    c = quad(cv.linear_operator(fvp, p.params, p.batch), v)
    assert len(traces) == 1
    assert float(a) != float(b) and float(a) == pytest.approx(float(c), rel=1e-12)
    again = cv.fisher_vp(p.logits)  # the same factory on the same function: one program
    assert again == fvp and hash(again) == hash(fvp)
    quad(again.bind(p.params, p.batch), v)
    assert len(traces) == 1
    other = cv.fisher_vp(lambda q, b: p.logits(q, b))  # another function: another program
    assert other != fvp
    quad(other.bind(p.params, p.batch), v)
    assert len(traces) == 2


def _flat(tree):
    return cv.ravel(tree)[0]


def test_at_rebinds_params_and_raveled_keeps_the_numbers(mlp64):
    p = mlp64
    op = cv.hessian_vp(p.loss).bind(p.params, p.batch)
    params2 = jax.tree_util.tree_map(lambda x: 0.9 * x, p.params)
    v = _random_like(p.params, 3)
    want = cv.hessian_vp(p.loss)(params2, v, p.batch)
    assert rel_err(_flat(cv.apply(op.at(params2), v)), _flat(want)) <= TOL64
    flat = op.raveled()
    assert flat.space.leaves[0].shape == (op.n,) and flat.raveled() is flat
    assert rel_err(cv.apply(flat, _flat(v)), _flat(cv.apply(op, v))) <= TOL64
    with pytest.raises(ValueError, match="params"):
        op.at({"w": jnp.zeros(3)})


def test_deflated_operator_is_the_projected_dense_matrix(mlp64):
    p = mlp64
    H = np.asarray(p.dense_hessian)
    w, U = np.linalg.eigh(H)
    V = U[:, -3:].T  # (3, n) top eigenvectors
    P = V.T @ V
    want = (np.eye(H.shape[0]) - P) @ H @ (np.eye(H.shape[0]) - P)
    op = cv.hessian_vp(p.loss).bind(p.params, p.batch)
    flat = cv.deflated(op.raveled(), jnp.asarray(V))
    assert rel_err(_columns(flat), want) <= TOL64
    unravel = cv.ravel(p.params)[1]
    stacked = jax.vmap(unravel)(jnp.asarray(V))
    tree = cv.deflated(op, stacked)
    assert rel_err(_columns(tree), want) <= TOL64
    assert np.trace(want) == pytest.approx(np.sum(w[:-3]), rel=1e-10)


def test_as_operator_wraps_both_user_forms_once(mlp64):
    p = mlp64
    H = jnp.asarray(p.dense_hessian)
    plain = cv.as_operator(lambda x: H @ x, p.flat)
    with_args = cv.as_operator(lambda x, M: M @ x, p.flat, args=(H,))
    hvp = cv.hessian_vp(p.loss)
    form = cv.as_operator(lambda q, v, b: hvp(q, v, b), params=p.params, args=(p.batch,))
    x = jax.random.normal(jax.random.key(4), p.flat.shape)
    for op in (plain, with_args):
        assert rel_err(cv.apply(op, x), H @ x) <= TOL64
    v = cv.ravel(p.params)[1](x)
    assert rel_err(_flat(cv.apply(form, v)), H @ x) <= TOL64
    assert cv.as_operator(form, p.params) is form
    # a plain matvec over the same function keys the same program
    again = cv.as_operator(plain.fn.fn, p.flat)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(plain)


def test_as_operator_rejects_bad_input_naming_the_argument(mlp64):
    p = mlp64
    x = p.flat
    with pytest.raises(ValueError, match="fisher_vp must be callable"):
        cv.as_operator(3.0, x, name="fisher_vp")
    with pytest.raises(ValueError, match="like is required"):
        cv.as_operator(lambda v: v)
    with pytest.raises(ValueError, match="matvec must return a vector like"):
        cv.as_operator(lambda v: v[:-1], x, name="matvec")
    with pytest.raises(ValueError, match="matvec must return a vector like"):
        cv.as_operator(lambda v: v.astype(jnp.float32), x, name="matvec")
    with pytest.raises(ValueError, match="matvec must return a vector like"):
        cv.as_operator(lambda v: (v, v), x, name="matvec")
    with pytest.raises(ValueError, match="cannot be applied"):
        cv.as_operator(lambda params, v: v, x, name="matvec")  # a two-argument form, no params
    op = cv.hessian_vp(p.loss).bind(p.params, p.batch)
    with pytest.raises(ValueError, match="unlike"):
        cv.as_operator(op, x)
    with pytest.raises(ValueError, match="args must be a tuple"):
        cv.as_operator(lambda v, a: v, x, args=jnp.ones(2))
    with pytest.raises(ValueError, match="op must be a LinearOperator"):
        cv.deflated(lambda v: v, jnp.zeros((1, x.size)))


def test_consumers_take_the_operator(mlp64):
    """``top_eigenpairs``, the traced Lanczos, SLQ and ``fisher_trace`` on the operator vs eigh."""
    p = mlp64
    F = np.asarray(_explicit_fisher(p))
    lam = np.linalg.eigvalsh(F)[::-1]
    op = cv.fisher_vp(p.logits).bind(p.params, p.batch)
    key = jax.random.key(0)
    pairs = linalg.top_eigenpairs(op, p.params, 3, key=key, tol=1e-10)
    assert rel_err(pairs.values, lam[:3]) <= 1e-9
    flat_pairs = linalg.top_eigenpairs(op.raveled(), p.flat, 3, key=key, tol=1e-10)
    assert rel_err(flat_pairs.values, lam[:3]) <= 1e-9
    same = linalg.top_eigenpairs(op, p.flat, 3, key=key, tol=1e-10)  # raveled against a 1-D like
    assert rel_err(same.values, flat_pairs.values) <= 1e-12
    with pytest.raises(ValueError, match="unlike `like`"):
        linalg.top_eigenpairs(op, p.flat[:-1], 3, key=key)
    traced = jax.jit(lambda o, v0: linalg.top_eigenpairs_traced(o, v0, 3, key=key))(
        op, jnp.ones_like(p.flat)
    )
    assert rel_err(traced.values, lam[:3]) <= 1e-8
    density = linalg.spectral_density(op, p.params, key=key, num_probes=2, num_steps=8)
    assert np.allclose(density.weights.sum(axis=1), 1.0)
    trace, stderr, matvecs = aic.fisher_trace(op.raveled(), p.flat.size, jnp.float64)
    assert trace == pytest.approx(float(np.trace(F)), rel=1e-10)
    assert stderr == 0.0 and matvecs == p.flat.size


def test_measure_aic_takes_an_operator_and_gives_the_factory_forms_numbers():
    """``measure_aic`` with a bound operator equals the ``fisher_vp(params, v, *args)`` form."""
    from geomcollapse import landscapes

    q = landscapes.make_quadratic_landscape(
        jax.random.key(5), 30, 3, top=(3.0, 2.0, 1.0), tail_mass=0.3, epsilon=0.03, coupling=0.8
    )
    theta = jnp.zeros(q.n)

    def fisher(_, v, F):
        return F @ v

    def loss(t, A, c):
        return 0.5 * t @ A @ t + c @ t

    common = dict(key=jax.random.key(1), loss_args=(q.A, q.c), tol=1e-12, trace="exact")
    old = aic.measure_aic(fisher, loss, theta, 3, fisher_args=(q.F,), **common)
    op = cv.as_operator(fisher, params=theta, args=(q.F,))
    new = aic.measure_aic(op, loss, theta, 3, **common)
    assert new.report.coupling == pytest.approx(old.report.coupling, rel=1e-12)
    assert new.trace == pytest.approx(old.trace, rel=1e-12)
    assert new.report.coupling == pytest.approx(q.aic(3).coupling, rel=1e-9)
    with pytest.raises(ValueError, match="fisher_args must be empty"):
        aic.measure_aic(op, loss, theta, 3, fisher_args=(q.F,), **common)
    with pytest.raises(ValueError, match="fisher_vp must be callable"):
        aic.measure_aic("F", loss, theta, 3, **common)
    # refused at the boundary, traced once (before: by the operator wrapper's own check)
    with pytest.raises(ValueError, match=r"fisher_vp's output F v leaf 0 has shape \(2,\)"):
        aic.measure_aic(lambda _, v: v[:2], loss, theta, 3, **common)


def test_the_operator_overhead_table_in_the_docs_is_generated_from_the_results(tmp_path):
    """docs/benchmarks.md's "One operator type" table is what ``--readme`` makes of the JSON."""
    import json
    from pathlib import Path

    from benchmarks import _common, operator_overhead

    root = Path(__file__).resolve().parent.parent
    doc = tmp_path / "benchmarks.md"
    doc.write_text(_common.DOC.read_text(encoding="utf-8"), encoding="utf-8")
    saved = json.loads((root / "benchmarks" / "results" / "operator_overhead.json").read_text())
    _common.replace_table("operator-overhead-table", operator_overhead.markdown_table(saved), doc)
    assert doc.read_text(encoding="utf-8") == _common.DOC.read_text(encoding="utf-8")
    # the decision the module docstring states: ours builds fastest and never retraces
    for product in ("hvp", "fisher_vp"):
        build = saved[product]["build_us"]
        assert build["ours"] < min(build["eqx_module"], build["lineax"], build["lineax_partial"])
        assert saved[product]["rebuilt"]["traces_during_timing"]["ours"] == 0
        assert saved[product]["rebuilt"]["traces_during_timing"]["lineax"] > 0


def test_a_plain_matvec_keeps_its_captured_arrays_as_data():
    """``as_operator`` traces a plain ``v ↦ A v`` once: the array it closes over is a leaf of
    the operator (passed to the compiled program, not folded into it), and two functions of
    the same code over different arrays (also inside their own ``jax.jit``, whose captured
    arrays stay that jit's constants) stay apart."""
    n = 40
    A1 = jnp.diag(jnp.arange(1.0, n + 1.0))
    A2 = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
    x = jnp.linspace(-1.0, 1.0, n)
    for wrap in (lambda f: f, jax.jit):
        ops = [cv.as_operator(wrap(lambda v, A=A: A @ v), x) for A in (A1, A2)]
        for op, A in zip(ops, (A1, A2), strict=True):
            assert rel_err(cv.apply(op, x), A @ x) <= TOL64
            leaves = jax.tree_util.tree_leaves(op.args)
            assert wrap is jax.jit or any(np.array_equal(leaf, A) for leaf in leaves)
