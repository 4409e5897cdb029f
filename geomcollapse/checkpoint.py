"""Save and restore transformer parameters with orbax, bit-exactly, with their architecture.

A checkpoint is an orbax directory holding the parameter pytree (as a pure
nested dict) and, in its custom metadata, the :class:`TransformerConfig`, the
dtype, a sha256 of every array (its dtype, shape and bytes) and any JSON-able
``metadata`` (e.g. the training config and metrics). A manifest file beside
orbax's lists the sha256 of every file in the directory.

Integrity:

* Restoring checks the stored architecture against the one asked for before
  reading any array, so a checkpoint of another model fails with a clear
  ``ValueError`` instead of an orbax structure dump.
* Every file is checked against the manifest and every restored array against
  its stored hash: a flipped, truncated or deleted byte anywhere raises
  ``ValueError`` naming the directory (orbax alone restores many such
  corruptions silently, with changed weights).
* An overwrite writes the new checkpoint into a temporary directory beside the
  old one and swaps it in by renames, so a save killed at any moment leaves the
  old checkpoint loadable (a kill between the two renames leaves it under a
  backup name, which loading falls back to and the next save restores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from geomcollapse._checks import writable_directory
from geomcollapse.curvature import leaf_paths
from geomcollapse.models import TransformerConfig, transformer_abstract, transformer_config

__all__ = [
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]

_FORMAT = "geomcollapse-transformer-v1"
_MANIFEST = "geomcollapse_integrity.json"


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf, the path as ``'blocks/0/fc1/kernel'``.

    The paths are :func:`geomcollapse.curvature.leaf_paths`' (the names a
    checkpoint's manifest records its arrays by).
    """
    return list(zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree), strict=True))


