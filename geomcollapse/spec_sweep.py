"""Sweep :func:`geomcollapse.diagnose` over any model: an ablation of your own ``θ*``.

A sweep config names this module as its experiment (``"experiment":
"geomcollapse.spec_sweep"``) and the model by its spec, as ``geomcollapse
diagnose --spec`` does (docs/diagnose.md): a Python file or module, optionally
with ``:function``. Each grid cell diagnoses the model with the cell's options
(``lr``, ``d``, ``steps``, ``seed``, ...); its one row is the report's
numbers (:meth:`geomcollapse.Diagnosis.to_dict`: ``aic.coupling``,
``crossing_step``, ``validity_time``, ...), so that ``geomcollapse report OUTPUT
--x lr --y crossing_step`` plots any of them against any grid axis, seeds
aggregated (docs/sweeps.md). As the command does, float64 is turned on before
the spec's function runs, so arrays it builds from NumPy float64 stay float64.

Every row records ``model_sha256``, a digest of the spec's ``θ*`` and data (dtype,
shape and bytes of every leaf of ``params``, ``skill_args`` and ``task_args``), and
``spec_sha256``, a digest of the spec's source file (the losses are code, not data);
the sweep refuses rows of another digest (``SWEEP_INVARIANTS``): a sweep resumed
after the model file changed stops instead of mixing rows of two models (code the
spec imports from elsewhere is not covered). ``spec`` cannot be a grid axis
(``SWEEP_FIXED``): one sweep is one model. The spec's path is read as
``geomcollapse diagnose --spec`` reads it, relative to the working directory; each
row records the file or module it loaded (``spec_source``). A model small enough for
the dense route (``n ≤ DENSE_MAX_N``, unsharded) draws no random numbers, so a
``seed`` other than 0 is refused there: its rows would repeat one diagnosis and
count as independent seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import sys
from pathlib import Path

import jax
import numpy as np

from geomcollapse import model_spec
from geomcollapse._sharding import is_sharded
from geomcollapse.diagnosis.plan import DEFAULT_ORDER, DENSE_MAX_N, check_plan, dense_route

__all__ = [
    "SWEEP_FIXED",
    "SWEEP_INVARIANTS",
    "Config",
    "check_config",
    "model_digest",
    "source_digest",
    "sweep_cell",
]

SWEEP_INVARIANTS = ("model_sha256", "spec_sha256")  # every row of one sweep: the same model
SWEEP_FIXED = ("spec",)  # not a grid axis: one sweep, one model


@dataclasses.dataclass(frozen=True)
class Config:
    """One diagnosis: the spec and :func:`geomcollapse.diagnose`'s options (``None``: default)."""

    spec: str = ""  # FILE.py[:function] or package.module[:function], as --spec
    seed: int = 0  # key = jax.random.key(seed): the Lanczos start and the probes
    d: int | None = None
    lr: float | None = None
    steps: int | None = None
    threshold: float | None = None
    order: int = DEFAULT_ORDER


def _load(config: Config) -> model_spec.ModelSpec:
    if not isinstance(config.spec, str) or not config.spec.strip():
        raise ValueError(
            "spec: name the model's spec, a Python file or module as for "
            "`geomcollapse diagnose --spec` (e.g. base {'spec': 'my_model.py'})"
        )
    jax.config.update("jax_enable_x64", True)  # as `geomcollapse diagnose --spec` does
    return _loaded(config.spec)


@functools.lru_cache(maxsize=4)
def _loaded(spec: str) -> model_spec.ModelSpec:
    """The spec's model, built once per process: every cell's check and run share it."""
    return model_spec.load_spec(spec)


def check_config(config: Config) -> None:
    """Refuse a cell before the sweep writes anything, naming the option.

    No spec, one that does not load, a ``seed`` that is not an integer ``≥ 0``,
    or options :func:`geomcollapse.diagnose` would refuse for this model
    (``d`` beyond its parameters, ``lr``, ``steps``, ``threshold`` not positive,
    ``steps`` or ``threshold`` without ``lr``, ``order`` out of range).
    """
    spec = _load(config)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {config.seed!r}")
    n = sum(math.prod(jax.numpy.shape(x)) for x in jax.tree_util.tree_leaves(spec.params))
    if config.seed != 0 and dense_route("auto", "auto", n, is_sharded(spec.params)):
        raise ValueError(
            f"seed={config.seed}: this model (n={n} ≤ {DENSE_MAX_N}) is diagnosed on the dense "
            "route, which draws no random numbers, so every seed gives the same row (counted "
            "as independent seeds); sweep seeds only for a model on the Lanczos route"
        )
    check_plan(
        n,
        d=config.d,
        lr=config.lr,
        steps=config.steps,
        threshold=config.threshold,
        order=config.order,
    )


def sweep_cell(config: Config, outdir: Path) -> list[dict]:
    """One row: the diagnosis of ``config.spec`` with the cell's options, as numbers.

    ``outdir`` (the sweep's working directory) is not used: nothing is cached.
    Non-finite numbers of the report (e.g. no crossing step: ``inf``) are
    recorded as ``None``, since a sweep's rows are strict JSON.
    """
    del outdir
    spec = _load(config)
    # before the diagnosis: a spec it cannot hash fails first
    digest, code = _digest(config.spec)
    diagnosis = model_spec.diagnose_spec(
        spec,
        key=jax.random.key(config.seed),
        d=config.d,
        lr=config.lr,
        steps=config.steps,
        threshold=config.threshold,
        order=config.order,
    )
    source = model_spec.spec_source(config.spec)
    row = _finite_or_none(diagnosis.to_dict())
    return [{**row, "model_sha256": digest, "spec_sha256": code, "spec_source": source}]


def model_digest(spec: model_spec.ModelSpec) -> str:
    """sha256 (hex) of ``spec``'s ``params``, ``skill_args`` and ``task_args``: each array
    leaf's path, dtype, shape and bytes (a PRNG key by its key data). The same in every
    process: no object's ``repr`` (an nnx ``GraphDef`` prints addresses) is hashed, and
    leaves that are not arrays are named by their type alone."""
    digest = hashlib.sha256()
    for part in (spec.params, spec.skill_args, spec.task_args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
            digest.update(jax.tree_util.keystr(path).encode())
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
                leaf.dtype, jax.dtypes.prng_key
            ):
                leaf = jax.random.key_data(leaf)
            if not isinstance(leaf, np.ndarray | np.generic | jax.Array | int | float | bool):
                digest.update(type(leaf).__name__.encode())
                continue
            arr = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{arr.dtype.name}{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def source_digest(spec: str) -> str:
    """sha256 (hex) of the source file of the spec ``spec`` names: the file itself, or the
    file its module was loaded from (its losses are code, which :func:`model_digest`'s
    arrays do not cover)."""
    where = model_spec.spec_source(spec)
    path = Path(where) if Path(where).is_file() else None
    if path is None:
        loaded = sys.modules.get(where)
        origin = getattr(loaded, "__file__", None)
        path = Path(origin) if origin else None
    if path is None or not path.is_file():
        raise ValueError(f"spec {spec!r}: no source file to digest for {where!r}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4)
def _digest(spec: str) -> tuple[str, str]:
    """:func:`model_digest` and :func:`source_digest` of the spec ``spec`` names, once per
    process (as its model is loaded once): the file is read once, not at every cell."""
    return model_digest(_loaded(spec)), source_digest(spec)


def _finite_or_none(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value
