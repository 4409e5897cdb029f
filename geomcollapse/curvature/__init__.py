"""Curvature operators (gradient, HVP, GGN-VP, Fisher-VP), block-diagonal parts, pytree helpers."""

from geomcollapse.curvature._blocks import block_diagonal, layer_key, leaf_groups
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
    "block_diagonal",
    "empirical_fisher_vp",
    "fisher_vp",
    "ggn_vp",
    "gradient",
    "hessian_vp",
    "layer_key",
    "leaf_groups",
    "leaf_paths",
    "num_params",
    "per_example_gradients",
    "ravel",
    "restrict",
    "select",
    "substitute",
]
