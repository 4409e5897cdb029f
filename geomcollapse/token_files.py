"""Token files for the transformer family; :func:`diagnose_checkpoint` (``geomcollapse diagnose``).

A token file holds ``N`` sequences of token ids (docs/diagnose.md):

* ``.npy``: an integer array ``(N, T)``; every row is a whole sequence.
* ``.npz``: an integer array ``tokens`` ``(N, T)``, optionally ``answer_start``
  ``(N,)`` and, for a task file, ``targets`` ``(N, T)`` and ``mask`` ``(N, T)``
  (a :class:`geomcollapse.tasks.TokenBatch` saved by ``np.savez(path,
  **batch._asdict())`` is one, its ``harmful`` array not read); any other
  array is refused (a misspelled name would otherwise be read as a default).
* ``.jsonl``: one sequence per line, a JSON list of ids or an object
  ``{"tokens": [...], "answer_start": s}`` (``answer_start`` optional, any other
  key refused); rows
  of different lengths are right-padded with id 0, which no loss or skill
  position ever reads (the model is causal).

A *skill* file gives the prompts whose next-token distribution at position
``answer_start`` (default: each row's last token) is the skill; the skill loss
is the divergence from the aligned model's own distribution there,
``u(θ) = mean KL(p_{θ*} ‖ p_θ)`` (docs/theory.md §5.3: exactly minimal at
``θ*`` with ``∇²u(θ*) = F``). A *task* file gives the fine-tuning data; the
loss is the mean next-token cross-entropy over the positions ``p`` with
``answer_start ≤ p ≤ (row length) − 2`` (default: all), or over ``mask`` when
the file has one (``targets`` default to the tokens shifted left by one). Without
a ``mask``, a task row with no such position (one token, or ``answer_start`` at
its last) is refused rather than left out of the mean. A skill file's
``targets`` and ``mask`` (a saved ``TokenBatch`` has them) are not read: the
skill is the distribution at ``answer_start``.

Every malformed input raises ``ValueError`` whose one-line message starts with
the file's path and says what is wrong, before anything is computed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse._checks import finite_leaves, prng_key
from geomcollapse.curvature import leaf_paths
from geomcollapse.diagnosis import DEFAULT_ORDER, Diagnosis, check_plan, diagnose
from geomcollapse.models import TransformerConfig

__all__ = ["TokenFile", "diagnose_checkpoint", "read_checkpoint_config", "read_token_file"]

SUFFIXES = (".npy", ".npz", ".jsonl")
ROLES = ("skill", "task")


class TokenFile(NamedTuple):
    """A validated token file.

    Attributes:
      tokens: ``(N, T)`` int32 ids (rows right-padded with 0 where shorter).
      targets: ``(N, T)`` int32 next-token labels (task files).
      mask: ``(N, T)`` float loss weights over ``targets`` (task files).
      answer_start: ``(N,)`` int32 skill positions (skill files) or first loss positions.
      lengths: ``(N,)`` int32 row lengths.
    """

    tokens: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    answer_start: np.ndarray
    lengths: np.ndarray


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _ids(values: Any, path: Path, what: str, where: str = "") -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: {where}{what} must be integer token ids, got dtype {arr.dtype}")
    return arr


def _read_npy(path: Path) -> dict:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types for a damaged file
        raise ValueError(f"{path}: not a readable .npy file ({_one_line(err)})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is an .npz archive; name it .npz")
    return {"tokens": arr}


def _read_npz(path: Path) -> dict:
    try:  # numpy's own errors (a pickled object array, a truncated member) name no file
        with np.load(path, allow_pickle=False) as archive:
            found = sorted(archive.files)
            data = {k: archive[k] for k in found if k in _NPZ_KEYS}
    except Exception as err:
        raise ValueError(f"{path}: not a readable .npz file ({_one_line(err)})") from None
    if "tokens" not in found:
        raise ValueError(f"{path}: no 'tokens' array (the archive holds {found})")
    unknown = sorted(set(found) - set(_NPZ_KEYS) - {"harmful"})
    if unknown:  # a misspelled 'answer_start' would be read as the default, silently
        raise ValueError(
            f"{path}: unknown arrays {unknown}; an archive holds only "
            f"{list(_NPZ_KEYS)} (and a TokenBatch's 'harmful', not read)"
        )
    return data


_NPZ_KEYS = ("tokens", "answer_start", "targets", "mask")
_JSONL_KEYS = ("tokens", "answer_start")


def _read_jsonl(path: Path) -> dict:
    rows, starts = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}: "
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: {where}not valid JSON ({err.msg})") from None
        start = None
        if isinstance(value, dict):
            if "tokens" not in value:
                raise ValueError(f"{path}: {where}an object must have a 'tokens' list")
            unknown = sorted(set(value) - set(_JSONL_KEYS))
            if unknown:  # a misspelled 'answer_start' would be read as the default, silently
                raise ValueError(
                    f"{path}: {where}unknown keys {unknown}; an object holds only "
                    f"{list(_JSONL_KEYS)}"
                )
            start = value.get("answer_start")
            value = value["tokens"]
        if not isinstance(value, list):
            raise ValueError(
                f"{path}: {where}expected a list of token ids or an object with a 'tokens' "
                f"list, got {type(value).__name__}"
            )
        if not value:
            raise ValueError(f"{path}: {where}empty sequence")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError(f"{path}: {where}token ids must be integers")
        big = next((t for t in value if not -(2**31) <= t < 2**31), None)
        if big is not None:  # beyond int32: no vocabulary has it, and numpy cannot hold it
            raise ValueError(f"{path}: {where}token id {big} out of range")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise ValueError(f"{path}: {where}answer_start must be an integer, got {start!r}")
        if start is not None and not 0 <= start < len(value):
            raise ValueError(
                f"{path}: {where}answer_start must lie in [0, row length), got {start} "
                f"(length {len(value)})"
            )
        rows.append(value)
        starts.append(start)
    if not rows:
        raise ValueError(f"{path}: holds no sequences")
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    data = {"tokens": tokens, "lengths": np.array([len(r) for r in rows])}
    if any(s is not None for s in starts):
        data["answer_start"] = np.array([0 if s is None else s for s in starts])
        data["start_missing"] = np.array([s is None for s in starts])
    return data


def read_token_file(path: str | Path, role: str, config: TransformerConfig) -> TokenFile:
    """Read and validate a skill or task token file for a transformer of ``config``.

    Args:
      path: a ``.npy``, ``.npz`` or ``.jsonl`` file (formats in the module docstring).
      role: ``'skill'`` or ``'task'``.
      config: the checkpoint's architecture (its ``vocab`` and ``context`` bound the ids).

    Raises:
      ValueError: one line, starting with ``path``: missing or empty file,
        unknown format, wrong shape or dtype, ids out of ``[0, vocab)``, rows
        past the context, a bad ``answer_start``/``targets``/``mask``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be 'skill' or 'task', got {role!r}")
    path = Path(path)
    data = _read_any(path)
    tokens, lengths = _checked_tokens(data, path, config)
    start = _answer_start(data, path, role, lengths)
    if role == "skill":
        targets = np.zeros(tokens.shape, np.int32)
        mask = np.zeros(tokens.shape, np.float32)
    else:
        targets, mask = _task_targets_and_mask(data, path, config, tokens, lengths, start)
    return TokenFile(
        tokens.astype(np.int32),
        np.asarray(targets, np.int32),
        mask,
        np.asarray(start, np.int32),
        lengths.astype(np.int32),
    )


