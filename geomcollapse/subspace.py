"""The alignment-sensitive subspace ``M`` (Def. 3.4) and what is measured against it.

A :class:`Subspace` holds the top-``d`` eigenpairs ``(λ_i, v_i)`` of a skill
Fisher ``F(θ*)``; ``P = Σ v_i v_iᵀ`` projects onto ``M``. Its methods are the
quantities of docs/theory.md §2-§7 evaluated on a displacement ``x = θ − θ*``:
``P x``, ``F^{1/2}P x`` (in ``M``'s coordinates, ``√λ_i ⟨v_i, x⟩``: ``P``
commutes with ``F``), the projected loss ``½‖F^{1/2}Px‖²`` of Thm 6.1 and the
overlap scores of Section 7. :func:`orthogonalized` is the correction
``L(θ) − ⟨P g(θ*), θ − θ*⟩`` of docs/theory.md §5 on any model.

The basis is either a ``(d, n)`` array of raveled rows or a pytree whose leaves
have a leading ``d`` axis (as :func:`geomcollapse.linalg.top_eigenpairs`
returns for a pytree ``like``); vectors ``x`` are then ``(n,)`` or pytrees
like ``θ*``. Everything is pure and traceable (a ``Subspace`` is a pytree), so
it jits and vmaps; add a leading time axis with ``jax.vmap``.

Matvec convention of the library: a curvature operator is
``op(params, v, *args) -> A v`` with ``v`` like ``params``
(:mod:`geomcollapse.curvature`); data and weights enter as arguments, never as
closure constants, so jitted entry points neither constant-fold nor recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import finite_leaves, is_concrete
from geomcollapse._sharding import is_sharded, stack_combine, stack_dot, tree_dot, tree_norm
from geomcollapse.curvature import (
    LinearOperator,
    VectorProduct,
    check_layout,
    linear_operator,
    params_layout,
)
from geomcollapse.linalg import TracedEigenpairs, top_eigenpairs_traced

__all__ = [
    "OverlapScore",
    "Subspace",
    "fisher_product",
    "flat_basis",
    "orthogonalized",
    "subspace_arrays",
    "warm_eigenpairs",
]

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(x: PyTree) -> jax.Array:
    return x if isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 1 else ravel_pytree(x)[0]


def _is_vector(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 1


def _leafwise(basis: PyTree, x: PyTree, name: str) -> bool:
    """A pytree basis against a pytree ``x`` of its structure: work leaf by leaf.

    Nothing is raveled, so a basis sharded like the parameters (as
    :func:`geomcollapse.linalg.top_eigenpairs` returns for sharded ``like``)
    stays sharded and only ``(d,)`` coordinates are reduced across devices.
    False: raveled rows against raveled ``x`` (a ``(d, n)`` basis, an ``(n,)``
    ``x``, or a pytree ``x`` laid out as the basis' leaves, e.g. an ``nnx.State``
    against its pure dict). ``ValueError`` naming ``name`` when a pytree ``x`` is
    laid out otherwise (its raveled entries would pair other coordinates).
    """
    if isinstance(basis, (jax.Array, np.ndarray)) or _is_vector(x):
        return False
    layout = tuple((path, shape[1:]) for path, shape in params_layout(basis))
    check_layout(x, layout, name, "the subspace's basis (without its leading d axis)")
    return jax.tree_util.tree_structure(basis) == jax.tree_util.tree_structure(x)


def _raveled(x: PyTree, rows: jax.Array, name: str) -> jax.Array:
    """``x`` as an ``(n,)`` vector against ``(d, n)`` rows; ``ValueError`` naming ``name``
    when its size is not ``n``."""
    flat = _flat(x)
    if flat.shape != rows.shape[1:]:
        raise ValueError(
            f"{name} has {flat.size} entries, the subspace's basis rows have {rows.shape[1]}"
        )
    return flat


def flat_basis(basis: PyTree) -> jax.Array:
    """A basis as ``(d, n)`` rows: a 2-D array as is, a pytree with leading ``d`` raveled."""
    if isinstance(basis, (jax.Array, np.ndarray)):
        if np.ndim(basis) != 2:
            raise ValueError(
                "basis must be (d, n) or a pytree with a leading d axis, "
                f"got shape {np.shape(basis)}"
            )
        return jnp.asarray(basis)
    leaves = jax.tree_util.tree_leaves(basis)
    if not leaves:
        raise ValueError("basis has no array leaves")
    d = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(d) != 1 or None in d:
        raise ValueError(
            f"basis leaves must share a leading d axis, got leading sizes {sorted(map(str, d))}"
        )
    return jax.vmap(lambda b: ravel_pytree(b)[0])(basis)


def check_orthonormal(rows: PyTree, name: str = "basis") -> None:
    """Raise unless concrete ``(d, n)`` rows are orthonormal: ``max|VVᵀ − D| ≤ √eps``.

    ``rows`` may also be a pytree basis with a leading ``d`` axis (its Gram matrix is
    summed leaf by leaf, nothing raveled).

    ``D`` is ``I`` except on rows of (near-)zero norm, which a solver uses for
    pairs it could not reach (``found = False``) and which pass as zero rows.
    ``eps`` is float32's or the rows' dtype's, whichever is larger: a float32
    solver's basis cast to float64 is orthonormal only to float32 rounding
    (≈ 1e-6), and ``√eps`` is far above that and far below a basis that is not
    one. Tracers pass (checked at the library's eager entry points).
    """
    leaves = [jnp.reshape(b, (np.shape(b)[0], -1)) for b in jax.tree_util.tree_leaves(rows)]
    if not all(map(is_concrete, leaves)) or leaves[0].shape[0] == 0:  # traced, or no rows
        return
    gram = sum(jnp.matmul(b, b.T, precision=_HIGHEST) for b in leaves)
    unit = (jnp.diagonal(gram) > 0.5).astype(gram.dtype)
    error = float(jnp.max(jnp.abs(gram - jnp.diag(unit))))
    tol = float(np.sqrt(max(jnp.finfo(gram.dtype).eps, jnp.finfo(jnp.float32).eps)))
    if not error <= tol:
        raise ValueError(
            f"{name} must have orthonormal rows: max |VVᵀ − I| = {error:.2e} > {tol:.1e} (√eps)"
        )


class OverlapScore(NamedTuple):
    """How much an update ``Δθ`` lies in ``M`` (Section 7; docs/theory.md §7).

    Attributes:
      geometric: ``‖PΔθ‖/‖Δθ‖`` (0 for ``Δθ = 0``); a random ``d``-dimensional
        subspace of ``R^n`` gives ``≈ (d/n)^{1/2}``.
      fisher: ``½‖F^{1/2}PΔθ‖²``, the lower bound of Thm 6.1.
    """

    geometric: jax.Array
    fisher: jax.Array


class Subspace(NamedTuple):
    """Top-``d`` eigenpairs of a skill Fisher: ``M = span(v_1 … v_d)`` (Def. 3.4).

    Attributes:
      values: ``(d,)`` eigenvalues ``λ_1 ≥ … ≥ λ_d`` (clipped at 0 where used as ``√λ``).
      basis: ``(d, n)`` orthonormal rows, or a pytree with a leading ``d`` axis.
      residuals: ``(d,)`` ``‖F v_i − λ_i v_i‖`` (NaN when unknown).
      converged: ``()`` bool, every pair certified to the solver's tolerance.
    """

    values: jax.Array
    basis: PyTree
    residuals: jax.Array
    converged: jax.Array

    @classmethod
    def from_eigenpairs(cls, pairs: Any, *, allow_unconverged: bool = False) -> Subspace:
        """The subspace of :func:`geomcollapse.linalg.top_eigenpairs` (or the traced) pairs.

        Raises ``ValueError`` when a found pair is not converged, unless
        ``allow_unconverged``: an uncertified ``M`` makes every number measured
        against it uncertified too.
        """
        converged = np.asarray(jax.device_get(pairs.converged))
        found = np.asarray(jax.device_get(getattr(pairs, "found", np.ones_like(converged, bool))))
        ok = bool(np.all(converged[found] if converged.shape == found.shape else converged))
        if not ok and not allow_unconverged:
            raise ValueError(
                "eigenpairs are not converged (residuals "
                f"{np.asarray(pairs.residuals)}): pass allow_unconverged=True to use them anyway"
            )
        values = jnp.asarray(pairs.values)
        if is_sharded(values):  # next to the values on the mesh, put there explicitly
            flag = jax.device_put(np.asarray(ok), values.sharding)
        else:
            flag = jnp.asarray(ok)
        return cls(
            values=values,
            basis=pairs.vectors,
            residuals=jnp.asarray(pairs.residuals),
            converged=flag,
        )

    @classmethod
    def exact(cls, values: Any, basis: Any) -> Subspace:
        """A subspace from exact (dense ``eigh``) pairs: residuals NaN, converged True.

        Raises ``ValueError`` when ``values`` is not ``(d,)`` for the basis' ``d`` rows,
        or when a concrete ``basis`` is not orthonormal.
        """
        values = jnp.asarray(values)
        rows = flat_basis(basis)
        if values.shape != rows.shape[:1]:
            raise ValueError(
                f"values must be (d,) for the basis' d = {rows.shape[0]} rows, got shape "
                f"{values.shape} (broadcast against the rows it would give another loss)"
            )
        check_orthonormal(rows, "basis")
        return cls(values, basis, jnp.full(values.shape, jnp.nan, values.dtype), jnp.asarray(True))

    def leading(self, d: int) -> Subspace:
        """The subspace of the top ``d`` of these pairs (``1 ≤ d ≤ dim``)."""
        if not 1 <= d <= self.dim:
            raise ValueError(f"d must be in [1, {self.dim}], got {d}")
        return Subspace(
            self.values[:d],
            jax.tree_util.tree_map(lambda b: b[:d], self.basis),
            self.residuals[:d],
            self.converged,
        )

    @property
    def dim(self) -> int:
        """``d``."""
        return int(np.shape(self.values)[0])

    @property
    def rows(self) -> jax.Array:
        """The basis as ``(d, n)`` raveled rows."""
        return flat_basis(self.basis)

    @property
    def sqrt_values(self) -> jax.Array:
        """``(d,)`` ``√max(λ_i, 0)``."""
        return jnp.sqrt(jnp.maximum(self.values, 0.0))

    @property
    def fisher_half_rows(self) -> jax.Array:
        """``F^{1/2}P`` as a ``(d, n)`` map ``diag(√λ) Vᵀ`` (rows ``√λ_i v_i``)."""
        return self.sqrt_values[:, None] * self.rows

    def coordinates(self, x: PyTree) -> jax.Array:
        """``(d,)`` ``⟨v_i, x⟩``: ``P x`` in ``M``'s basis.

        A pytree basis and a pytree ``x`` are contracted leaf by leaf (no ravel).
        ``ValueError`` when ``x`` has another size, or (pytree against a pytree basis)
        another layout.
        """
        return self._coordinates(x, "x")

    def _coordinates(self, x: PyTree, name: str) -> jax.Array:
        if _leafwise(self.basis, x, name):
            return stack_dot(self.basis, x)
        rows = self.rows
        return jnp.dot(rows, _raveled(x, rows, name), precision=_HIGHEST)

    def project(self, x: PyTree) -> PyTree:
        """``P x``, shaped like ``x`` (an ``(n,)`` array or a pytree like ``θ*``)."""
        if _leafwise(self.basis, x, "x"):
            return stack_combine(self.coordinates(x), self.basis)
        flat = jnp.dot(self.coordinates(x), self.rows, precision=_HIGHEST)
        if _is_vector(x):
            return flat
        return ravel_pytree(x)[1](flat)

    def fisher_half(self, x: PyTree) -> jax.Array:
        """``(d,)`` ``F^{1/2}P x`` in ``M``'s basis, ``√λ_i ⟨v_i, x⟩`` (norm ``‖F^{1/2}Px‖``)."""
        return self.sqrt_values * self.coordinates(x)

    def projected_loss(self, x: PyTree) -> jax.Array:
        """``½‖F^{1/2}P x‖²`` (Thm 6.1's lower bound on ``Δu``)."""
        return 0.5 * jnp.sum(self.fisher_half(x) ** 2)

    def overlap_score(self, delta_theta: PyTree) -> OverlapScore:
        """:class:`OverlapScore` of an update ``Δθ = θ_K − θ*`` (NaN for a non-finite one)."""
        if _leafwise(self.basis, delta_theta, "delta_theta"):
            flat, norm = delta_theta, tree_norm(delta_theta)
        else:
            flat = _raveled(delta_theta, self.rows, "delta_theta")
            norm = jnp.linalg.norm(flat)
        coordinates = self._coordinates(flat, "delta_theta")
        zero = norm == 0  # Δθ = 0 scores 0; a NaN norm (a diverged run) stays NaN
        inside = jnp.linalg.norm(coordinates)
        return OverlapScore(
            geometric=jnp.where(zero, 0.0, inside / jnp.where(zero, 1.0, norm)),
            fisher=0.5 * jnp.sum((self.sqrt_values * coordinates) ** 2),
        )


def orthogonalized(
    loss_fn: Callable[..., jax.Array], subspace: Subspace, params: PyTree, *loss_args: Any
) -> Callable[..., jax.Array]:
    """``L̃(θ, *args) = L(θ, *args) − ⟨P g(θ*), θ − θ*⟩``, so ``P g̃(θ*) = 0`` (docs/theory.md §5).

    The Hessian is unchanged. ``g(θ*)`` is taken once, with ``loss_args``, at
    ``θ* = params``; the returned loss takes ``(θ, *args)`` like ``loss_fn``.
    """
    finite_leaves(params, "params")
    if _leafwise(subspace.basis, params, "params"):  # e.g. a basis sharded like the parameters
        pg_tree = subspace.project(jax.grad(loss_fn)(params, *loss_args))

        def corrected_tree(theta: PyTree, *args: Any) -> jax.Array:
            x = jax.tree_util.tree_map(jnp.subtract, theta, params)
            return loss_fn(theta, *args) - tree_dot(pg_tree, x)

        return corrected_tree
    flat_star, _ = ravel_pytree(params)
    rows = subspace.rows
    if rows.shape[1] != flat_star.size:
        raise ValueError(
            f"subspace basis has {rows.shape[1]} parameters, params have {flat_star.size}"
        )
    g_star = _flat(jax.grad(loss_fn)(params, *loss_args))
    pg = jnp.dot(jnp.dot(rows, g_star, precision=_HIGHEST), rows, precision=_HIGHEST)

    def corrected(theta: PyTree, *args: Any) -> jax.Array:
        x = _flat(theta) - flat_star
        return loss_fn(theta, *args) - jnp.dot(pg, x, precision=_HIGHEST)

    return corrected


def subspace_arrays(subspace: Any, *, fisher_values: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(λ (d,), V (d, n))`` of a :class:`Subspace`, validated at a public entry point.

    Raises ``ValueError`` naming ``subspace`` unless it is a :class:`Subspace`
    with ``d ≥ 1`` finite values (with ``fisher_values``, for callers that use them as a
    Fisher's, none below ``−√eps·max|λ|``), as many basis rows, and orthonormal finite
    rows (:func:`check_orthonormal`).
    """
    if not isinstance(subspace, Subspace):
        raise ValueError(f"subspace must be a geomcollapse Subspace, got {type(subspace).__name__}")
    values = jnp.asarray(subspace.values)
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(f"subspace.values must be (d,) with d ≥ 1, got shape {values.shape}")
    rows = subspace.rows
    if rows.shape[0] != values.shape[0]:
        raise ValueError(
            f"subspace basis has {rows.shape[0]} rows, subspace.values has {values.shape[0]}"
        )
    finite_leaves(values, "subspace.values")
    finite_leaves(rows, "subspace.basis")
    concrete = fisher_values and is_concrete(values)
    lam = np.asarray(jax.device_get(values), np.float64) if concrete else np.zeros(1)
    if lam.min() < -np.sqrt(float(jnp.finfo(values.dtype).eps)) * np.abs(lam).max():
        raise ValueError(
            f"subspace.values must be a Fisher's eigenvalues (≥ 0), got {lam.min():.3g}: a "
            "negative λ reads as 0 in ½‖F^{1/2}Px‖², so a budget on it could never fire"
        )
    check_orthonormal(rows, "subspace.basis")
    return values, rows


def fisher_product(fisher_vp: Any) -> VectorProduct:
    """``fisher_vp(params, v, *args)`` as a curvature ``VectorProduct``, checked once.

    The Fisher at moving parameters (``θ_k``, ``θ*``) that the monitor and the
    tracking defence re-find ``M`` with, as :func:`warm_eigenpairs` takes it. A
    bound :class:`~geomcollapse.curvature.LinearOperator` is refused (it holds
    fixed params); ``ValueError`` naming ``fisher_vp`` unless it is callable.
    """
    if isinstance(fisher_vp, VectorProduct):
        return fisher_vp
    if isinstance(fisher_vp, LinearOperator):
        raise ValueError(
            "fisher_vp must be the unbound fisher_vp(params, v, *args) (e.g. "
            "curvature.fisher_vp(logits)), not an operator bound to fixed params"
        )
    if not callable(fisher_vp):
        raise ValueError(f"fisher_vp must be callable, got {type(fisher_vp).__name__}")
    return VectorProduct(fisher_vp)


def warm_eigenpairs(
    fisher_vp: VectorProduct | Callable[..., PyTree],
    params: PyTree,
    args: tuple,
    previous: jax.Array,
    d: int,
    keys: tuple[jax.Array, jax.Array],
    tol: float | None,
    max_steps: int | None,
) -> TracedEigenpairs:
    """``M(params)``: top-``d`` eigenpairs of ``F(params)`` by traced Lanczos, warm-started.

    The start vector is ``Σ_i v_i`` of the ``(d, n)`` rows ``previous`` (the last
    ``M``) plus a random unit vector (from ``keys[0]``), so a direction rotating
    into ``M`` is not missed; ``keys[1]`` drives restarts. Traceable (no checks):
    :func:`geomcollapse.defences.project_out_tracking` and
    :func:`geomcollapse.monitor.monitor` call it inside ``jit``.

    Args:
      fisher_vp: ``fisher_vp(params, v, *args) -> F(params) v``.
      params: the point ``θ`` (a pytree); ``args`` the matvec's extra arguments.
      previous: ``(d, n)`` rows of the previous basis.
      d: how many pairs; ``tol``, ``max_steps``: as
        :func:`geomcollapse.linalg.top_eigenpairs_traced` takes them.
    """
    theta = ravel_pytree(params)[0]
    matvec = linear_operator(fisher_vp, params, *args).raveled()
    noise = jax.random.normal(keys[0], theta.shape, theta.dtype)
    v0 = jnp.sum(previous.astype(theta.dtype), axis=0) + noise / jnp.linalg.norm(noise)
    return top_eigenpairs_traced(matvec, v0, d, key=keys[1], tol=tol, max_steps=max_steps)
