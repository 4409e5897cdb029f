"""Pretrain → align → checkpoint → benign fine-tuning, for the synthetic-task transformer.

* :func:`align_model`: pretrain on the base tasks, then align on the refusal
  skill mixed with base data, giving ``θ*``; saved with orbax and reloaded
  (bit-exactly) on the next call with the same :class:`AlignmentConfig`.
* :func:`finetune`: fine-tune ``θ*`` on one benign task (full or LoRA) with
  optax, recording the skill loss ``u``, the harmfulness score and the task's
  accuracy along the way.
* :func:`skill_fisher_vp` / :func:`skill_per_example_gradients`: the skill
  Fisher at ``θ*`` — the true Fisher (labels from the model; default) and the
  empirical one (observed ``REFUSE`` labels).
* :func:`skill_reference`: the aligned model's own first-answer logits on the
  skill prompts, the fixed reference of the KL skill loss
  (``training.kl_skill_loss``; docs/theory.md §5.3).

Every random choice comes from ``seed`` through ``jax.random`` keys: the same
config gives the same model, bit for bit, on the same machine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from geomcollapse import checkpoint, curvature, tasks, training
from geomcollapse._checks import positive_float, positive_int
from geomcollapse.models import (
    lora_apply,
    lora_init,
    lora_merge,
    transformer_abstract,
    transformer_config,
    transformer_init,
    transformer_logits,
)

__all__ = [
    "AlignedModel",
    "AlignmentConfig",
    "FinetuneConfig",
    "FinetuneRun",
    "SkillReference",
    "align_model",
    "evaluation_sets",
    "finetune",
    "is_aligned",
    "skill_fisher_trace",
    "skill_fisher_vp",
    "skill_per_example_gradients",
    "skill_reference",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """How ``θ*`` is made: model size, data, optimiser and step counts."""

    size: str = "tiny"
    seed: int = 0
    num_examples: int = 20_000  # training pool per phase
    pretrain_steps: int = 2000
    align_steps: int = 500
    batch_size: int = 128
    harmful_fraction: float = 0.3  # of the alignment mix
    pretrain_lr: float = 3e-3
    align_lr: float = 1e-3
    weight_decay: float = 0.01
    num_eval: int = 500  # held-out prompts per metric

    def __post_init__(self):
        model = transformer_config(self.size)  # ValueError for an unknown size
        if model.vocab < tasks.VOCAB_SIZE or model.context < tasks.SEQUENCE_LENGTH:
            raise ValueError(
                f"size {self.size!r} (vocab {model.vocab}, context {model.context}) cannot hold "
                f"the tasks (vocab {tasks.VOCAB_SIZE}, length {tasks.SEQUENCE_LENGTH})"
            )
        for name in ("num_examples", "pretrain_steps", "align_steps", "batch_size", "num_eval"):
            positive_int(getattr(self, name), name)
        for name in ("pretrain_lr", "align_lr"):
            positive_float(getattr(self, name), name)
        if not 0.0 < self.harmful_fraction < 1.0:
            raise ValueError(f"harmful_fraction must lie in (0, 1), got {self.harmful_fraction}")


class AlignedModel(NamedTuple):
    """``θ*`` and how it was made.

    Attributes:
      graphdef, params: the float32 model (``transformer_logits(graphdef)(params, tokens)``).
      config: the :class:`AlignmentConfig`.
      metrics: :class:`training.Metrics` of ``θ*`` on the held-out sets.
      path: the checkpoint directory, or ``None``.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    config: AlignmentConfig
    metrics: training.Metrics
    path: Path | None

    def logits_fn(self):
        return transformer_logits(self.graphdef)

    def as_dtype(self, dtype) -> tuple[nnx.GraphDef, nnx.State]:
        """``(graphdef, params)`` computing in ``dtype`` (e.g. float64 for theory checks)."""
        graphdef, _ = transformer_abstract(self.config.size, dtype)
        return graphdef, jax.tree.map(lambda x: jnp.asarray(x, dtype), self.params)


def _keys(seed: int) -> dict[str, jax.Array]:
    names = ("model", "base", "align", "pretrain", "aligning", "eval_harm", "eval_clean")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def evaluation_sets(config: AlignmentConfig) -> tuple[tasks.TokenBatch, tasks.TokenBatch]:
    """Held-out ``(harmful prompts, clean base-task examples)`` (keys unused in training)."""
    k = _keys(config.seed)
    return (
        tasks.harmful_prompts(k["eval_harm"], config.num_eval),
        tasks.base_tasks(k["eval_clean"], config.num_eval),
    )