def _read_any(path: Path) -> dict:
    """The arrays of a ``.npy``, ``.npz`` or ``.jsonl`` file; ``ValueError`` naming ``path``."""
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unsupported format {path.suffix or '(no suffix)'!r} "
            f"(use {', '.join(SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    return {".npy": _read_npy, ".npz": _read_npz, ".jsonl": _read_jsonl}[path.suffix](path)


def _checked_tokens(
    data: dict, path: Path, config: TransformerConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens (N, T), lengths (N,))``: 2-D, non-empty, within the context and vocabulary."""
    tokens = _ids(data["tokens"], path, "tokens")
    if tokens.ndim != 2:
        raise ValueError(
            f"{path}: tokens must be a 2-D (N, T) array of token ids, got shape {tokens.shape}"
        )
    N, T = tokens.shape
    if N == 0 or T == 0:
        raise ValueError(f"{path}: holds no tokens (shape {tokens.shape})")
    lengths = np.asarray(data.get("lengths", np.full(N, T)))
    if T > config.context:
        raise ValueError(
            f"{path}: sequences of {T} tokens exceed the checkpoint's context of "
            f"{config.context} tokens"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab:
        raise ValueError(
            f"{path}: token ids must lie in [0, {config.vocab}) (the checkpoint's vocabulary), "
            f"got ids in [{lo}, {hi}]"
        )
    return tokens, lengths


def _answer_start(data: dict, path: Path, role: str, lengths: np.ndarray) -> np.ndarray:
    """Each row's ``answer_start``, checked; where a row gives none, the role's default."""
    N = lengths.shape[0]
    start = None
    if "answer_start" in data:
        start = _ids(data["answer_start"], path, "answer_start")
        if start.shape != (N,):
            raise ValueError(
                f"{path}: answer_start must have shape (N,) = ({N},), got {start.shape}"
            )
        bad = np.flatnonzero((start < 0) | (start >= lengths))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{path}: answer_start must lie in [0, row length), got {int(start[i])} in row "
                f"{i} of length {int(lengths[i])}"
            )
    default = lengths - 1 if role == "skill" else np.zeros(N, lengths.dtype)
    if "answer_start" in data and "start_missing" in data:  # .jsonl rows without one
        return np.where(data["start_missing"], default, start)
    return default if start is None else start


def _task_targets_and_mask(
    data: dict,
    path: Path,
    config: TransformerConfig,
    tokens: np.ndarray,
    lengths: np.ndarray,
    start: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A task file's next-token ``targets`` and loss ``mask`` (given, checked, or derived)."""
    N, T = tokens.shape
    positions = np.arange(T)[None, :]
    if int(lengths.max()) < 2:
        raise ValueError(
            f"{path}: task sequences need at least 2 tokens (a next-token target), "
            f"got rows of length {int(lengths.max())}"
        )
    if "targets" in data:
        targets = _ids(data["targets"], path, "targets")
        if targets.shape != (N, T):
            raise ValueError(
                f"{path}: targets must have the tokens' shape {(N, T)}, got {targets.shape}"
            )
        t_lo, t_hi = int(targets.min()), int(targets.max())
        if t_lo < 0 or t_hi >= config.vocab:
            raise ValueError(
                f"{path}: targets must lie in [0, {config.vocab}) (the checkpoint's "
                f"vocabulary), got ids in [{t_lo}, {t_hi}]"
            )
    else:  # the next token; a row's last position (and padding) has none
        targets = np.concatenate([tokens[:, 1:], np.zeros((N, 1), tokens.dtype)], axis=1)
    if "mask" in data:
        mask = np.asarray(data["mask"])
        if mask.shape != (N, T):
            raise ValueError(f"{path}: mask must have the tokens' shape {(N, T)}, got {mask.shape}")
        if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool) or not np.all(
            np.isin(mask, (0, 1))
        ):
            raise ValueError(f"{path}: mask must hold only 0 and 1")
        mask = mask.astype(np.float32)
        if "targets" not in data and np.any(mask * (positions > lengths[:, None] - 2)):
            raise ValueError(
                f"{path}: mask selects a position with no next token (a row's last "
                "token or its padding); give 'targets' or mask those positions out"
            )
    else:
        mask = ((positions >= start[:, None]) & (positions <= lengths[:, None] - 2)).astype(
            np.float32
        )
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:  # its row would drop out of the mean loss without a word
            i = int(empty[0])
            raise ValueError(
                f"{path}: row {i} (of {empty.size} such rows) has no target position: length "
                f"{int(lengths[i])}, answer_start {int(start[i])}; a task row needs a token "
                "after answer_start to predict (or give 'mask' to leave rows out on purpose)"
            )
    if not np.any(mask):
        raise ValueError(f"{path}: the loss mask selects no target position")
    return targets, mask


