"""Logistic landscapes: multinomial logistic skill and fine-tuning NLLs (docs/theory.md §5).

The skill's Fisher equals its Hessian at every point, ``θ*`` is the exact skill
minimum, and the cubic remainder is real, so flows need a numerical integrator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import theory
from geomcollapse._checks import (
    finite_float,
    is_concrete,
    positive_float,
    positive_int,
    prng_key,
    subspace_dim,
)
from geomcollapse._phi import phi2
from geomcollapse._precision import float_dtype
from geomcollapse.subspace import Subspace


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
        if not all(is_concrete(x) for x in leaves) or np.ndim(self.theta_star) != 1:
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
        curved = jnp.log1p(jnp.sum(p * centred**2 * phi2(centred), axis=-1))
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
