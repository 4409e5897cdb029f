"""Quadratic landscapes with exact AIC numbers and exact flows (docs/theory.md §4).

In the coordinates ``x = θ − θ*``: fine-tuning loss ``L = ½xᵀAx + cᵀx``, skill
loss ``u = ½xᵀFx`` (so ``Δu = ½‖F^{1/2}x‖²``). ``M`` is spanned by the top-``d``
eigenvectors of ``F``; ``P`` projects onto it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import flow, linalg, theory
from geomcollapse._checks import (
    finite_float,
    finite_leaves,
    positive_float,
    positive_int,
    prng_key,
    subspace_dim,
)
from geomcollapse._precision import float_dtype
from geomcollapse.subspace import Subspace


def _is_concrete(x) -> bool:
    """A real array (not a tracer, nor a placeholder JAX puts in while unflattening)."""
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


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
        if not all(_is_concrete(x) for x in (self.A, self.c, self.F)):
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
    try:
        top = np.sort(np.asarray(top, np.float64))[::-1]
    except (TypeError, ValueError):
        raise ValueError(f"top must be a sequence of d={d} numbers, got {top!r}") from None
    if top.shape != (d,) or not np.all(np.isfinite(top)) or np.any(top <= 0):
        raise ValueError(f"top must hold d={d} finite positive eigenvalues, got {top}")
    tail_mass = finite_float(tail_mass, "tail_mass")
    epsilon = finite_float(epsilon, "epsilon")
    curvature_scale = finite_float(curvature_scale, "curvature_scale")
    for name, value in (("tail_mass", tail_mass), ("epsilon", epsilon)):
        if value < 0:
            raise ValueError(f"{name} must be ≥ 0, got {value}")
    if curvature_scale < 0:
        raise ValueError(f"curvature_scale must be ≥ 0, got {curvature_scale}")
    c_perp_norm = positive_float(c_perp_norm, "c_perp_norm")
    if (coupling is None) == (kappa is None):
        raise ValueError("give exactly one of coupling (target γ) or kappa")
    if coupling is not None and finite_float(coupling, "coupling") < 0:
        raise ValueError(f"coupling must be ≥ 0, got {coupling}")
    if kappa is not None:
        kappa = finite_float(kappa, "kappa")
    ratio = 0.5
    weights = ratio ** np.arange(n - d)
    tail = tail_mass * weights / weights.sum()
    if tail.size and tail[0] >= top[-1]:
        raise ValueError(
            f"tail_mass={tail_mass} puts a tail eigenvalue {tail[0]:.3g} above λ_d={top[-1]:.3g}"
        )
    lam = np.concatenate([top, tail])
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
    c = epsilon * p + cp
    S = np.sqrt(lam[:d])[:, None] * Vm.T  # F^{1/2}P as a (d, n) map
    if kappa is None:
        # ‖S(PBc) + κ (wᵀc) S u‖ = γ: a quadratic in κ; take its non-negative root.
        g_vec = S @ (B @ c)
        h_vec = float(w @ c) * (S @ u)
        qa, qb, qc = h_vec @ h_vec, 2 * g_vec @ h_vec, g_vec @ g_vec - coupling**2
        disc = qb**2 - 4 * qa * qc
        if qa == 0 or disc < 0:
            raise ValueError(
                f"coupling={coupling} is out of reach with epsilon={epsilon}: the smallest "
                f"attainable γ here is {np.sqrt(max(g_vec @ g_vec - qb**2 / (4 * qa), 0)):.3g}"
            )
        roots = [(-qb + s * np.sqrt(disc)) / (2 * qa) for s in (1, -1)]
        kappa = min((r for r in roots if r >= 0), default=max(roots))
    A = B + kappa * (np.outer(u, w) + np.outer(w, u))
    A = 0.5 * (A + A.T)
    return QuadraticLandscape(
        A=jnp.asarray(A, dtype), c=jnp.asarray(c, dtype), F=jnp.asarray(0.5 * (F + F.T), dtype), d=d
    )


def _logits(features: jax.Array, theta: jax.Array) -> jax.Array:
    """``z_k = W_k θ`` for features ``(K, C, n)`` and ``θ`` ``(n,)``: ``(K, C)``."""
    return jnp.einsum("kcn,n->kc", features, theta)


def softmax_nll(features: jax.Array, targets: jax.Array, theta: jax.Array) -> jax.Array:
    """``mean_k [logsumexp(W_k θ) − ⟨y_k, W_k θ⟩]``, multinomial logistic NLL (docs/theory.md §5).

    Args:
      features: ``(K, C, n)`` per-example class features ``W_k``.
      targets: ``(K, C)`` target distributions ``y_k`` (rows sum to 1).
      theta: ``(n,)`` parameters.
    """
    z = _logits(features, theta)
    return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.sum(targets * z, axis=-1))


def softmax_fisher(features: jax.Array, theta: jax.Array) -> jax.Array:
    """Dense ``F(θ) = mean_k W_kᵀ(diag p_k − p_k p_kᵀ)W_k``, ``(n, n)``: the NLL's Hessian."""
    p = jax.nn.softmax(_logits(features, theta), axis=-1)
    mean_w = jnp.einsum("kc,kcn->kn", p, features)
    second = jnp.einsum("kc,kcn,kcm->nm", p, features, features)
    return (second - jnp.einsum("kn,km->nm", mean_w, mean_w)) / features.shape[0]


