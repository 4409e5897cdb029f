"""Block-diagonal approximations of a curvature operator over a partition of the parameter pytree.

A partition groups the leaves of ``params`` (by leaf path, see
:func:`geomcollapse.curvature.leaf_paths`). The block-diagonal operator keeps
each group's own block ``A_gg`` of a symmetric operator ``A`` (the Fisher, the
GGN, the Hessian) and drops every cross-group block ``A_gh`` (``g ≠ h``): per
tensor, every leaf is alone; per layer, the leaves under one layer share a
block (``blocks/0/...``). Its spectrum is the union of the blocks' spectra.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from geomcollapse._checks import same_structure
from geomcollapse.curvature._operator import VectorProduct
from geomcollapse.curvature._pytree import leaf_paths

PyTree = Any
Grouping = str | Callable[[str], Hashable] | Sequence[Sequence[str]]

_INDEX = re.compile(r"^\d+$")


def layer_key(path: str) -> str:
    """The layer a leaf path belongs to: up to its first integer component, else its first.

    ``'blocks/0/fc1/kernel/value' → 'blocks/0'``, ``'head/kernel/value' → 'head'``,
    ``'1/w' → '1'`` (an MLP given as a list of layers).
    """
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return "/".join(parts[: i + 1])
    return parts[0]


def leaf_groups(params: PyTree, by: Grouping = "tensor") -> tuple[tuple[str, ...], ...]:
    """Partition the leaf paths of ``params`` into groups, in ``tree_leaves`` order.

    Args:
      params: parameter pytree.
      by: ``'tensor'`` (every leaf alone), ``'layer'`` (grouped by
        :func:`layer_key`), a function ``path -> key`` (leaves with equal keys
        share a group), or an explicit sequence of groups of paths, which must
        name every leaf exactly once.

    Returns:
      The groups, each a tuple of leaf paths; groups ordered by their first leaf.

    Raises:
      ValueError: an unknown ``by``, or explicit groups that name a path twice,
        name an unknown path, leave a leaf out or hold an empty group.
    """
    paths = leaf_paths(params)
    if by == "tensor":
        return tuple((p,) for p in paths)
    if by == "layer":
        by = layer_key
    if isinstance(by, str):
        raise ValueError(f"by must be 'tensor', 'layer', a callable or groups of paths, got {by!r}")
    if callable(by):
        groups: dict[Hashable, list[str]] = {}
        for p in paths:
            groups.setdefault(by(p), []).append(p)
        return tuple(tuple(g) for g in groups.values())
    explicit = [tuple(g) for g in by]
    named = [p for g in explicit for p in g]
    if any(len(g) == 0 for g in explicit):
        raise ValueError("groups must not be empty")
    if len(set(named)) != len(named):
        raise ValueError("groups name a leaf path more than once")
    unknown = set(named) - set(paths)
    if unknown:
        raise ValueError(f"groups name paths absent from params: {sorted(unknown)}")
    missing = [p for p in paths if p not in set(named)]
    if missing:
        raise ValueError(f"groups leave out the leaves {missing}")
    order = {p: i for i, p in enumerate(paths)}
    explicit = [tuple(sorted(g, key=order.__getitem__)) for g in explicit]
    return tuple(sorted(explicit, key=lambda g: order[g[0]]))


def _masks(params: PyTree, by: Grouping) -> jax.Array:
    """``(G, num_leaves)`` 0/1: leaf ``i`` belongs to group ``g``."""
    paths = leaf_paths(params)
    groups = leaf_groups(params, by)
    index = {p: i for i, p in enumerate(paths)}
    rows = [[0.0] * len(paths) for _ in groups]
    for g, group in enumerate(groups):
        for p in group:
            rows[g][index[p]] = 1.0
    return jnp.asarray(rows)


def block_diagonal(operator_vp: Callable[..., PyTree], by: Grouping = "tensor") -> VectorProduct:
    """The block-diagonal part of a symmetric operator over a partition of the parameters.

    ``(A_bd v)_g = A_gg v_g``: ``v`` restricted to each group ``g`` (zero
    elsewhere) goes through the full operator and only group ``g``'s part of the
    output is kept. Costs one ``operator_vp`` per group, run one after the other
    in a ``lax.scan`` (one trace, the memory of one matvec).

    Args:
      operator_vp: ``operator_vp(params, v, *args) -> A v``, e.g.
        :func:`geomcollapse.curvature.fisher_vp` ``(logits_fn)``.
      by: the partition, as in :func:`leaf_groups` (``'tensor'``, ``'layer'``,
        a key function or explicit groups).

    Returns:
      ``bd(params, v, *args)``, a pytree like ``params``, as a
      :class:`geomcollapse.curvature.VectorProduct` (``bd.bind(params, *args)``
      is the operator); jit-able (the partition is read from the static pytree
      structure).
    """

    def bd(params: PyTree, v: PyTree, *args: Any) -> PyTree:
        same_structure(params, v, "params", "v")
        masks = _masks(params, by)
        leaves, treedef = jax.tree_util.tree_flatten(v)

        def masked(mask):
            return jax.tree_util.tree_unflatten(
                treedef, [leaf * mask[i].astype(leaf.dtype) for i, leaf in enumerate(leaves)]
            )

        def step(acc, mask):
            out = operator_vp(params, masked(mask), *args)
            out_leaves = jax.tree_util.tree_leaves(out)
            pairs = enumerate(zip(acc, out_leaves, strict=True))
            acc = [a + o * mask[i].astype(o.dtype) for i, (a, o) in pairs]
            return acc, None

        zeros = [jnp.zeros_like(leaf) for leaf in leaves]
        acc, _ = jax.lax.scan(step, zeros, masks)
        return jax.tree_util.tree_unflatten(treedef, acc)

    groups = by if isinstance(by, str) or callable(by) else tuple(tuple(g) for g in by)
    return VectorProduct(bd, ("block_diagonal", operator_vp, groups))