def _optimizer(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr / 10)
    return optax.adamw(schedule, weight_decay=weight_decay)


def is_aligned(config: AlignmentConfig, directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint of ``config`` that :func:`align_model`
    restores instead of training.

    False for a missing directory or a file, a checkpoint of another config, and one
    that cannot be read or whose files fail their check (``align_model`` trains over
    the first two and raises, naming the file, on the last).
    """
    if not isinstance(config, AlignmentConfig):
        raise ValueError(f"config must be an AlignmentConfig, got {type(config).__name__}")
    try:
        return _stored_metadata(config, directory) is not None
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _stored_metadata(config: AlignmentConfig, directory) -> dict | None:
    """The metadata of ``directory``'s checkpoint when it was made with ``config``, else
    None (no directory, or another config); ``ValueError`` if its files fail their check."""
    if directory is None or not Path(directory).is_dir():
        return None
    meta = checkpoint.read_metadata(directory)["metadata"]
    return meta if meta.get("alignment_config") == dataclasses.asdict(config) else None


def align_model(
    config: AlignmentConfig = AlignmentConfig(),
    directory: str | Path | None = None,
    *,
    progress: bool = True,
) -> AlignedModel:
    """Pretrain and align a transformer, or restore it from ``directory``.

    With ``directory``: a checkpoint there made with the same ``config`` is
    restored (no training); otherwise the model is trained and saved there
    (replacing a checkpoint of another config).
    """
    if not isinstance(config, AlignmentConfig):
        raise ValueError(f"config must be an AlignmentConfig, got {type(config).__name__}")
    meta = _stored_metadata(config, directory)
    if meta is not None:
        graphdef, params, _ = checkpoint.load_checkpoint(directory, config.size)
        metrics = training.Metrics(**meta["metrics"])  # measured when it was saved
        return AlignedModel(graphdef, params, config, metrics, Path(directory).resolve())

    k = _keys(config.seed)
    graphdef, params = transformer_init(k["model"], config.size)
    loss = training.sequence_loss(transformer_logits(graphdef))
    common = {"batch_size": config.batch_size, "progress": progress}
    params, pre_losses = training.train(
        loss,
        params,
        tasks.base_tasks(k["base"], config.num_examples),
        _optimizer(config.pretrain_lr, config.pretrain_steps, config.weight_decay),
        num_steps=config.pretrain_steps,
        key=k["pretrain"],
        desc="pretrain",
        **common,
    )
    params, align_losses = training.train(
        loss,
        params,
        tasks.refusal_skill(k["align"], config.num_examples, config.harmful_fraction),
        _optimizer(config.align_lr, config.align_steps, config.weight_decay),
        num_steps=config.align_steps,
        key=k["aligning"],
        desc="align",
        **common,
    )
    metrics = training.evaluate(transformer_logits(graphdef), params, *evaluation_sets(config))
    path = None
    if directory is not None:
        meta = {
            "alignment_config": dataclasses.asdict(config),
            "metrics": metrics._asdict(),
            "final_losses": [float(pre_losses[-1]), float(align_losses[-1])],
        }
        path = checkpoint.save_checkpoint(
            directory, params, transformer_config(config.size), meta, overwrite=True
        )
    return AlignedModel(graphdef, params, config, metrics, path)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Benign fine-tuning of ``θ*``: optax Adam at a constant learning rate."""

    method: str = "full"  # 'full' or 'lora'
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64
    num_examples: int = 4000
    eval_every: int = 25
    # explicit evaluation steps (strictly increasing, in [1, steps]); empty: every eval_every
    eval_steps: tuple[int, ...] = ()
    lora_rank: int = 4
    lora_alpha: float = 8.0
    seed: int = 1

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', got {self.method!r}")
        for name in ("steps", "batch_size", "num_examples", "eval_every", "lora_rank"):
            positive_int(getattr(self, name), name)
        positive_float(self.lr, "lr")
        positive_float(self.lora_alpha, "lora_alpha")
        given = [positive_int(k, "eval_steps") for k in self.eval_steps]
        if any(b <= a for a, b in itertools.pairwise(given)) or any(k > self.steps for k in given):
            raise ValueError(
                f"eval_steps must increase strictly within [1, steps={self.steps}], "
                f"got {self.eval_steps}"
            )

    def schedule(self) -> tuple[int, ...]:
        """The steps after which metrics are taken (besides step 0); the last is ``steps``.

        ``eval_steps`` (plus ``steps``) when given, else every ``eval_every`` steps.
        """
        if self.eval_steps:
            return tuple(sorted({*self.eval_steps, self.steps}))
        return (*range(self.eval_every, self.steps, self.eval_every), self.steps)


class FinetuneRun(NamedTuple):
    """Metrics along one fine-tuning run (index 0 is ``θ*``).

    Attributes:
      task, method: what was fine-tuned, how.
      steps: ``(K,)`` optimiser steps at which metrics were taken.
      skill_loss, harmfulness, accuracy: ``(K,)`` float64 (see :class:`training.Metrics`).
      losses: ``(steps,)`` training losses.
      params: the final full-space parameters (LoRA merged).
    """

    task: str
    method: str
    steps: np.ndarray
    skill_loss: np.ndarray
    harmfulness: np.ndarray
    accuracy: np.ndarray
    losses: np.ndarray
    params: nnx.State


def finetune(
    aligned: AlignedModel,
    task: str,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    progress: bool = True,
) -> FinetuneRun:
    """Fine-tune ``θ*`` on the benign task ``task``; record metrics at ``config.schedule()``.

    Training runs in compiled chunks of the gcd of the gaps between evaluation
    steps; the minibatch order depends only on the key, so the trajectory is
    the same whatever the schedule.
    """
    if task not in tasks.BENIGN_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(tasks.BENIGN_TASKS)}")
    key = jax.random.fold_in(jax.random.key(config.seed), sorted(tasks.BENIGN_TASKS).index(task))
    k_data, k_eval, k_order, k_lora = jax.random.split(key, 4)
    data = tasks.benign_task(k_data, task, config.num_examples)
    task_eval = tasks.benign_task(k_eval, task, aligned.config.num_eval, evaluation=True)
    harm, _ = evaluation_sets(aligned.config)
    logits = aligned.logits_fn()
    theta_star = aligned.params
    fn, optimizer = _finetune_objective(logits, config.method, config.lora_alpha, config.lr)

    if config.method == "full":
        start, to_full, frozen = theta_star, (lambda p: p), ()
    else:
        start, frozen = lora_init(k_lora, theta_star, config.lora_rank), (theta_star,)

        def to_full(adapters):
            return lora_merge(theta_star, adapters, config.lora_alpha)

    steps, metrics = [], []
    evaluate = training.evaluator(logits)

    schedule = config.schedule()

    def measure(step, p):
        if step == 0 or step in schedule:
            steps.append(step)
            metrics.append(evaluate(to_full(p), harm, task_eval))

    measure(0, start)
    final, losses = training.train(
        fn,
        start,
        data,
        optimizer,
        num_steps=config.steps,
        batch_size=config.batch_size,
        key=k_order,
        chunk=math.gcd(*np.diff((0, *schedule)).tolist()),
        progress=progress,
        desc=f"fine-tune {task} ({config.method})",
        callback=measure,
        loss_args=frozen,
    )
    columns = np.asarray(metrics, np.float64).T  # skill_loss, harmfulness, accuracy
    return FinetuneRun(
        task, config.method, np.asarray(steps), *columns, losses=losses, params=to_full(final)
    )


