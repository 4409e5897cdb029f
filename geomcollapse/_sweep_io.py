"""File handling shared by both kinds of sweep: configs in, JSONL rows out, atomically.

A sweep's output is a JSONL file: a header line, then rows appended in groups
(a batch of landscapes, or a cell of an experiment), each group in one
``write`` followed by ``fsync``. A kill can therefore leave at most a partial
last line and a group with only some of its rows; resuming keeps whole groups
only and rewrites the file through a temporary file and ``os.replace``. Under
``jax.distributed`` each process writes its own part file the same way, and
process 0 merges the parts into the output (:func:`start_output`,
:func:`merge_parts`; :func:`processes`, :func:`barrier`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from geomcollapse._checks import is_number


def reject_unknown(found: dict, allowed, where: str) -> None:
    """Raise naming the keys of ``found`` that are not in ``allowed``."""
    unknown = sorted(set(found) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


INT64 = 2**63  # an integer of a sweep config fits a signed 64-bit integer: |x| < 2**63


def reject_non_finite(value: Any, where: str) -> None:
    """Raise naming the key (e.g. ``grid.epsilon[1]``) of any NaN or ±inf in ``value``,
    or of an integer that does not fit a signed 64-bit integer (no field takes one)."""
    if isinstance(value, dict):
        for key, item in value.items():
            reject_non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            reject_non_finite(item, f"{where}[{i}]")
    elif isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"{where} is {value}: every number in a sweep config must be finite")
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ValueError(f"{where} is {value}: it does not fit a signed 64-bit integer")


def reject_repeats(values: list, where: str) -> None:
    """Raise naming ``where`` and the value when ``values`` holds one value twice (``1``
    and ``1.0`` alike, inside lists too: ``[2, 1]`` and ``[2.0, 1.0]``): a repeated grid
    value or seed would run one cell twice and count its rows as independent samples."""
    seen = set()
    for value in values:
        key = json.dumps(_as_floats(value), sort_keys=True, default=repr)
        if key in seen:
            raise ValueError(
                f"{where} holds {value!r} twice: each value of a grid axis (and each seed)"
                " must be distinct, or one cell would be run and counted twice"
            )
        seen.add(key)


def _as_floats(value: Any) -> Any:
    """``value`` with every number (below 2⁵³, where floats are exact) as a float."""
    if isinstance(value, list | tuple):
        return [_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    return float(value) if is_number(value) and abs(value) < 2**53 else value


def read_config_file(path: Path) -> Any:
    """The parsed contents of a ``.json`` (or, on Python ≥ 3.11, ``.toml``) config file."""
    if path.is_dir():
        raise ValueError(f"config {str(path)!r} is a directory, not a config file")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"config must be .json or .toml, got {path.name!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {str(path)!r}: {err}") from None
    if path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ValueError("TOML configs need Python ≥ 3.11 (tomllib); use JSON")
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:  # json keeps the last silently; TOML refuses it itself
            raise ValueError(
                f"config file {str(path)!r} gives the key {repeated[0]!r} twice in one object "
                "(only the last would count)"
            )
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not valid JSON: {err}") from None


def header_of(path: Path, lines: list[str], digest: str) -> dict | None:
    """The header of ``path`` (its whole ``lines``, at least one) when it is this
    config's sweep (``config_sha256 == digest``); ``None`` when it is another config's
    header alone (a start that failed before any row: nothing to keep, so the sweep
    starts afresh there). ``ValueError`` when ``path`` is not a sweep output, or is
    another config's sweep with rows."""
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("config_sha256"), str):
        raise ValueError(
            f"{path} is not a sweep output (its first line is not a sweep's header); move it "
            "away or change 'output'"
        )
    if header["config_sha256"] == digest:
        return header
    if len(lines) == 1:
        return None
    raise ValueError(f"{path} holds a sweep of a different config; move it away or change 'output'")


