"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.models` (small
reference models and data).
"""

from geomcollapse import curvature, linalg, models

__version__ = "0.1.0"
__all__ = ["curvature", "linalg", "models"]
