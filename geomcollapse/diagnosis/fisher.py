"""The skill Fisher of a diagnosis: its matvec from ``fisher=``, and the refusals of one
that vanishes, is rounding noise, is not symmetric or not positive semidefinite.

``F`` is the true Fisher ``Jᵀ(diag p − ppᵀ)J`` of ``skill_logits``
(:func:`geomcollapse.curvature.fisher_vp`), the empirical one from per-example
gradients (:func:`geomcollapse.curvature.empirical_fisher_vp`), or a user's
matvec ``fisher(params, v, *skill_args)`` (docs/theory.md §2, §5.3), bound once at
``params`` into a :class:`geomcollapse.curvature.LinearOperator` (a pytree: ``jax.jit``
keys on its function, so no cache of factories is kept here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import curvature
from geomcollapse._checks import evaluate_abstractly, scalar_loss

__all__ = [
    "bad_fisher",
    "cast_output",
    "check_matvec_output",
    "empirical_fvp",
    "evaluate_abstractly",
    "fisher_operator",
    "refuse_rounding_noise",
    "scalar_loss",
    "true_fvp",
    "vanishing_fisher",
]

PyTree = Any
_FISHERS = ("true", "empirical")


def true_fvp(skill_logits: Callable) -> curvature.VectorProduct:
    """The true Fisher's matvec ``(params, v, *skill_args) -> F v`` of ``skill_logits``' softmax."""
    return curvature.fisher_vp(skill_logits)


def empirical_fvp(skill_loss: Callable) -> curvature.VectorProduct:
    """The empirical Fisher's matvec ``(params, v, *skill_args) -> F v``, ``F`` the mean of
    ``∇ℓ_i∇ℓ_iᵀ`` over the examples (leading axis of ``skill_args``) of ``skill_loss``.

    Equal (one compiled program) for the same ``skill_loss``."""

    def example_loss(params, example):
        return skill_loss(params, *jax.tree.map(lambda a: a[None], example))

    efvp = curvature.empirical_fisher_vp(example_loss)

    def fvp(params, v, *skill_args):
        return efvp(params, v, tuple(skill_args))

    return curvature.VectorProduct(fvp, ("empirical_skill_fisher", skill_loss))


def cast_output(fisher: Callable) -> curvature.VectorProduct:
    """``fisher`` with its output cast to ``params``' dtypes (equal for the same ``fisher``)."""

    def cast(params, v, *args):
        return jax.tree_util.tree_map(
            lambda o, p: o.astype(p.dtype), fisher(params, v, *args), params
        )

    return curvature.VectorProduct(cast, ("cast_output", fisher))


def fisher_operator(
    fisher: Any, skill_loss: Callable, skill_logits: Any, params: PyTree, skill_args: tuple
) -> tuple[curvature.LinearOperator, str]:
    """The skill Fisher ``F`` at ``params`` as a :class:`geomcollapse.curvature.LinearOperator`
    (``skill_args`` its data) and its label; ``fisher`` checked once here."""
    fvp, name = _fisher_vp(fisher, skill_loss, skill_logits, params, skill_args)
    return curvature.linear_operator(fvp, params, *skill_args), name


def _fisher_vp(
    fisher: Any, skill_loss: Callable, skill_logits: Any, params: PyTree, skill_args: tuple
) -> tuple[Callable, str]:
    """The skill Fisher's matvec ``fvp(params, v, *skill_args)`` and its label, checked."""
    if callable(fisher):
        return check_matvec_output(fisher, params, skill_args), "custom"
    if fisher not in _FISHERS:
        raise ValueError(
            f"fisher must be 'true', 'empirical' or a matvec fisher_vp(params, v, *skill_args), "
            f"got {fisher!r}"
        )
    if fisher == "true":
        if skill_logits is None or not callable(skill_logits):
            raise ValueError(
                "skill_logits is required for fisher='true': the logits whose softmax is the "
                "skill's output distribution, skill_logits(params, *skill_args) -> (..., C)"
            )
        out = evaluate_abstractly(
            skill_logits, (params, *skill_args), "skill_logits", "skill_logits(params, *skill_args)"
        )
        shape = getattr(out, "shape", None)
        if shape is None or not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                f"skill_logits must return floating logits of shape (..., C), got "
                f"{shape or type(out).__name__}"
            )
        if len(shape) < 2 or shape[-1] < 2:
            # (N,) would be read as ONE categorical over N classes (e.g. a binary
            # classifier's single logit per example): refuse rather than guess.
            raise ValueError(
                f"skill_logits must return logits of shape (N, ..., C) with an example axis "
                f"and C ≥ 2 classes, got shape {shape}; for one example return z[None], "
                "for one logit z per example (a binary classifier) "
                "jnp.stack([jnp.zeros_like(z), z], -1)"
            )
        return true_fvp(skill_logits), "true"
    leaves = jax.tree.leaves(skill_args)
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        raise ValueError(
            "skill_args must hold arrays sharing one leading example axis for fisher="
            f"'empirical' (per-example gradients), got leading sizes {sorted(map(str, sizes))}"
        )
    # per-example gradients call skill_loss on batches of one example
    first = tuple(jax.tree.map(lambda a: a[:1], skill_args))
    scalar_loss(
        skill_loss, params, first, "skill_loss", "skill_loss(params, *skill_args) on one example"
    )
    return empirical_fvp(skill_loss), "empirical"