def _check_distribution(targets, name: str, classes: int) -> None:
    arr = np.asarray(targets)
    if arr.ndim != 2 or arr.shape[1] != classes:
        raise ValueError(f"{name} must have shape (K, {classes}), got {arr.shape}")
    tol = 1e3 * np.finfo(arr.dtype).eps
    if not np.all(np.isfinite(arr)) or np.any(arr < -tol):
        raise ValueError(f"{name} must be finite and non-negative")
    worst = float(np.max(np.abs(arr.sum(axis=1) - 1.0)))
    if worst > tol * classes:
        raise ValueError(f"rows of {name} must sum to 1 (max deviation {worst:.3g})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogisticLandscape:
    """Skill and fine-tuning losses that are multinomial logistic NLLs (docs/theory.md §5).

    ``u(θ) = softmax_nll(W^s, y^s, θ)`` and
    ``L(θ) = softmax_nll(W^f, y^f, θ) − ⟨r, θ − θ*⟩`` with an optional linear
    correction ``r`` (zero, or ``P g₀(θ*)`` from :meth:`orthogonalized`, which
    makes ``P g(θ*) = 0`` and leaves the Hessian unchanged). The skill's
    Hessian equals its Fisher ``F(θ)`` at every ``θ``; its third derivative is
    the real cubic remainder of Thm 6.1. A pytree: batches of landscapes vmap.

    Attributes:
      skill_features: ``(K, C, n)``; skill_targets: ``(K, C)``.
      task_features: ``(J, C, n)``; task_targets: ``(J, C)``.
      theta_star: ``(n,)`` the aligned parameters ``θ*``.
      correction: ``(n,)`` the linear correction ``r``.
    """

    skill_features: jax.Array
    skill_targets: jax.Array
    task_features: jax.Array
    task_targets: jax.Array
    theta_star: jax.Array
    correction: jax.Array

    def __post_init__(self):
        leaves = dataclasses.astuple(self)
        if not all(_is_concrete(x) for x in leaves) or np.ndim(self.theta_star) != 1:
            return  # traced, or a batch (built by make_logistic_batch from valid draws)
        ws, wf = np.shape(self.skill_features), np.shape(self.task_features)
        if len(ws) != 3 or len(wf) != 3 or ws[1:] != wf[1:]:
            raise ValueError(
                f"skill_features {ws} and task_features {wf} must be (K, C, n) with equal C, n"
            )
        n = ws[2]
        for name in ("theta_star", "correction"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(
                    f"{name} must have shape ({n},), got {np.shape(getattr(self, name))}"
                )
        _check_distribution(self.skill_targets, "skill_targets", ws[1])
        _check_distribution(self.task_targets, "task_targets", ws[1])
        if np.shape(self.skill_targets)[0] != ws[0] or np.shape(self.task_targets)[0] != wf[0]:
            raise ValueError("targets must have one row per example of their features")
        if not all(np.all(np.isfinite(np.asarray(x))) for x in leaves):
            raise ValueError("LogisticLandscape arrays must be finite")

    @property
    def n(self) -> int:
        return int(np.shape(self.theta_star)[-1])

    def skill_loss(self, theta: jax.Array) -> jax.Array:
        """``u(θ)``, a scalar."""
        return softmax_nll(self.skill_features, self.skill_targets, theta)

    def task_loss(self, theta: jax.Array) -> jax.Array:
        """``L(θ)`` including the linear correction, a scalar."""
        raw = softmax_nll(self.task_features, self.task_targets, theta)
        return raw - jnp.dot(self.correction, theta - self.theta_star)

    def delta_u(self, x: jax.Array) -> jax.Array:
        """``Δu = u(θ* + x) − u(θ*)`` without cancellation; ``x`` may carry leading batch axes.

        Takes the displacement ``x = θ − θ*`` itself (e.g. :attr:`flow.Flow.displacement`),
        never ``θ``: forming ``θ* + x`` and subtracting ``θ*`` again would round ``x``
        at ``eps·|θ*|``. With ``δ_k = W_k x``, ``p_k = softmax(W_kθ*)`` and ``δ̃ = δ − E_p δ``:
        ``u_k(θ) − u_k(θ*) = ⟨p_k − y_k, δ_k⟩ + log1p(E_p[δ̃² φ₂(δ̃)])``. The
        class-constant part of ``δ`` (``O(t)`` along a flow, where ``Δu`` is
        ``O(t⁴)``) cancels before any rounding, so ``Δu`` keeps full relative
        accuracy at small ``t``; ``u(θ) − u(θ*)`` would lose it below ``eps·u``.
        """
        x_rows = jnp.reshape(x, (-1, self.n))
        ws, ys = self.skill_features, self.skill_targets
        p = jax.nn.softmax(_logits(ws, self.theta_star), axis=-1)
        delta = jnp.einsum("kcn,tn->tkc", ws, x_rows)
        centred = delta - jnp.sum(p * delta, axis=-1, keepdims=True)
        curved = jnp.log1p(jnp.sum(p * centred**2 * flow.phi2(centred), axis=-1))
        out = jnp.mean(jnp.sum((p - ys) * delta, axis=-1) + curved, axis=-1)
        return jnp.reshape(out, jnp.shape(x)[:-1])

    def derivatives(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``F(θ*)`` ``(n, n)``, ``g(θ*)`` ``(n,)`` and ``H(θ*) g(θ*)`` ``(n,)`` (pure; vmaps)."""
        theta = self.theta_star
        g = jax.grad(self.task_loss)(theta)
        Hg = jax.jvp(jax.grad(self.task_loss), (theta,), (g,))[1]
        return self.fisher(), g, Hg

    def cubic_constant(self) -> jax.Array:
        """``C`` with ``|Δu(θ) − ½xᵀF(θ*)x| ≤ C‖x‖³`` for every ``x = θ − θ*`` (Thm 6.1's ``O``).

        Taylor with Lagrange remainder: ``Δu − ½xᵀFx = ⅙ D³u(ξ)[x,x,x]``, and
        ``D³u[x,x,x] = mean_k κ₃(W_k x)``, the third central moment of ``W_k x``
        under ``p_k(ξ)``. A variable of range ``R`` has ``|κ₃| ≤ R · Var ≤ R³/4``
        (Popoviciu), and ``W_k x`` has range ``≤ D_k‖x‖`` with
        ``D_k = max_{c,c'} ‖w_kc − w_kc'‖``; so ``C = mean_k D_k³ / 24``.
        Valid whenever ``∇u(θ*) = 0`` (skill targets ``softmax(W_kθ*)``).
        """
        w = self.skill_features
        spread = jnp.linalg.norm(w[..., :, None, :] - w[..., None, :, :], axis=-1)
        return jnp.mean(jnp.max(spread, axis=(-2, -1)) ** 3, axis=-1) / 24

    def fisher(self, theta: jax.Array | None = None) -> jax.Array:
        """Dense skill Fisher ``F(θ)`` (default ``θ*``), ``(n, n)``."""
        return softmax_fisher(self.skill_features, self.theta_star if theta is None else theta)

    def fisher_vp(self, theta: jax.Array, v: jax.Array) -> jax.Array:
        """``F(θ) v`` matrix-free: ``mean_k W_kᵀ(p_k ⊙ W_k v − p_k ⟨p_k, W_k v⟩)``."""
        p = jax.nn.softmax(_logits(self.skill_features, theta), axis=-1)
        wv = _logits(self.skill_features, v)
        r = p * (wv - jnp.sum(p * wv, axis=-1, keepdims=True))
        return jnp.einsum("kc,kcn->n", r, self.skill_features) / self.skill_features.shape[0]

    def orthogonalized(self, d: int) -> LogisticLandscape:
        """The landscape with ``r = P g₀(θ*)`` (docs/theory.md §5), so ``P g(θ*) = 0``.

        ``P`` projects onto the top-``d`` eigenvectors of ``F(θ*)``; ``g₀`` is the
        gradient of the uncorrected fine-tuning NLL.
        """
        d = subspace_dim(d, self.n)
        return dataclasses.replace(self, correction=orthogonal_correction(self, d))

    def subspace(self, d: int) -> Subspace:
        """``M``: the top-``d`` eigenpairs of the dense ``F(θ*)`` as an exact :class:`Subspace`."""
        d = subspace_dim(d, self.n)
        lam, V = jnp.linalg.eigh(self.fisher())
        return Subspace.exact(lam[::-1][:d], V[:, ::-1][:, :d].T)

    def aic(self, d: int) -> theory.AICReport:
        """The AIC report (Def. 5.1) at ``θ*`` from dense ``F``, ``g`` and ``Hg``."""
        d = subspace_dim(d, self.n)
        F, g, Hg = (np.asarray(a, np.float64) for a in _derivatives_jit(self))
        lam, V = np.linalg.eigh(F)
        lam, V = lam[::-1], V[:, ::-1]
        g_perp = g - V[:, :d] @ (V[:, :d].T @ g)
        return theory.aic_report(
            Subspace.exact(lam[:d], V[:, :d].T),
            g,
            Hg,
            tail_mass=np.sum(lam[d:]),
            tail_quadratic=g_perp @ F @ g_perp,
        )


_derivatives_jit = jax.jit(lambda landscape: landscape.derivatives())


@jax.jit
def orthogonal_correction(landscape: LogisticLandscape, d: jax.Array) -> jax.Array:
    """``r = P g₀(θ*)``: the top-``d`` Fisher projection of the uncorrected task gradient.

    ``d`` may be traced (a mask selects the top ``d`` eigenvectors), so batches
    of landscapes with different ``d`` vmap. Returns ``(n,)``.
    """
    g0 = jax.grad(softmax_nll, argnums=2)(
        landscape.task_features, landscape.task_targets, landscape.theta_star
    )
    _, V = jnp.linalg.eigh(landscape.fisher())
    top = V[:, ::-1] * (jnp.arange(V.shape[0]) < d)[None, :]
    return top @ (top.T @ g0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _draw_logistic(key, n, classes, skill_examples, task_examples, dtype, scales):
    """Random features, ``θ*`` and targets of :func:`make_logistic_landscape`."""
    feature_scale, theta_scale, task_shift = scales
    k_ws, k_wf, k_th, k_shift = jax.random.split(key, 4)
    ws = feature_scale * jax.random.normal(k_ws, (skill_examples, classes, n), dtype) / np.sqrt(n)
    wf = feature_scale * jax.random.normal(k_wf, (task_examples, classes, n), dtype) / np.sqrt(n)
    theta_star = theta_scale * jax.random.normal(k_th, (n,), dtype)
    theta_task = theta_star + task_shift * jax.random.normal(k_shift, (n,), dtype)
    return (
        ws,
        jax.nn.softmax(_logits(ws, theta_star), axis=-1),
        wf,
        jax.nn.softmax(_logits(wf, theta_task), axis=-1),
        theta_star,
    )


def make_logistic_batch(key: jax.Array, num: int, n: int, **kwargs) -> LogisticLandscape:
    """``num`` independent :func:`make_logistic_landscape` draws as one batched pytree.

    ``kwargs`` are those of :func:`make_logistic_landscape` but ``orthogonalize_d``
    (use ``jax.vmap(orthogonal_correction)`` instead). Member ``i`` equals
    ``make_logistic_landscape(jax.random.split(key, num)[i], n, **kwargs)``;
    every leaf has a leading ``num`` axis (vmap over it).
    """
    num = positive_int(num, "num")
    n = positive_int(n, "n")
    float_dtype(kwargs.get("dtype", jnp.float64))
    if "orthogonalize_d" in kwargs:
        raise ValueError("orthogonalize_d is not supported here: vmap orthogonal_correction")
    keys = jax.random.split(prng_key(key), num)
    return jax.vmap(lambda k: make_logistic_landscape(k, n, **kwargs))(keys)


def make_logistic_landscape(
    key: jax.Array,
    n: int,
    *,
    classes: int = 3,
    skill_examples: int = 2,
    task_examples: int = 8,
    feature_scale: float = 1.0,
    theta_scale: float = 1.0,
    task_shift: float = 1.0,
    orthogonalize_d: int | None = None,
    dtype=jnp.float64,
) -> LogisticLandscape:
    """A random logistic landscape whose ``θ*`` minimizes the skill loss exactly.

    Features are i.i.d. ``N(0, feature_scale²/n)``; ``θ* ~ N(0, theta_scale² I)``;
    the skill targets are ``softmax(W^s_k θ*)`` (well specified, so ``∇u(θ*) = 0``
    and ``F(θ*)`` is the Hessian at the minimum); the fine-tuning targets are
    ``softmax(W^f_k θ_f)`` at ``θ_f = θ* + task_shift · N(0, I)``, so
    ``g(θ*) ≠ 0``. ``F`` has rank ``skill_examples · (classes − 1)`` (when
    ``< n``): its top subspace carries all of its trace, and ``u`` is exactly
    constant along ``F``'s null space.

    Args:
      key: ``jax.random`` key.
      n: number of parameters.
      classes, skill_examples, task_examples: ``C``, ``K``, ``J`` (``C ≥ 2``).
      orthogonalize_d: if given, apply :meth:`LogisticLandscape.orthogonalized`
        with this ``d`` (so ``P g(θ*) = 0``).
    """
    key = prng_key(key)
    n = positive_int(n, "n")
    classes = positive_int(classes, "classes")
    if classes < 2:
        raise ValueError(f"classes must be ≥ 2, got {classes}")
    skill_examples = positive_int(skill_examples, "skill_examples")
    task_examples = positive_int(task_examples, "task_examples")
    feature_scale = positive_float(feature_scale, "feature_scale")
    theta_scale = positive_float(theta_scale, "theta_scale")
    task_shift = finite_float(task_shift, "task_shift")
    if task_shift < 0:
        raise ValueError(f"task_shift must be ≥ 0, got {task_shift}")
    if orthogonalize_d is not None and positive_int(orthogonalize_d, "orthogonalize_d") >= n:
        raise ValueError(f"orthogonalize_d={orthogonalize_d} must be smaller than n={n}")
    dtype = float_dtype(dtype)
    scales = jnp.asarray([feature_scale, theta_scale, task_shift], dtype)
    ws, ys, wf, yf, theta_star = _draw_logistic(
        key, n, classes, skill_examples, task_examples, jnp.dtype(dtype), scales
    )
    landscape = LogisticLandscape(
        skill_features=ws,
        skill_targets=ys,
        task_features=wf,
        task_targets=yf,
        theta_star=theta_star,
        correction=jnp.zeros((n,), dtype),
    )
    return landscape if orthogonalize_d is None else landscape.orthogonalized(orthogonalize_d)


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
    subspace = Subspace(eig.values, eig.vectors, eig.residuals, eig.converged)
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
        converged=eig.converged & path.converged,
    )
