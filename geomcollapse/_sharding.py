"""Vectors laid out like sharded parameters: detection, layouts and pytree linear algebra.

When the parameters ``θ`` are ``jax.Array`` leaves spread over a device mesh
(``NamedSharding``), the library keeps every vector of ``R^n`` it builds — Lanczos
basis rows, eigenvectors, probes, ``g`` and ``Hg`` — as a pytree shaped and
sharded like ``θ`` (a stack of ``k`` vectors: the same leaves with a leading
unsharded ``k`` axis). A flat ``(n,)`` vector would be a concatenation of the
leaves: on a mesh that is a reshuffle of every parameter across devices (or a
gather of all of them onto one), each time a vector is raveled or unraveled.
In the pytree layout a dot product is a per-device partial sum and one
all-reduce of a scalar; nothing of size ``n`` moves.

Dot products are written as ``sum(x * y)`` rather than ``dot``: a contraction
over a sharded axis needs an explicit output sharding on meshes with
``AxisType.Explicit`` axes, an elementwise product and a full sum do not.

Small arrays the library makes on the host (coefficients, eigenvalues) are put
on the mesh explicitly, replicated (``jax.device_put``), so that no array
created on the default device is moved implicitly next to sharded ones, and
the numbers the host needs come back through ``jax.device_get``: runs pass
under ``jax.transfer_guard_device_to_device("disallow")`` and
``jax.transfer_guard_device_to_host("disallow")`` (tests/test_sharding.py).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def traced(tree: PyTree) -> bool:
    """Whether any leaf of ``tree`` is a tracer (inside ``jit``, ``vmap``, ``grad``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def one_device(tree: PyTree) -> jax.sharding.Sharding | None:
    """The one-device sharding that ``tree``'s committed arrays share; None when it has
    none, when they span several devices, or under a trace."""
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    placed = {x.sharding for x in leaves if isinstance(x, jax.Array) and x.committed}
    if len(placed) != 1 or len(next(iter(placed)).device_set) != 1:
        return None
    return next(iter(placed))


def on_one_device_mesh(tree: PyTree) -> PyTree:
    """``tree``'s arrays on a mesh of one device (its committed device, else JAX's
    default), replicated: unsharded parameters laid out as a :class:`Layout` reads them,
    so they take the sharded parameters' code path. Copies nothing already there."""
    placed = one_device(tree)
    device = next(iter(placed.device_set)) if placed is not None else jax.devices()[0]
    sharding = NamedSharding(jax.sharding.Mesh(np.array([device]), ("one",)), P())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def uncommitted(tree: PyTree) -> bool:
    """Whether ``tree`` is not a committed ``jax.Array`` (numpy, a Python number, or an
    array JAX may still move), judged by its first leaf: a vector is made whole, by one
    computation or from one host array (a check per call, a few microseconds). False
    under a trace."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or isinstance(leaves[0], jax.core.Tracer):
        return False
    return not (isinstance(leaves[0], jax.Array) and leaves[0].committed)


def is_sharded(tree: PyTree) -> bool:
    """Whether some leaf of ``tree`` is a concrete ``jax.Array`` placed on more than one device."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            if len(leaf.sharding.device_set) > 1:
                return True
    return False


class Layout:
    """The layout of a parameter pytree on a mesh: shardings, sizes, one dtype.

    Built from a sharded ``like``; raises ``ValueError`` naming ``name`` when a
    leaf is not a ``NamedSharding`` array on the common mesh, or when the
    leaves' dtypes differ (a stacked basis holds one dtype).
    """

    def __init__(self, like: PyTree, name: str = "like"):
        leaves, self.treedef = jax.tree_util.tree_flatten(like)
        meshes = set()
        for i, leaf in enumerate(leaves):
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, NamedSharding):
                raise ValueError(
                    f"{name} leaf {i} is not a jax.Array with a NamedSharding "
                    f"(got {type(sharding).__name__}): put every leaf of sharded "
                    "parameters on the mesh with jax.device_put(x, NamedSharding(mesh, spec))"
                )
            meshes.add(sharding.mesh)
        if len(meshes) != 1:
            raise ValueError(f"{name} leaves lie on {len(meshes)} different meshes; use one")
        dtypes = {leaf.dtype for leaf in leaves}
        if len(dtypes) != 1:
            raise ValueError(
                f"{name} mixes dtypes {sorted(str(d) for d in dtypes)}: sharded parameters "
                "need one floating dtype"
            )
        self.mesh = meshes.pop()
        self.dtype = leaves[0].dtype
        self.shapes = tuple(leaf.shape for leaf in leaves)
        self.sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)
        self.n = int(sum(self.sizes))
        self.specs = tuple(leaf.sharding.spec for leaf in leaves)
        self.shardings = jax.tree_util.tree_unflatten(
            self.treedef, [leaf.sharding for leaf in leaves]
        )
        self.replicated = NamedSharding(self.mesh, P())
        self.stacked = jax.tree_util.tree_unflatten(
            self.treedef, [NamedSharding(self.mesh, P(None, *s)) for s in self.specs]
        )

    def key(self) -> tuple:
        """A hashable description: a ``Layout`` is a static argument of compiled kernels."""
        return (self.treedef, self.shapes, str(self.dtype), self.mesh, self.specs)

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.key() == other.key()

    def put(self, x: Any) -> jax.Array:
        """A small host array (or scalar) on the mesh, replicated, explicitly."""
        return jax.device_put(np.asarray(x), self.replicated)

    def unravel(self, flat: jax.Array) -> PyTree:
        """The ``(…, n)`` flat rows as a pytree like the parameters (``ravel_pytree`` order)."""
        lead = flat.shape[:-1]
        offsets = np.cumsum((0, *self.sizes))
        leaves = [
            flat[..., offsets[i] : offsets[i + 1]].reshape(*lead, *shape)
            for i, shape in enumerate(self.shapes)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    """``⟨a, b⟩`` over all leaves (per-device partial sums and one all-reduce on a mesh)."""
    terms = [jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), _leaves(b), strict=True)]
    return functools.reduce(operator.add, terms)


def tree_norm(a: PyTree) -> jax.Array:
    """``‖a‖``."""
    return jnp.sqrt(tree_dot(a, a))


def stack_dot(stack: PyTree, x: PyTree) -> jax.Array:
    """``(k,)`` ``⟨stack_i, x⟩`` for a stack (leaves with a leading ``k`` axis) and a vector;
    the scalar ``⟨stack, x⟩`` when ``stack`` is a vector like ``x``.

    A ``dot`` per leaf, not a multiply-and-sum: jaxlib 0.10.2's CPU compiler fuses the
    vmapped multiply-and-sum with the ``z − (zVᵀ)V`` that follows it into one library
    ("YNN") kernel that is wrong in float32 for batches of 16 or more probes (rows off by
    up to 65 % of their norm: tests/test_stack_products.py keeps the cases); as dots it is
    right.
    """
    terms = [
        jnp.tensordot(s, y, axes=y.ndim, precision=_HIGHEST)
        for s, y in zip(jax.tree_util.tree_leaves(stack), _leaves(x), strict=True)
    ]
    return functools.reduce(operator.add, terms)


def stack_combine(coeffs: jax.Array, stack: PyTree) -> PyTree:
    """``Σ_i coeffs[..., i] stack_i``: a vector (``coeffs`` ``(k,)``) or a stack (``(m, k)``)."""
    return jax.tree_util.tree_map(
        lambda s: jnp.tensordot(coeffs, s, axes=1, precision=_HIGHEST), stack
    )


def _leaves(tree: PyTree) -> list:
    return jax.tree_util.tree_leaves(tree)
