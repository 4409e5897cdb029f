"""Spectra of symmetric operators: Lanczos top-k, SLQ densities, exact Gram route."""

from geomcollapse.linalg._gram import empirical_fisher_eigenpairs
from geomcollapse.linalg._lanczos import Eigenpairs, top_eigenpairs
from geomcollapse.linalg._slq import SpectralDensity, density_on_grid, spectral_density

__all__ = [
    "Eigenpairs",
    "SpectralDensity",
    "density_on_grid",
    "empirical_fisher_eigenpairs",
    "spectral_density",
    "top_eigenpairs",
]
