"""Small reference models and synthetic data."""

from geomcollapse.models._lora import (
    DEFAULT_TARGETS,
    lora_apply,
    lora_init,
    lora_merge,
    lora_update,
)
from geomcollapse.models._mlp import (
    Batch,
    MLPProblem,
    gaussian_mixture,
    mlp_apply,
    mlp_init,
    mlp_problem,
    softmax_cross_entropy,
)
from geomcollapse.models._transformer import (
    SIZES,
    Transformer,
    TransformerConfig,
    check_tokens,
    transformer_abstract,
    transformer_config,
    transformer_init,
    transformer_logits,
)

__all__ = [
    "DEFAULT_TARGETS",
    "SIZES",
    "Batch",
    "MLPProblem",
    "Transformer",
    "TransformerConfig",
    "check_tokens",
    "gaussian_mixture",
    "lora_apply",
    "lora_init",
    "lora_merge",
    "lora_update",
    "mlp_apply",
    "mlp_init",
    "mlp_problem",
    "softmax_cross_entropy",
    "transformer_abstract",
    "transformer_config",
    "transformer_init",
    "transformer_logits",
]