@functools.lru_cache(maxsize=16)
def _finetune_objective(logits, method: str, alpha: float, lr: float):
    """The fine-tuning loss and Adam, the same objects for every task: every task's run
    then reuses one compiled training step (LoRA's loss takes the frozen ``θ*`` as its
    second argument, ``lora_loss(adapters, θ*, tokens, targets, mask)``)."""
    loss = training.sequence_loss(logits)
    fn = loss if method == "full" else lora_apply(loss, alpha)
    return fn, optax.adam(lr)


def skill_fisher_vp(logits_fn, params: PyTree, harmful: tasks.TokenBatch):
    """``v ↦ F v``: the true skill Fisher at ``params`` over ``harmful`` prompts.

    ``F = (1/N) Σ_x Jᵀ(diag p − p pᵀ)J`` for the categorical output at the
    first answer position (labels drawn from the model, i.e. the GGN of ``u``).
    """
    fvp = curvature.fisher_vp(training.answer_logits(logits_fn))
    harmful = harmful.prompts_only()
    tokens, start = jnp.asarray(harmful.tokens), jnp.asarray(harmful.answer_start)
    # weights and prompts enter the compiled matvec as arguments, not folded constants
    compiled = jax.jit(lambda v, p, t, s: fvp(p, v, t, s))
    return lambda v: compiled(v, params, tokens, start)


