"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.landscapes` (quadratic
landscapes with exact AIC numbers, logistic landscapes), :mod:`geomcollapse.flow`
(exact, ODE and optimizer flows, cancellation-free Δu), :mod:`geomcollapse.subspace`
(M, projections, overlap scores, the orthogonalising correction),
:mod:`geomcollapse.theory` (AIC report, series, exponent fits), :mod:`geomcollapse.aic`
(the AIC measured on any model), :mod:`geomcollapse.series` (Taylor forecast of Δu(t)),
:mod:`geomcollapse.models` (small reference models, the transformer, LoRA and data).
Imported on demand (they pull in optax/orbax): :mod:`geomcollapse.tasks` (synthetic
token tasks), :mod:`geomcollapse.training` (losses, metrics, decoding, training loop),
:mod:`geomcollapse.checkpoint` (orbax save/restore), :mod:`geomcollapse.pipeline`
(pretrain → align → fine-tune, skill Fisher).
"""

import os

# Threaded OpenBLAS inside XLA's CPU thread pool oversubscribes small machines
# (the LAPACK behind jnp.linalg.eigh and scipy's eigsh; one run here hung), and
# one BLAS thread is as fast here. A default only: an explicit setting wins, and
# it takes effect only if numpy/scipy are first imported after geomcollapse.
# (XLA's own pool can still deadlock on vmapped batched eigh: see
# landscapes.summarize_batch; cf. jax-ml/jax#28871.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from geomcollapse import (
    aic,
    curvature,
    flow,
    landscapes,
    linalg,
    models,
    series,
    subspace,
    theory,
)

__version__ = "0.1.0"
__all__ = [
    "aic",
    "curvature",
    "flow",
    "landscapes",
    "linalg",
    "models",
    "series",
    "subspace",
    "theory",
]
