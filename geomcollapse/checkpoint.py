"""Save and restore transformer parameters with orbax, bit-exactly, with their architecture.

A checkpoint is an orbax directory holding the parameter pytree (as a pure
nested dict) and, in its custom metadata, the :class:`TransformerConfig`, the
dtype and any JSON-able ``metadata`` (e.g. the training config and metrics).
Restoring checks the stored architecture against the one asked for before
reading any array, so a checkpoint of another model fails with a clear
``ValueError`` instead of an orbax structure dump.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from geomcollapse.models import TransformerConfig, transformer_abstract, transformer_config

_FORMAT = "geomcollapse-transformer-v1"


def save_checkpoint(
    directory: str | Path,
    params: nnx.State,
    config: TransformerConfig,
    metadata: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` (from :func:`transformer_init`) and ``config`` to ``directory``.

    Raises ``ValueError`` if ``directory`` exists and ``overwrite`` is false.
    Returns the absolute checkpoint path.
    """
    path = Path(directory).resolve()
    if path.exists() and not overwrite:
        raise ValueError(f"checkpoint directory {path} exists; pass overwrite=True to replace it")
    pure = nnx.to_pure_dict(params)
    dtypes = {str(np.dtype(x.dtype)) for x in jax.tree.leaves(pure)}
    if len(dtypes) != 1:
        raise ValueError(f"params must share one dtype, got {sorted(dtypes)}")
    custom = {
        "format": _FORMAT,
        "config": dataclasses.asdict(config),
        "dtype": dtypes.pop(),
        "metadata": metadata or {},
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, pure, custom_metadata=custom, force=overwrite)
    return path


def read_metadata(directory: str | Path) -> dict:
    """The stored ``{'config', 'dtype', 'metadata'}`` of a checkpoint (no arrays read)."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise ValueError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            custom = ckptr.metadata(path).custom_metadata or {}
        except Exception as err:  # orbax raises several types for a non-checkpoint directory
            raise ValueError(f"{path} is not an orbax checkpoint: {err}") from None
    if custom.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a geomcollapse transformer checkpoint")
    return custom


def load_checkpoint(
    directory: str | Path, config: TransformerConfig | str | None = None
) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """Restore ``(graphdef, params, metadata)`` exactly as saved.

    Args:
      directory: a checkpoint written by :func:`save_checkpoint`.
      config: the expected architecture (a config or a name in ``SIZES``); when
        given, a checkpoint of another architecture raises ``ValueError``.
    """
    custom = read_metadata(directory)
    stored = TransformerConfig(**custom["config"])
    if config is not None:
        config = transformer_config(config)
    if config is not None and config != stored:
        raise ValueError(
            f"checkpoint {directory} holds a different architecture: saved {stored}, "
            f"asked for {config}"
        )
    graphdef, abstract = transformer_abstract(stored, np.dtype(custom["dtype"]))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract)
    )
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(Path(directory).resolve(), target)
    nnx.replace_by_pure_dict(abstract, pure)
    return graphdef, abstract, custom["metadata"]
