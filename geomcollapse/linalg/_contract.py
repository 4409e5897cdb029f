"""The one contract of every eigensolver here: result type, tolerance, scale, breakdown, residuals.

The host-driven Lanczos (:func:`top_eigenpairs`), the traced one
(:func:`top_eigenpairs_traced`), SLQ and the Gram route decide with these
functions and nothing else:

- **Tolerance** ``tol`` is relative: a pair is converged when its *true*
  residual ``‖A v − λ v‖ ≤ tol · ‖A‖``, default :func:`default_tol`
  ``= 100·eps`` of the working dtype, never below :func:`min_certifiable_tol`
  ``= 8·eps`` (there the residual's own rounding is as large as ``tol``).
- **Reference scale** ``‖A‖`` is :func:`reference_scale`, the largest
  ``|θ|`` among the run's Ritz values (the rounding of a matvec scales with
  ``‖A‖``, not with the pair's own ``|λ|`` nor with the algebraically largest).
- **Breakdown and zero level**: ``β_j`` (or ``|θ|``) at or below
  :func:`zero_level` ``= 10·eps·√m·max_j ‖A q_j‖`` after ``m`` steps is
  rounding: an invariant subspace (``β``) or a zero eigenvalue (``θ``,
  reported with ``found = False``).
- **Residuals** are recomputed from one more matvec per pair
  (:func:`residual_norms`) in :func:`certification_dtype`: float64 whenever
  ``jax_enable_x64`` is on, on every layout (the Lanczos estimate
  ``|β_m s_{m,i}|`` drops below what the working dtype represents). Only the
  stopping test uses the estimate.
- **converged** is :func:`converged`: ``found & (residual ≤ tol·‖A‖)``. A pair
  the run could not reach is never ``converged``; :attr:`Eigenpairs.certified`
  is the one flag downstream code reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse._checks import positive_float

PyTree = Any


class Eigenpairs(NamedTuple):
    """Top-``k`` eigenpairs of a symmetric operator, from any solver of :mod:`geomcollapse.linalg`.

    Attributes:
      values: ``(k,)`` eigenvalues, descending (by value, or by magnitude for
        ``which='magnitude'``), in the working dtype; ``0`` where not ``found``.
      vectors: unit eigenvectors stacked on a leading ``k`` axis: ``(k, n)`` for
        a 1-D input, else a pytree like the input with a leading ``k`` axis
        (sharded like it for a sharded input); zero rows where not ``found``.
      residuals: ``(k,)`` true ``‖A v_i − λ_i v_i‖``, each from one more matvec
        (computed in float64 when x64 is on); ``0`` where not ``found``.
      converged: ``(k,)`` bool, ``found & (residuals ≤ tol·‖A‖)``
        (:func:`converged`); the traced solver also requires the run to have
        behaved as a symmetric operator.
      found: ``(k,)`` bool; ``False`` where the operator has no non-zero
        eigenvalue left to return (rank ``< k``): value, vector and residual
        are zero-filled there.
      num_matvecs: operator applications used, certification included (an
        ``int``, or a ``()`` int32 array from the traced solver).
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array
    converged: jax.Array
    found: jax.Array
    num_matvecs: Any

    @property
    def certified(self) -> jax.Array:
        """``()`` bool (``(…,)`` under a batch): every found pair is converged."""
        return jnp.all(jnp.asarray(self.converged) | ~jnp.asarray(self.found), axis=-1)


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def default_tol(dtype) -> float:
    """``100·eps``: the default relative residual tolerance of every solver in ``dtype``."""
    return 100.0 * _eps(dtype)


def min_certifiable_tol(dtype) -> float:
    """``8·eps``: the smallest relative residual tolerance ``dtype`` can certify.

    A residual ``‖Av − λv‖`` computed in ``dtype`` carries a rounding error of a
    few ``eps·‖A‖``; a tolerance below this cannot be told apart from it.
    """
    return 8.0 * _eps(dtype)


def certifiable_tol(tol: Any, dtype) -> float:
    """``tol`` as a float (``None``: :func:`default_tol`); raises below the dtype's floor."""
    if tol is None:
        return default_tol(dtype)
    tol = positive_float(tol, "tol")
    if tol < min_certifiable_tol(dtype):
        raise ValueError(
            f"tol={tol:g} is below what {jnp.dtype(dtype).name} can certify "
            f"(min_certifiable_tol = 8·eps = {min_certifiable_tol(dtype):.2g}): "
            "raise tol or work in float64 (jax_enable_x64)"
        )
    return tol


def reference_scale(theta: Any, valid: Any = None) -> Any:
    """``‖A‖`` as the tolerance's reference: ``max |θ|`` over the (``valid``) Ritz values.

    numpy in, a float out (never below the smallest normal float64); a JAX
    array in (traced), a ``()`` array out.
    """
    if isinstance(theta, np.ndarray):
        top = float(np.max(np.abs(theta))) if theta.size else 0.0
        return max(top, np.finfo(np.float64).tiny)
    size = jnp.abs(theta) if valid is None else jnp.where(valid, jnp.abs(theta), 0.0)
    return jnp.maximum(jnp.max(size), jnp.finfo(theta.dtype).tiny)


def zero_level(dtype, norm: Any, steps: Any) -> Any:
    """``10·eps·√steps·norm``: ``β`` or ``|θ|`` at or below it is rounding after ``steps`` steps.

    ``norm`` is the run's ``max_j ‖A q_j‖``; host floats or traced arrays.
    """
    root = np.sqrt(steps) if isinstance(steps, int | float) else jnp.sqrt(steps)
    return 10.0 * _eps(dtype) * root * norm


def certification_dtype(dtype) -> Any:
    """The dtype residuals are certified in: float64 when x64 is on, else ``dtype``."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.dtype(dtype)


def residual_norms(Av: PyTree, v: PyTree, values: Any) -> Any:
    """``‖A v_i − λ_i v_i‖`` for stacks (leaves with a leading ``k`` axis) or a single vector.

    ``values`` is ``(k,)`` (a stack) or ``()`` (one vector). JAX inputs are
    widened to :func:`certification_dtype` on their devices (per-device partial
    sums for sharded leaves); numpy inputs are computed in float64 on the host.
    """
    leaves = jax.tree_util.tree_leaves(v)
    xp = np if isinstance(leaves[0], np.ndarray) else jnp
    wide = np.float64 if xp is np else certification_dtype(leaves[0].dtype)
    lam = xp.asarray(values).astype(wide)
    total = 0.0
    for a, x in zip(jax.tree_util.tree_leaves(Av), leaves, strict=True):
        a, x = xp.asarray(a).astype(wide), xp.asarray(x).astype(wide)
        lead = lam.ndim
        r = a - lam.reshape(lam.shape + (1,) * (x.ndim - lead)) * x
        total = total + xp.sum(r * r, axis=tuple(range(lead, x.ndim)))
    return xp.sqrt(total)


def converged(residuals: Any, found: Any, tol: Any, scale: Any) -> Any:
    """``found & (residuals ≤ tol·scale)``: the one convergence rule (host or traced)."""
    return found & (residuals <= tol * scale)
