"""A small decoder-only transformer in flax nnx, used as pure functions of its parameters.

Token + learned position embeddings, ``layers`` pre-LayerNorm blocks (causal
multi-head self-attention, GELU MLP), a final LayerNorm and a linear head.
:func:`transformer_init` splits the module into a static graph and a parameter
pytree (``nnx.State``), so every curvature operator, flow and eigensolver of
the library applies to it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geomcollapse._checks import positive_int, prng_key


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of :class:`Transformer` (all positive integers; ``d_model % heads == 0``)."""

    vocab: int
    context: int
    d_model: int
    heads: int
    layers: int
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("vocab", "context", "d_model", "heads", "layers", "mlp_ratio"):
            positive_int(getattr(self, name), name)
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")


SIZES = {
    # ≈ 28k parameters: CPU tests and float64 theory checks
    "tiny": TransformerConfig(vocab=32, context=24, d_model=32, heads=2, layers=2),
    # ≈ 1.0M parameters: sized for one GPU
    "small": TransformerConfig(vocab=64, context=64, d_model=128, heads=4, layers=5),
}


class _Block(nnx.Module):
    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, dtype):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        d = config.d_model
        self.heads = config.heads
        self.ln1 = nnx.LayerNorm(d, **kw)
        self.qkv = nnx.Linear(d, 3 * d, **kw)
        self.out = nnx.Linear(d, d, **kw)
        self.ln2 = nnx.LayerNorm(d, **kw)
        self.fc1 = nnx.Linear(d, config.mlp_ratio * d, **kw)
        self.fc2 = nnx.Linear(config.mlp_ratio * d, d, **kw)

    def _attention(self, x: jax.Array) -> jax.Array:
        *lead, t, d = x.shape
        qkv = self.qkv(x).reshape(*lead, t, 3, self.heads, d // self.heads)
        q, k, v = (qkv[..., i, :, :] for i in range(3))  # (..., t, heads, dh)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        return jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, t, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.out(self._attention(self.ln1(x)))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """Decoder-only transformer: ``tokens (..., T) int → logits (..., T, vocab)``."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.config = config
        self.embed = nnx.Embed(config.vocab, config.d_model, **kw)
        self.position = nnx.Embed(config.context, config.d_model, **kw)
        self.blocks = nnx.List([_Block(config, rngs, dtype) for _ in range(config.layers)])
        self.ln_final = nnx.LayerNorm(config.d_model, **kw)
        self.head = nnx.Linear(config.d_model, config.vocab, **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        check_tokens(tokens, self.config)
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def check_tokens(tokens, config: TransformerConfig) -> None:
    """Raise ``ValueError`` for non-integer tokens, a sequence past the context or ids out of range.

    The id range is checked only on concrete arrays (not under ``jit``).
    """
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array, got dtype {dtype}")
    if tokens.ndim < 1 or tokens.shape[-1] > config.context:
        raise ValueError(
            f"sequence length {tokens.shape[-1] if tokens.ndim else 0} exceeds the model's "
            f"context of {config.context} tokens"
        )
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        values = np.asarray(tokens)  # numpy: a concrete closure constant stays concrete in jit
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= config.vocab:
            raise ValueError(f"token ids must lie in [0, {config.vocab}), got [{lo}, {hi}]")


def transformer_init(
    key: jax.Array, config: TransformerConfig | str, dtype=jnp.float32
) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a :class:`Transformer` and split it into ``(graphdef, params)``.

    Args:
      key: ``jax.random`` key for the initialisation.
      config: a :class:`TransformerConfig` or a name in ``SIZES`` (``'tiny'``, ``'small'``).
      dtype: parameter and compute dtype.

    Returns:
      The static graph and the parameter pytree; pass both to :func:`transformer_logits`.
    """
    config = transformer_config(config)
    key = prng_key(key)
    model = Transformer(config, nnx.Rngs(params=key), dtype=dtype)
    return nnx.split(model, nnx.Param)


def transformer_config(config: TransformerConfig | str) -> TransformerConfig:
    """``config`` itself, or the named one in ``SIZES``; ``ValueError`` for an unknown name."""
    if isinstance(config, str):
        if config not in SIZES:
            raise ValueError(f"config: unknown transformer size {config!r}; known: {sorted(SIZES)}")
        return SIZES[config]
    if not isinstance(config, TransformerConfig):
        raise ValueError(
            f"config must be a TransformerConfig or a name in {sorted(SIZES)}, "
            f"got {type(config).__name__}"
        )
    return config


def transformer_abstract(
    config: TransformerConfig | str, dtype=jnp.float32
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: shapes only, no compute."""
    config = transformer_config(config)
    return nnx.split(
        nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0), dtype=dtype)), nnx.Param
    )


@functools.lru_cache(maxsize=64)
def transformer_logits(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``logits(params, tokens)``: a pure function of the parameter pytree.

    Cached per ``graphdef`` (the same function object each time), so jitted
    code built on it compiles once per model, not once per call.
    """

    def logits(params: nnx.State, tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(tokens)

    return logits
