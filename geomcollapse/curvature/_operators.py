"""Matrix-free curvature operators over parameter pytrees.

Every factory takes a loss (or model) function whose first argument is the
parameter pytree and returns a :class:`VectorProduct`: a pure, jit-able
``fvp(params, v, *args)`` whose ``bind(params, *args)`` is the
:class:`LinearOperator` at ``params`` (docs/library.md "Operators"). Vectors ``v`` are
pytrees with the structure, shapes and dtypes of ``params``; a mismatch raises
``ValueError`` at trace time. Symbols follow docs/theory.md §1: ``g = ∇L``,
``H = ∇g``, ``F = Jᵀ(diag p − ppᵀ)J``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from geomcollapse._checks import floating_leaves, same_structure
from geomcollapse.curvature._operator import VectorProduct

PyTree = Any


def gradient(loss_fn: Callable[..., jax.Array]) -> Callable[..., PyTree]:
    """``g(params, *args) = ∇_θ loss_fn(params, *args)``, a pytree like ``params``."""

    def grad_fn(params: PyTree, *args: Any) -> PyTree:
        floating_leaves(params, "params")
        return jax.grad(loss_fn)(params, *args)

    return grad_fn


def hessian_vp(loss_fn: Callable[..., jax.Array]) -> VectorProduct:
    """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

    Returns ``hvp(params, v, *args)``; cost ≈ 2 gradients (one jvp of the
    gradient). ``H = ∇²_θ loss_fn(params, *args)``.
    """
    grad_fn = jax.grad(loss_fn)

    def hvp(params: PyTree, v: PyTree, *args: Any) -> PyTree:
        same_structure(params, v, "params", "v")
        return jax.jvp(lambda p: grad_fn(p, *args), (params,), (v,))[1]

    return VectorProduct(hvp, ("hessian_vp", loss_fn))


def _jvp_and_vjp(
    fn: Callable[..., jax.Array], params: PyTree, v: PyTree, args: tuple
) -> tuple[jax.Array, jax.Array, Callable]:
    """Outputs ``z``, ``J v`` and the transpose ``u ↦ Jᵀu`` from one linearization.

    ``jax.linearize`` + ``jax.linear_transpose`` trace the forward pass once for
    both; under jit, XLA also merges the two forward passes of ``jax.jvp`` +
    ``jax.vjp``, and ``benchmarks/curvature_speed.py`` measures the two routes
    equal within noise (≈ 1.1 gradients each on the benchmark MLP).
    """
    z, f_jvp = jax.linearize(lambda p: fn(p, *args), params)
    jv = f_jvp(v)
    f_vjp = jax.linear_transpose(f_jvp, params)
    return z, jv, lambda u: f_vjp(u)[0]


def ggn_vp(
    predict_fn: Callable[..., jax.Array],
    output_loss_fn: Callable[..., jax.Array],
) -> VectorProduct:
    """Generalized Gauss-Newton-vector product ``Jᵀ ∇²_z ℓ(z) J v``.

    Args:
      predict_fn: ``predict_fn(params, *args) -> z``, the model outputs.
      output_loss_fn: ``output_loss_fn(z, *args) -> scalar``; the loss is
        ``output_loss_fn(predict_fn(params, *args), *args)``.

    Returns:
      ``ggn(params, v, *args)``, a pytree like ``params``.
    """

    def ggn(params: PyTree, v: PyTree, *args: Any) -> PyTree:
        same_structure(params, v, "params", "v")
        z, jv, jt = _jvp_and_vjp(predict_fn, params, v, args)
        out_grad = jax.grad(lambda zz: output_loss_fn(zz, *args))
        hjv = jax.jvp(out_grad, (z,), (jv,))[1]
        return jt(hjv)

    return VectorProduct(ggn, ("ggn_vp", predict_fn, output_loss_fn))


def fisher_vp(logits_fn: Callable[..., jax.Array]) -> VectorProduct:
    """True Fisher-vector product for categorical (softmax) outputs.

    ``F v = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i v`` with ``p_i = softmax(z_i)``,
    computed without materialising ``J``. ``logits_fn(params, *args)`` returns
    logits of shape ``(..., C)``; the ``N`` rows are all leading positions, so
    ``F`` is the Fisher (= GGN) of the *mean* cross-entropy over those rows.
    docs/theory.md §1: at a minimum of a well-specified NLL, ``F`` equals the Hessian.

    Returns:
      ``fvp(params, v, *args)``, a pytree like ``params``.
    """

    def fvp(params: PyTree, v: PyTree, *args: Any) -> PyTree:
        same_structure(params, v, "params", "v")
        z, jv, jt = _jvp_and_vjp(logits_fn, params, v, args)
        if z.ndim < 1:
            raise ValueError("logits_fn must return logits of shape (..., C)")
        num_rows = z.size // z.shape[-1]
        p = jax.nn.softmax(z, axis=-1)
        u = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
        return jt(u / num_rows)

    return VectorProduct(fvp, ("fisher_vp", logits_fn))


def per_example_gradients(
    example_loss_fn: Callable[..., jax.Array],
) -> Callable[..., PyTree]:
    """Per-example gradients ``g_i = ∇ ℓ(params, example_i)`` by ``vmap``.

    ``example_loss_fn(params, example, *args)`` is the loss of one example;
    the returned ``fn(params, batch, *args)`` maps it over the leading axis of
    every leaf of ``batch`` and returns a pytree like ``params`` with a leading
    axis of size ``m``.
    """
    grad_fn = jax.grad(example_loss_fn)

    def fn(params: PyTree, batch: PyTree, *args: Any) -> PyTree:
        floating_leaves(params, "params")
        return jax.vmap(grad_fn, in_axes=(None, 0) + (None,) * len(args))(params, batch, *args)

    return fn


def empirical_fisher_vp(
    example_loss_fn: Callable[..., jax.Array],
) -> VectorProduct:
    """Empirical Fisher-vector product ``(1/m) Gᵀ G v`` with ``G`` the per-example gradients.

    Computed as one jvp and one transpose of the map ``θ ↦ (ℓ_1, …, ℓ_m)``, so
    ``G`` (m × n) is never stored. Note that the empirical Fisher vanishes at a
    minimum of the loss it is built from; the true Fisher (:func:`fisher_vp`)
    does not.

    Returns:
      ``efvp(params, v, batch, *args)``, a pytree like ``params``.
    """

    def losses(params: PyTree, batch: PyTree, *args: Any) -> jax.Array:
        return jax.vmap(example_loss_fn, in_axes=(None, 0) + (None,) * len(args))(
            params, batch, *args
        )

    def efvp(params: PyTree, v: PyTree, batch: PyTree, *args: Any) -> PyTree:
        same_structure(params, v, "params", "v")
        _, gv, gt = _jvp_and_vjp(losses, params, v, (batch, *args))
        return gt(gv / gv.shape[0])

    return VectorProduct(efvp, ("empirical_fisher_vp", example_loss_fn))