def whole_lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` without a partial last line (one with no newline)."""
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines = lines[:-1]  # a partial trailing line from a kill mid-write
    return [line for line in lines if line]


def rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` atomically (a temporary file, ``fsync``, ``os.replace``).

    The temporary file is created with mode 0o666 less the process umask, as
    ``open`` would create ``path`` (``tempfile.mkstemp`` makes it 0o600).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_path(path: Path) -> Path:
    """The lock file that a sweep writing ``path`` holds while it runs."""
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s lock file for the ``with`` block; never wait.

    A second sweep (another process or thread) of the same output raises
    ``ValueError`` instead of appending the same rows again. The lock is an
    ``flock`` on ``<path>.lock``, released by the kernel if the holder dies
    (so a killed sweep still resumes); the file is removed on exit. A lock
    file removed between another's ``open`` and ``flock`` is detected by its
    inode and opened again.
    """
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"another sweep is writing {path} (it holds {lock}); let it finish, or stop "
                "it and run again to resume"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it after we opened it: take the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def append(path: Path, lines: list[str]) -> None:
    """One ``write`` of whole lines with ``O_APPEND``, then ``fsync``."""
    data = "".join(line + "\n" for line in lines).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------ sweeps over several processes
#
# Under ``jax.distributed`` (N processes), process i computes the groups (cells
# or batches) whose index is i mod N and appends them to its own part file,
# ``<output>.part-<i>-of-<N>``, with the same header, atomic appends and
# resume rules as the output itself. After a barrier, process 0 merges the
# output and every part into the output (groups in index order, each once,
# through ``rewrite``) and deletes the parts. Every process counts as done the
# complete groups of the output and of all parts, so a restart (with any N, or
# a single process) computes only what is missing.


def part_path(path: Path, process: int, count: int) -> Path:
    """Process ``process`` of ``count``'s part file of the output ``path``."""
    return path.with_name(f"{path.name}.part-{process}-of-{count}")


def part_paths(path: Path) -> list[Path]:
    """Every part file of the output ``path`` (of any process count), sorted."""
    parts = path.parent.glob(f"{glob.escape(path.name)}.part-*-of-*")
    return sorted(p for p in parts if re.fullmatch(r".*\.part-\d+-of-\d+", p.name))


Groups = dict  # group index -> its lines, complete groups only


def start_output(
    path: Path,
    header: str,
    read_groups: Callable[[Path], tuple[str | None, Groups]],
    process: int,
    count: int,
) -> tuple[Path, set[int]]:
    """Prepare the file this process appends to; return it and the groups done anywhere.

    ``read_groups(p)`` returns ``(header line or None, {group: lines})`` for the
    complete groups of ``p`` (validated against the config; missing file:
    ``(None, {})``). The file this process writes (the output itself for one
    process, else its part) is rewritten with its complete groups only,
    dropping a partial line and an incomplete group left by a kill.
    """
    target = path if count == 1 else part_path(path, process, count)
    done: set[int] = set()
    for p in [path, *part_paths(path)]:
        done |= set(read_groups(p)[1])
    own_header, own = read_groups(target)
    rewrite(target, [own_header or header, *(line for g in sorted(own) for line in own[g])])
    return target, done


@contextlib.contextmanager
def locked_output(
    path: Path,
    header: str,
    read_groups: Callable[[Path], tuple[str | None, Groups]],
    process: int,
    count: int,
) -> Iterator[tuple[Path, set[int]]]:
    """:func:`start_output` under :func:`exclusive`'s lock on the file this process writes.

    Yields ``(target, groups done)``. ``OSError`` (no directory, no permission)
    becomes ``ValueError`` naming the output.
    """
    target = path if count == 1 else part_path(path, process, count)
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive(target))
            # drops partial lines and incomplete groups; several processes: one part each
            started = start_output(path, header, read_groups, process, count)
        except OSError as err:
            raise ValueError(f"cannot write the sweep output {path} ('output'): {err}") from None
        yield started


def merge_parts(
    path: Path, header: str, read_groups: Callable[[Path], tuple[str | None, Groups]]
) -> None:
    """Merge the output and its part files into the output; delete the parts.

    Groups are written in index order, each once; a group found in two files
    with different lines raises ``ValueError`` (it cannot happen by design:
    each group has one owner). Nothing is done when there is no part.
    """
    parts = part_paths(path)
    if not parts:
        return
    main_header, groups = read_groups(path)
    for p in parts:
        for g, lines in read_groups(p)[1].items():
            if g in groups and groups[g] != lines:
                raise ValueError(f"{p} holds group {g} with other rows than {path}; move it away")
            groups.setdefault(g, lines)
    rewrite(path, [main_header or header, *(line for g in sorted(groups) for line in groups[g])])
    for p in parts:
        p.unlink()


def processes() -> tuple[int, int]:
    """``(this process's index, process count)`` of the JAX runtime (``(0, 1)`` alone)."""
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Wait until every JAX process reaches ``name`` (nothing to wait for alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
