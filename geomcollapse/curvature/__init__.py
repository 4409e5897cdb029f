"""Curvature operators (gradient, HVP, GGN-VP, Fisher-VP) and pytree helpers."""

from geomcollapse.curvature._operators import (
    empirical_fisher_vp,
    fisher_vp,
    ggn_vp,
    gradient,
    hessian_vp,
    per_example_gradients,
)
from geomcollapse.curvature._pytree import (
    leaf_paths,
    num_params,
    ravel,
    restrict,
    select,
    substitute,
)

__all__ = [
    "empirical_fisher_vp",
    "fisher_vp",
    "ggn_vp",
    "gradient",
    "hessian_vp",
    "leaf_paths",
    "num_params",
    "per_example_gradients",
    "ravel",
    "restrict",
    "select",
    "substitute",
]
