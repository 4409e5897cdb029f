"""Many quadratic landscapes in one compiled call: AIC numbers and exact-flow curves.

The traced inner loop of sweeps and benchmarks: a dense route (two ``eigh``) and a
Krylov route (no dense ``eigh`` of ``A`` or ``F``), batched by ``lax.map`` or ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import flow, linalg, theory
from geomcollapse._checks import (
    subspace_dim,
)
from geomcollapse.subspace import Subspace


class QuadraticSummary(NamedTuple):
    """AIC numbers and exact-flow curves of one quadratic landscape (all arrays; vmaps).

    Fields are those of :class:`geomcollapse.theory.AICReport` that are arrays
    (``tail_mass``, ``lambda_d``, ``orthogonality``, ``fisher_orthogonality``,
    ``coupling``, ``tail_quadratic = cᵀ(I−P)F(I−P)c``), plus ``delta_u`` and
    ``projected_loss``, each ``(T,)``, along the exact flow.
    """

    tail_mass: jax.Array
    lambda_d: jax.Array
    orthogonality: jax.Array
    fisher_orthogonality: jax.Array
    coupling: jax.Array
    tail_quadratic: jax.Array
    delta_u: jax.Array
    projected_loss: jax.Array


def map_landscapes(fn: Callable, *batched: Any, sequential: bool) -> Any:
    """``fn`` over the leading batch axis of every array in ``batched``.

    ``sequential=True`` runs the landscapes one after another inside one
    compiled call (``lax.map``); ``False`` vmaps them. On CPU use sequential:
    a vmapped batch lowers to batched LAPACK ``eigh`` calls, which on this
    project's 2-core CPU machine intermittently deadlock XLA's thread pool
    (every thread parked on a futex; 512 landscapes of n = 256 never return,
    pinned to one core or mapped sequentially they do), and they are no
    faster there (LAPACK works one matrix at a time). On GPU, vmap.
    """
    if sequential:
        return jax.lax.map(lambda args: fn(*args), batched)
    return jax.vmap(fn)(*batched)


def summarize_batch(
    A: jax.Array, c: jax.Array, F: jax.Array, d: int, ts: jax.Array, *, sequential: bool
) -> QuadraticSummary:
    """:func:`quadratic_summary` over a leading batch axis of ``A``, ``c``, ``F``.

    ``sequential`` as in :func:`map_landscapes`.
    """
    return map_landscapes(
        lambda A, c, F: quadratic_summary(A, c, F, d, ts), A, c, F, sequential=sequential
    )


def quadratic_summary(
    A: jax.Array, c: jax.Array, F: jax.Array, d: int, ts: jax.Array
) -> QuadraticSummary:
    """AIC (Def. 5.1) and exact ``Δu(t)``, ``½‖F^{1/2}Px(t)‖²`` in one pure, vmappable call.

    Args:
      A: ``(n, n)`` symmetric; c: ``(n,)``; F: ``(n, n)`` symmetric PSD (not
        validated here: this is the traced inner loop of sweeps and benchmarks;
        :class:`QuadraticLandscape` validates).
      d: static ``dim M``.
      ts: ``(T,)`` times.
    """
    d = subspace_dim(d, np.shape(c)[-1])
    lam, V = jnp.linalg.eigh(F)
    lam, V = lam[::-1], V[:, ::-1]
    top = V[:, :d]
    c_perp = c - top @ (top.T @ c)
    measures = theory.aic_measures(
        Subspace.exact(lam[:d], top.T),
        c,
        A @ c,
        tail_mass=jnp.sum(lam[d:]),
        tail_quadratic=c_perp @ (F @ c_perp),
    )
    x = flow.quadratic_flow(A, c, ts)
    xv = x @ V  # coordinates in F's eigenbasis: Δu = ½ Σ λ_i (v_iᵀx)², ≥ 0 by construction
    weights = jnp.maximum(lam, 0.0)
    return QuadraticSummary(
        **measures._asdict(),
        delta_u=0.5 * jnp.sum(weights * xv**2, axis=1),
        projected_loss=0.5 * jnp.sum(weights[:d] * xv[:, :d] ** 2, axis=1),
    )


class KrylovSummary(NamedTuple):
    """:func:`quadratic_summary_krylov`'s result: the summary and how it was obtained.

    Attributes:
      summary: the :class:`QuadraticSummary`.
      eig_matvecs, flow_matvecs: ``()`` int32 products with ``F`` and with ``A``.
      eig_residual: ``()`` max ``‖Fv − λv‖/λ₁`` over the top-``d`` pairs.
      flow_error: ``()`` max estimated relative error of ``x(t)`` over the times.
      converged: ``()`` bool, both within ``tol``.
    """

    summary: QuadraticSummary
    eig_matvecs: jax.Array
    flow_matvecs: jax.Array
    eig_residual: jax.Array
    flow_error: jax.Array
    converged: jax.Array


def quadratic_summary_krylov(
    A: jax.Array,
    c: jax.Array,
    F: jax.Array,
    d: int,
    ts: jax.Array,
    key: jax.Array,
    *,
    tol: float | None = None,
    max_steps: int | None = None,
) -> KrylovSummary:
    """:func:`quadratic_summary` by Krylov methods: no dense ``eigh`` of ``A`` or ``F``.

    The top-``d`` eigenpairs of ``F`` by :func:`geomcollapse.linalg.top_eigenpairs_traced`
    (random start from ``key``), the tail mass as ``tr F − Σ_{i≤d} λ_i``, the flow
    by :func:`geomcollapse.flow.krylov_quadratic_flow`, and ``Δu = ½ xᵀFx``
    (clipped at 0, absolute accuracy ``≈ ε‖F‖‖x‖²``). Agrees with the dense route
    to ``≈ tol`` where both converge; ``converged`` says whether they did.

    Args:
      A, c, F, d, ts: as :func:`quadratic_summary`.
      key: ``jax.random`` key for the Lanczos start and restarts on ``F``.
      tol: relative tolerance of both Krylov solves (default ``100·eps``).
      max_steps: static Krylov capacity for each (defaults of the two solvers).
    """
    n = c.shape[0]
    tol = linalg.default_tol(c.dtype) if tol is None else tol
    k_start, k_restart = jax.random.split(key)
    fvp = lambda v: jnp.dot(F, v, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    avp = lambda v: jnp.dot(A, v, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    eig = linalg.top_eigenpairs_traced(
        fvp,
        jax.random.normal(k_start, (n,), c.dtype),
        d,
        key=k_restart,
        tol=tol,
        max_steps=max_steps,
    )
    path = flow.krylov_quadratic_flow(avp, c, ts, tol=tol, max_steps=max_steps)
    subspace = Subspace(eig.values, eig.vectors, eig.residuals, eig.certified)
    c_perp = c - subspace.project(c)
    measures = theory.aic_measures(
        subspace,
        c,
        avp(c),
        tail_mass=jnp.trace(F) - jnp.sum(eig.values),
        tail_quadratic=c_perp @ fvp(c_perp),
    )
    x = path.x
    summary = QuadraticSummary(
        **measures._asdict(),
        delta_u=jnp.maximum(0.5 * jnp.sum(x * (x @ F), axis=1), 0.0),
        projected_loss=jax.vmap(subspace.projected_loss)(x),
    )
    eig_residual = jnp.max(eig.residuals) / jnp.abs(eig.values[0])
    flow_error = jnp.max(path.error)
    return KrylovSummary(
        summary=summary,
        eig_matvecs=eig.num_matvecs,
        flow_matvecs=path.num_matvecs,
        eig_residual=eig_residual,
        flow_error=flow_error,
        converged=eig.certified & path.converged,
    )
