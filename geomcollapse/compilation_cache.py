"""JAX's persistent compilation cache, on by default for the CLI and ``diagnose``.

A second process that diagnoses a model of the same shapes loads its XLA programs
from disk instead of compiling them again (docs/library.md § Compilation cache).

* Directory: ``$GEOMCOLLAPSE_COMPILATION_CACHE`` when it names a path, else
  ``$XDG_CACHE_HOME/geomcollapse/jax`` (``~/.cache/geomcollapse/jax``).
* Off: ``GEOMCOLLAPSE_COMPILATION_CACHE=0`` (or ``off``, ``false``, ``no``).
* A cache the user configured (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)``) is left as it is.

The cache is trusted code: keep it in a directory only you can write
(JAX's warning, docs/library.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "GEOMCOLLAPSE_COMPILATION_CACHE"
_OFF = {"0", "off", "false", "no"}
# Programs that compile faster than this are not worth a disk entry. JAX's own
# default (1 s) would skip most of diagnose's programs (0.1–0.8 s each on a 2-core CPU).
MIN_COMPILE_TIME_S = 0.1


def cache_directory() -> Path | None:
    """The directory ``enable`` uses; None when ``$GEOMCOLLAPSE_COMPILATION_CACHE`` is off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geomcollapse" / "jax"


def enable() -> Path | None:
    """Turn JAX's persistent compilation cache on, unless the user set one or turned it off.

    Returns:
      the cache directory in use (the user's own when one was configured), or None
      when the cache is off. Idempotent; safe after earlier compilations (the cache
      is re-initialised so that later compilations use it).
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    directory = cache_directory()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None  # an unwritable cache directory only costs compile time
    if not os.access(directory, os.W_OK):
        return None
    least = jax.config.jax_persistent_cache_min_compile_time_secs
    use(directory, MIN_COMPILE_TIME_S if least == 1.0 else least)  # 1.0: JAX's default
    return directory


def use(directory: str | Path, min_compile_time_s: float) -> None:
    """Use ``directory`` as this process's persistent cache for programs that take at
    least ``min_compile_time_s`` to compile: e.g. what :func:`enable` chose in another
    process (a ``spawn``-ed worker does not inherit ``jax.config``)."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    compilation_cache.set_cache_dir(str(directory))
    compilation_cache.reset_cache()  # JAX decides once per process whether a cache is used
