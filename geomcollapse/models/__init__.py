"""Small reference models and synthetic data."""

from geomcollapse.models._mlp import (
    Batch,
    MLPProblem,
    gaussian_mixture,
    mlp_apply,
    mlp_init,
    mlp_problem,
    softmax_cross_entropy,
)

__all__ = [
    "Batch",
    "MLPProblem",
    "gaussian_mixture",
    "mlp_apply",
    "mlp_init",
    "mlp_problem",
    "softmax_cross_entropy",
]
