"""A functional multilayer perceptron, softmax cross-entropy and a Gaussian-mixture task."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from geomcollapse._checks import positive_int, prng_key

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list[dict]:
    """LeCun-normal MLP parameters ``[{'w': (d_in, d_out), 'b': (d_out,)}, ...]``."""
    key = prng_key(key)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least input and output widths, got {sizes}")
    sizes = [positive_int(s, "sizes[i]") for s in sizes]
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (d_in, d_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        w = jax.random.normal(k, (d_in, d_out), dtype) / jnp.sqrt(jnp.asarray(d_in, dtype))
        params.append({"w": w, "b": jnp.zeros((d_out,), dtype)})
    return params


def mlp_apply(params: list[dict], x: jax.Array, activation: str = "tanh") -> jax.Array:
    """Logits ``(..., d_out)`` of the MLP on inputs ``x`` ``(..., d_in)``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    act = _ACTIVATIONS[activation]
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits)``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


class Batch(NamedTuple):
    """Inputs ``x`` ``(m, dim)`` and integer labels ``y`` ``(m,)``."""

    x: jax.Array
    y: jax.Array


def gaussian_mixture(
    key: jax.Array,
    num_examples: int,
    dim: int,
    num_classes: int,
    *,
    mean_scale: float = 1.0,
    dtype=jnp.float32,
) -> Batch:
    """Labelled samples from ``num_classes`` unit-variance Gaussians.

    Class means are drawn from ``N(0, mean_scale² I_dim)``; each point is its
    class mean plus ``N(0, I_dim)`` noise; labels are uniform.
    """
    key = prng_key(key)
    num_examples = positive_int(num_examples, "num_examples")
    dim = positive_int(dim, "dim")
    num_classes = positive_int(num_classes, "num_classes")
    k_mean, k_label, k_noise = jax.random.split(key, 3)
    means = mean_scale * jax.random.normal(k_mean, (num_classes, dim), dtype)
    y = jax.random.randint(k_label, (num_examples,), 0, num_classes)
    x = means[y] + jax.random.normal(k_noise, (num_examples, dim), dtype)
    return Batch(x=x, y=y)


class MLPProblem(NamedTuple):
    """A classification problem: parameters, data and the pieces operators need."""

    params: list[dict]
    batch: Batch
    activation: str

    def logits(self, params: Any, batch: Batch) -> jax.Array:
        """Model logits ``(m, C)``."""
        return mlp_apply(params, batch.x, self.activation)

    def loss(self, params: Any, batch: Batch) -> jax.Array:
        """Mean cross-entropy over the batch."""
        return softmax_cross_entropy(self.logits(params, batch), batch.y)

    def example_loss(self, params: Any, example: Batch) -> jax.Array:
        """Cross-entropy of one example (``x`` ``(dim,)``, scalar ``y``)."""
        return softmax_cross_entropy(self.logits(params, example)[None], example.y[None])


def mlp_problem(
    key: jax.Array,
    sizes: Sequence[int] = (784, 256, 256, 10),
    num_examples: int = 512,
    *,
    gd_steps: int = 5,
    learning_rate: float = 0.1,
    activation: str = "tanh",
    dtype=jnp.float32,
) -> MLPProblem:
    """The reference problem: an MLP on a Gaussian mixture after a few GD steps.

    The defaults are the fixed benchmark problem of issue #2: MLP
    784-256-256-10 with tanh (269,322 parameters), 512 examples, mean
    cross-entropy, 5 plain gradient-descent steps so the Hessian has outliers.
    """
    k_data, k_init = jax.random.split(prng_key(key))
    batch = gaussian_mixture(k_data, num_examples, sizes[0], sizes[-1], dtype=dtype)
    problem = MLPProblem(mlp_init(k_init, sizes, dtype), batch, activation)
    grad = jax.jit(jax.grad(problem.loss))
    params = problem.params
    for _ in range(gd_steps):
        params = jax.tree_util.tree_map(
            lambda p, g: p - learning_rate * g, params, grad(params, batch)
        )
    return problem._replace(params=params)
