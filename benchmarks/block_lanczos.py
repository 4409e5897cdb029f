"""Matvec counts of block Lanczos, to compare with single-vector Lanczos (issue #2).

A measuring tool for ``curvature_speed`` (the stopping rule of
:func:`geomcollapse.linalg.top_eigenpairs`), not a solver of the library; see
docs/benchmarks.md, "Curvature operators and the top-k eigensolver: MLP".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _block_tridiagonal(diagonal: list[np.ndarray], lower: list[np.ndarray]) -> np.ndarray:
    """``T`` with ``b × b`` blocks ``A_i`` on the diagonal and ``B_i`` below it."""
    b = diagonal[0].shape[0]
    m = len(diagonal)
    T = np.zeros((m * b, m * b))
    for i, A in enumerate(diagonal):
        T[i * b : (i + 1) * b, i * b : (i + 1) * b] = A
    for i, B in enumerate(lower):
        T[(i + 1) * b : (i + 2) * b, i * b : (i + 1) * b] = B
        T[i * b : (i + 1) * b, (i + 1) * b : (i + 2) * b] = B.T
    return T


def block_lanczos_top(
    batched_matvec: Callable[[np.ndarray], np.ndarray],
    n: int,
    k: int,
    b: int,
    *,
    tol: float,
    seed: int,
    max_matvecs: int = 300,
) -> tuple[int | None, np.ndarray]:
    """Block Lanczos with full reorthogonalisation, stopped on Ritz residuals.

    Args:
      batched_matvec: ``(b, n) -> (b, n)``, rows ``A v_i``.
      n, k, b: dimension, eigenpairs wanted, block size.
      tol: stop when the top-``k`` Ritz pairs have residual ``≤ tol·|θ₁|``.
      seed: numpy seed of the random orthonormal start block.
      max_matvecs: budget.

    Returns:
      ``(matvecs, top-k Ritz values descending)``; matvecs is ``None`` if the
      budget ran out.
    """
    V = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, b)))[0].T  # (b, n)
    basis, diagonal, lower = [V], [], []
    V_prev, B_prev = None, None
    theta = np.zeros(0)
    while (len(diagonal) + 1) * b <= max_matvecs:
        W = np.asarray(batched_matvec(V), np.float64)
        A = V @ W.T
        A = (A + A.T) / 2
        W = W - A @ V
        if V_prev is not None:
            W = W - B_prev.T @ V_prev
        Q = np.concatenate(basis)
        for _ in range(2):  # full reorthogonalisation, twice
            W = W - (W @ Q.T) @ Q
        V_next, R = np.linalg.qr(W.T)  # W = Rᵀ V_nextᵀ: A V_j = ... + B_j V_{j+1}, B_j = R
        diagonal.append(A)
        T = _block_tridiagonal(diagonal, lower)
        theta, S = np.linalg.eigh(T)
        top = np.argsort(-theta)[:k]
        residuals = np.linalg.norm(R @ S[-b:, top], axis=0)
        if T.shape[0] >= k and np.max(residuals) <= tol * np.max(np.abs(theta)):
            return len(diagonal) * b, theta[top]
        lower.append(R)
        V_prev, B_prev, V = V, R, V_next.T
        basis.append(V)
    return None, np.sort(theta)[::-1][:k]
