"""The library's decoder-only transformer: sizes, causality, input checks, Fisher-VP vs dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, models
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def tiny64():
    graphdef, params = models.transformer_init(jax.random.key(0), "tiny", dtype=jnp.float64)
    return graphdef, params, models.transformer_logits(graphdef)


def test_named_sizes_have_the_promised_parameter_counts():
    tiny = curvature.num_params(models.transformer_init(jax.random.key(0), "tiny")[1])
    assert tiny == 28_320
    small = jax.eval_shape(lambda: models.transformer_init(jax.random.key(0), "small")[1])
    assert curvature.num_params(small) == 1_016_256


def test_logits_are_causal(tiny64):
    _, params, logits = tiny64
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 32)
    a, b = jax.jit(logits)(params, tokens), jax.jit(logits)(params, changed)
    assert a.shape == (2, 12, 32)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # the past never sees the future
    assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-6


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (jnp.zeros((2, 25), jnp.int32), "exceeds the model's context of 24"),
        (jnp.full((2, 4), 32, jnp.int32), r"token ids must lie in \[0, 32\)"),
        (jnp.full((2, 4), -1, jnp.int32), r"token ids must lie in \[0, 32\)"),
        (jnp.zeros((2, 4), jnp.float32), "integer array"),
    ],
)
def test_bad_tokens_raise(tiny64, tokens, message):
    _, params, logits = tiny64
    with pytest.raises(ValueError, match=message):
        logits(params, tokens)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown transformer size 'huge'"):
        models.transformer_init(jax.random.key(0), "huge")
    with pytest.raises(ValueError, match="divisible"):
        models.TransformerConfig(vocab=8, context=4, d_model=6, heads=4, layers=1)


def test_fisher_vp_on_the_tiny_transformer_matches_the_dense_fisher(tiny64):
    """Block = the last block's MLP output layer + head (4,256 parameters), all positions."""
    _, params, logits = tiny64
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 0, 32)
    block = curvature.select(params, r"^(head|blocks/1/fc2)/")
    fvp = jax.jit(curvature.fisher_vp(curvature.restrict(logits)))
    flat, unravel = ravel_pytree(block)

    def flat_logits(w):
        return curvature.restrict(logits)(unravel(w), params, tokens).reshape(-1, 32)

    J = jax.jit(jax.jacfwd(flat_logits))(flat)  # (18, 32, n)
    p = jax.nn.softmax(flat_logits(flat), axis=-1)
    cov = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    F = jnp.einsum("icn,icd,idm->nm", J, cov, J) / J.shape[0]
    v = jax.random.normal(jax.random.key(3), flat.shape, jnp.float64)
    out = ravel_pytree(fvp(block, unravel(v), params, tokens))[0]
    assert rel_err(out, F @ v) < 1e-12


def test_lora_effective_update_equals_the_merged_weight_difference(tiny64):
    _, params, logits = tiny64
    adapters = models.lora_init(jax.random.key(4), params, rank=2)
    assert set(adapters) == {
        f"blocks/{i}/{m}/kernel/value" for i in (0, 1) for m in ("qkv", "out", "fc1", "fc2")
    }
    # B = 0: the adapted model is θ* exactly
    merged0 = models.lora_merge(params, adapters, alpha=4.0)
    np.testing.assert_array_equal(ravel_pytree(merged0)[0], ravel_pytree(params)[0])
    adapters = jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape, x.dtype), adapters
    )
    merged = models.lora_merge(params, adapters, alpha=4.0)
    update = models.lora_update(adapters, alpha=4.0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    embedded = curvature.substitute(zeros, update)
    diff = ravel_pytree(merged)[0] - ravel_pytree(params)[0]
    assert rel_err(diff, ravel_pytree(embedded)[0]) < 1e-14
    for path, delta in update.items():
        assert np.linalg.matrix_rank(np.asarray(delta)) == 2, path
    # the adapters are trainable parameters of the same logits function
    tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, 32)
    lora_logits = models.lora_apply(logits, 4.0)
    grad_fn = jax.jit(jax.grad(lambda a: jnp.sum(lora_logits(a, params, tokens))))
    grads = grad_fn(adapters)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_lora_rejects_bad_targets_and_ranks(tiny64):
    _, params, _ = tiny64
    with pytest.raises(ValueError, match="selects no parameter"):
        models.lora_init(jax.random.key(0), params, 2, where="nothing_here")
    with pytest.raises(ValueError, match="matrix leaves"):
        models.lora_init(jax.random.key(0), params, 2, where=r"head/bias")
    with pytest.raises(ValueError, match="exceeds min"):
        models.lora_init(jax.random.key(0), params, 64)


def test_lora_gradients_follow_the_chain_rule_through_the_merged_weight(tiny64):
    """``W' = W + s·A B`` (s = α/r): ``∂L/∂A = s·G Bᵀ`` and ``∂L/∂B = s·Aᵀ G``, ``G = ∂L/∂W'``."""
    _, params, logits = tiny64
    alpha, rank = 3.0, 2
    adapters = models.lora_init(jax.random.key(7), params, rank=rank)
    # B = 0 at init would make ∂L/∂A vanish: give both factors non-zero values
    adapters = jax.tree_util.tree_map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(8), x.shape, x.dtype), adapters
    )
    tokens = jax.random.randint(jax.random.key(9), (3, 6), 0, 32)
    targets = jax.random.randint(jax.random.key(10), (3, 6), 0, 32)

    def loss(p):
        return models.softmax_cross_entropy(logits(p, tokens), targets)

    grads = jax.jit(jax.grad(lambda a: loss(models.lora_merge(params, a, alpha))))(adapters)
    merged = models.lora_merge(params, adapters, alpha)
    G = curvature.select(jax.jit(jax.grad(loss))(merged), lambda path: path in adapters)
    s = alpha / rank
    for path, ab in adapters.items():
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        g = np.asarray(G[path])
        assert np.linalg.norm(g) > 0, path
        assert rel_err(grads[path]["a"], s * g @ b.T) < 1e-12, path
        assert rel_err(grads[path]["b"], s * a.T @ g) < 1e-12, path