def check_matvec_output(fisher: Callable, params: PyTree, skill_args: tuple) -> Callable:
    """A custom ``fisher(params, v, *skill_args)`` must return floating arrays shaped like
    ``params``; one of another floating dtype (a float64 ``F v`` for float32 params) is
    cast to ``params``' dtypes. Returns the matvec to use."""
    out = evaluate_abstractly(
        fisher, (params, params, *skill_args), "fisher", "fisher(params, v, *skill_args)"
    )
    want = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(out)

    def leaves(tree) -> list[str]:
        return [f"{jnp.dtype(a.dtype).name}{list(np.shape(a))}" for a in jax.tree.leaves(tree)]

    shapes_ok = got == want and all(
        np.shape(o) == np.shape(p) and jnp.issubdtype(o.dtype, jnp.floating)
        for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True)
    )
    if not shapes_ok:
        raise ValueError(
            "fisher must return F v as a pytree like params (same structure and shapes, "
            f"floating): params have {want.num_leaves} leaves "
            f"{', '.join(leaves(params))[:200]}; it returned {got.num_leaves}: "
            f"{', '.join(leaves(out))[:200]}"
        )
    if leaves(out) == leaves(params):
        return fisher
    return cast_output(fisher)


def refuse_rounding_noise(along_v1: Callable, params: PyTree, trace: float, key) -> None:
    """Refuse an empirical Fisher that is rounding noise, whatever its symmetry.

    At a minimum of the loss it is built from every per-example gradient is 0 up
    to rounding, and what is left is not a property of the model: moving ``θ*``
    by four units in the last place of each entry (``θ_j(1 ± 4·eps)``) redraws
    it. ``q(θ) = v₁ᵀF(θ)v₁`` along the top eigenvector then changes by ``O(q)``,
    while a real empirical Fisher, with per-example residuals ``r`` well above
    rounding (``r ≫ eps·|z|``, ``z`` the logits), changes by about ``8·eps·|z|/r``
    of itself. A change above half of ``q`` is refused. Scale-free: the loss's
    units and ``θ``'s cancel in the ratio (a loss scaled by 1e-12, far from its
    minimum, is kept).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [
        a + 4 * jnp.finfo(a.dtype).eps * jnp.abs(a) * jax.random.rademacher(k, a.shape, a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    q0 = along_v1(params)
    q1 = along_v1(jax.tree_util.tree_unflatten(treedef, moved))
    if not abs(q1 - q0) <= 0.5 * max(abs(q0), abs(q1)):
        raise ValueError(
            vanishing_fisher(
                "empirical",
                trace,
                f"v₁ᵀFv₁ = {q0:.3g} becomes {q1:.3g} when θ* moves by 4 units in the last "
                "place: rounding noise",
            )
        )


def bad_fisher(
    fisher_name: str, tr: float | None, asymmetry: str = "", min_eigenvalue: float | None = None
) -> str:
    """The message refusing a skill Fisher at ``θ*``: zero (or rounding noise), not
    symmetric (``asymmetry`` says by how much) or not positive semidefinite.

    An empirical Fisher that vanishes at a minimum is rounding noise, which is
    neither symmetric nor of one sign: for it every failure reads as vanishing.
    """
    if tr is not None and not np.isfinite(tr):
        return (
            f"fisher: the skill Fisher is not finite at params (tr F = {tr}): check its "
            "matvec, skill_logits and skill_args for NaN or inf"
        )
    if fisher_name != "empirical":
        if asymmetry:
            return (
                f"fisher: the skill Fisher's matvec is not symmetric at params ({asymmetry}); "
                "it must compute F v for a symmetric positive semidefinite F"
            )
        if tr is not None and tr < 0:
            return (
                f"fisher: the skill Fisher is not positive semidefinite at params "
                f"(tr F = {tr:.3g} < 0); a Fisher Jᵀ Λ J has no negative eigenvalue"
            )
        if min_eigenvalue is not None:
            return (
                f"fisher: the skill Fisher is not positive semidefinite at params (smallest "
                f"eigenvalue {min_eigenvalue:.3g}, tr F = {tr:.3g})"
            )
    return vanishing_fisher(fisher_name, tr, asymmetry)


def vanishing_fisher(fisher_name: str, tr: float | None, detail: str = "") -> str:
    """The message for a skill Fisher that is zero (or rounding noise) at ``θ*``."""
    hint = (
        ": the empirical Fisher vanishes at a minimum of the skill loss it is built from "
        "(every per-example gradient is 0 there, up to rounding); use fisher='true' with "
        "skill_logits"
        if fisher_name == "empirical"
        else ""
    )
    size = "" if tr is None else f"tr F = {tr:.3g}"
    if detail:
        size = f"{size}; {detail}" if size else detail
    return f"fisher: the skill Fisher vanishes at params ({size}){hint}"
