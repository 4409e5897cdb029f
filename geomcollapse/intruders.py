"""Intruder dimensions of a fine-tuned weight matrix (docs/theory.md §7).

Source: Shuttleworth, Andreas, Torralba and Sharma, "LoRA vs Full Fine-tuning:
An Illusion of Equivalence", arXiv 2410.21228 (2024), Definition 1: a singular
vector ``y_j`` of the fine-tuned matrix is an *intruder dimension* iff
``max_i cos(y_j, x_i) < ε`` over the singular vectors ``x_i`` of the matrix
before fine-tuning. The paper counts intruders among the top-``k`` singular
vectors (by singular value) and leaves ``ε`` a parameter (its figures sweep it).
The authors' released script (github.com/reeceshuttle/intruder-dimensions,
``find_intruder_dimensions.py``) fixes the details this module follows:

- ``k = 10`` and ``ε = 0.5`` by default (also the defaults of PEFT's
  ``reduce_intruder_dimension``, huggingface/peft#2999);
- the cosine is taken in absolute value (a singular vector's sign is arbitrary)
  and the maximum runs over all ``min(d_in, d_out)`` singular vectors of the
  reduced SVD of ``W₀``;
- the compared vectors are the left singular vectors of the PyTorch weight,
  whose shape is ``(d_out, d_in)``: vectors of the layer's **output** space.

Layout. This library stores a dense kernel as ``W`` of shape ``(d_in, d_out)``
(``y = x W``, flax), the transpose of PyTorch's. With the reduced SVD
``W = Σ_j σ_j u_j v_jᵀ`` (``u_j ∈ R^{d_in}`` left, ``v_j ∈ R^{d_out}`` right),
the paper's vectors are the *right* singular vectors ``v_j`` here; that is
``space="output"``, the default. ``space="input"`` compares the ``u_j`` instead.

One deviation, for well-posedness: singular vectors of ``W₀`` whose singular
value is numerically zero (below ``max(d_in, d_out)·eps·σ_max``, the rule of
``numpy.linalg.matrix_rank``) are left out of the maximum, since any
orthonormal basis of that null part is an equally valid SVD. ``W₀ = 0`` makes
every top-``k`` vector of ``W₁`` an intruder.

Not handled (the paper's definition has the same gap): a *repeated* non-zero
singular value of ``W₀`` (an orthogonal initialisation, ``W₀ = I``) makes its
singular vectors any orthonormal basis of their shared space, so a ``W₁`` near
``W₀`` can report cosines far below 1 and spurious intruders (a probe: random
orthogonal ``8 × 8`` ``Q`` against ``Q + 10⁻⁶·noise``, ``k = 8``: maximum
similarity 0.45–0.80 by seed, one intruder for one seed). Trained matrices
have distinct singular values in practice; for one that may not, compare the
projection onto each cluster of equal ``σ`` instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse._checks import finite_float, finite_leaves, positive_int, same_structure
from geomcollapse.curvature import leaf_paths, select, substitute
from geomcollapse.models import DEFAULT_TARGETS

__all__ = [
    "DEFAULT_K",
    "DEFAULT_THRESHOLD",
    "IntruderResult",
    "intruder_dimensions",
    "intruder_pytree",
    "intruder_update",
]

PyTree = Any
DEFAULT_K = 10  # top-k singular vectors examined (the authors' script)
DEFAULT_THRESHOLD = 0.5  # ε of Definition 1 (the authors' script and PEFT)
_SPACES = ("output", "input")
_HIGHEST = jax.lax.Precision.HIGHEST


class IntruderResult(NamedTuple):
    """The top-``k`` singular triplets of ``W₁`` and which of them are intruders.

    Attributes:
      indices: ``(count,)`` int, ascending positions ``j`` in ``[0, k)`` (0 = largest
        singular value) of the intruders.
      max_similarity: ``(k,)`` ``max_i |cos(y_j, x_i)|`` over ``W₀``'s singular vectors
        ``x_i`` in the compared ``space``; ``j`` is an intruder iff this is ``< threshold``.
      singular_values: ``(k,)`` the top-``k`` singular values ``σ_j`` of ``W₁``, descending.
      vectors_left: ``(k, d_in)`` rows ``u_j`` (``W₁ = Σ σ_j u_j v_jᵀ``).
      vectors_right: ``(k, d_out)`` rows ``v_j``.
      count: number of intruders, ``len(indices)``.
    """

    indices: jax.Array
    max_similarity: jax.Array
    singular_values: jax.Array
    vectors_left: jax.Array
    vectors_right: jax.Array
    count: int


class _Analysis(NamedTuple):
    max_similarity: jax.Array  # (k,)
    singular_values: jax.Array  # (k,)
    left: jax.Array  # (k, d_in)
    right: jax.Array  # (k, d_out)


def _check_matrices(w0: Any, w1: Any, names: tuple[str, str]) -> tuple[jax.Array, jax.Array]:
    """``(w0, w1)`` as same-dtype floating 2-D arrays of one shape; ``ValueError`` otherwise."""
    for w, name in zip((w0, w1), names, strict=True):
        if np.ndim(w) != 2:
            raise ValueError(f"{name} must be a 2-D matrix (d_in, d_out), got shape {np.shape(w)}")
        dtype = getattr(w, "dtype", None)
        if dtype is None:
            dtype = np.asarray(w).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point matrix, got dtype {dtype}")
    if np.shape(w0) != np.shape(w1):
        raise ValueError(
            f"{names[1]} has shape {np.shape(w1)}, but {names[0]} has shape {np.shape(w0)}"
        )
    finite_leaves(w0, names[0])
    finite_leaves(w1, names[1])
    dtype = jnp.result_type(w0, w1)
    return jnp.asarray(w0, dtype), jnp.asarray(w1, dtype)


def _check_k(k: Any, shape: tuple[int, ...], where: str = "") -> int:
    k = positive_int(k, "k")
    if k > min(shape):
        raise ValueError(f"k={k} exceeds min(d_in, d_out)={min(shape)}{where}")
    return k


def _check_threshold(threshold: Any) -> float:
    eps = finite_float(threshold, "threshold")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (a cosine similarity), got {threshold!r}")
    return eps


def _check_space(space: Any) -> str:
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
    return space


def _analyse(w0: jax.Array, w1: jax.Array, k: int, space: str) -> _Analysis:
    """Top-``k`` SVD of ``w1`` and each vector's largest ``|cos|`` with ``w0``'s (traceable)."""
    u1, s1, v1t = jnp.linalg.svd(w1, full_matrices=False)
    u0, s0, v0t = jnp.linalg.svd(w0, full_matrices=False)
    left, right = u1[:, :k].T, v1t[:k]
    if space == "output":
        cos = jnp.matmul(right, v0t.T, precision=_HIGHEST)  # (k, m)
    else:
        cos = jnp.matmul(left, u0, precision=_HIGHEST)
    # W₀'s null part has no defined singular vectors: leave it out of the max.
    tol = max(w0.shape) * jnp.finfo(w0.dtype).eps * s0[0]
    cos = jnp.where(s0 > tol, jnp.abs(cos), 0.0)
    return _Analysis(jnp.max(cos, axis=1), s1[:k], left, right)


def _intruder_part(a: _Analysis, delta: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_{j: mask_j} (u_jᵀ ΔW v_j) u_j v_jᵀ`` (traceable)."""
    coeff = jnp.einsum("ki,ij,kj->k", a.left, delta, a.right, precision=_HIGHEST)
    coeff = jnp.where(mask, coeff, 0.0)
    return jnp.einsum("k,ki,kj->ij", coeff, a.left, a.right, precision=_HIGHEST)


