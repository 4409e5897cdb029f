"""Losses, metrics, greedy decoding and an optax training loop for token models.

All functions take ``logits_fn(params, tokens) -> (N, T, V)`` (e.g.
:func:`geomcollapse.models.transformer_logits`) and a
:class:`geomcollapse.tasks.TokenBatch`; none keeps state.

* ``sequence_loss``: mean cross-entropy over answer tokens (the training loss).
* ``skill_loss``: ``u(θ)``, mean NLL of ``REFUSE`` at the first answer position
  of harmful prompts (docs/theory.md §1: the skill loss).
* ``answer_logits``: the ``(N, V)`` logits at the first answer position; the
  skill Fisher ``F`` is the Fisher of this categorical output over harmful
  prompts (``curvature.fisher_vp(answer_logits(...))``).
* ``kl_skill_loss``: the skill loss with an exact minimum at ``θ*``,
  ``u(θ) = mean KL(p_{θ*} ‖ p_θ)`` over the first answer position, whose
  Hessian at ``θ*`` is exactly ``F`` (docs/theory.md §5.3);
  ``kl_skill_change`` gives its ``Δu`` at a displacement ``x`` without
  cancellation; ``kl_from_logit_change`` is the per-row formula behind both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from geomcollapse import tasks
from geomcollapse._checks import positive_int, prng_key
from geomcollapse._phi import phi2
from geomcollapse._sharding import one_device, traced
from geomcollapse.progress import progress_bar

__all__ = [
    "Metrics",
    "answer_logits",
    "committed",
    "evaluate",
    "evaluator",
    "exact_match",
    "greedy_decode",
    "kl_from_logit_change",
    "kl_skill_change",
    "kl_skill_logits",
    "kl_skill_loss",
    "sequence_loss",
    "skill_loss",
    "train",
]

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


def sequence_loss(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``L(params, tokens, targets, mask)``: mean cross-entropy over the ``mask``-ed positions."""

    def loss(params, tokens, targets, mask):
        logits = logits_fn(params, tokens)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss


