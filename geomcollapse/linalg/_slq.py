"""Stochastic Lanczos quadrature (SLQ) estimate of a spectral density.

For a unit probe ``z``, Lanczos with ``T = S diag(θ) Sᵀ`` gives the Gauss
quadrature ``zᵀ f(A) z ≈ Σ_j S_{0j}² f(θ_j)``; averaging over random probes
estimates ``(1/n) Σ_i f(λ_i)``, i.e. the spectral density as nodes ``θ`` with
weights ``S_{0j}²`` (each probe's weights sum to 1). Reuses the Lanczos core of
:mod:`geomcollapse.linalg._lanczos` (any placement, sharded parameters
included) and its operator scaling: each probe runs on ``A / s`` with
``s = max|A z|`` and its nodes are multiplied back by ``s``, so ``c·A`` gives
nodes ``c·θ`` and the same weights (float32 at ``c = 1e-30``: the unscaled
recurrence underflowed and the top node was off by 45-96 %). A breakdown
(the contract's zero level) ends a probe early (the quadrature is then
exact) and its missing nodes carry zero weight.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse._checks import positive_float, positive_int, prng_key
from geomcollapse.linalg._lanczos import (
    Placement,
    key_home,
    placed_operator,
    run_lanczos,
    scaled_operator,
    tridiagonal,
)
from geomcollapse.progress import progress_bar

PyTree = Any


class SpectralDensity(NamedTuple):
    """SLQ quadrature: ``nodes`` and ``weights``, each ``(num_probes, num_steps)``.

    ``weights`` sum to 1 along the last axis; the density estimate is
    ``mean_probes Σ_j weights δ(λ − nodes)``.
    """

    nodes: np.ndarray
    weights: np.ndarray


def spectral_density(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 16,
    num_steps: int = 64,
    progress: bool = False,
) -> SpectralDensity:
    """SLQ quadrature nodes and weights of a symmetric operator.

    Args:
      matvec: a :class:`geomcollapse.curvature.LinearOperator`, or ``v -> A v``
        on vectors like ``like`` (1-D array or pytree).
      like: example vector fixing shape and dtype.
      key: ``jax.random`` key for the Rademacher probes.
      num_probes: number of random probes.
      num_steps: Lanczos steps per probe (clamped to ``n``).
      progress: show a progress bar over probes.

    Returns:
      :class:`SpectralDensity` (float64 numpy arrays).
    """
    key = prng_key(key)
    apply, at, _ = placed_operator(matvec, like)
    num_probes = positive_int(num_probes, "num_probes")
    num_steps = min(positive_int(num_steps, "num_steps"), at.n)
    nodes = np.zeros((num_probes, num_steps))
    weights = np.zeros((num_probes, num_steps))
    for p in progress_bar(range(num_probes), desc="slq", enabled=progress):
        z = _probe(jax.device_put(jax.random.fold_in(key, p), key_home(at)), at)
        scaled, first, s = scaled_operator(apply, apply(z), at)
        basis = run_lanczos(
            scaled,
            z,
            num_steps,
            stop=lambda *_: False,
            restart_key=None,
            first_product=first,
            at=at,
        )
        theta, S = np.linalg.eigh(tridiagonal(basis.alphas, basis.betas))
        m = theta.size
        nodes[p, :m] = theta * s
        weights[p, :m] = S[0, :] ** 2
    return SpectralDensity(nodes=nodes, weights=weights)


@partial(jax.jit, static_argnums=1)
def _probe(key: jax.Array, at: Placement) -> PyTree:
    """A unit Rademacher probe ``z/√n``, drawn flat and placed like the vectors."""
    z = jax.random.rademacher(key, (at.n,), at.dtype)
    return at.from_flat(z / jnp.sqrt(jnp.asarray(at.n, at.dtype)))


def density_on_grid(density: SpectralDensity, grid: np.ndarray, *, sigma: float) -> np.ndarray:
    """Gaussian-smoothed spectral density evaluated on ``grid``.

    Returns ``(len(grid),)``: ``mean_p Σ_j w_pj N(grid; θ_pj, σ²)``, which
    integrates to 1 over the real line.
    """
    sigma = positive_float(sigma, "sigma")
    if not isinstance(density, SpectralDensity):
        raise ValueError(f"density must be a SpectralDensity, got {type(density).__name__}")
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or not np.all(np.isfinite(grid)):
        raise ValueError(f"grid must be a 1-D array of finite points, got shape {grid.shape}")
    diff = grid[:, None, None] - density.nodes[None]
    kernel = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    return np.mean(np.sum(density.weights[None] * kernel, axis=-1), axis=-1)
