"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.landscapes` (quadratic
landscapes with exact AIC numbers), :mod:`geomcollapse.flow` (exact flows and
gradient descent), :mod:`geomcollapse.theory` (AIC report, series, exponent
fits), :mod:`geomcollapse.models` (small reference models and data).
"""

from geomcollapse import curvature, flow, landscapes, linalg, models, theory

__version__ = "0.1.0"
__all__ = ["curvature", "flow", "landscapes", "linalg", "models", "theory"]
