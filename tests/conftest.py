"""Shared test set-up: float64 enabled once, dtype-scaled tolerances, small models."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from geomcollapse import models  # noqa: E402


def rel_err(actual, expected) -> float:
    """``‖actual − expected‖ / max(‖expected‖, tiny)`` in float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def tol_for(dtype, factor: float = 1e3) -> float:
    """Tolerance ``factor · eps(dtype)``."""
    return factor * float(jnp.finfo(dtype).eps)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm causal self-attention + MLP block over token embeddings."""

    def __init__(self, vocab: int, d: int, heads: int, rngs: nnx.Rngs, dtype=jnp.float64):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.embed = nnx.Embed(vocab, d, **kw)
        self.ln1 = nnx.LayerNorm(d, **kw)
        self.qkv = nnx.Linear(d, 3 * d, **kw)
        self.out = nnx.Linear(d, d, **kw)
        self.heads = heads
        self.ln2 = nnx.LayerNorm(d, **kw)
        self.fc1 = nnx.Linear(d, 2 * d, **kw)
        self.fc2 = nnx.Linear(2 * d, d, **kw)
        self.head = nnx.Linear(d, vocab, **kw)

    def _attention(self, x):
        *lead, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(*lead, t, 3, self.heads, -1), 3, axis=-3)
        q, k, v = (a.squeeze(-3) for a in (q, k, v))  # (..., t, heads, dh)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        return jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, t, d)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.out(self._attention(self.ln1(x)))
        x = x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
        return self.head(x)


class Problem:
    """A model as pure functions of a parameter pytree, with jitted dense references."""

    def __init__(self, params, logits_fn, batch):
        self.params = params
        self.logits = logits_fn
        self.batch = batch
        flat, unravel = ravel_pytree(params)
        self.flat = flat

        def flat_loss(x):
            return self.loss(unravel(x), batch)

        def flat_logits(x):
            z = logits_fn(unravel(x), batch)
            return z.reshape(-1, z.shape[-1])

        self.dense_hessian = jax.jit(jax.hessian(flat_loss))(flat)
        self.dense_gradient = jax.jit(jax.grad(flat_loss))(flat)
        self.dense_jacobian = jax.jit(jax.jacfwd(flat_logits))(flat)  # (N, C, n)
        self.dense_logits = jax.jit(flat_logits)(flat)  # (N, C)

    def loss(self, params, batch):
        return models.softmax_cross_entropy(self.logits(params, batch), batch.y)

    def example_loss(self, params, example):
        ex = jax.tree_util.tree_map(lambda a: a[None], example)
        return self.loss(params, ex)


@pytest.fixture(scope="session")
def mlp64():
    """A 6-12-4 tanh MLP (136 parameters) on 24 mixture points, float64."""
    p = models.mlp_problem(jax.random.key(3), (6, 12, 4), 24, gd_steps=2, dtype=jnp.float64)
    return Problem(p.params, p.logits, p.batch)


@pytest.fixture(scope="session")
def transformer64():
    """A one-block causal transformer (vocab 5, width 4, 2 heads) on 6 sequences, float64."""
    model = TransformerBlock(vocab=5, d=4, heads=2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    k_tok, k_lab = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(k_tok, (6, 3), 0, 5)
    batch = models.Batch(x=tokens, y=jax.random.randint(k_lab, (6, 3), 0, 5))

    def logits(params, batch):
        return nnx.merge(graphdef, params)(batch.x)

    return Problem(state, logits, batch)


@pytest.fixture(params=["mlp64", "transformer64"])
def problem(request):
    """Every curvature test runs on both the MLP and the transformer block."""
    return request.getfixturevalue(request.param)
