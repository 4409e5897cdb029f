"""``φ₂``, the exponential integrators' function, stable near 0: shared by flows and losses.

:func:`geomcollapse.flow.quadratic_flow` writes the exact flow with it, and the
cancellation-free KL of :func:`geomcollapse.training.kl_from_logit_change` and
the logistic landscape's ``Δu`` sum ``p δ̃² φ₂(δ̃)`` (docs/theory.md §5.1).
Public as :func:`geomcollapse.flow.phi2`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SERIES_BELOW = 1e-2  # |z| below which φ₂ uses its Taylor series (error < 1e-16)


def phi2(z: jax.Array) -> jax.Array:
    """``φ₂(z) = (eᶻ − 1 − z)/z²``, with ``φ₂(0) = ½``; elementwise, stable near 0."""
    small = jnp.abs(z) < SERIES_BELOW
    zs = jnp.where(small, 1.0, z)
    series = 0.5 + z / 6 + z**2 / 24 + z**3 / 120 + z**4 / 720 + z**5 / 5040
    return jnp.where(small, series, (jnp.expm1(zs) - zs) / zs**2)
