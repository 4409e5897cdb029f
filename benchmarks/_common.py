"""Shared benchmark plumbing: machine description, result files, docs/benchmarks.md tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
import scipy

DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def replace_table(marker: str, table: str, doc: Path = DOC) -> None:
    """In ``doc``, replace the lines between the ``<!-- marker`` line and ``<!-- /marker -->``."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker}")
    start = text.index("\n", start) + 1
    end = text.index(f"<!-- /{marker} -->")
    doc.write_text(text[:start] + table + "\n" + text[end:], encoding="utf-8")


def median_time(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of ``repeats`` calls ``fn(*args)`` (ready), after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def machine_info() -> dict:
    """Platform, device, core count and library versions of this run."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device": dev.device_kind,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_result(stem: str, result: dict, quick: bool, outdir: Path) -> Path:
    """Write ``outdir/<stem>_<platform>[_quick].json``; return its path."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{stem}_{result['machine']['platform']}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