def intruder_dimensions(
    w0: Any,
    w1: Any,
    *,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    space: str = "output",
) -> IntruderResult:
    """The intruder dimensions among the top-``k`` singular vectors of ``w1`` (Definition 1).

    Shuttleworth et al. 2024 (arXiv 2410.21228), Def. 1: the ``j``-th singular
    vector ``y_j`` of ``W₁`` (``j < k``, by singular value) is an intruder iff
    ``max_i |cos(y_j, x_i)| < ε`` over the singular vectors ``x_i`` of ``W₀``
    (numerically-zero singular values of ``W₀`` excluded; see the module
    docstring). Runs eagerly: ``indices`` and ``count`` depend on the data.

    Args:
      w0: ``(d_in, d_out)`` floating weight before fine-tuning, finite.
      w1: ``(d_in, d_out)`` weight after fine-tuning (``W₀ + ΔW``), finite.
      k: how many top singular vectors of ``w1`` to examine, ``1 ≤ k ≤ min(d_in, d_out)``;
        keep ``k`` within ``rank(W₁)``, beyond it the vectors are arbitrary.
      threshold: ``ε ∈ (0, 1]``.
      space: ``"output"`` (default; the ``d_out``-dimensional right singular
        vectors here, the left ones of the PyTorch-layout weight the authors
        analyse) or ``"input"`` (the ``d_in``-dimensional left ones).

    Returns:
      :class:`IntruderResult`.

    Raises:
      ValueError: naming the argument, for a non-matrix or non-floating input,
        mismatched shapes, non-finite entries, ``k`` outside ``[1, min(d_in, d_out)]``,
        ``threshold`` outside ``(0, 1]`` or an unknown ``space``.
    """
    w0, w1 = _check_matrices(w0, w1, ("w0", "w1"))
    k = _check_k(k, w0.shape)
    eps = _check_threshold(threshold)
    space = _check_space(space)
    a = _analyse(w0, w1, k, space)
    indices = np.flatnonzero(np.asarray(a.max_similarity) < eps)
    return IntruderResult(
        indices=jnp.asarray(indices),
        max_similarity=a.max_similarity,
        singular_values=a.singular_values,
        vectors_left=a.left,
        vectors_right=a.right,
        count=len(indices),
    )


