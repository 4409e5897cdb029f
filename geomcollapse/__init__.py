"""geomcollapse: the geometry of alignment collapse, reproduced numerically in JAX.

Subpackages: :mod:`geomcollapse.curvature` (matrix-free curvature operators),
:mod:`geomcollapse.linalg` (spectra), :mod:`geomcollapse.landscapes` (quadratic
landscapes with exact AIC numbers, logistic landscapes), :mod:`geomcollapse.flow`
(exact, ODE and optimizer flows, cancellation-free Δu), :mod:`geomcollapse.subspace`
(M, projections, overlap scores, the orthogonalising correction),
:mod:`geomcollapse.defences` (defences as optax gradient transformations),
:mod:`geomcollapse.monitor` (watching a training run: projected loss, overlap, rotation of M),
:mod:`geomcollapse.theory` (AIC report, series, exponent fits), :mod:`geomcollapse.aic`
(the AIC measured on any model), :mod:`geomcollapse.series` (Taylor forecast of Δu(t)),
:mod:`geomcollapse.stats` (rank correlations with bootstrap intervals),
:mod:`geomcollapse.tensor_norm` (the largest value of a derivative tensor on the sphere, SS-HOPM),
:mod:`geomcollapse.intruders` (LoRA intruder dimensions and the update along them),
:mod:`geomcollapse.models` (small reference models, the transformer, LoRA and data).
:func:`geomcollapse.diagnose` measures all of it at ``θ*`` in one call and returns a
:class:`geomcollapse.Diagnosis` (JSON, Markdown, a one-page figure).
Imported on demand (they pull in optax/orbax): :mod:`geomcollapse.tasks` (synthetic
token tasks), :mod:`geomcollapse.training` (losses, metrics, decoding, training loop),
:mod:`geomcollapse.checkpoint` (orbax save/restore, verified), :mod:`geomcollapse.pipeline`
(pretrain → align → fine-tune, skill Fisher, the KL skill reference),
:mod:`geomcollapse.representation` (representation-space gradients of dense layers),
:mod:`geomcollapse.token_files` (token files and :func:`diagnose` of a transformer checkpoint).
"""

from geomcollapse import (
    aic,
    curvature,
    defences,
    flow,
    intruders,
    landscapes,
    linalg,
    models,
    monitor,
    series,
    stats,
    subspace,
    tensor_norm,
    theory,
)
from geomcollapse.diagnosis import Diagnosis, diagnose

__version__ = "0.1.0"
__all__ = [
    "Diagnosis",
    "aic",
    "curvature",
    "defences",
    "diagnose",
    "flow",
    "intruders",
    "landscapes",
    "linalg",
    "models",
    "monitor",
    "series",
    "stats",
    "subspace",
    "tensor_norm",
    "theory",
]
