"""Lanczos inside ``jit``/``vmap``: a fixed-capacity basis and a traced stopping rule.

:func:`top_eigenpairs` drives its loop from the host so that it can stop after
any matvec on one large operator; that cannot be vmapped or run inside
``lax.map`` over thousands of small dense problems (issue #3's batched
landscapes, where two dense ``eigh`` of ``n = 256`` cost ≈ 16 ms per landscape on
the 2-core CPU and a Krylov route ≈ 2 ms, measured in
``benchmarks/landscape_batch.py``). Here the basis lives in a preallocated
``(max_steps, n)`` buffer, the loop is a ``lax.while_loop`` over blocks of
``check_every`` steps, and after each block a caller's traced ``stop`` decides
from the tridiagonal ``T`` (one small ``eigh``, :func:`ritz`).

Each step is ``w = A q_j − α_j q_j − β_{j−1} q_{j−1}`` followed by two full
Gram-Schmidt passes against the buffer ("twice is enough"; zero rows past the
current step contribute nothing). A breakdown ``β_j ≤ zero_level`` (the rule
of :mod:`geomcollapse.linalg._contract`, shared with the host-driven solver)
means the Krylov space is invariant: without ``restart_key`` the run is then
exhausted (and exact); with it a random vector orthogonal to the basis
continues the run (``β_j = 0``, so ``T`` splits into blocks) — needed to find
every copy of a repeated eigenvalue, as in the host-driven solver.
:func:`top_eigenpairs_traced` follows the same contract as
:func:`top_eigenpairs`: tolerance relative to ``‖A‖ = max|θ|``, true
residuals from ``k`` more matvecs, ``converged`` decided on them, the same
:class:`Eigenpairs` result.

Batching: ``lax.map`` on CPU; ``vmap`` on GPU. A vmapped batch lowers the
small ``eigh`` of ``T`` to batched LAPACK calls inside the while loop, which
hang XLA:CPU's thread pool here (0 % CPU, never returns: 2 Krylov flows of
``n = 96`` with ``max_steps`` 72–96, 64 landscape summaries of ``n = 256``; 2
flows with ``max_steps ≤ 64`` return, and ``lax.map`` always does), as
:func:`geomcollapse.landscapes.map_landscapes` notes for dense ``eigh``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from geomcollapse._checks import float_vector, positive_float_or_traced, positive_int, prng_key
from geomcollapse.curvature import flat_matvec
from geomcollapse.linalg._contract import (
    Eigenpairs,
    converged,
    default_tol,
    reference_scale,
    residual_norms,
    zero_level,
)

_HIGHEST = jax.lax.Precision.HIGHEST


class LanczosRun(NamedTuple):
    """A traced Lanczos decomposition ``A Qᵀ = Qᵀ T + β_{m−1} q_m e_mᵀ`` (``Q`` holds rows).

    Attributes:
      basis: ``(max_steps, n)`` orthonormal rows ``q_0 … q_{m−1}``; zero rows
        past ``num_steps``.
      alpha: ``(max_steps,)`` diagonal of ``T``; zero past ``num_steps``.
      beta: ``(max_steps,)``; ``beta[j]`` couples ``q_j`` and ``q_{j+1}`` (zero at a
        restart); ``beta[num_steps − 1]`` is the residual norm ``β_m``.
      num_steps: ``()`` int32, the number ``m`` of completed steps.
      restarted: ``()`` bool, the last step ended in a restart.
      exhausted: ``()`` bool, the Krylov space is invariant (no restart key) or
        the basis spans the whole space.
      asymmetry: ``()`` largest ``|⟨q_{j−1}, A q_j⟩ − β_{j−1}|`` and norm removed
        by the full re-orthogonalisation over the run, relative to ``‖T‖``: at
        rounding level for a symmetric ``A``, ``O(1)`` for a non-symmetric one
        (whose Ritz pairs are then meaningless; see :func:`is_symmetric_run`).
      norm: ``()`` ``max_j ‖A q_j‖`` over the run, the scale of the breakdown
        and zero levels (:func:`geomcollapse.linalg._contract.zero_level`).
    """

    basis: jax.Array
    alpha: jax.Array
    beta: jax.Array
    num_steps: jax.Array
    restarted: jax.Array
    exhausted: jax.Array
    asymmetry: jax.Array
    norm: jax.Array

    @property
    def residual_norm(self) -> jax.Array:
        """``()`` ``β_m``, the norm of the residual row; zero when exhausted (exact)."""
        return jnp.where(self.exhausted, 0.0, self.beta[jnp.maximum(self.num_steps - 1, 0)])


class Ritz(NamedTuple):
    """Eigendecomposition ``T = S diag(θ) Sᵀ`` of a run's tridiagonal, padded to ``max_steps``.

    Attributes:
      values: ``(max_steps,)`` ascending; the last ``num_steps`` are the Ritz values.
      vectors: ``(max_steps, max_steps)``, columns ``s_i``; padding columns are
        zero on the run's rows.
      valid: ``(max_steps,)`` bool, which columns are Ritz pairs.
    """

    values: jax.Array
    vectors: jax.Array
    valid: jax.Array


def ritz(run: LanczosRun) -> Ritz:
    """The Ritz decomposition of ``run``'s ``T``, padded to ``(max_steps, max_steps)``.

    One ``eigh`` of the smallest leading ``b × b`` block (``b`` a multiple of 8)
    that holds the run.

    Rows past ``num_steps`` are padded with a diagonal entry below every Ritz
    value (Gershgorin), so the Ritz pairs are the last ``num_steps`` columns and
    the padding never mixes with them.
    """
    m = run.alpha.shape[0]
    rows = jnp.arange(m)
    inside = rows < run.num_steps
    bound = 1.0 + jnp.max(jnp.abs(run.alpha)) + 2.0 * jnp.max(jnp.abs(run.beta))
    diag = jnp.where(inside, run.alpha, -2.0 * bound)
    off = jnp.where(rows[:-1] < run.num_steps - 1, run.beta[:-1], 0.0)
    T = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)

    # eigh of the smallest leading block (multiple of _BUCKET) holding the run, so a
    # check costs O(num_steps³), not O(max_steps³): with max_steps = 64 and runs of
    # 16 steps this was 60 % of the batched landscape benchmark.
    def leading(b: int):
        def solve(T):
            values, vectors = jnp.linalg.eigh(T[:b, :b])
            pad = m - b
            values = jnp.concatenate([jnp.full((pad,), -2.0 * bound, T.dtype), values])
            full = jnp.zeros((m, m), T.dtype).at[:b, pad:].set(vectors)
            return values, full.at[b:, :pad].set(jnp.eye(pad, dtype=T.dtype))

        return solve

    sizes = _buckets(m)
    index = jnp.searchsorted(jnp.asarray(sizes), run.num_steps)
    values, vectors = jax.lax.switch(index, [leading(b) for b in sizes], T)
    return Ritz(values, vectors, rows >= m - run.num_steps)


_BUCKET = 8


def _buckets(capacity: int) -> list[int]:
    """Leading-block sizes ``8, 16, …, capacity`` that `ritz` and the Gram-Schmidt switch over."""
    return sorted({*range(_BUCKET, capacity, _BUCKET), capacity})


def is_symmetric_run(run: LanczosRun) -> jax.Array:
    """``()`` bool: the run's operator behaved as a symmetric one (``asymmetry ≤ 10√eps``).

    The same threshold as the host-driven solver's symmetry check.
    """
    return run.asymmetry <= 10.0 * jnp.sqrt(jnp.finfo(run.basis.dtype).eps)


def _orthogonalizer(max_steps: int) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``(basis, w, filled) -> w`` with two Gram-Schmidt passes against the filled rows.

    Runs against the smallest leading block of rows holding the basis (same
    buckets as :func:`ritz`): a step costs ``O(j·n)``, not ``O(max_steps·n)``.
    """
    sizes = _buckets(max_steps)

    def against(b: int):
        def passes(basis, w):
            rows = basis[:b]
            for _ in range(2):
                w = w - _dot(_dot(rows, w), rows)
            return w

        return passes

    def orthogonalize(basis, w, filled):
        index = jnp.searchsorted(jnp.asarray(sizes), filled)
        return jax.lax.switch(index, [against(b) for b in sizes], basis, w)

    return orthogonalize


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=_HIGHEST)


