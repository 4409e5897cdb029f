"""A toy experiment for the sweep tests: closed-form rows, a seed-batched twin and a report.

Cell ``config`` has ``b`` rows; row ``j`` is ``value = a·(j+1)² + scale·Σshifts``
and ``z = jax.random.normal(key(seed), (b,))[j]``. ``sleep`` seconds pass
before a cell returns, so a test can kill a sweep between cells.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Inner:
    """A nested config, to check that dicts replace inside dataclass fields."""

    scale: float = 1.0
    label: str = "x"


@dataclasses.dataclass(frozen=True)
class Config:
    """The toy's fields."""

    a: float = 1.0
    b: int = 2
    seed: int = 0
    sleep: float = 0.0
    shifts: tuple[float, ...] = (0.0,)
    inner: Inner = Inner()


def _values(config: Config) -> jax.Array:
    j = jnp.arange(1, config.b + 1, dtype=jnp.float64)
    return config.a * j**2 + config.inner.scale * sum(config.shifts)


def _rows(config: Config, values, z) -> list[dict]:
    return [{"j": j, "value": float(values[j]), "z": float(z[j])} for j in range(config.b)]


def sweep_cell(config: Config, outdir: Path) -> list[dict]:
    """The rows of one cell; ``a < 0`` fails only here, when computed (as a window too
    narrow for a fit does in a real experiment), not in a config check."""
    if config.a < 0:
        raise ValueError(f"a={config.a}: the toy's window holds no point")
    time.sleep(config.sleep)
    z = jax.random.normal(jax.random.key(config.seed), (config.b,), jnp.float64)
    return _rows(config, _values(config), z)


def sweep_cells(configs: list[Config], outdir: Path) -> list[list[dict]]:
    """The rows of cells that differ only in ``seed``: the draws vmapped over seeds."""
    first = configs[0]
    assert all(dataclasses.replace(c, seed=first.seed) == first for c in configs)
    seeds = jnp.asarray([c.seed for c in configs])
    z = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (first.b,), jnp.float64))(seeds)
    time.sleep(first.sleep)
    return [_rows(c, _values(c), z[i]) for i, c in enumerate(configs)]


def report(rows: list[dict], outdir: Path) -> list[Path]:
    """``outdir/sweep_toy.md``: per cell, its grid values, row count and mean ``value``."""
    cells: dict[int, list[dict]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    lines = ["| cell | params | rows | mean value |", "|---|---|---|---|"]
    for cell, members in sorted(cells.items()):
        params = ", ".join(f"{k}={v}" for k, v in members[0]["params"].items())
        mean = sum(r["value"] for r in members) / len(members)
        lines.append(f"| {cell} | {params} | {len(members)} | {mean!r} |")
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "sweep_toy.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
