"""Shared set-up of the transformer experiments: the aligned model ``θ*`` per size, cached.

``θ*`` is trained once per :class:`AlignmentConfig` and kept as an orbax
checkpoint under ``experiments/results/checkpoints/``; later experiments and
reruns restore it bit-exactly instead of retraining. ``tiny``'s is committed
(float32 training on a CPU gives another ``θ*`` on another machine): an
``outdir`` without one gets a copy of it.

Costly quantities of ``θ*`` alone (no fine-tuning in them: Thm 6.1's constants,
the predictors at ``θ*``) are kept the same way, as JSON under
``experiments/results/at_theta/`` (:func:`read_at_theta`, :func:`write_at_theta`),
named and checked by a key that carries ``θ*``'s digest; ``tiny``'s are committed,
so the main job reads them instead of recomputing them (docs/experiments.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments._common import write_json
from geomcollapse import curvature, linalg, models, pipeline, tasks, training
from geomcollapse.subspace import Subspace

ALIGNMENT = {
    "tiny": pipeline.AlignmentConfig(),
    "small": pipeline.AlignmentConfig(size="small", pretrain_steps=3000, align_steps=800),
    # the tests' model (and the experiments' TINY configs): fewer steps, same targets met
    "tiny-fast": pipeline.AlignmentConfig(pretrain_steps=1200, align_steps=400),
}


_REPOSITORY = Path(__file__).resolve().parent.parent  # where the committed θ* lies


def checkpoint_dir(size: str, outdir: Path) -> Path:
    """Where ``θ*`` of ``ALIGNMENT[size]`` is cached under ``outdir``."""
    return Path(outdir) / "experiments" / "results" / "checkpoints" / f"aligned_{size}"


def theta_cached(size: str, outdir: Path) -> bool:
    """Whether :func:`aligned_model` restores ``θ*`` of ``size`` without training: cached
    under ``outdir`` or committed in the repository."""
    config = ALIGNMENT[size]
    return any(
        pipeline.is_aligned(config, checkpoint_dir(size, root)) for root in (outdir, _REPOSITORY)
    )


def theta_digest(params) -> str:
    """A 16-hex-digit digest of ``θ*``'s values (its raveled bytes), for cache keys."""
    return hashlib.sha256(np.asarray(ravel_pytree(params)[0]).tobytes()).hexdigest()[:16]


AT_THETA = Path("experiments") / "results" / "at_theta"


