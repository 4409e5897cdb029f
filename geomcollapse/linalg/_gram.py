"""Exact eigenpairs of the empirical Fisher ``GᵀG/m`` via the ``m × m`` Gram matrix.

When ``m ≪ n``, ``F_emp = GᵀG/m`` (``G``: ``m × n`` per-example gradients) has
rank ≤ ``m`` and the same non-zero spectrum as ``K = GGᵀ/m``. With
``K u = s u``, ``v = Gᵀu / √(m s)`` is a unit eigenvector of ``F_emp`` with
eigenvalue ``s``. Cost: one ``m × m`` eigh and one ``m × n`` product.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import finite_leaves, positive_int
from geomcollapse.linalg._contract import (
    Eigenpairs,
    certifiable_tol,
    converged,
    reference_scale,
    residual_norms,
)

_HIGHEST = jax.lax.Precision.HIGHEST

PyTree = Any


def empirical_fisher_eigenpairs(
    per_example_grads: PyTree, k: int, *, tol: float | None = None
) -> Eigenpairs:
    """Top-``k`` eigenpairs of ``F_emp = (1/m) Σ_i g_i g_iᵀ`` from per-example gradients.

    Args:
      per_example_grads: ``(m, n)`` array, or a pytree whose leaves have a
        leading axis ``m`` (as from ``curvature.per_example_gradients``).
      k: number of pairs, ``1 ≤ k ≤ n``; pairs beyond the rank are zero-filled
        with ``found = False``.
      tol: relative residual tolerance, as for every solver here (default
        ``100·eps``; :mod:`geomcollapse.linalg._contract`).

    Returns:
      :class:`Eigenpairs` with true residuals ``‖F_emp v − s v‖`` (two products
      with ``G``, in float64 when x64 is on) and ``converged`` decided on them
      against ``tol·s₁``; vectors as ``(k, n)`` for an array input, else a
      pytree with a leading ``k`` axis.
    """
    leaves = finite_leaves(per_example_grads, "per_example_grads")
    m = int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else 0
    if m < 1 or any(np.ndim(x) < 1 or np.shape(x)[0] != m for x in leaves):
        raise ValueError("per_example_grads leaves must share a leading axis m >= 1")
    example = jax.tree_util.tree_map(lambda x: x[0], per_example_grads)
    _, unravel = ravel_pytree(example)
    G = jax.vmap(lambda t: ravel_pytree(t)[0])(per_example_grads)  # (m, n)
    n = G.shape[1]
    k = positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} exceeds the parameter dimension n={n}")
    dtype = G.dtype
    tol = certifiable_tol(tol, dtype)
    K = jnp.dot(G, G.T, precision=_HIGHEST) / m
    s, U = np.linalg.eigh(np.asarray(K, np.float64))
    s, U = s[::-1], U[:, ::-1]
    kk = min(k, m)
    eps = float(jnp.finfo(dtype).eps)
    found = s[:kk] > 10.0 * eps * max(s[0], np.finfo(np.float64).tiny) * m
    scale = np.where(found, 1.0 / np.sqrt(np.where(found, m * s[:kk], 1.0)), 0.0)
    coeffs = jnp.asarray(U[:, :kk] * scale, dtype)  # (m, kk)
    V = jnp.dot(coeffs.T, G, precision=_HIGHEST)  # (kk, n)
    FV = jnp.dot(jnp.dot(V, G.T, precision=_HIGHEST), G, precision=_HIGHEST) / m
    values = jnp.asarray(np.where(found, s[:kk], 0.0), dtype)
    residuals = residual_norms(FV, V, values)
    ok = converged(np.asarray(residuals), found, tol, reference_scale(s[:kk]))
    residuals = residuals.astype(dtype)
    pad = k - kk
    values = jnp.concatenate([values, jnp.zeros(pad, dtype)])
    V = jnp.concatenate([V, jnp.zeros((pad, n), dtype)])
    residuals = jnp.concatenate([residuals, jnp.zeros(pad, dtype)])
    found = jnp.asarray(np.concatenate([found, np.zeros(pad, bool)]))
    ok = jnp.asarray(np.concatenate([ok, np.zeros(pad, bool)]))
    return Eigenpairs(
        values=values,
        vectors=V
        if isinstance(per_example_grads, jax.Array | np.ndarray)
        else jax.vmap(unravel)(V),
        residuals=residuals,
        converged=ok,
        found=found,
        num_matvecs=0,
    )