def skill_per_example_gradients(logits_fn, params: PyTree, harmful: tasks.TokenBatch) -> PyTree:
    """Per-prompt gradients of ``−log p(REFUSE | x)``, leading axis ``N``.

    The empirical skill Fisher is ``GᵀG/N`` (``linalg.empirical_fisher_eigenpairs``).
    """
    u = training.skill_loss(logits_fn)

    def one(p, example):
        tokens, start = example
        return u(p, tokens[None], start[None])

    grads = curvature.per_example_gradients(one)
    harmful = harmful.prompts_only()
    return jax.jit(grads)(params, (jnp.asarray(harmful.tokens), jnp.asarray(harmful.answer_start)))


def skill_fisher_trace(
    logits_fn,
    params: PyTree,
    harmful: tasks.TokenBatch,
    *,
    chunk: int = 16,
    max_bytes: int = 2**32,
) -> float:
    """Exact ``tr F = (1/N) Σ_x tr((diag p − p pᵀ) J_x J_xᵀ)`` from per-prompt logit Jacobians.

    ``J_x`` (``V × n``, as one block per parameter leaf; ``J_x J_xᵀ`` is summed
    over the leaves, never a raveled copy) is formed for ``chunk`` prompts at a
    time, fewer where it (``V · n`` floats a prompt) would pass ``max_bytes``:
    at least one prompt, which sets the floor (``small``: 0.5 GB a prompt).
    Cost ``≈ V`` backward passes per prompt.
    """
    chunk = positive_int(chunk, "chunk")
    max_bytes = positive_int(max_bytes, "max_bytes")
    harmful = harmful.prompts_only()
    first = training.answer_logits(logits_fn)
    out = jax.eval_shape(first, params, harmful.tokens[:1], harmful.answer_start[:1])
    leaves = jax.tree.leaves(params)
    per_prompt = out.shape[-1] * sum(x.size * x.dtype.itemsize for x in leaves)
    chunk = max(1, min(chunk, max_bytes // per_prompt))

    @jax.jit
    def part(params, tokens, start):  # weights as an argument: no constant folding
        z = first(params, tokens, start)
        p = jax.nn.softmax(z, axis=-1)
        J = jax.jacrev(lambda q: first(q, tokens, start))(params)  # leaves (m, V, ...)
        K = sum(
            jnp.einsum("mci,mdi->mcd", x, x)
            for x in (b.reshape(b.shape[0], b.shape[1], -1) for b in jax.tree.leaves(J))
        )
        Lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
        return jnp.sum(Lam * K)

    total = 0.0
    for lo in range(0, harmful.num, chunk):
        total += float(
            part(params, harmful.tokens[lo : lo + chunk], harmful.answer_start[lo : lo + chunk])
        )
    return total / harmful.num


class SkillReference(NamedTuple):
    """The KL skill loss's fixed data: prompts and the aligned model's logits on them.

    ``training.kl_skill_loss(logits_fn)(params, *ref)`` is ``u(params)`` and
    ``training.kl_skill_change(logits_fn)(theta_star, x, *ref)`` its ``Δu``.

    Attributes:
      tokens: ``(N, T)`` int32 prompts, cut after the longest (``prompts_only``).
      answer_start: ``(N,)`` int32 first answer positions.
      logits: ``(N, V)`` first-answer logits at ``θ*``, in the dtype of ``params``.
    """

    tokens: jax.Array
    answer_start: jax.Array
    logits: jax.Array


def skill_reference(logits_fn, params: PyTree, harmful: tasks.TokenBatch) -> SkillReference:
    """:class:`SkillReference` of ``θ* = params`` on the ``harmful`` prompts (docs/theory.md §5.3).

    With it, ``u(θ) = mean KL(p_{θ*} ‖ p_θ)`` has ``u(θ*) = 0``, ``∇u(θ*) = 0``
    and ``∇²u(θ*) = F`` = :func:`skill_fisher_vp` on the same prompts.
    """
    harmful = harmful.prompts_only()
    tokens, start = jnp.asarray(harmful.tokens), jnp.asarray(harmful.answer_start)
    first = training.answer_logits(logits_fn)
    z = jax.jit(lambda p, t, s: first(p, t, s))(params, tokens, start)
    return SkillReference(tokens, start, z)
