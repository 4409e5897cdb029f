"""The floating dtype a caller asked for, refused when JAX would silently narrow it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy floating dtype; ``ValueError`` if JAX cannot honour it.

    With ``jax_enable_x64`` off, JAX turns a float64 request into float32 with
    only a warning; the library's float64 results (≈1e-12 AIC numbers) would
    then be float32 ones, so it refuses instead.
    """
    try:
        out = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {out}")
    if out.itemsize > 4 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{name}={out} needs 64-bit JAX, which is off: call "
            "jax.config.update('jax_enable_x64', True) at start-up (JAX would return float32)"
        )
    return out
