"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.landscapes` (quadratic
landscapes with exact AIC numbers, logistic landscapes), :mod:`geomcollapse.flow`
(exact, ODE and optimizer flows), :mod:`geomcollapse.theory` (AIC report, series, exponent
fits), :mod:`geomcollapse.aic` (the AIC measured on any model),
:mod:`geomcollapse.models` (small reference models and data).
"""

from geomcollapse import aic, curvature, flow, landscapes, linalg, models, theory

__version__ = "0.1.0"
__all__ = ["aic", "curvature", "flow", "landscapes", "linalg", "models", "theory"]