def intruder_update(
    w0: Any,
    w1: Any,
    *,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    space: str = "output",
) -> jax.Array:
    """The part of ``ΔW = W₁ − W₀`` along ``W₁``'s intruder directions.

    With ``W₁ = Σ_j σ_j u_j v_jᵀ`` (reduced SVD, ``σ`` descending) and ``I`` the
    intruder positions among ``j < k`` (:func:`intruder_dimensions`)::

        intruder_update = Σ_{j ∈ I} (u_jᵀ ΔW v_j) u_j v_jᵀ
                        = Σ_{j ∈ I} (σ_j − u_jᵀ W₀ v_j) u_j v_jᵀ,

    the component of ``ΔW`` on each intruder's rank-one direction ``u_j v_jᵀ``
    (Frobenius projection onto ``span{u_j v_jᵀ : j ∈ I}``, an orthonormal set):
    ``W₁``'s own intruder term minus the share ``W₀`` already had on it. It
    is invariant to the signs of the singular vectors, but not defined when a
    singular value of ``W₁`` inside ``I`` is repeated across ``I``'s boundary.
    This is the piece of a LoRA update whose overlap with ``M`` the overlap
    score (docs/theory.md §7) is evaluated on. Zero when there are no intruders.

    Args, raises: as :func:`intruder_dimensions`.
    Returns: ``(d_in, d_out)`` array of ``w0``'s (promoted) dtype.

    Traceable with ``k`` and ``space`` static (e.g. ``jax.jit(partial(intruder_update,
    k=4))``); the finiteness check then applies only to concrete inputs.
    """
    w0, w1 = _check_matrices(w0, w1, ("w0", "w1"))
    k = _check_k(k, w0.shape)
    eps = _check_threshold(threshold)
    space = _check_space(space)
    a = _analyse(w0, w1, k, space)
    return _intruder_part(a, w1 - w0, a.max_similarity < eps)


def intruder_pytree(
    params0: PyTree,
    params1: PyTree,
    *,
    where: Any = DEFAULT_TARGETS,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    space: str = "output",
) -> tuple[dict[str, int], PyTree]:
    """Intruder counts and the intruder part of ``params1 − params0`` on every matched matrix.

    Args:
      params0: parameter pytree before fine-tuning (``θ*``).
      params1: pytree of the same structure, shapes and dtypes after fine-tuning
        (e.g. ``models.lora_merge(params0, adapters, alpha)``).
      where: a regex searched in each leaf path or a predicate ``path -> bool``
        (:func:`geomcollapse.curvature.select`); default the LoRA targets
        ``models._lora.DEFAULT_TARGETS`` (attention and MLP kernels).
        Every matched leaf must be a matrix ``(d_in, d_out)``.
      k, threshold, space: as :func:`intruder_dimensions`, the same for every matrix.

    Returns:
      ``(counts, update)``: ``counts`` maps each matched leaf path (as
      :func:`geomcollapse.curvature.leaf_paths` spells it) to its number of
      intruders; ``update`` is a pytree like ``params0`` holding
      :func:`intruder_update` at the matched leaves and zeros elsewhere, so
      ``overlap_score(update)`` is the overlap of the intruder part alone.

    Raises:
      ValueError: mismatched pytrees, nothing matched, a matched leaf that is
        not a matrix or has ``min(d_in, d_out) < k`` (naming its path), or the
        bad inputs of :func:`intruder_dimensions`.
    """
    same_structure(params0, params1, "params0", "params1")
    k = positive_int(k, "k")
    eps = _check_threshold(threshold)
    space = _check_space(space)
    block0 = select(params0, where)
    leaves1 = dict(zip(leaf_paths(params1), jax.tree_util.tree_leaves(params1), strict=True))
    counts: dict[str, int] = {}
    parts: dict[str, jax.Array] = {}
    for path, w0 in block0.items():
        if np.ndim(w0) != 2:
            raise ValueError(f"where matched {path!r} of shape {np.shape(w0)}: not a matrix")
        _check_k(k, np.shape(w0), f" at {path!r}")
        a0, a1 = _check_matrices(w0, leaves1[path], (f"params0[{path!r}]", f"params1[{path!r}]"))
        a = _analyse(a0, a1, k, space)
        mask = a.max_similarity < eps
        counts[path] = int(np.sum(np.asarray(mask)))
        parts[path] = _intruder_part(a, a1 - a0, mask)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params0)
    return counts, substitute(zeros, parts)