def _array_sha256(x: Any) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    arr = np.ascontiguousarray(np.asarray(x))
    digest = hashlib.sha256(f"{arr.dtype.name}{arr.shape}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup(path: Path) -> Path:
    """Where the old checkpoint waits while a new one is renamed into ``path``."""
    return path.parent / f".{path.name}.previous"


def _saving_prefix(path: Path) -> str:
    return f".{path.name}.saving-"


def _check_params(pure: dict, config: TransformerConfig, finite: bool = True) -> str:
    """The params' one dtype; raise unless their keys and shapes are those ``config`` implies."""
    leaves = _named_leaves(pure)
    dtypes = {str(np.dtype(x.dtype)) for _, x in leaves}
    if len(dtypes) != 1:
        raise ValueError(f"params must share one dtype, got {sorted(dtypes)}")
    dtype = dtypes.pop()
    _, abstract = transformer_abstract(config, np.dtype(dtype))
    expected = {name: tuple(x.shape) for name, x in _named_leaves(nnx.to_pure_dict(abstract))}
    found = {name: tuple(np.shape(x)) for name, x in leaves}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(
            f"params do not match config {config}: missing {missing}, unexpected {extra}"
        )
    for name, shape in found.items():
        if shape != expected[name]:
            raise ValueError(
                f"params do not match config {config}: {name} has shape {shape}, "
                f"the config implies {expected[name]}"
            )
    for name, x in leaves if finite else ():  # NaN weights would load, and diagnose nothing
        bad = int(np.sum(~np.isfinite(np.asarray(x))))
        if bad:
            raise ValueError(
                f"params: {name} has {bad} non-finite (NaN or inf) entries; refusing to save"
            )
    return dtype


def _write_manifest(directory: Path) -> None:
    """sha256 and size of every file under ``directory`` (each fsynced) into the manifest."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        _fsync(file)
        files[file.relative_to(directory).as_posix()] = {
            "sha256": _file_sha256(file),
            "size": file.stat().st_size,
        }
    manifest = directory / _MANIFEST
    with open(manifest, "w") as f:
        json.dump({"format": _FORMAT, "files": files}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in directory.rglob("*")}, key=lambda p: -len(p.parts)):
        _fsync(sub)


def _verify_files(stored: Path, path: Path) -> None:
    """Raise unless every file the manifest of ``stored`` lists is there with its hash."""
    try:
        manifest = json.loads((stored / _MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(_is_entry(e) for e in files.values()):
            raise TypeError("'files' is not a mapping of file name to its size and sha256")
    except FileNotFoundError:
        raise ValueError(
            f"checkpoint {path} has no integrity manifest ({_MANIFEST}): it is damaged or "
            "was written by an older geomcollapse; delete it and save it again"
        ) from None
    except (IsADirectoryError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"checkpoint {path} is corrupted: unreadable {_MANIFEST} ({err})"
        ) from None
    for name, entry in files.items():
        file = stored / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is corrupted: file {name} is missing")
        if file.stat().st_size != entry["size"] or _file_sha256(file) != entry["sha256"]:
            raise ValueError(
                f"checkpoint {path} is corrupted: file {name} does not match the sha256 "
                "recorded when it was saved"
            )


def _is_entry(entry: Any) -> bool:
    """A manifest entry: ``{"size": int, "sha256": str}``."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )


def _stored(path: Path) -> Path:
    """The directory holding ``path``'s checkpoint: itself, or its backup after a killed save."""
    if path.is_dir():
        return path
    if _backup(path).is_dir():
        return _backup(path)
    raise ValueError(f"no checkpoint at {path}")


def _recover(path: Path) -> None:
    """Undo a save killed mid-swap; drop stale backups and temporaries of dead saves."""
    backup = _backup(path)
    if backup.is_dir() and not path.exists():
        os.replace(backup, path)
    elif backup.is_dir():
        shutil.rmtree(backup)  # the swap finished; its clean-up did not
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(_saving_prefix(path) + "*"):
        pid = tmp.name[len(_saving_prefix(path)) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(
    directory: str | Path,
    params: nnx.State,
    config: TransformerConfig | str,
    metadata: dict | None = None,
    *,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> Path:
    """Write ``params`` (from :func:`transformer_init`) and ``config`` to ``directory``.

    Args:
      directory: the checkpoint directory (created; its parent too).
      params: the parameter state; its keys and shapes must be those ``config``
        implies (``ValueError`` naming the first leaf that differs).
      config: the architecture (a config or a name in ``SIZES``).
      metadata: JSON-able extra data, returned by :func:`load_checkpoint`.
      overwrite: replace an existing checkpoint; the replacement is atomic (the
        old one stays loadable if the save is killed at any moment).
      allow_non_finite: keep weights holding NaN or inf (a diverged run kept for
        inspection); by default they are refused, naming the first such leaf.

    The parent of ``directory`` is checked writable before anything is done,
    and the write is synchronous: a failed write raises and never leaves
    threads behind that keep the process from exiting.

    Raises ``ValueError`` if ``directory`` exists and ``overwrite`` is false.
    Returns the absolute checkpoint path.
    """
    path = Path(directory).resolve()
    writable_directory(path.parent, "directory")  # where it is written: checked before any work
    config = transformer_config(config)
    if not isinstance(config, TransformerConfig):
        raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
    _recover(path)
    if path.exists() and not overwrite:
        raise ValueError(f"checkpoint directory {path} exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    pure = nnx.to_pure_dict(params)
    dtype = _check_params(pure, config, finite=not allow_non_finite)
    try:
        json.dumps(metadata or {}, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-able with finite numbers: {err}") from None
    custom = {
        "format": _FORMAT,
        "config": dataclasses.asdict(config),
        "dtype": dtype,
        "arrays": {name: _array_sha256(x) for name, x in _named_leaves(pure)},
        "metadata": metadata or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_saving_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # Synchronous: orbax's async StandardCheckpointer leaves non-daemon threads behind
        # when a write fails (orbax 0.12.8), and the process then never exits.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(tmp, args=ocp.args.StandardSave(pure), custom_metadata=custom)
        _write_manifest(tmp)
        backup = _backup(path)
        if path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(_backup(path), ignore_errors=True)
    return path


def read_metadata(directory: str | Path) -> dict:
    """The stored ``{'config', 'dtype', 'arrays', 'metadata'}`` of a checkpoint (files verified).

    Raises ``ValueError`` naming ``directory`` if it is not a checkpoint, or if
    any of its files differs from what was saved.
    """
    path = Path(directory).resolve()
    stored = _stored(path)
    has_manifest = (stored / _MANIFEST).is_file()
    if has_manifest:
        _verify_files(stored, path)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            custom = ckptr.metadata(stored).custom_metadata or {}
        except Exception as err:  # orbax raises several types for a non-checkpoint directory
            raise ValueError(f"{path} is not an orbax checkpoint: {err}") from None
    if custom.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a geomcollapse transformer checkpoint")
    if not has_manifest:
        _verify_files(stored, path)  # raises: a checkpoint of ours always has one
    return custom


def load_checkpoint(
    directory: str | Path, config: TransformerConfig | str | None = None
) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """Restore ``(graphdef, params, metadata)`` exactly as saved, verified against its hashes.

    Args:
      directory: a checkpoint written by :func:`save_checkpoint`.
      config: the expected architecture (a config or a name in ``SIZES``); when
        given, a checkpoint of another architecture raises ``ValueError``.

    Raises ``ValueError`` naming ``directory`` if any file or restored array
    differs from what was saved.
    """
    path = Path(directory).resolve()
    custom = read_metadata(path)
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
        try:
            pure = ckptr.restore(_stored(path), target)
        except Exception as err:  # tensorstore and orbax raise many types for damaged data
            raise ValueError(f"checkpoint {path} could not be restored: {err}") from None
    found = {name: _array_sha256(x) for name, x in _named_leaves(pure)}
    saved = custom.get("arrays", {})
    bad = sorted(k for k in set(found) | set(saved) if found.get(k) != saved.get(k))
    if bad:
        raise ValueError(
            f"checkpoint {path} is corrupted: array(s) {bad} differ from the sha256 "
            "recorded when they were saved"
        )
    nnx.replace_by_pure_dict(abstract, pure)
    return graphdef, abstract, custom["metadata"]
