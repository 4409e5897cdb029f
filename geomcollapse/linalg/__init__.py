"""Spectra of symmetric operators: Lanczos top-k, SLQ densities, exact Gram route."""

from geomcollapse.linalg._contract import (
    Eigenpairs,
    certifiable_tol,
    certification_dtype,
    default_tol,
    min_certifiable_tol,
)
from geomcollapse.linalg._gram import empirical_fisher_eigenpairs
from geomcollapse.linalg._lanczos import lanczos_basis, top_eigenpairs
from geomcollapse.linalg._slq import SpectralDensity, density_on_grid, spectral_density
from geomcollapse.linalg._traced import (
    LanczosRun,
    Ritz,
    TracedEigenpairs,
    is_symmetric_run,
    lanczos,
    ritz,
    top_eigenpairs_traced,
)

__all__ = [
    "Eigenpairs",
    "LanczosRun",
    "Ritz",
    "SpectralDensity",
    "TracedEigenpairs",
    "certifiable_tol",
    "certification_dtype",
    "default_tol",
    "density_on_grid",
    "empirical_fisher_eigenpairs",
    "is_symmetric_run",
    "lanczos",
    "lanczos_basis",
    "min_certifiable_tol",
    "ritz",
    "spectral_density",
    "top_eigenpairs",
    "top_eigenpairs_traced",
]
