"""No program is compiled twice for the same shapes (#25: no repeat compiles).

Each check counts XLA backend compilations (JAX's compile event) during a call
that should reuse what an earlier call compiled, and checks that the reuse
gives the same numbers as a fresh run.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, tasks, training
from geomcollapse.models import transformer_init, transformer_logits

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counted_compiles():
    """A list that receives the name of every program XLA compiles inside the block."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            seen.append(kwargs.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _mlp_operator():
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (6, 4)), "b": jnp.zeros(4)}
    x = jax.random.normal(jax.random.fold_in(key, 1), (9, 6))

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    # committed, as parameters restored from a checkpoint or produced by a step are
    params = jax.device_put(params, jax.devices()[0])
    return curvature.hessian_vp(loss).bind(params, x), params, loss, x


def test_apply_compiles_once_for_uncommitted_and_committed_vectors():
    op, params, loss, x = _mlp_operator()
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(np.linspace(-1.0, 1.0, flat.size, dtype=flat.dtype)))  # uncommitted
    first = curvature.apply(op, v)
    with counted_compiles() as seen:
        second = curvature.apply(op, first)  # the previous output: committed
        third = curvature.apply(op, v)
    assert seen == []
    H = np.asarray(jax.hessian(lambda f: loss(unravel(f), x))(flat))  # dense twin
    for out, vec in ((first, v), (second, first)):
        expected = H @ np.asarray(ravel_pytree(vec)[0])
        np.testing.assert_allclose(ravel_pytree(out)[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ravel_pytree(third)[0], ravel_pytree(first)[0])


def test_apply_under_jit_and_vmap_equals_the_eager_call():
    op, params, _, _ = _mlp_operator()
    flat, unravel = ravel_pytree(params)
    vs = jax.random.normal(jax.random.key(5), (3, flat.size), flat.dtype)
    eager = np.stack([ravel_pytree(curvature.apply(op, unravel(v)))[0] for v in vs])
    jitted = jax.jit(lambda o, v: ravel_pytree(curvature.apply(o, unravel(v)))[0])
    mapped = jax.vmap(lambda v: ravel_pytree(curvature.apply(op, unravel(v)))[0])(vs)
    np.testing.assert_allclose(np.stack([jitted(op, v) for v in vs]), eager, rtol=1e-12)
    np.testing.assert_allclose(mapped, eager, rtol=1e-12)


def test_train_compiles_its_step_once_and_reuses_it_for_new_data_and_frozen_arguments():
    """A run from committed parameters (as restored from a checkpoint) compiles its
    step once, not once for the first chunk and again for the next; a second run on
    other data of the same shapes, with other frozen arguments, compiles nothing; its
    numbers equal a run that compiled anew."""
    graphdef, params = transformer_init(jax.random.key(0), "tiny")
    params = jax.device_put(params, jax.devices()[0])  # committed
    logits = transformer_logits(graphdef)
    loss = training.sequence_loss(logits)

    def scaled(p, scale, *batch):  # a frozen argument, as LoRA's θ*
        return scale * loss(p, *batch)

    optimizer = optax.adam(1e-3)
    a = tasks.benign_task(jax.random.key(1), "shift", 64)
    b = tasks.benign_task(jax.random.key(2), "shift", 64)
    assert a.truncated().tokens.shape == b.truncated().tokens.shape
    common = {"num_steps": 6, "batch_size": 8, "chunk": 3, "progress": False}
    k = jax.random.key(3)
    with counted_compiles() as first:
        training.train(scaled, params, a, optimizer, key=k, loss_args=(1.0,), **common)
    assert first.count("jit(_chunk)") == 1, first
    with counted_compiles() as seen:
        reused, losses = training.train(
            scaled, params, b, optimizer, key=k, loss_args=(2.0,), **common
        )
    assert "jit(_chunk)" not in seen, seen

    def fresh(p, *batch):  # another function object: compiles anew
        return 2.0 * loss(p, *batch)

    alone, alone_losses = training.train(fresh, params, b, optax.adam(1e-3), key=k, **common)
    np.testing.assert_allclose(losses, alone_losses, rtol=1e-6)
    np.testing.assert_allclose(
        ravel_pytree(reused)[0], ravel_pytree(alone)[0], rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="loss_args"):
        training.train(scaled, params, b, optimizer, key=k, loss_args=2.0, **common)