def _asymmetry(run: LanczosRun, a, b, coupling, beta_prev, local, w) -> jax.Array:
    """The run's asymmetry after one step (see :class:`LanczosRun`).

    For symmetric ``A``, ``⟨q_{j−1}, A q_j⟩ = β_{j−1}`` and the three-term ``w``
    is already orthogonal to the older rows; both gaps measure asymmetry.
    """
    scale = jnp.maximum(jnp.max(jnp.abs(run.alpha)), jnp.abs(a)) + jnp.max(run.beta)
    gap = jnp.maximum(jnp.abs(coupling - beta_prev), jnp.linalg.norm(local - w))
    tiny = jnp.finfo(run.basis.dtype).tiny
    return jnp.maximum(run.asymmetry, gap / jnp.maximum(jnp.maximum(scale, b), tiny))


def _restart_vector(orthogonalize, restart_key, run: LanczosRun, breakdown, j) -> jax.Array:
    """At a breakdown, a random vector orthogonal to the basis (not normalised); else zeros."""
    n = run.basis.shape[1]
    zeros = jnp.zeros((n,), run.basis.dtype)
    if restart_key is None:
        return zeros

    # Drawn only at a breakdown: n normals and a Gram-Schmidt at every step
    # cost ≈ 30 ms at n = 1e6 on the 2-core CPU.
    def draw():
        fresh = jax.random.normal(jax.random.fold_in(restart_key, j), (n,), run.basis.dtype)
        return orthogonalize(run.basis, fresh, j + 1)

    return jax.lax.cond(breakdown, draw, lambda: zeros)


