"""Block-diagonal Fisher over a parameter partition vs its dense twin (136-parameter MLP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, linalg, models
from tests.conftest import rel_err


class _MLP:
    """A 6-12-4 tanh MLP (136 parameters) on 24 float64 mixture points, with its dense Fisher."""

    def __init__(self):
        self.params = models.mlp_init(jax.random.key(3), (6, 12, 4), jnp.float64)
        self.batch = models.gaussian_mixture(jax.random.key(4), 24, 6, 4, dtype=jnp.float64)
        flat, unravel = ravel_pytree(self.params)
        J = jax.jit(jax.jacfwd(lambda w: self.logits(unravel(w), self.batch)))(flat)
        p = jax.nn.softmax(self.logits(self.params, self.batch), axis=-1)
        Lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
        self.fisher = np.asarray(jnp.einsum("nci,ncd,ndj->ij", J, Lam, J) / J.shape[0])

    @staticmethod
    def logits(params, batch):
        return models.mlp_apply(params, batch.x)


@pytest.fixture(scope="module")
def mlp():
    return _MLP()


def _flat_group_ids(params, groups):
    """Group index of every raveled parameter (``ravel_pytree`` follows ``tree_leaves``)."""
    paths = curvature.leaf_paths(params)
    of = {p: g for g, group in enumerate(groups) for p in group}
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    return np.repeat([of[p] for p in paths], sizes)


def test_layer_key_and_leaf_groups():
    assert curvature.layer_key("blocks/0/fc1/kernel/value") == "blocks/0"
    assert curvature.layer_key("head/kernel/value") == "head"
    assert curvature.layer_key("1/w") == "1"
    params = [{"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, {"w": jnp.ones((3, 1)), "b": jnp.ones(1)}]
    assert curvature.leaf_groups(params, "tensor") == (("0/b",), ("0/w",), ("1/b",), ("1/w",))
    assert curvature.leaf_groups(params, "layer") == (("0/b", "0/w"), ("1/b", "1/w"))
    assert curvature.leaf_groups(params, lambda p: p.endswith("w")) == (
        ("0/b", "1/b"),
        ("0/w", "1/w"),
    )
    assert curvature.leaf_groups(params, [["1/w", "0/w"], ["1/b", "0/b"]]) == (
        ("0/b", "1/b"),
        ("0/w", "1/w"),
    )
    for bad, message in [
        ([["0/w", "0/b"], ["1/w"]], "leave out"),
        ([["0/w", "0/b"], ["1/w", "1/b", "0/w"]], "more than once"),
        ([["0/w", "0/b", "1/w", "1/b", "2/w"]], "absent"),
        ([["0/w", "0/b", "1/w", "1/b"], []], "empty"),
        ("row", "by must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            curvature.leaf_groups(params, bad)


@pytest.mark.parametrize("by", ["tensor", "layer"])
def test_block_diagonal_fisher_equals_the_dense_fisher_with_off_blocks_zeroed(mlp, by):
    params = mlp.params
    F = mlp.fisher
    ids = _flat_group_ids(params, curvature.leaf_groups(params, by))
    F_bd = np.where(ids[:, None] == ids[None, :], F, 0.0)
    assert np.abs(F - F_bd).max() > 1e-3 * np.abs(F).max()  # the cross blocks matter

    bd = jax.jit(curvature.block_diagonal(curvature.fisher_vp(mlp.logits), by))
    flat, unravel = ravel_pytree(params)
    for k in range(3):
        v = jax.random.normal(jax.random.key(k), flat.shape, jnp.float64)
        out = ravel_pytree(bd(params, unravel(v), mlp.batch))[0]
        assert rel_err(out, F_bd @ np.asarray(v)) < 1e-12


def test_per_tensor_top_eigenpairs_are_the_union_of_the_block_spectra(mlp):
    params = mlp.params
    F = mlp.fisher
    groups = curvature.leaf_groups(params, "tensor")
    ids = _flat_group_ids(params, groups)
    union = []  # (eigenvalue, eigenvector embedded in R^n) of every block, by dense eigh
    for g in range(len(groups)):
        idx = np.nonzero(ids == g)[0]
        lam, U = np.linalg.eigh(F[np.ix_(idx, idx)])
        for j in range(lam.size):
            vec = np.zeros(F.shape[0])
            vec[idx] = U[:, j]
            union.append((lam[j], vec))
    union.sort(key=lambda pair: -pair[0])
    k = 4
    top = np.array([lam for lam, _ in union[:k]])
    assert np.all(np.diff(top) < -1e-6 * top[0])  # simple eigenvalues: vectors comparable

    bd = jax.jit(curvature.block_diagonal(curvature.fisher_vp(mlp.logits), "tensor"))
    flat, unravel = ravel_pytree(params)

    def matvec(v):
        return ravel_pytree(bd(params, unravel(v), mlp.batch))[0]

    pairs = linalg.top_eigenpairs(matvec, flat, k, key=jax.random.key(0), tol=1e-10)
    assert bool(jnp.all(pairs.converged))
    np.testing.assert_allclose(np.asarray(pairs.values), top, rtol=1e-9)
    for j in range(k):
        vec = np.asarray(pairs.vectors[j])
        overlap = abs(vec @ union[j][1])  # sign-free
        assert overlap > 1 - 1e-8
        # each eigenvector of the block-diagonal operator lives in one block
        assert np.unique(ids[np.abs(vec) > 1e-8]).size == 1