def at_theta_path(name: str, key: dict, outdir: Path) -> Path:
    """Where the quantity ``name`` of ``key`` is kept under ``outdir``: named by a digest
    of ``key`` (a JSON-able dict that carries ``θ*``'s :func:`theta_digest`)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(outdir) / AT_THETA / f"{name}_{digest}.json"


def stored_at_theta(name: str, key: dict, outdir: Path, required: tuple = ()) -> list[dict]:
    """Every payload stored for ``key``: under ``outdir`` first, then committed in this
    repository (one of each at most).

    A file is used only when the key stored in it equals ``key`` and its payload is a
    dict holding the ``required`` fields; an unreadable file, another key or a payload
    without them is skipped with a warning naming the file (the caller recomputes).
    """
    want = json.loads(json.dumps(key))  # tuples as JSON stores them
    found = []
    for root in dict.fromkeys((Path(outdir).resolve(), _REPOSITORY)):
        path = at_theta_path(name, key, root)
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            payload = stored["payload"]
            if stored["key"] != want:
                problem = "its stored key differs"
            elif not isinstance(payload, dict) or not set(required) <= set(payload):
                problem = f"its payload lacks one of {list(required)}"
            else:
                found.append(payload)
                continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"it cannot be read ({type(e).__name__}: {e})"
        warnings.warn(f"{path} is not used: {problem}; recomputing", stacklevel=2)
    return found


def read_at_theta(name: str, key: dict, outdir: Path, required: tuple = ()) -> dict | None:
    """The payload stored for ``key`` (:func:`stored_at_theta`'s first); None when none is."""
    found = stored_at_theta(name, key, outdir, required)
    return found[0] if found else None


def write_at_theta(name: str, key: dict, outdir: Path, payload: dict) -> Path:
    """Store ``payload`` for ``key`` under ``outdir`` (atomically); returns the file."""
    path = at_theta_path(name, key, outdir)
    write_json(path, {"key": key, "payload": payload})
    return path


def aligned_model(size: str, outdir: Path, progress: bool = True) -> pipeline.AlignedModel:
    """``θ*`` for ``size``, restored from (or trained into) the checkpoint cache in ``outdir``."""
    if size not in ALIGNMENT:
        raise ValueError(f"unknown model {size!r}; known: {sorted(ALIGNMENT)}")
    target, committed = checkpoint_dir(size, outdir), checkpoint_dir(size, _REPOSITORY)
    if not target.exists() and pipeline.is_aligned(ALIGNMENT[size], committed):
        shutil.copytree(committed, target)  # the committed θ*: the same on every machine
    return pipeline.align_model(ALIGNMENT[size], target, progress=progress)


def rows(tree) -> np.ndarray:
    """A pytree with a leading axis ``k`` → a ``(k, n)`` float64 matrix."""
    return np.asarray(jax.jit(jax.vmap(lambda t: ravel_pytree(t)[0]))(tree), np.float64)


def flat(tree) -> jnp.ndarray:
    """A pytree → its raveled 1-D vector."""
    return ravel_pytree(tree)[0]


class SkillFisher(NamedTuple):
    """The refusal skill's true Fisher at ``θ*`` (float64), top-``k`` and trace.

    Attributes:
      params, logits: float64 ``θ*`` and its logits function.
      graphdef: the model's graph (``logits`` is ``models.transformer_logits(graphdef)``).
      harmful: the harmful prompts that define ``F`` and ``u``.
      fvp: ``v ↦ F v`` (jitted, pytree in and out).
      pairs: the Lanczos :class:`Eigenpairs`; ``subspace`` the same as a certified
        :class:`geomcollapse.subspace.Subspace`; ``values`` ``(k,)`` and ``basis``
        ``(k, n)`` float64 as numpy; ``trace``: exact ``tr F``.
    """

    params: Any
    logits: Any
    graphdef: Any
    harmful: tasks.TokenBatch
    fvp: Any
    pairs: Any
    subspace: Subspace
    values: np.ndarray
    basis: np.ndarray
    trace: float


def skill_fisher(
    size: str,
    outdir: Path,
    *,
    num_prompts: int,
    k: int,
    prompt_key: jax.Array,
    lanczos_key: jax.Array,
    tol: float,
) -> SkillFisher:
    """``θ*`` of ``size`` in float64 and its skill Fisher's top-``k`` (Lanczos) and exact trace."""
    graphdef, params = aligned_model(size, outdir).as_dtype(jnp.float64)
    logits = models.transformer_logits(graphdef)
    harmful = tasks.harmful_prompts(prompt_key, num_prompts)
    # pipeline.skill_fisher_vp's F, bound once: Lanczos and every later F v run one compiled
    # program (curvature.apply), not a traced copy of the matvec beside it
    short = harmful.prompts_only()
    op = curvature.fisher_vp(training.answer_logits(logits)).bind(
        params, jnp.asarray(short.tokens), jnp.asarray(short.answer_start)
    )
    fvp = partial(curvature.apply, op)
    pairs = linalg.top_eigenpairs(op, params, k, key=lanczos_key, tol=tol, progress=True)
    return SkillFisher(
        params,
        logits,
        graphdef,
        harmful,
        fvp,
        pairs,
        Subspace.from_eigenpairs(pairs),
        np.asarray(pairs.values, np.float64),
        rows(pairs.vectors),
        pipeline.skill_fisher_trace(logits, params, harmful),
    )
