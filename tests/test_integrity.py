"""Integrity: damaged checkpoints fail loudly, saves are atomic, bad inputs name themselves.

Checkpoints are damaged on disk (flipped, truncated and deleted bytes in every
file, the manifest included) and saves are SIGKILLed at fixed points and at
timed moments in a child process; the old checkpoint must survive each kill.
"""

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geomcollapse import checkpoint, curvature, landscapes, models, sweep

ROOT = Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")


def _child_env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("JAX_ENABLE_X64", None)
    return env


# --- checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The 'tiny' transformer at its (untrained) init, saved once: ``(path, params)``."""
    _, params = models.transformer_init(jax.random.key(0), "tiny")
    path = checkpoint.save_checkpoint(
        tmp_path_factory.mktemp("ck") / "ck", params, "tiny", {"note": "x"}
    )
    return path, params


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _same(a, b) -> bool:
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_round_trip_is_exact_and_stores_one_hash_per_array(saved):
    path, params = saved
    _, restored, meta = checkpoint.load_checkpoint(path, "tiny")
    assert meta == {"note": "x"} and _same(params, restored)
    stored = checkpoint.read_metadata(path)["arrays"]
    assert len(stored) == len(jax.tree.leaves(params)) == 30


def _damage(file: Path, mode: str) -> None:
    data = bytearray(file.read_bytes())
    if mode == "flip":
        for i in range(8):  # 8 bytes, as in the reported silent corruption
            data[(len(data) // 2 + 7 * i) % len(data)] ^= 0xFF
        file.write_bytes(bytes(data))
    elif mode == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        file.unlink()


@pytest.mark.parametrize("mode", ["flip", "truncate", "delete"])
def test_damage_to_any_file_raises_naming_the_directory(saved, tmp_path, mode):
    path, _ = saved
    names = _files(path)
    # orbax's own metadata, the array data and our manifest are all among them
    assert {"_CHECKPOINT_METADATA", "_METADATA", checkpoint._MANIFEST} <= set(names)
    assert any("/d/" in f or f.startswith("d/") for f in names)
    for i, name in enumerate(names):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(path, copy)
        _damage(copy / name, mode)
        with pytest.raises(ValueError, match=re.escape(str(copy))):
            checkpoint.load_checkpoint(copy, "tiny")
        with pytest.raises(ValueError, match=re.escape(str(copy))):
            checkpoint.read_metadata(copy)


def test_array_hashes_catch_data_corruption_that_orbax_restores_silently(saved, tmp_path):
    """Flip array bytes, then re-manifest the files: only the per-array sha256 is left to catch it.

    Most such flips restore without an orbax error (changed weights, up to
    ~1e38); each must raise, naming the array.
    """
    path, _ = saved
    data = max((path / f for f in _files(path)), key=lambda f: f.stat().st_size)
    rel = data.relative_to(path)
    size = data.stat().st_size
    caught = {"array": 0, "orbax": 0}
    for k, start in enumerate(range(size // 16, size - 64, size // 12)):
        copy = tmp_path / f"copy{k}"
        shutil.copytree(path, copy)
        raw = bytearray((copy / rel).read_bytes())
        for i in range(8):
            raw[start + i] ^= 0x5A
        (copy / rel).write_bytes(bytes(raw))
        (copy / checkpoint._MANIFEST).unlink()
        checkpoint._write_manifest(copy)  # the file check now passes
        with pytest.raises(ValueError, match=re.escape(str(copy))) as err:
            checkpoint.load_checkpoint(copy, "tiny")
        caught["array" if "array(s) [" in str(err.value) else "orbax"] += 1
    assert caught["array"] >= 5, caught


def test_a_directory_without_manifest_is_refused(saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "old")
    (tmp_path / "old" / checkpoint._MANIFEST).unlink()
    with pytest.raises(ValueError, match="no integrity manifest"):
        checkpoint.load_checkpoint(tmp_path / "old")


@pytest.mark.parametrize(
    "manifest",
    [{"files": []}, {"files": {"_METADATA": {"size": "1"}}}, {"files": {"a": 3}}, [1], "dir"],
)
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_directory(saved, tmp_path, manifest):
    """A list of files, a malformed entry or a directory in its place: an AttributeError or
    IsADirectoryError escaped (found by a bad-input probe)."""
    path, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / checkpoint._MANIFEST).unlink()
    if manifest == "dir":
        (copy / checkpoint._MANIFEST).mkdir()
    else:
        (copy / checkpoint._MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(str(copy))):
        checkpoint.load_checkpoint(copy, "tiny")


def test_save_checks_params_against_the_config(saved, tmp_path):
    _, params = saved
    wider = models.TransformerConfig(vocab=32, context=24, d_model=16, heads=2, layers=2)
    with pytest.raises(
        ValueError, match=r"blocks/0/fc1/bias has shape \(128,\), the config implies \(64,\)"
    ):
        checkpoint.save_checkpoint(tmp_path / "a", params, wider)
    deeper = models.TransformerConfig(vocab=32, context=24, d_model=32, heads=2, layers=3)
    with pytest.raises(ValueError, match=r"missing \['blocks/2/"):
        checkpoint.save_checkpoint(tmp_path / "b", params, deeper)
    pure = nnx.to_pure_dict(params)
    pure["head"]["kernel"] = pure["head"]["kernel"].astype(jnp.float16)
    _, mixed = models.transformer_abstract("tiny")
    nnx.replace_by_pure_dict(mixed, pure)
    with pytest.raises(ValueError, match="share one dtype"):
        checkpoint.save_checkpoint(tmp_path / "c", mixed, "tiny")
    with pytest.raises(ValueError, match="metadata must be JSON-able"):
        checkpoint.save_checkpoint(tmp_path / "d", params, "tiny", {"loss": NAN})
    assert not any(tmp_path.iterdir())  # nothing written by a refused save


CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys, time
    import jax
    import orbax.checkpoint as ocp
    from geomcollapse import checkpoint, models

    path, stage = sys.argv[1], sys.argv[2]
    _, params = models.transformer_init(jax.random.key(1), "tiny")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_on(real, when):
        def wrapper(*args, **kwargs):
            if when(*args):
                die()
            return real(*args, **kwargs)
        return wrapper

    name = os.path.basename(path)
    if stage == "orbax":  # arrays written, orbax's own directory not finalized
        ocp.StandardCheckpointHandler.finalize = die
    elif stage == "manifest":  # orbax done, manifest not written
        checkpoint._write_manifest = die
    elif stage == "rename_old":  # before the old checkpoint is moved aside
        os.replace = kill_on(os.replace, lambda src, dst: os.path.basename(src) == name)
    elif stage == "rename_new":  # old moved aside, new not yet in place
        os.replace = kill_on(os.replace, lambda src, dst: os.path.basename(dst) == name)
    elif stage == "cleanup":  # new in place, old backup not yet removed
        shutil.rmtree = kill_on(shutil.rmtree, lambda p, *a: str(p).endswith(".previous"))
    print("saving", flush=True)
    start = time.monotonic()
    checkpoint.save_checkpoint(path, params, "tiny", overwrite=True)
    print("saved", time.monotonic() - start, flush=True)
    """
)


def _child(tmp_path: Path, path: Path, stage: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(path), stage],
        env=_child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def _fresh_old(tmp_path: Path, saved) -> Path:
    path = tmp_path / "ck"
    shutil.copytree(saved[0], path)
    return path


def _check_survivor_then_resave(path: Path, old, new_is_ok: bool):
    _, got, _ = checkpoint.load_checkpoint(path, "tiny")  # verifies every file and array
    _, new = models.transformer_init(jax.random.key(1), "tiny")
    assert _same(got, old) or (new_is_ok and _same(got, new))
    is_new = _same(got, new)
    checkpoint.save_checkpoint(path, new, "tiny", overwrite=True)  # recovers, cleans up
    assert _same(checkpoint.load_checkpoint(path, "tiny")[1], new)
    assert sorted(p.name for p in path.parent.iterdir()) == ["child.py", "ck"]
    return is_new


@pytest.mark.parametrize(
    ("stage", "new_expected"),
    [  # the default tier keeps the narrowest window (between the renames), 5-8 s each
        pytest.param("orbax", False, marks=pytest.mark.full),
        pytest.param("manifest", False, marks=pytest.mark.full),
        pytest.param("rename_old", False, marks=pytest.mark.full),
        ("rename_new", False),
        pytest.param("cleanup", True, marks=pytest.mark.full),
    ],
)
def test_old_checkpoint_survives_a_kill_at_each_step_of_an_overwrite(
    saved, tmp_path, stage, new_expected
):
    path = _fresh_old(tmp_path, saved)
    proc = _child(tmp_path, path, stage)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the save was not killed at that step"
    if stage == "rename_new":
        assert not path.exists()  # the window between the renames: only the backup holds it
    assert _check_survivor_then_resave(path, saved[1], new_is_ok=new_expected) == new_expected


@pytest.mark.full
def test_old_checkpoint_survives_sigkill_at_timed_moments(saved, tmp_path):
    path = _fresh_old(tmp_path, saved)
    proc = _child(tmp_path, path, "none")
    out, _ = proc.communicate(timeout=300)
    duration = float(out.split("saved")[1])
    shutil.rmtree(path)
    outcomes = []
    for fraction in (0.1, 0.35, 0.6, 0.85):
        path = _fresh_old(tmp_path, saved)
        proc = _child(tmp_path, path, "none")
        assert proc.stdout.readline().startswith("saving")
        time.sleep(fraction * duration)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        outcomes.append(_check_survivor_then_resave(path, saved[1], new_is_ok=True))
        shutil.rmtree(path)
    assert not all(outcomes), "every kill came after the save had finished"


# --- non-finite and malformed inputs ---------------------------------------

QUADRATIC = {"top": [2.0, 1.0], "tail_mass": 0.1, "epsilon": 1e-3, "coupling": 0.5}


def test_quadratic_landscape_names_its_non_finite_array():
    L = landscapes.make_quadratic_landscape(jax.random.key(0), 6, 2, **QUADRATIC)
    for name in ("A", "c", "F"):
        bad = np.array(getattr(L, name))
        bad[(0,) * bad.ndim] = NAN
        arrays = {"A": L.A, "c": L.c, "F": L.F, name: jnp.asarray(bad)}
        with pytest.raises(ValueError, match=rf"^{name} has 1 non-finite"):
            landscapes.QuadraticLandscape(**arrays, d=2)


def test_sweep_grid_keys_are_the_quadratic_makers_numeric_arguments():
    params = inspect.signature(landscapes.make_quadratic_landscape).parameters
    assert set(sweep.GRID_KEYS) == set(params) - {"key", "dtype"}


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("name", sweep.GRID_KEYS)  # = every numeric argument of the maker
def test_make_quadratic_landscape_names_the_non_finite_argument(name, value):
    kwargs = {"n": 6, "d": 2, **QUADRATIC}
    if name == "kappa":
        kwargs = {**kwargs, "coupling": None, "kappa": value}
    elif name == "top":
        kwargs["top"] = [2.0, value]
    else:
        kwargs[name] = value
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        landscapes.make_quadratic_landscape(jax.random.key(0), **kwargs)


LOGISTIC_ARGS = [
    "n",
    "classes",
    "skill_examples",
    "task_examples",
    "feature_scale",
    "theta_scale",
    "task_shift",
]


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("name", LOGISTIC_ARGS)
@pytest.mark.parametrize("maker", ["landscape", "batch"])
def test_logistic_makers_name_the_non_finite_argument(maker, name, value):
    kwargs = {"n": 6, name: value}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        if maker == "landscape":
            landscapes.make_logistic_landscape(jax.random.key(0), **kwargs)
        else:
            landscapes.make_logistic_batch(jax.random.key(0), 3, **kwargs)


def test_restrict_and_substitute_check_block_leaf_shapes():
    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "out": jnp.ones(4)}

    def fn(p, x):
        return jnp.sum(p["fc"]["kernel"] @ p["fc"]["bias"]) * x + jnp.sum(p["out"])

    good = {"fc/bias": jnp.full(2, 2.0)}
    assert curvature.restrict(fn)(good, params, 1.0) == pytest.approx(3 * 4 + 4)
    for bad in ({"fc/bias": jnp.ones(3)}, {"fc/bias": jnp.ones((2, 1))}):
        with pytest.raises(ValueError, match=r"block\['fc/bias'\] has shape"):
            curvature.substitute(params, bad)
        with pytest.raises(ValueError, match=r"block\['fc/bias'\] has shape"):
            curvature.restrict(fn)(bad, params, 1.0)
        with pytest.raises(ValueError, match=r"block\['fc/bias'\] has shape"):
            jax.jit(curvature.restrict(fn))(bad, params, 1.0)


X64_OFF = textwrap.dedent(
    """
    import json, warnings
    import jax, jax.numpy as jnp
    from geomcollapse import landscapes, sweep
    assert not jax.config.jax_enable_x64
    kw = {"top": [2.0, 1.0], "tail_mass": 0.1, "epsilon": 1e-3, "coupling": 0.5}
    run = {"id": 0, "seed": 0, "n": 6, "d": 2, **kw}
    calls = {
        "quadratic": lambda: landscapes.make_quadratic_landscape(jax.random.key(0), 6, 2, **kw),
        "quadratic_f64": lambda: landscapes.make_quadratic_landscape(
            jax.random.key(0), 6, 2, dtype=jnp.float64, **kw),
        "logistic": lambda: landscapes.make_logistic_landscape(jax.random.key(0), 6),
        "logistic_batch": lambda: landscapes.make_logistic_batch(jax.random.key(0), 2, 6),
        "landscape_for": lambda: sweep.landscape_for(run),
        "quadratic_f32": lambda: landscapes.make_quadratic_landscape(
            jax.random.key(0), 6, 2, dtype=jnp.float32, **kw).A.dtype,
        "logistic_f32": lambda: landscapes.make_logistic_landscape(
            jax.random.key(0), 6, dtype=jnp.float32).theta_star.dtype,
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 paths must not warn either
        for name, call in calls.items():
            try:
                out[name] = "ok " + str(call())
            except ValueError as err:
                out[name] = "ValueError " + str(err)
    print(json.dumps(out))
    """
)


def test_float64_with_x64_off_raises_instead_of_returning_float32(tmp_path):
    script = tmp_path / "x64_off.py"
    script.write_text(X64_OFF)
    done = subprocess.run(
        [sys.executable, str(script)], env=_child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("quadratic", "quadratic_f64", "logistic", "logistic_batch", "landscape_for"):
        assert out[name].startswith("ValueError dtype=float64 needs 64-bit JAX"), (name, out)
    assert out["quadratic_f32"] == "ok float32" and out["logistic_f32"] == "ok float32", out


def test_float_dtype_rejects_non_floating():
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        landscapes.make_quadratic_landscape(jax.random.key(0), 6, 2, dtype=jnp.int32, **QUADRATIC)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        landscapes.make_logistic_landscape(jax.random.key(0), 6, dtype="nope")
