"""Pytree ↔ flat-vector helpers and restriction of a function to a parameter block."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import floating_leaves

PyTree = Any


def ravel(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flatten a pytree of floating arrays into ``(flat (n,), unravel)``.

    Thin wrapper over ``jax.flatten_util.ravel_pytree`` that rejects
    non-floating leaves with a ``ValueError``.
    """
    floating_leaves(tree, "tree")
    return ravel_pytree(tree)


def num_params(tree: PyTree) -> int:
    """Total number of scalars in a pytree."""
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: PyTree) -> list[str]:
    """``'/'``-joined path of every leaf, in ``tree_leaves`` order (e.g. ``'fc1/kernel'``)."""
    with_path = jax.tree_util.tree_leaves_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in with_path]


def params_layout(tree: PyTree) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(path, shape)`` of every leaf in ``ravel_pytree`` order: how a raveled ``(n,)``
    vector maps onto ``tree``. Paths are :func:`leaf_paths` without an nnx Variable's
    trailing ``.value`` attribute, so an ``nnx.State`` and its ``to_pure_dict()`` have one
    layout (a module named ``value`` keeps its name)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        shape = tuple(int(s) for s in np.shape(leaf))
        out.append(("/".join(_key_name(k) for k in path), shape))
    return tuple(out)


def as_layout(pairs: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``pairs`` of ``(path, shape)`` (e.g. read back from JSON lists) as a layout of
    :func:`params_layout`'s form: strings and tuples of ints."""
    return tuple((str(p), tuple(int(s) for s in shape)) for p, shape in pairs)


def check_layout(tree: PyTree, layout: Any, name: str, against: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tree`` has ``layout``
    (:func:`params_layout`): the same leaves, paths and shapes, in the same order, so
    that ``(n,)`` rows raveled from one are the same coordinates of the other."""
    found, expected = params_layout(tree), as_layout(layout)
    if found == expected:
        return
    where = next(
        (i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
        min(len(found), len(expected)),
    )
    got = found[where] if where < len(found) else "no leaf"
    want = expected[where] if where < len(expected) else "no leaf"
    raise ValueError(
        f"{name} is laid out unlike {against}: leaf {where} is {got}, expected {want} "
        f"({len(found)} leaves against {len(expected)}); the raveled rows would pair "
        f"other coordinates. Pass {name} with the pytree structure, leaf order and shapes "
        "that were diagnosed"
    )


def select(params: PyTree, where: str | Callable[[str], bool]) -> dict[str, jax.Array]:
    """The block of ``params`` whose leaf paths match ``where``.

    Args:
      params: parameter pytree.
      where: a regular expression searched in each leaf path (see
        :func:`leaf_paths`), or a predicate ``path -> bool``.

    Returns:
      ``{path: leaf}`` for the selected leaves (a pytree usable as parameters).
    """
    if isinstance(where, str):
        pattern = re.compile(where)

        def keep(path: str) -> bool:
            return pattern.search(path) is not None
    elif callable(where):
        keep = where
    else:
        raise ValueError(f"where must be a regex string or a callable, got {where!r}")
    paths = leaf_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    block = {p: leaf for p, leaf in zip(paths, leaves, strict=True) if keep(p)}
    if not block:
        raise ValueError(f"where={where!r} selects no parameter; paths are {paths}")
    return block


def substitute(params: PyTree, block: dict[str, jax.Array]) -> PyTree:
    """``params`` with the leaves named in ``block`` replaced by ``block``'s values.

    Raises ``ValueError`` naming the key if ``block`` names a path absent from
    ``params`` or holds a leaf whose shape differs from that ``params`` leaf
    (shapes are static, so this holds under ``jit`` too).
    """
    if not isinstance(block, Mapping):
        raise ValueError(f"block must be a dict of path -> array, got {type(block).__name__}")
    paths = leaf_paths(params)
    unknown = set(block) - set(paths)
    if unknown:
        raise ValueError(f"block names paths absent from params: {sorted(unknown)}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for p, leaf in zip(paths, leaves, strict=True):
        if p in block and np.shape(block[p]) != np.shape(leaf):
            raise ValueError(
                f"block[{p!r}] has shape {np.shape(block[p])}, "
                f"but params leaf {p!r} has shape {np.shape(leaf)}"
            )
    new = [block.get(p, leaf) for p, leaf in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def restrict(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``fn(params, *args)`` into ``fn_block(block, params, *args)``.

    The returned function differentiates only through ``block`` (from
    :func:`select`); the other parameters are an ordinary argument, not a
    closure, so jit does not bake them in as constants. Use it with any
    operator factory, e.g. ``hessian_vp(restrict(loss))(block, v, params, batch)``.
    A ``block`` leaf whose shape differs from the ``params`` leaf it replaces
    raises ``ValueError`` naming its key (see :func:`substitute`).
    """

    def fn_block(block: dict[str, jax.Array], params: PyTree, *args: Any) -> Any:
        return fn(substitute(params, block), *args)

    return fn_block
