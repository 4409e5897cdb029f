"""Gradient flows. Exact flow and gradient descent on quadratics, without cancellation.

THEORY §4: for ``L = ½xᵀAx + cᵀx`` the flow ``ẋ = −(Ax + c)``, ``x(0) = 0`` is
``x(t) = −t φ₁(−At) c`` with ``φ₁(z) = (eᶻ − 1)/z``. We evaluate it as
``x(t) = −t c + t² A φ₂(−At) c`` with ``φ₂(z) = (eᶻ − 1 − z)/z²``, so the
component of ``x`` in ``M`` when ``Pc = 0`` (``t² PAφ₂c``) is computed with full
relative accuracy at small ``t`` instead of as a difference of ``O(t)`` terms,
and a singular ``A`` needs no special case (``φ₂(0) = ½``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SERIES_BELOW = 1e-2  # |z| below which φ₁, φ₂ use their Taylor series (error < 1e-16)


def phi1(z: jax.Array) -> jax.Array:
    """``φ₁(z) = (eᶻ − 1)/z``, with ``φ₁(0) = 1``; elementwise, stable near 0."""
    small = jnp.abs(z) < _SERIES_BELOW
    zs = jnp.where(small, 0.0, z)
    series = 1 + z / 2 + z**2 / 6 + z**3 / 24 + z**4 / 120 + z**5 / 720
    return jnp.where(small, series, jnp.expm1(zs) / jnp.where(small, 1.0, zs))


def phi2(z: jax.Array) -> jax.Array:
    """``φ₂(z) = (eᶻ − 1 − z)/z²``, with ``φ₂(0) = ½``; elementwise, stable near 0."""
    small = jnp.abs(z) < _SERIES_BELOW
    zs = jnp.where(small, 1.0, z)
    series = 0.5 + z / 6 + z**2 / 24 + z**3 / 120 + z**4 / 720 + z**5 / 5040
    return jnp.where(small, series, (jnp.expm1(zs) - zs) / zs**2)


def quadratic_flow(A: jax.Array, c: jax.Array, ts: jax.Array) -> jax.Array:
    """Exact gradient flow ``x(t)`` of ``½xᵀAx + cᵀx`` from ``x(0) = 0``.

    Args:
      A: ``(n, n)`` symmetric (any sign, singular allowed).
      c: ``(n,)`` gradient at ``θ*``.
      ts: ``(T,)`` times ``≥ 0``.

    Returns:
      ``(T, n)`` positions ``x(t) = −tc + t²Aφ₂(−At)c`` (via ``eigh(A)``).
    """
    a, U = jnp.linalg.eigh(A)
    cu = U.T @ c
    ts = jnp.asarray(ts, c.dtype)
    # A φ₂(−At) c in A's eigenbasis: a_i φ₂(−a_i t) (Uᵀc)_i.
    coeff = a[None, :] * phi2(-a[None, :] * ts[:, None]) * cu[None, :]
    return -ts[:, None] * c[None, :] + (ts**2)[:, None] * (coeff @ U.T)


def quadratic_gd(A: jax.Array, c: jax.Array, eta: float, ks: jax.Array) -> jax.Array:
    """Gradient descent ``x_{k+1} = x_k − η(Ax_k + c)``, ``x_0 = 0``, in closed form.

    ``x_k = −η Σ_{j<k} (I − ηA)^j c`` (THEORY §4), evaluated in ``A``'s
    eigenbasis as ``−η k c + ...`` without cancellation: each mode's factor is
    ``−η Σ_{j<k}(1 − ηa)^j = expm1(k log1p(−ηa))/a`` (``−ηk`` at ``a = 0``).

    Returns ``(K, n)`` iterates for the step counts ``ks``.
    """
    a, U = jnp.linalg.eigh(A)
    cu = U.T @ c
    ks = jnp.asarray(ks, c.dtype)[:, None]
    ea = eta * a[None, :]
    small = jnp.abs(ea) < 1e-8
    safe = jnp.where(small | (ea >= 1), 0.5, ea)
    # (1 − ηa)^k − 1 via expm1/log1p while 1 − ηa > 0; a plain power past the
    # stability edge ηa ≥ 1, where GD oscillates and the base is ≤ 0.
    base = 1.0 - ea
    odd = jnp.mod(ks, 2.0) == 1.0
    power_minus_one = jnp.where(
        ea >= 1,
        jnp.where(odd & (base < 0), -1.0, 1.0) * jnp.abs(base) ** ks - 1.0,
        jnp.expm1(ks * jnp.log1p(-safe)),
    )
    factor = jnp.where(
        small,
        -eta * ks * (1 - (ks - 1) * ea / 2),
        power_minus_one / jnp.where(small, 1.0, a[None, :]),
    )
    return (factor * cu[None, :]) @ U.T
