"""Every curvature operator against its dense twin, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import curvature as cv
from geomcollapse import models
from tests.conftest import rel_err

TOL64 = 1e-10


def _random_like(params, seed):
    flat, unravel = cv.ravel(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def test_problems_are_float64_and_small(problem):
    assert problem.flat.dtype == jnp.float64
    assert 100 <= problem.flat.size <= 400


def test_gradient_matches_dense(problem):
    g = cv.ravel(jax.jit(cv.gradient(problem.loss))(problem.params, problem.batch))[0]
    assert rel_err(g, problem.dense_gradient) <= TOL64


def test_hvp_matches_dense_hessian(problem):
    hvp = jax.jit(cv.hessian_vp(problem.loss))
    for seed in range(3):
        v = _random_like(problem.params, seed)
        hv = hvp(problem.params, v, problem.batch)
        assert rel_err(cv.ravel(hv)[0], problem.dense_hessian @ cv.ravel(v)[0]) <= TOL64


def test_fisher_vp_matches_explicit_fisher(problem):
    J, z = problem.dense_jacobian, problem.dense_logits
    p = jax.nn.softmax(z, axis=-1)
    middle = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    F = jnp.einsum("icn,icd,idm->nm", J, middle, J) / J.shape[0]
    v = _random_like(problem.params, 7)
    fv = jax.jit(cv.fisher_vp(problem.logits))(problem.params, v, problem.batch)
    assert rel_err(cv.ravel(fv)[0], F @ cv.ravel(v)[0]) <= TOL64


def test_fisher_equals_ggn_of_cross_entropy(problem):
    ggn = cv.ggn_vp(problem.logits, lambda z, b: models.softmax_cross_entropy(z, b.y))
    v = _random_like(problem.params, 8)
    a = cv.ravel(jax.jit(ggn)(problem.params, v, problem.batch))[0]
    b = cv.ravel(jax.jit(cv.fisher_vp(problem.logits))(problem.params, v, problem.batch))[0]
    assert rel_err(a, b) <= TOL64


def test_ggn_matches_explicit_jt_hl_j(problem):
    """GGN of a non-CE output loss (a quartic) against ``Jᵀ ∇²ℓ J``."""

    def out_loss(z, batch):
        return jnp.mean(jnp.sum(z**4, -1)) / 4

    J, zz = problem.dense_jacobian, problem.dense_logits
    HL = jax.vmap(lambda r: jnp.diag(3 * r**2))(zz) / zz.shape[0]
    G = jnp.einsum("icn,icd,idm->nm", J, HL, J)
    v = _random_like(problem.params, 9)
    gv = jax.jit(cv.ggn_vp(problem.logits, out_loss))(problem.params, v, problem.batch)
    assert rel_err(cv.ravel(gv)[0], G @ cv.ravel(v)[0]) <= TOL64


def test_ggn_equals_hessian_for_linear_model_with_squared_loss():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (7, 3)), "b": jax.random.normal(k2, (3,))}
    x = jax.random.normal(k3, (20, 7))
    y = jnp.sin(x[:, :3])

    def predict(p, x, y):
        return x @ p["w"] + p["b"]

    def out_loss(z, x, y):
        return 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))

    def loss(p, x, y):
        return out_loss(predict(p, x, y), x, y)

    for seed in range(3):
        v = _random_like(params, seed)
        h = cv.ravel(cv.hessian_vp(loss)(params, v, x, y))[0]
        g = cv.ravel(cv.ggn_vp(predict, out_loss)(params, v, x, y))[0]
        assert rel_err(g, h) <= TOL64


def test_per_example_gradients_and_empirical_fisher(problem):
    m = problem.batch.y.shape[0]
    per_example = jax.jit(cv.per_example_gradients(problem.example_loss))
    G = jax.vmap(lambda t: cv.ravel(t)[0])(per_example(problem.params, problem.batch))
    grad_one = jax.jit(jax.grad(problem.example_loss))
    rows = [
        cv.ravel(
            grad_one(problem.params, jax.tree_util.tree_map(lambda a, i=i: a[i], problem.batch))
        )[0]
        for i in range(m)
    ]
    assert rel_err(G, jnp.stack(rows)) <= TOL64
    v = _random_like(problem.params, 11)
    efvp = jax.jit(cv.empirical_fisher_vp(problem.example_loss))
    fv = efvp(problem.params, v, problem.batch)
    assert rel_err(cv.ravel(fv)[0], G.T @ (G @ cv.ravel(v)[0]) / m) <= TOL64


def test_restriction_is_the_dense_sub_block(mlp64):
    block = cv.select(mlp64.params, r"^1/")  # the second layer only
    paths = cv.leaf_paths(mlp64.params)
    assert sorted(block) == ["1/b", "1/w"]
    flat, H = mlp64.flat, mlp64.dense_hessian
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(mlp64.params)]
    starts = np.cumsum([0, *sizes])
    idx = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i, p in enumerate(paths) if p.startswith("1/")]
    )
    v = _random_like(block, 4)
    hv = cv.hessian_vp(cv.restrict(mlp64.loss))(block, v, mlp64.params, mlp64.batch)
    assert rel_err(cv.ravel(hv)[0], H[np.ix_(idx, idx)] @ cv.ravel(v)[0]) <= TOL64
    # substitute(params, select(params)) is the identity
    same = cv.substitute(mlp64.params, block)
    assert rel_err(cv.ravel(same)[0], flat) == 0.0


def test_float32_in_float32_out(mlp64):
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), mlp64.params)
    batch = mlp64.batch._replace(x=mlp64.batch.x.astype(jnp.float32))
    v = _random_like(p32, 0)
    for op in (
        cv.hessian_vp(mlp64.loss),
        cv.fisher_vp(mlp64.logits),
        cv.empirical_fisher_vp(mlp64.example_loss),
    ):
        out = jax.jit(op)(p32, v, batch)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(out)} == {jnp.dtype("float32")}


def test_bad_vectors_raise(mlp64):
    hvp = cv.hessian_vp(mlp64.loss)
    v = _random_like(mlp64.params, 0)
    with pytest.raises(ValueError, match="v does not have the pytree structure"):
        hvp(mlp64.params, v[:1], mlp64.batch)
    wrong_shape = [dict(layer, b=layer["b"][:-1]) for layer in v]
    with pytest.raises(ValueError, match=r"v leaf \d+ has shape"):
        hvp(mlp64.params, wrong_shape, mlp64.batch)
    wrong_dtype = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), v)
    with pytest.raises(ValueError, match=r"v leaf \d+ has dtype"):
        cv.fisher_vp(mlp64.logits)(mlp64.params, wrong_dtype, mlp64.batch)
    int_params = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), mlp64.params)
    with pytest.raises(ValueError, match="params must hold floating-point"):
        cv.gradient(mlp64.loss)(int_params, mlp64.batch)
    with pytest.raises(ValueError, match="selects no parameter"):
        cv.select(mlp64.params, "nothing-matches")
