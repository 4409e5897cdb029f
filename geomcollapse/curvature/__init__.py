"""Curvature operators (gradient, HVP, GGN-VP, Fisher-VP), block-diagonal parts, pytree helpers.

One operator type: :class:`LinearOperator` (docs/library.md "Operators").
"""

from geomcollapse.curvature._blocks import block_diagonal, layer_key, leaf_groups
from geomcollapse.curvature._operator import (
    LinearOperator,
    Space,
    VectorProduct,
    apply,
    as_operator,
    deflated,
    flat_matvec,
    host_matvec,
    keyed,
    linear_operator,
    space_of,
)
from geomcollapse.curvature._operators import (
    empirical_fisher_vp,
    fisher_vp,
    ggn_vp,
    gradient,
    hessian_vp,
    per_example_gradients,
)
from geomcollapse.curvature._pytree import (
    as_layout,
    check_layout,
    leaf_paths,
    num_params,
    params_layout,
    ravel,
    restrict,
    select,
    substitute,
)

__all__ = [
    "LinearOperator",
    "Space",
    "VectorProduct",
    "apply",
    "as_layout",
    "as_operator",
    "block_diagonal",
    "check_layout",
    "deflated",
    "empirical_fisher_vp",
    "fisher_vp",
    "flat_matvec",
    "ggn_vp",
    "gradient",
    "hessian_vp",
    "host_matvec",
    "keyed",
    "layer_key",
    "leaf_groups",
    "leaf_paths",
    "linear_operator",
    "num_params",
    "params_layout",
    "per_example_gradients",
    "ravel",
    "restrict",
    "select",
    "space_of",
    "substitute",
]
