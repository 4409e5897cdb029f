"""Shared set-up of the transformer experiments: the aligned model ``θ*`` per size, cached.

``θ*`` is trained once per :class:`AlignmentConfig` and kept as an orbax
checkpoint under ``experiments/results/checkpoints/`` (not committed); later
experiments and reruns restore it bit-exactly instead of retraining.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse import pipeline

ALIGNMENT = {
    "tiny": pipeline.AlignmentConfig(),
    "small": pipeline.AlignmentConfig(size="small", pretrain_steps=3000, align_steps=800),
    # the tests' model (and the experiments' TINY configs): fewer steps, same targets met
    "tiny-fast": pipeline.AlignmentConfig(pretrain_steps=1200, align_steps=400),
}


def checkpoint_dir(size: str, outdir: Path) -> Path:
    """Where ``θ*`` of ``ALIGNMENT[size]`` is cached under ``outdir``."""
    return outdir / "experiments" / "results" / "checkpoints" / f"aligned_{size}"


def aligned_model(size: str, outdir: Path, progress: bool = True) -> pipeline.AlignedModel:
    """``θ*`` for ``size``, restored from (or trained into) the checkpoint cache in ``outdir``."""
    if size not in ALIGNMENT:
        raise ValueError(f"unknown model {size!r}; known: {sorted(ALIGNMENT)}")
    return pipeline.align_model(ALIGNMENT[size], checkpoint_dir(size, outdir), progress=progress)


def rows(tree) -> np.ndarray:
    """A pytree with a leading axis ``k`` → a ``(k, n)`` float64 matrix."""
    return np.asarray(jax.jit(jax.vmap(lambda t: ravel_pytree(t)[0]))(tree), np.float64)


def flat(tree) -> jnp.ndarray:
    """A pytree → its raveled 1-D vector."""
    return ravel_pytree(tree)[0]
