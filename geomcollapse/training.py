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
from geomcollapse._progress import progress_bar

__all__ = [
    "Metrics",
    "answer_logits",
    "evaluate",
    "evaluator",
    "exact_match",
    "greedy_decode",
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
) -> tuple[PyTree, np.ndarray]:
    """Minibatch training of ``loss_fn(params, tokens, targets, mask)`` with an optax optimizer.

    Minibatches are drawn uniformly (with a fresh permutation each epoch) from
    ``data`` with ``key``; steps run in compiled chunks of ``chunk`` (a
    ``lax.scan``), so the run is deterministic under a fixed key.
    ``callback(step, params)``, if given, runs after every chunk (``step`` =
    steps done so far), e.g. to record metrics along the run.

    Returns:
      The trained parameters and the ``(num_steps,)`` float64 training losses.
    """
    num_steps = positive_int(num_steps, "num_steps")
    batch_size = positive_int(batch_size, "batch_size")
    chunk = positive_int(chunk, "chunk")
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

    @jax.jit
    def run(params, opt_state, idx):
        def step(carry, rows):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, *(a[rows] for a in arrays))
            updates, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss

        return jax.lax.scan(step, (params, opt_state), idx)

    opt_state = optimizer.init(params)
    losses = []
    bar = progress_bar(total=num_steps, desc=desc, enabled=progress)
    for start in range(0, num_steps, chunk):
        (params, opt_state), loss = run(params, opt_state, batches[start : start + chunk])
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
