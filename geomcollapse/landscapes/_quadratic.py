"""Quadratic landscapes with exact AIC numbers and exact flows (docs/theory.md §4).

In the coordinates ``x = θ − θ*``: fine-tuning loss ``L = ½xᵀAx + cᵀx``, skill
loss ``u = ½xᵀFx`` (so ``Δu = ½‖F^{1/2}x‖²``). ``M`` is spanned by the top-``d``
eigenvectors of ``F``; ``P`` projects onto it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import flow, theory
from geomcollapse._checks import (
    finite_float,
    finite_leaves,
    is_concrete,
    positive_float,
    positive_int,
    prng_key,
    subspace_dim,
)
from geomcollapse._precision import float_dtype
from geomcollapse.subspace import Subspace


def _check_symmetric(M, name: str, psd: bool) -> None:
    """Validate a (batch of) square symmetric matrices over the last two axes."""
    arr = np.asarray(M)
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"{name} must be a square matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries")
    scale = max(float(np.max(np.abs(arr))), np.finfo(np.float64).tiny)
    tol = 1e3 * np.finfo(arr.dtype).eps * scale
    asym = float(np.max(np.abs(arr - np.swapaxes(arr, -1, -2))))
    if asym > tol:
        raise ValueError(f"{name} is not symmetric: max |{name} − {name}ᵀ| = {asym:.3g}")
    if psd:
        lo = float(np.min(np.linalg.eigvalsh(arr.astype(np.float64))))
        if lo < -tol * arr.shape[-1]:
            raise ValueError(
                f"{name} has a negative eigenvalue {lo:.3g} beyond rounding: a Fisher is PSD"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuadraticLandscape:
    """``L = ½xᵀAx + cᵀx`` (fine-tuning) and ``u = ½xᵀFx`` (skill), ``x = θ − θ*``.

    A pytree (``A``, ``c``, ``F`` are leaves; ``d`` is static), so batches of
    landscapes ``vmap``. Concrete inputs are validated: ``A`` and ``F`` square,
    symmetric and the size of ``c``; ``F`` PSD up to rounding.

    Attributes:
      A: ``(n, n)`` fine-tuning Hessian ``H``.
      c: ``(n,)`` fine-tuning gradient at ``θ*``.
      F: ``(n, n)`` skill Fisher.
      d: default dimension of ``M`` for :meth:`projected_loss`; ``None`` means
        the numerical rank of ``F`` (then the projected loss equals ``Δu``).
    """

    A: jax.Array
    c: jax.Array
    F: jax.Array
    d: int | None = dataclasses.field(default=None, metadata={"static": True})

    def __post_init__(self):
        if not all(is_concrete(x) for x in (self.A, self.c, self.F)):
            return
        for name in ("A", "c", "F"):
            finite_leaves(getattr(self, name), name)
        _check_symmetric(self.A, "A", psd=False)
        _check_symmetric(self.F, "F", psd=True)
        n = np.shape(self.c)[-1:]
        if len(n) != 1 or np.shape(self.A)[-1] != n[0] or np.shape(self.F)[-1] != n[0]:
            raise ValueError(
                f"shapes disagree: A {np.shape(self.A)}, F {np.shape(self.F)}, c {np.shape(self.c)}"
            )
        if self.d is not None:
            self._check_d(self.d)

    @property
    def n(self) -> int:
        return int(np.shape(self.c)[-1])

    def _check_d(self, d) -> int:
        return subspace_dim(d, self.n)

    def _fisher_split(self, d: int):
        """Eigenvalues of ``F`` (descending) and its top-``d`` eigenvectors, ``(n, d)``."""
        lam, V = jnp.linalg.eigh(self.F)
        lam, V = lam[::-1], V[:, ::-1]
        return lam, V[:, :d]

    def subspace(self, d: int | None = None) -> Subspace:
        """``M``: the top-``d`` eigenpairs of ``F`` (dense ``eigh``, exact) as a :class:`Subspace`.

        ``d`` defaults to the landscape's ``d`` (or ``F``'s numerical rank).
        """
        d = self._check_d(d) if d is not None else self._default_d()
        lam, top = self._fisher_split(d)
        return Subspace.exact(lam[:d], top.T)

    def _default_d(self) -> int:
        if self.d is not None:
            return self.d
        lam = np.linalg.eigvalsh(np.asarray(self.F, np.float64))[::-1]
        rank = int(np.sum(lam > self.n * np.finfo(np.asarray(self.F).dtype).eps * lam[0]))
        return min(max(rank, 1), self.n - 1)

    def aic(self, d: int) -> theory.AICReport:
        """The AIC report (Def. 5.1) for ``M`` = top-``d`` eigenvectors of ``F``."""
        d = self._check_d(d)
        lam, top = self._fisher_split(d)
        c_perp = self.c - top @ (top.T @ self.c)
        return theory.aic_report(
            Subspace.exact(lam[:d], top.T),
            self.c,
            self.A @ self.c,
            tail_mass=jnp.sum(lam[d:]),
            tail_quadratic=c_perp @ (self.F @ c_perp),
        )

    def trajectory(self, ts: jax.Array) -> jax.Array:
        """Exact gradient-flow positions ``x(t)``, ``(T, n)`` (:func:`flow.quadratic_flow`)."""
        return flow.quadratic_flow(self.A, self.c, jnp.asarray(ts, self.c.dtype))

    def delta_u(self, ts: jax.Array) -> jax.Array:
        """Exact ``Δu(t) = ½ x(t)ᵀ F x(t)`` along the flow, ``(T,)``.

        Evaluated as ``½ Σ_i max(λ_i, 0)(v_iᵀx)²`` in ``F``'s eigenbasis: never
        negative, and the rounding of ``F``'s null part (``eps·‖F‖‖x‖²``, which
        ``xᵀFx`` would add) stays out of a ``t⁴``-small ``Δu``.
        """
        lam, V = jnp.linalg.eigh(self.F)
        xv = self.trajectory(ts) @ V
        return 0.5 * jnp.sum(jnp.maximum(lam, 0.0) * xv**2, axis=1)

    def _projected_half_sq(self, x: jax.Array, d: int | None) -> jax.Array:
        """``½‖F^{1/2}P x‖²`` for rows ``x`` ``(T, n)``; ``d`` as in :meth:`projected_loss`."""
        return jax.vmap(self.subspace(d).projected_loss)(x)

    def projected_loss(self, ts: jax.Array, d: int | None = None) -> jax.Array:
        """Exact ``½‖F^{1/2}P x(t)‖²`` along the flow, ``(T,)``.

        ``d`` defaults to the landscape's ``d`` (or ``F``'s numerical rank).
        """
        return self._projected_half_sq(self.trajectory(ts), d)

    def gd_projected_loss(self, eta: float, ks: jax.Array, d: int | None = None) -> jax.Array:
        """``½‖F^{1/2}P x_k‖²`` along gradient descent with step ``eta``, ``(K,)``."""
        return self._projected_half_sq(flow.quadratic_gd(self.A, self.c, eta, ks), d)


def _top_values(top: Sequence[float], d: int) -> np.ndarray:
    """``top`` as ``d`` finite positive eigenvalues, largest first."""
    try:
        top = np.sort(np.asarray(top, np.float64))[::-1]
    except (TypeError, ValueError):
        raise ValueError(f"top must be a sequence of d={d} numbers, got {top!r}") from None
    if top.shape != (d,) or not np.all(np.isfinite(top)) or np.any(top <= 0):
        raise ValueError(f"top must hold d={d} finite positive eigenvalues, got {top}")
    return top


def _non_negative(value: float, name: str) -> float:
    value = finite_float(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def _tail(top: np.ndarray, tail_mass: float, size: int) -> np.ndarray:
    """``size`` geometric (ratio ½) tail eigenvalues summing to ``tail_mass``, all < ``λ_d``."""
    weights = 0.5 ** np.arange(size)
    tail = tail_mass * weights / weights.sum()
    if tail.size and tail[0] >= top[-1]:
        raise ValueError(
            f"tail_mass={tail_mass} puts a tail eigenvalue {tail[0]:.3g} above λ_d={top[-1]:.3g}"
        )
    return tail


def _kappa_for(coupling: float, epsilon: float, g_vec: np.ndarray, h_vec: np.ndarray) -> float:
    """``κ ≥ 0`` with ``‖g + κ h‖ = γ`` (``g = S(PBc)``, ``h = (wᵀc) S u``): a quadratic in κ."""
    qa, qb, qc = h_vec @ h_vec, 2 * g_vec @ h_vec, g_vec @ g_vec - coupling**2
    disc = qb**2 - 4 * qa * qc
    if qa == 0 or disc < 0:
        raise ValueError(
            f"coupling={coupling} is out of reach with epsilon={epsilon}: the smallest "
            f"attainable γ here is {np.sqrt(max(g_vec @ g_vec - qb**2 / (4 * qa), 0)):.3g}"
        )
    roots = [(-qb + s * np.sqrt(disc)) / (2 * qa) for s in (1, -1)]
    return min((r for r in roots if r >= 0), default=max(roots))


def _draw(key, n: int, d: int, lam, curvature_scale: float, epsilon: float, c_perp_norm: float):
    """``(V_M, F, B, u, w, c)`` of :func:`make_quadratic_landscape`, seven draws from ``key``."""
    keys = jax.random.split(key, 7)

    def normal(k, shape):  # float64 draws under x64, else float32 (no narrowing warning)
        return np.asarray(jax.random.normal(k, shape, jax.dtypes.canonicalize_dtype(jnp.float64)))

    V, _ = np.linalg.qr(normal(keys[0], (n, n)))
    Vm, Vp = V[:, :d], V[:, d:]
    F = (V * lam) @ V.T

    def psd_block(k, m):
        G = normal(k, (m, m))
        return curvature_scale * (G @ G.T) / m

    B = Vm @ psd_block(keys[1], d) @ Vm.T + Vp @ psd_block(keys[2], n - d) @ Vp.T
    u = Vm @ normal(keys[3], (d,))
    u /= np.linalg.norm(u)
    w = Vp @ normal(keys[4], (n - d,))
    w /= np.linalg.norm(w)
    p = Vm @ normal(keys[5], (d,))
    p /= np.linalg.norm(p)
    cp = Vp @ normal(keys[6], (n - d,))
    cp *= c_perp_norm / np.linalg.norm(cp)
    return Vm, F, B, u, w, epsilon * p + cp


def make_quadratic_landscape(
    key: jax.Array,
    n: int,
    d: int,
    *,
    top: Sequence[float],
    tail_mass: float,
    epsilon: float,
    coupling: float | None = None,
    kappa: float | None = None,
    c_perp_norm: float = 1.0,
    curvature_scale: float = 1.0,
    dtype=jnp.float64,
) -> QuadraticLandscape:
    """A quadratic landscape with chosen AIC numbers (docs/theory.md §4 construction).

    ``F = V diag(λ) Vᵀ`` with ``λ_{1..d} = top`` and a geometric tail summing to
    ``tail_mass``; ``A = B + κ(uwᵀ + wuᵀ)`` with ``B`` block-diagonal in
    ``range(P) ⊕ range(P)^⊥`` (random PSD blocks of scale ``curvature_scale``),
    unit ``u ∈ range(P)``, unit ``w ⊥ range(P)``; ``c = εp + c_⊥``.

    Args:
      key: ``jax.random`` key.
      n, d: dimension and ``dim M`` (``1 ≤ d < n``).
      top: the ``d`` top eigenvalues of ``F`` (any order; ``λ_d = min(top)``).
      tail_mass: ``Σ_{j>d} λ_j ≥ 0``; each tail eigenvalue must stay below ``λ_d``.
      epsilon: ``‖Pc‖ ≥ 0``.
      coupling: target ``γ = ‖F^{1/2}PAc‖``; solves for ``κ``. Exclusive with ``kappa``.
      kappa: the coupling strength ``κ`` itself.
      c_perp_norm: ``‖(I−P)c‖ > 0``.
      curvature_scale: scale of ``B``'s blocks.

    Returns:
      A :class:`QuadraticLandscape` with ``d`` set, whose ``.aic(d)`` gives
      ``tail_mass``, ``λ_d``, ``ε`` and ``γ`` to ≈1e-12 relative in float64.
    """
    key = prng_key(key)
    n = positive_int(n, "n")
    d = subspace_dim(d, n)
    dtype = float_dtype(dtype)
    top = _top_values(top, d)
    tail_mass, epsilon, curvature_scale = (
        _non_negative(value, name)
        for name, value in (
            ("tail_mass", tail_mass),
            ("epsilon", epsilon),
            ("curvature_scale", curvature_scale),
        )
    )
    c_perp_norm = positive_float(c_perp_norm, "c_perp_norm")
    if (coupling is None) == (kappa is None):
        raise ValueError("give exactly one of coupling (target γ) or kappa")
    if coupling is not None:
        _non_negative(coupling, "coupling")
    if kappa is not None:
        kappa = finite_float(kappa, "kappa")
    lam = np.concatenate([top, _tail(top, tail_mass, n - d)])
    Vm, F, B, u, w, c = _draw(key, n, d, lam, curvature_scale, epsilon, c_perp_norm)
    S = np.sqrt(lam[:d])[:, None] * Vm.T  # F^{1/2}P as a (d, n) map
    if kappa is None:
        kappa = _kappa_for(coupling, epsilon, S @ (B @ c), float(w @ c) * (S @ u))
    A = B + kappa * (np.outer(u, w) + np.outer(w, u))
    A = 0.5 * (A + A.T)
    return QuadraticLandscape(
        A=jnp.asarray(A, dtype), c=jnp.asarray(c, dtype), F=jnp.asarray(0.5 * (F + F.T), dtype), d=d
    )