def _step(matvec, orthogonalize, restart_key):
    """One Lanczos step ``(run, q_{j−1}) -> (run, q_j)``: matvec, recurrence, breakdown."""

    def step(carry):
        run, q_prev = carry
        j = run.num_steps
        n = run.basis.shape[1]
        q = run.basis[j]
        beta_prev = jnp.where(j > 0, run.beta[jnp.maximum(j - 1, 0)], 0.0)
        w = matvec(q)
        norm = jnp.maximum(run.norm, jnp.linalg.norm(w))
        a = _dot(q, w)
        coupling = jnp.where(j > 0, _dot(q_prev, w), 0.0)
        local = w - a * q - beta_prev * q_prev
        w = orthogonalize(run.basis, local, j + 1)
        b = jnp.linalg.norm(w)
        asymmetry = _asymmetry(run, a, b, coupling, beta_prev, local, w)
        breakdown = b <= zero_level(run.basis.dtype, norm, j + 1)
        fresh = _restart_vector(orthogonalize, restart_key, run, breakdown, j)
        fresh_norm = jnp.linalg.norm(fresh)
        eps = jnp.finfo(run.basis.dtype).eps
        can_restart = fresh_norm > jnp.sqrt(eps)  # zero once the basis spans R^n
        nxt = jnp.where(breakdown, fresh / jnp.where(can_restart, fresh_norm, 1.0), w / b)
        exhausted = (breakdown & ~can_restart) | (j + 1 >= n)
        # Write one row in place: a select over the whole (max_steps, n) buffer
        # copies it at every step.
        row = jnp.minimum(j + 1, run.basis.shape[0] - 1)
        keep = exhausted | (j + 1 >= run.basis.shape[0])
        basis = run.basis.at[row].set(jnp.where(keep, run.basis[row], nxt))
        return LanczosRun(
            basis=basis,
            alpha=run.alpha.at[j].set(a),
            beta=run.beta.at[j].set(jnp.where(breakdown, 0.0, b)),
            num_steps=j + 1,
            restarted=breakdown & can_restart,
            exhausted=exhausted,
            asymmetry=asymmetry,
            norm=norm,
        ), q

    return step


