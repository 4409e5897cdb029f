"""The persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from geomcollapse import compilation_cache

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from geomcollapse import compilation_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None
    )
    directory = compilation_cache.enable()
    y = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)(jnp.ones((7, 5)))
    y.block_until_ready()
    print(json.dumps({"dir": None if directory is None else str(directory), "hits": len(hits)}))
    """
)


def _child(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_cache(tmp_path):
    env = {compilation_cache.ENV: str(tmp_path / "cache"), "JAX_COMPILATION_CACHE_DIR": ""}
    first = _child(env)
    assert first == {"dir": str(tmp_path / "cache"), "hits": 0}
    assert any((tmp_path / "cache").iterdir()), "the first process wrote no cache entry"
    second = _child(env)
    assert second["hits"] >= 1


@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_environment_variable_turns_it_off(tmp_path, off):
    env = {compilation_cache.ENV: off, "XDG_CACHE_HOME": str(tmp_path)}
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    assert _child(env) == {"dir": None, "hits": 0}
    assert not (tmp_path / "geomcollapse").exists()


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.cache_directory() == tmp_path / "geomcollapse" / "jax"
    monkeypatch.setenv(compilation_cache.ENV, "~/elsewhere")
    assert compilation_cache.cache_directory() == compilation_cache.Path.home() / "elsewhere"


def test_a_cache_the_user_configured_is_kept(tmp_path):
    env = {
        compilation_cache.ENV: str(tmp_path / "ours"),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
    }
    assert _child(env)["dir"] == str(tmp_path)
    assert not (tmp_path / "ours").exists()
