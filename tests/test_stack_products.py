"""The stacked inner products of ``_sharding`` against numpy: ``⟨stack_i, x⟩``, their
combinations and the deflation ``z − (zVᵀ)V`` they make, jitted and vmapped over probes.

In float32 on jaxlib 0.10.2's CPU compiler, the vmapped multiply-and-sum form of
``stack_dot`` fused with the deflation after it gave rows off by 5-65 % of their norm for
batches of 16 to 256 probes (the shapes below); these cases keep the dot form honest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse._sharding import stack_combine, stack_dot

# (n, d, probes): every case the fused form got wrong, and a single vector
CASES = [
    (300, 5, 128),
    (300, 10, 256),
    (300, 50, 128),
    (4096, 5, 16),
    (4096, 10, 16),
    (4096, 10, 1),
]


@jax.jit
def _deflate(z, basis):
    """``z − (zVᵀ)V`` row by row, as aic's probes and the deflated operator compute it."""
    coeffs = jax.vmap(lambda v: stack_dot(basis, v))(z)
    return jax.tree.map(jnp.subtract, z, stack_combine(coeffs, basis))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(("n", "d", "probes"), CASES)
def test_deflated_probes_equal_numpy(n, d, probes, dtype):
    rng = np.random.default_rng(n + d + probes)
    V = np.linalg.qr(rng.standard_normal((n, d)))[0].T
    Z = rng.standard_normal((probes, n))
    want = Z - (Z @ V.T) @ V
    got = np.asarray(_deflate(jnp.asarray(Z, dtype), jnp.asarray(V, dtype)), np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    assert np.abs(got - want).max() <= tol * np.abs(Z).max()


def test_stack_dot_on_a_pytree_equals_the_raveled_products():
    rng = np.random.default_rng(1)
    stack = {"w": rng.standard_normal((3, 4, 5)), "b": rng.standard_normal((3, 5))}
    x = {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}
    flat_stack = np.concatenate([stack["b"], stack["w"].reshape(3, -1)], axis=1)
    flat_x = np.concatenate([x["b"], x["w"].ravel()])
    got = stack_dot(jax.tree.map(jnp.asarray, stack), jax.tree.map(jnp.asarray, x))
    np.testing.assert_allclose(np.asarray(got), flat_stack @ flat_x, rtol=1e-12)
    combined = stack_combine(jnp.asarray([1.0, -2.0, 0.5]), jax.tree.map(jnp.asarray, stack))
    np.testing.assert_allclose(
        np.asarray(combined["w"]), np.tensordot([1.0, -2.0, 0.5], stack["w"], 1), rtol=1e-12
    )