def read_checkpoint_config(directory: str | Path) -> TransformerConfig:
    """The architecture stored in a transformer checkpoint, verified (no arrays read).

    Raises ``ValueError`` (one line, starting with ``directory``): missing
    directory, not a geomcollapse transformer checkpoint, damaged files.
    """
    from geomcollapse import checkpoint

    path = Path(directory)
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint directory")
    try:
        meta = checkpoint.read_metadata(path)
        return TransformerConfig(**meta["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: {_without_path(_one_line(err), path)}") from None


def _without_path(message: str, path: Path) -> str:
    """``message`` without its mentions of ``path`` (the caller prefixes it once).

    ``checkpoint`` names the directory by its absolute path: only that is
    dropped (``no checkpoint at /abs/P`` → ``no checkpoint``), never a relative
    spelling that could be an ordinary word (a directory named ``checkpoint``).
    """
    resolved = re.escape(str(path.resolve()))
    message = re.sub(rf"(\s+at)?\s*{resolved}(?![\w/-]|\.\w)", "", message)
    return " ".join(message.split()) or "not a checkpoint"


def _finite_weights(params: Any, directory: str | Path) -> None:
    """Raise, naming the checkpoint and its first bad array, if a weight is NaN or ±inf."""
    from flax import nnx

    pure = nnx.to_pure_dict(params)
    for name, leaf in zip(leaf_paths(pure), jax.tree_util.tree_leaves(pure), strict=True):
        try:
            finite_leaves(leaf, name)
        except ValueError as err:
            raise ValueError(f"{directory}: the checkpoint's weights: {err}") from None


def diagnose_checkpoint(
    checkpoint_dir: str | Path,
    skill: str | Path,
    task: str | Path,
    *,
    key: jax.Array,
    d: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    dtype: Any = jnp.float64,
    progress: bool = False,
    **options: Any,
) -> Diagnosis:
    """:func:`geomcollapse.diagnose` of a transformer checkpoint on a skill and a task file.

    The skill loss is ``u = mean KL(p_{θ*} ‖ p_θ)`` of the next-token
    distribution at the skill file's positions (``training.kl_skill_loss``), its
    Fisher the true one of that output (``fisher='true'``); the task loss is
    ``training.sequence_loss`` over the task file's masked targets. Everything
    is validated (checkpoint metadata, both files, then ``d``, ``lr``,
    ``steps``, ``threshold``, ``order`` and ``key``) before the weights load,
    and the weights must be finite (the error names the checkpoint).
    Parameters are cast to ``dtype`` (float64 by default: the t⁴ onset is far
    below float32 rounding). ``options`` go to :func:`geomcollapse.diagnose`.
    """
    from geomcollapse import checkpoint, curvature, training
    from geomcollapse.models import transformer_abstract, transformer_logits

    config = read_checkpoint_config(checkpoint_dir)
    skill_file = read_token_file(skill, "skill", config)
    task_file = read_token_file(task, "task", config)
    graphdef, abstract = transformer_abstract(config, dtype)
    n = curvature.num_params(abstract)
    check_plan(
        n, d=d, lr=lr, steps=steps, threshold=threshold, order=options.get("order", DEFAULT_ORDER)
    )
    key = prng_key(key)
    try:
        _, params, _ = checkpoint.load_checkpoint(checkpoint_dir, config)
    except ValueError as err:
        raise ValueError(f"{checkpoint_dir}: {_one_line(err)}") from None
    _finite_weights(params, checkpoint_dir)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    logits = transformer_logits(graphdef)
    first = training.answer_logits(logits)
    s_len = int(np.max(skill_file.answer_start)) + 1  # causal: later tokens change nothing
    s_tokens = jnp.asarray(skill_file.tokens[:, :s_len])
    s_start = jnp.asarray(skill_file.answer_start)
    reference = jax.jit(first)(params, s_tokens, s_start)
    skill_args = (s_tokens, s_start, reference)
    task_args = tuple(jnp.asarray(a) for a in (task_file.tokens, task_file.targets, task_file.mask))
    return diagnose(
        training.kl_skill_loss(logits),
        training.sequence_loss(logits),
        params,
        skill_args=skill_args,
        task_args=task_args,
        skill_logits=training.kl_skill_logits(logits),
        d=d,
        lr=lr,
        steps=steps,
        threshold=threshold,
        key=key,
        progress=progress,
        **options,
    )
