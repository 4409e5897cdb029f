"""LoRA adapters on any parameter pytree, as pure functions (issue #4).

A weight ``W`` (``(d_in, d_out)``, a kernel leaf selected by path) is replaced
by ``W + s·A B`` with ``A`` ``(d_in, r)``, ``B`` ``(r, d_out)`` and scale
``s = alpha / r``; ``B`` starts at zero, so the adapted model starts at ``θ*``.
The effective full-space update ``Δθ = s·A B`` is available for analysis
(overlap with the sensitive subspace ``M``, Section 7's "intruder" directions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from geomcollapse._checks import positive_float, positive_int, prng_key
from geomcollapse.curvature import leaf_paths, select, substitute

PyTree = Any
DEFAULT_TARGETS = r"(qkv|out|fc1|fc2)/kernel(/value)?$"  # the transformer's attention + MLP weights


def lora_init(
    key: jax.Array, params: PyTree, rank: int, where: str = DEFAULT_TARGETS
) -> dict[str, dict[str, jax.Array]]:
    """Adapters ``{path: {'a': (d_in, r), 'b': (r, d_out)}}`` for the 2-D leaves matching ``where``.

    ``a ~ N(0, 1/d_in)``, ``b = 0``. Raises ``ValueError`` if nothing matches, a
    match is not a matrix, or ``rank`` exceeds ``min(d_in, d_out)``.
    """
    key = prng_key(key)
    rank = positive_int(rank, "rank")
    targets = select(params, where)  # raises ValueError when nothing matches
    adapters = {}
    for k, (path, w) in zip(jax.random.split(key, len(targets)), targets.items(), strict=True):
        if w.ndim != 2:
            raise ValueError(f"LoRA needs matrix leaves; {path} has shape {w.shape}")
        d_in, d_out = w.shape
        if rank > min(d_in, d_out):
            raise ValueError(f"rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} at {path}")
        adapters[path] = {
            "a": jax.random.normal(k, (d_in, rank), w.dtype) / jnp.sqrt(d_in).astype(w.dtype),
            "b": jnp.zeros((rank, d_out), w.dtype),
        }
    return adapters


def lora_update(adapters: dict, alpha: float) -> dict[str, jax.Array]:
    """The effective full-space update ``{path: s·A B}`` with ``s = alpha / r``."""
    alpha = positive_float(alpha, "alpha")
    return {path: (alpha / ab["a"].shape[1]) * (ab["a"] @ ab["b"]) for path, ab in adapters.items()}


def lora_merge(params: PyTree, adapters: dict, alpha: float) -> PyTree:
    """``params`` with every adapted weight replaced by ``W + s·A B``."""
    missing = sorted(set(adapters) - set(leaf_paths(params)))
    if missing:
        raise ValueError(f"adapters name leaves that params does not have: {missing}")
    base = select(params, lambda path: path in adapters)
    update = lora_update(adapters, alpha)
    return substitute(params, {path: base[path] + update[path] for path in adapters})


def lora_apply(fn: Callable[..., Any], alpha: float) -> Callable[..., Any]:
    """``fn(params, *args)`` → ``fn_lora(adapters, params, *args)``, differentiable in adapters."""

    def fn_lora(adapters: dict, params: PyTree, *args: Any) -> Any:
        return fn(lora_merge(params, adapters, alpha), *args)

    return fn_lora
