"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.landscapes` (quadratic
landscapes with exact AIC numbers, logistic landscapes), :mod:`geomcollapse.flow`
(exact, ODE and optimizer flows), :mod:`geomcollapse.theory` (AIC report, series, exponent
fits), :mod:`geomcollapse.aic` (the AIC measured on any model),
:mod:`geomcollapse.models` (small reference models and data).
"""

import os

# Batched LAPACK calls (vmapped ``eigh`` in sweeps and benchmarks) run inside
# XLA's CPU thread pool; with OpenBLAS threading on as well they can hang on
# small machines (reproduced here: a vmapped eigh of 128 matrices 256 × 256
# never returns on 2 cores; fine with one OpenBLAS thread; cf. jax-ml/jax#28871,
# OpenMathLib/OpenBLAS#660). A default only: an explicit setting wins, and it
# takes effect only if numpy/scipy are imported after geomcollapse.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from geomcollapse import aic, curvature, flow, landscapes, linalg, models, theory

__version__ = "0.1.0"
__all__ = ["aic", "curvature", "flow", "landscapes", "linalg", "models", "theory"]