def _start(v0: jax.Array, max_steps: int) -> LanczosRun:
    """The empty run whose first basis row is ``v0 / ‖v0‖``."""
    n, dtype = v0.shape[0], v0.dtype
    basis = jnp.zeros((max_steps, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    zeros = jnp.zeros((max_steps,), dtype)
    scalar = jnp.zeros((), dtype)
    return LanczosRun(
        basis, zeros, zeros, jnp.int32(0), jnp.bool_(False), jnp.bool_(False), scalar, scalar
    )


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    max_steps: int,
    stop: Callable[[LanczosRun], jax.Array],
    *,
    check_every: int = 8,
    restart_key: jax.Array | None = None,
) -> LanczosRun:
    """Lanczos with full reorthogonalisation until ``stop(run)`` or ``max_steps``; traced.

    Args:
      matvec: symmetric ``(n,) -> (n,)``, traceable, or a
        :class:`geomcollapse.curvature.LinearOperator` (applied raveled).
      v0: ``(n,)`` non-zero start vector (normalised here).
      max_steps: static capacity ``m_max ≤ n``.
      stop: ``LanczosRun -> bool`` scalar, evaluated after every
        ``check_every`` steps (and never right after a restart).
      check_every: static block length between stopping checks.
      restart_key: continue past a breakdown from random vectors drawn from
        this key; ``None`` ends the run there (the Krylov space is invariant).

    Returns:
      The :class:`LanczosRun`; ``num_steps < max_steps`` iff stopped or exhausted.
    """
    matvec = flat_matvec(matvec)  # a LinearOperator on its raveled (n,) vectors
    n = v0.shape[0]
    if not 1 <= max_steps <= n:
        raise ValueError(f"max_steps must be in [1, n={n}], got {max_steps}")
    if check_every < 1:
        raise ValueError(f"check_every must be ≥ 1, got {check_every}")
    step = _step(matvec, _orthogonalizer(max_steps), restart_key)

    def active(run: LanczosRun):
        return (run.num_steps < max_steps) & ~run.exhausted

    def block(carry):
        run, _ = carry
        # A while loop, not fori_loop over cond(active, step, identity): XLA copied
        # the whole (max_steps, n) basis in and out of the cond at every step.
        stop_at = run.num_steps + check_every
        # q_{j−1} is carried, not read back from the basis: that read made XLA copy
        # the whole (max_steps, n) basis twice per step (fused after the row update).
        q_prev = run.basis[jnp.maximum(run.num_steps - 1, 0)]
        run, _ = jax.lax.while_loop(
            lambda c: active(c[0]) & (c[0].num_steps < stop_at), step, (run, q_prev)
        )
        done = ~active(run) | (~run.restarted & stop(run))
        return run, done

    start = _start(v0, max_steps)
    run, _ = jax.lax.while_loop(lambda c: ~c[1], block, (start, jnp.bool_(False)))
    return run


TracedEigenpairs = Eigenpairs  # the one result type (kept under its former name)


def _top(run: LanczosRun, k: int):
    """Top-``k`` Ritz values, ``T``'s vectors ``(m, k)``, estimated residuals, found, ``‖A‖``."""
    r = ritz(run)
    last = jnp.maximum(run.num_steps - 1, 0)
    top = r.vectors[:, -k:][:, ::-1]  # (m, k) descending
    estimates = jnp.abs(run.residual_norm * top[last])
    values = r.values[-k:][::-1]
    level = zero_level(run.basis.dtype, run.norm, run.num_steps)
    found = r.valid[-k:][::-1] & (jnp.abs(values) > level)
    return values, top, estimates, found, r.valid[-k:][::-1], reference_scale(r.values, r.valid)


def top_eigenpairs_traced(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    k: int,
    *,
    key: jax.Array,
    tol: float | None = None,
    max_steps: int | None = None,
    check_every: int = 4,
) -> Eigenpairs:
    """Top-``k`` (algebraic) eigenpairs of a symmetric ``matvec``, inside ``jit``/``vmap``.

    Stops once every top-``k`` Ritz pair has ``β_m |s_{m,i}| ≤ tol·‖A‖`` (checked
    every ``check_every`` steps; ``‖A‖`` the largest ``|θ|``) or after
    ``max_steps``. Restarts from ``key`` at a breakdown, so repeated and
    rank-deficient spectra are found whole. Then certifies: the ``k`` true
    residuals ``‖A v − λ v‖`` (``k`` more matvecs, in float64 when x64 is on)
    decide ``converged``, as in :func:`geomcollapse.linalg.top_eigenpairs`.

    Args:
      matvec: symmetric ``(n,) -> (n,)``, traceable, or a
        :class:`geomcollapse.curvature.LinearOperator` (applied raveled).
      v0: ``(n,)`` start vector (e.g. ``jax.random.normal``).
      k: static number of pairs, ``≤ max_steps``.
      key: restart key.
      tol: relative residual tolerance (default ``100·eps`` of ``v0``'s dtype).
      max_steps: static basis capacity (default ``min(n, max(4k, 64))``).

    Returns:
      :class:`Eigenpairs` (all arrays; vmaps): ``converged`` per pair also
      requires a symmetric run (:func:`is_symmetric_run`);
      ``pairs.certified`` is the one flag for the whole set.
    """
    float_vector(v0, "v0")
    operator = flat_matvec(matvec)  # a LinearOperator on its raveled (n,) vectors

    def matvec(v: jax.Array) -> jax.Array:  # in v's dtype: a float64 Fisher of float32 θ
        return operator(v).astype(v.dtype)  # (x64 on) would change the loop's carry type

    key = prng_key(key)
    k = positive_int(k, "k")
    n = v0.shape[0]
    if max_steps is None:
        max_steps = min(n, max(4 * k, 64))
    max_steps = positive_int(max_steps, "max_steps")
    tol = default_tol(v0.dtype) if tol is None else positive_float_or_traced(tol, "tol")
    if not 1 <= k <= max_steps <= n:
        raise ValueError(f"need 1 ≤ k ≤ max_steps ≤ n, got k={k}, max_steps={max_steps}, n={n}")

    def stop(run: LanczosRun):
        _, _, estimates, _, valid, scale = _top(run, k)
        return jnp.all(converged(estimates, valid, tol, scale))

    run = lanczos(matvec, v0, max_steps, stop, check_every=check_every, restart_key=key)
    values, top, _, found, _, scale = _top(run, k)
    values = jnp.where(found, values, 0.0)
    vectors = jnp.where(found[:, None], jnp.dot(top.T, run.basis, precision=_HIGHEST), 0.0)
    residuals = residual_norms(jax.lax.map(matvec, vectors), vectors, values)
    return Eigenpairs(
        values=values,
        vectors=vectors,
        residuals=jnp.where(found, residuals, 0.0).astype(v0.dtype),
        converged=converged(residuals, found, tol, scale) & is_symmetric_run(run),
        found=found,
        num_matvecs=run.num_steps + k,
    )
