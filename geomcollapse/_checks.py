"""Input validation shared by the library: clear ``ValueError``s, never deep traces."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def floating_leaves(tree: Any, name: str) -> list:
    """Return the leaves of ``tree``; raise if any is not a floating-point array."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must hold floating-point arrays, got a leaf of dtype {dtype}")
    return leaves


@jax.jit
def _count_non_finite(leaves: list) -> list:
    return [jnp.sum(~jnp.isfinite(x)) for x in leaves]


def finite_leaves(tree: Any, name: str) -> list:
    """Return the floating leaves of ``tree``; raise if any holds NaN or ±inf.

    Only concrete arrays are checked (tracers pass through), so jitted callers
    keep working; the check runs at the library's eager entry points.
    """
    leaves = floating_leaves(tree, name)
    spread = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and len(leaf.sharding.device_set) > 1
    ]
    # Leaves spread over several devices are counted where they live, in one
    # compiled call: one integer per leaf comes back, never the leaf itself.
    counts = jax.device_get(_count_non_finite([leaves[i] for i in spread])) if spread else []
    on_mesh = dict(zip(spread, counts, strict=True))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.core.Tracer):
            continue
        if i in on_mesh:
            bad = int(on_mesh[i])
        else:
            arr = np.asarray(leaf)
            bad = 0 if np.all(np.isfinite(arr)) else int(np.sum(~np.isfinite(arr)))
        if bad:
            where = f" (leaf {i})" if len(leaves) > 1 else ""
            raise ValueError(f"{name} has {bad} non-finite (NaN or inf) entries{where}")
    return leaves


def finite_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def same_structure(
    reference: Any, other: Any, ref_name: str, name: str, *, same_dtype: bool = True
) -> None:
    """Raise unless ``other`` has the tree structure, shapes and dtypes of ``reference``.

    ``same_dtype=False``: any floating dtype (the caller casts).
    """
    ref_def = jax.tree_util.tree_structure(reference)
    other_def = jax.tree_util.tree_structure(other)
    if ref_def != other_def:
        raise ValueError(
            f"{name} does not have the pytree structure of {ref_name}: {other_def} vs {ref_def}"
        )
    ref_leaves = floating_leaves(reference, ref_name)
    for i, (a, b) in enumerate(zip(ref_leaves, jax.tree_util.tree_leaves(other), strict=True)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name} leaf {i} has shape {np.shape(b)}, {ref_name} has {np.shape(a)}"
            )
        dtype = getattr(b, "dtype", None)
        if not same_dtype:
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} leaf {i} has dtype {dtype}, not a floating-point one")
            continue
        if dtype != a.dtype:
            raise ValueError(
                f"{name} leaf {i} has dtype {getattr(b, 'dtype', type(b))}, "
                f"{ref_name} has {a.dtype}"
            )


def float_vector(x: Any, name: str) -> None:
    """Raise unless ``x`` is a 1-D floating-point array (concrete entries also finite)."""
    if np.ndim(x) != 1:
        raise ValueError(f"{name} must be a 1-D array (n,), got shape {np.shape(x)}")
    finite_leaves(x, name)


def positive_float_or_traced(value: Any, name: str) -> Any:
    """``positive_float(value)`` for a concrete number; a tracer passes through unchanged."""
    return value if isinstance(value, jax.core.Tracer) else positive_float(value, name)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, raising unless it is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


_NOT_NUMBERS = (str, bytes, bool, np.bool_)  # float() reads them, but they are no numbers


def probe_count(value: Any, name: str = "num_probes") -> int:
    """Return ``value`` as an int, raising unless it is an integer ≥ 2 (a standard error)."""
    count = positive_int(value, name)
    if count < 2:
        raise ValueError(f"{name} must be ≥ 2 for a standard error")
    return count


def positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite number > 0 (not a string)."""
    if isinstance(value, _NOT_NUMBERS):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def open_unit_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a number in ``(0, 1)``.

    Python and numpy numbers (``np.float32(0.9)``) alike; strings, bytes and
    bools are refused.
    """
    try:
        out = positive_float(value, name)
    except ValueError:
        out = math.inf
    if not out < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return out


def subspace_dim(value: Any, n: int) -> int:
    """``d = value`` as an int, raising unless ``1 ≤ d < n`` (``M`` must be a proper subspace)."""
    d = positive_int(value, "d")
    if d >= n:
        raise ValueError(f"d={d} must be smaller than n={n}, the number of parameters")
    return d


def prng_key(key: Any, name: str = "key") -> jax.Array:
    """Raise unless ``key`` is one JAX PRNG key: typed of shape ``()``, or raw uint32[2].

    A batch of keys (``jax.random.split(key, 2)``) is refused: every consumer
    splits or folds one key.
    """
    if key is None:
        raise ValueError(f"{name} is required: pass a jax.random key")
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if np.shape(key) != ():
            raise ValueError(
                f"{name} must be a single jax.random key (shape ()), got a batch of keys of "
                f"shape {np.shape(key)}"
            )
        return key
    if dtype == jnp.uint32 and np.shape(key) == (2,):
        return key
    if dtype == jnp.uint32 and np.shape(key)[-1:] == (2,):
        raise ValueError(
            f"{name} must be a single jax.random key (raw: uint32[2]), got a batch of raw keys "
            f"of shape {np.shape(key)}"
        )
    raise ValueError(f"{name} must be a jax.random key, got {type(key).__name__}")


def tuple_arg(value: Any, name: str) -> tuple:
    """``value`` as a tuple of extra arguments (data); ``ValueError`` unless a tuple or list."""
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple, got {type(value).__name__}")
    return tuple(value)


def is_concrete(x: Any) -> bool:
    """A real array (not a tracer, nor a placeholder JAX puts in while unflattening)."""
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
