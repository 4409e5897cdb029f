"""Flows at the rounding level: displacements, Δu and GD factors against exact references."""

from decimal import Decimal, localcontext

import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import flow


def _gd_reference(a: float, eta: float, k: int) -> Decimal:
    """``((1 − ηa)^k − 1)/a`` with the floats ``a``, ``η`` taken exactly, to 90 digits."""
    with localcontext() as ctx:
        ctx.prec = 90
        base = 1 - Decimal(a) * Decimal(eta)
        return (base**k - 1) / Decimal(a)


def test_quadratic_gd_factor_has_full_relative_accuracy_for_every_step():
    """``ηa ∈ [1e-14, 1]`` and ``k`` up to 10⁶: ≤ 1e-13 relative to a 90-digit reference.

    A first-order branch for small ``ηa`` was off by ``(kηa)²/6``: 1.35e-5 at
    ``ηa = 9e-9``, ``k = 10⁶``.
    """
    eta = 0.1
    ea = np.concatenate([np.logspace(-14, 0, 29), [9e-9, 1.1e-8, 0.5, 0.999999, 1.0]])
    a = ea / eta
    ks = np.array([0, 1, 2, 3, 7, 50, 1000, 10**5, 10**6])
    # diagonal A: eigh returns a exactly, so the reference sees the same a
    got = np.asarray(flow.quadratic_gd(jnp.diag(jnp.asarray(a)), jnp.ones(a.size), eta, ks))
    worst = 0.0
    for j, aj in enumerate(a):
        for i, k in enumerate(ks):
            ref = _gd_reference(float(aj), eta, int(k))
            if ref == 0:
                assert got[i, j] == 0
                continue
            worst = max(worst, abs(float((Decimal(float(got[i, j])) - ref) / ref)))
    assert worst <= 1e-13, worst


def test_quadratic_gd_zero_mode_edge_and_past_the_edge_equal_the_iteration():
    eta = 0.1
    a = np.array([0.0, 10.0, 15.0, 20.0, 25.0, -3.0])  # ηa = 0, 1, 1.5, 2, 2.5, −0.3
    ks = np.arange(9)
    got = np.asarray(flow.quadratic_gd(jnp.diag(jnp.asarray(a)), jnp.ones(a.size), eta, ks))
    x, ref = np.zeros(a.size), []
    for _ in ks:
        ref.append(x.copy())
        x = x - eta * (a * x + 1.0)
    ref = np.array(ref)
    np.testing.assert_array_equal(got[0], 0.0)  # k = 0
    np.testing.assert_allclose(got[:, 0], -eta * ks, rtol=1e-15)  # a = 0: −ηk
    np.testing.assert_allclose(got[1:, 1], -eta, rtol=1e-15)  # ηa = 1: one step to −c/a
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("ea", [1e-14, 1e-10, 9e-9, 1e-4])
def test_quadratic_gd_small_steps_on_a_rotated_matrix(ea):
    """A non-diagonal ``A`` against the explicit sum ``−η Σ_{j<k} (I − ηA)^j c`` in longdouble."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    spec = np.array([1.0, 0.5, 0.25, 0.0, 2.0])
    A = (Q * spec) @ Q.T
    c = rng.standard_normal(5)
    eta = ea / 2.0
    K = 3000  # large enough that a first-order (kηa)² error would show at ηa = 9e-9
    got = np.asarray(flow.quadratic_gd(jnp.asarray(A), jnp.asarray(c), eta, np.arange(K + 1)))
    # per-mode factors summed in long double in the eigenbasis numpy finds
    lam, V = np.linalg.eigh(A)
    b = 1 - np.longdouble(eta) * lam.astype(np.longdouble)
    powers = np.cumprod(np.vstack([np.ones(5, np.longdouble), np.tile(b, (K, 1))]), axis=0)
    sums = np.cumsum(np.vstack([np.zeros(5, np.longdouble), powers[:-1]]), axis=0)
    ref = np.asarray((-np.longdouble(eta) * sums * (V.T @ c)) @ V.T, np.float64)
    err = np.linalg.norm(got[1:] - ref[1:], axis=1) / np.linalg.norm(ref[1:], axis=1)
    assert err.max() < 1e-13, err.max()