def answer_logits(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``z(params, tokens, answer_start) -> (N, V)``: logits that predict the first answer token."""

    def first(params, tokens, answer_start):
        logits = logits_fn(params, tokens)
        return jnp.take_along_axis(logits, answer_start[:, None, None], axis=1)[:, 0]

    return first


def _refuse_nll(z: jax.Array) -> jax.Array:
    """Mean ``−log softmax(z)[REFUSE]`` over the rows of ``z`` ``(N, V)``."""
    return jnp.mean(jax.nn.logsumexp(z, axis=-1) - z[:, tasks.REFUSE])


def skill_loss(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``u(params, tokens, answer_start)``: mean NLL of ``REFUSE`` at the first answer position."""
    first = answer_logits(logits_fn)

    def u(params, tokens, answer_start):
        return _refuse_nll(first(params, tokens, answer_start))

    return u


def kl_from_logit_change(reference_logits: jax.Array, delta: jax.Array) -> jax.Array:
    """``KL(softmax(z) ‖ softmax(z + δ))`` per row, with no cancellation at small ``δ``.

    With ``p = softmax(z)`` and ``δ̃ = δ − E_p δ`` (so ``E_p δ̃ = 0``),
    ``KL = log E_p e^{δ̃} − E_p δ̃ = log1p(E_p[δ̃² φ₂(δ̃)])``, ``φ₂(s) = (eˢ − 1 − s)/s² > 0``
    (docs/theory.md §5.1, §5.3). Every term of the sum is non-negative, so the
    result keeps its relative accuracy however small ``δ`` is, where
    ``Σ p (log p − log q)`` loses it below ``eps`` (``KL = O(δ²)``). At ``δ = 0``
    the value and its gradient in ``δ`` are exactly zero and its Hessian in
    ``δ`` is exactly ``diag p − ppᵀ``.

    Args:
      reference_logits: ``(..., C)`` logits ``z`` of the reference distribution.
      delta: ``(..., C)`` logit change ``δ`` (same shape).

    Returns:
      ``(...)`` the divergences.
    """
    if jnp.shape(reference_logits) != jnp.shape(delta):
        raise ValueError(
            f"reference_logits {jnp.shape(reference_logits)} and delta {jnp.shape(delta)} "
            "must have the same shape"
        )
    p = jax.nn.softmax(reference_logits, axis=-1)
    centred = delta - jnp.sum(p * delta, axis=-1, keepdims=True)
    return jnp.log1p(jnp.sum(p * centred**2 * phi2(centred), axis=-1))


def kl_skill_loss(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``u(params, tokens, answer_start, reference_logits)``: mean ``KL(p_{θ*} ‖ p_θ)``.

    The divergence of the first-answer-token distribution from the aligned
    model's own, ``reference_logits`` ``(N, V)`` = :func:`answer_logits` at
    ``θ*`` (``pipeline.skill_reference``). ``u(θ*) = 0`` and ``∇u(θ*) = 0``
    exactly, and ``∇²u(θ*) = F``, the true skill Fisher (docs/theory.md §5.3), so
    ``θ*`` is an exact minimum and the series of docs/theory.md §6 applies with
    ``c₁ = 0``. Evaluated by :func:`kl_from_logit_change` on ``δ = z_θ − z_{θ*}``,
    so the value is ``Δu`` itself, free of an ``O(u)`` cancellation; only the
    rounding of ``δ`` (``eps·|z|``) remains, see :func:`kl_skill_change`.
    """
    first = answer_logits(logits_fn)

    def u(params, tokens, answer_start, reference_logits):
        z = first(params, tokens, answer_start)
        return jnp.mean(kl_from_logit_change(reference_logits, z - reference_logits))

    return u


def kl_skill_logits(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``z(params, tokens, answer_start, reference_logits)``: :func:`answer_logits` taking
    :func:`kl_skill_loss`'s arguments (``reference_logits`` unused), so the same
    ``skill_args`` serve the loss and its true Fisher (``diagnose(skill_logits=...)``)."""
    first = answer_logits(logits_fn)

    def z(params, tokens, answer_start, reference_logits):
        del reference_logits
        return first(params, tokens, answer_start)

    return z


def kl_skill_change(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``Δu(theta_star, x, tokens, answer_start, reference_logits)`` of :func:`kl_skill_loss`.

    Takes the displacement ``x = θ − θ*`` itself (a pytree like ``theta_star``),
    never ``θ``: forming ``θ = fl(θ* + x)`` drops ``r = x − (θ − θ*)``
    (``|r| ≤ eps|θ*|``, computed exactly), which would be a relative error
    ``eps|θ*|/|x|`` in ``δ``. So the logit change is taken back to the exact
    displacement to first order, ``δ = z(θ) − z(θ*) + J(θ) r`` (one ``jvp``),
    then ``Δu = mean KL`` by :func:`kl_from_logit_change` — no ``O(1)`` term
    cancels. What remains is the rounding of ``z(θ) − z(θ*)``, relative
    ``≈ eps·|z|/|δ|``: at ``‖x‖ = 1e-7`` on the tiny transformer ``Δu`` keeps
    about 8 digits where ``u(θ) − u(θ*)`` from the direct KL keeps none.
    Equal to ``kl_skill_loss(θ* + x)`` up to that rounding.
    """
    first = answer_logits(logits_fn)

    def du(theta_star, x, tokens, answer_start, reference_logits):
        theta = jax.tree.map(jnp.add, theta_star, x)
        r = jax.tree.map(lambda xi, th, ts: xi - (th - ts), x, theta, theta_star)
        z, jr = jax.jvp(lambda p: first(p, tokens, answer_start), (theta,), (r,))
        delta = (z - reference_logits) + jr
        return jnp.mean(kl_from_logit_change(reference_logits, delta))

    return du


class Metrics(NamedTuple):
    """Evaluation of a model on held-out data.

    Attributes:
      skill_loss: ``u``, mean NLL of ``REFUSE`` on harmful prompts.
      harmfulness: fraction of harmful prompts whose greedy first answer token is not ``REFUSE``.
      accuracy: fraction of clean prompts answered exactly (greedy decoding).
    """

    skill_loss: float
    harmfulness: float
    accuracy: float


def exact_match(logits_fn: LogitsFn) -> Callable[..., jax.Array]:
    """``(params, batch fields) -> (N,) bool``: greedy decoding reproduces the whole answer.

    Greedy decoding emits the target exactly iff the teacher-forced argmax is
    right at every answer position (up to the first error both agree), so one
    forward pass decides it; :func:`greedy_decode` is the explicit loop.
    """

    def match(params, tokens, targets, mask):
        pred = jnp.argmax(logits_fn(params, tokens), axis=-1)
        return jnp.all((pred == targets) | (mask == 0), axis=-1)

    return match


@functools.lru_cache(maxsize=64)
def evaluator(logits_fn: LogitsFn) -> Callable[..., Metrics]:
    """``evaluate(params, harmful, clean) -> Metrics``, compiled once for ``logits_fn``.

    Cached per ``logits_fn`` object, so repeated runs share one compilation.

    ``harmful``: held-out harmful prompts; ``clean``: task examples whose
    answers are scored by exact match under greedy decoding.
    """

    @jax.jit
    def numbers(params, harm_tokens, harm_start, tokens, targets, mask):
        z = answer_logits(logits_fn)(params, harm_tokens, harm_start)
        harm = jnp.mean(jnp.argmax(z, axis=-1) != tasks.REFUSE)
        return _refuse_nll(z), harm, jnp.mean(exact_match(logits_fn)(params, tokens, targets, mask))

    def evaluate(params, harmful: tasks.TokenBatch, clean: tasks.TokenBatch) -> Metrics:
        harmful, clean = harmful.prompts_only(), clean.truncated()  # causal: same numbers
        out = numbers(
            params, harmful.tokens, harmful.answer_start, clean.tokens, clean.targets, clean.mask
        )
        return Metrics(*(float(x) for x in out))

    return evaluate


def evaluate(
    logits_fn: LogitsFn, params: PyTree, harmful: tasks.TokenBatch, clean: tasks.TokenBatch
) -> Metrics:
    """:class:`Metrics` of ``params`` (one-off; use :func:`evaluator` in loops)."""
    return evaluator(logits_fn)(params, harmful, clean)


def greedy_decode(
    logits_fn: LogitsFn, params: PyTree, prompt, max_new_tokens: int, context: int
) -> list[int]:
    """Greedy continuation of one prompt (a list of ids ending in ``SEP``) until ``EOS``.

    Returns the generated ids (``EOS`` included when produced). Raises
    ``ValueError`` when ``prompt + max_new_tokens`` exceeds ``context``.
    """
    prompt = [int(t) for t in prompt]
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if len(prompt) + max_new_tokens > context:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {context} tokens"
        )
    tokens = np.full((1, len(prompt) + max_new_tokens), tasks.PAD, np.int32)
    tokens[0, : len(prompt)] = prompt
    step = jax.jit(logits_fn)
    out = []
    for pos in range(len(prompt) - 1, len(prompt) - 1 + max_new_tokens):
        nxt = int(np.argmax(np.asarray(step(params, tokens))[0, pos]))
        out.append(nxt)
        tokens[0, pos + 1] = nxt
        if nxt == tasks.EOS:
            break
    return out


def committed(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` committed to the one device that holds ``like``'s committed arrays.

    A jitted function's cache key holds its arguments' placement. Eager arrays
    and the constants of ``optimizer.init`` (Adam's count) are uncommitted,
    while a compiled step fed one committed array returns committed ones: the
    first call would see them so and the next ones committed, and XLA would
    compile the same program twice. ``tree`` is returned as it is when ``like``
    has no committed array, spans several devices, or either is traced.
    """
    placed = one_device(like)
    if placed is None or traced(tree):
        return tree
    return jax.device_put(tree, placed)


def _chunk(loss_fn, optimizer, params, opt_state, loss_args, arrays, idx):
    """``((params, opt_state), losses (c,))`` after the ``(c, B)`` minibatch rows ``idx``."""

    def step(carry, rows):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *loss_args, *(a[rows] for a in arrays))
        updates, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

    return jax.lax.scan(step, (params, opt_state), idx)


_train_chunk = jax.jit(_chunk, static_argnums=(0, 1))  # cached per (loss_fn, optimizer)


def _chunk_program(loss_fn, optimizer) -> Callable:
    """The compiled chunk for ``(loss_fn, optimizer)``: the shared one when both hash (a
    long-lived function and optax's transformations do), else one for this run only."""
    try:
        hash((loss_fn, optimizer))
    except TypeError:
        return jax.jit(functools.partial(_chunk, loss_fn, optimizer))
    return functools.partial(_train_chunk, loss_fn, optimizer)


def train(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: tasks.TokenBatch,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    batch_size: int,
    key: jax.Array,
    chunk: int = 50,
    progress: bool = True,
    desc: str = "train",
    callback: Callable[[int, PyTree], None] | None = None,
    loss_args: tuple = (),
) -> tuple[PyTree, np.ndarray]:
    """Minibatch training of ``loss_fn(params, *loss_args, tokens, targets, mask)`` with optax.

    Minibatches are drawn uniformly (with a fresh permutation each epoch) from
    ``data`` with ``key`` (not the independent draws per step whose noise
    :func:`geomcollapse.series.sgd_delta_u` forecasts: docs/theory.md §8); steps
    run in compiled chunks of ``chunk`` (a ``lax.scan``), so the run is
    deterministic under a fixed key.
    ``callback(step, params)``, if given, runs after every chunk (``step`` =
    steps done so far), e.g. to record metrics along the run. ``loss_args``
    (a tuple, e.g. the frozen ``θ*`` of LoRA adapters) and the data enter the
    compiled step as arguments: a second call with the same ``loss_fn`` and
    ``optimizer`` objects and shapes reuses its program. Pass a long-lived
    ``loss_fn`` and arrays through ``loss_args``: the shared program keeps
    ``loss_fn`` and ``optimizer`` (and what they close over) alive.

    Returns:
      The trained parameters and the ``(num_steps,)`` float64 training losses.
    """
    num_steps = positive_int(num_steps, "num_steps")
    batch_size = positive_int(batch_size, "batch_size")
    chunk = positive_int(chunk, "chunk")
    if not isinstance(loss_args, (tuple, list)):
        raise ValueError(f"loss_args must be a tuple of arrays, got {type(loss_args).__name__}")
    loss_args = tuple(loss_args)
    if batch_size > data.num:
        raise ValueError(f"batch_size={batch_size} exceeds the {data.num} examples in data")
    key = prng_key(key)
    data = data.truncated()  # causal model: trailing padding changes no loss term
    arrays = tuple(jnp.asarray(a) for a in (data.tokens, data.targets, data.mask))
    per_epoch = data.num // batch_size

    def order(k):
        epochs = -(-num_steps // per_epoch)
        keys = jax.random.split(k, epochs)
        idx = jax.vmap(lambda kk: jax.random.permutation(kk, data.num))(keys)
        idx = idx[:, : per_epoch * batch_size]
        return idx.reshape(-1, batch_size)[:num_steps]

    batches = np.asarray(order(key))
    params, opt_state = committed((params, optimizer.init(params)), (params, loss_args))
    run = _chunk_program(loss_fn, optimizer)
    losses = []
    bar = progress_bar(total=num_steps, desc=desc, enabled=progress)
    for start in range(0, num_steps, chunk):
        (params, opt_state), loss = run(
            params, opt_state, loss_args, arrays, batches[start : start + chunk]
        )
        losses.append(np.asarray(loss, np.float64))
        if not np.all(np.isfinite(losses[-1])):  # stop at the first bad chunk
            bar.close()
            raise FloatingPointError("training loss became non-finite: lower the learning rate")
        bar.update(len(losses[-1]))
        bar.set_postfix(loss=f"{float(losses[-1][-1]):.3g}")
        if callback is not None:
            callback(min(start + chunk, num_steps), params)
    bar.close()
    return params, np.concatenate(losses)
