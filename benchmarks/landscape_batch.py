"""Batched theory on quadratic landscapes: AIC + exact flow of many in one call (issue #3).

1024 landscapes with ``n = 256`` (THEORY §4 construction, random targets),
each: the AIC numbers and the exact ``Δu`` and projected loss at 64 times, in
one jitted call of :func:`geomcollapse.landscapes.summarize_batch` (vmapped on
accelerators; on CPU mapped in sequence, because vmapped batched LAPACK
deadlocks XLA's CPU thread pool on the 2-core machine; ``--vmap`` forces it),
against a Python loop calling the same per-landscape function, jitted.
Reports wall times (steady state, best of 3; compile time apart), the
per-landscape costs and their ratio, and checks the two agree. Writes
``benchmarks/results/landscape_batch_<platform>.json``.

Run: ``.venv/bin/python -m benchmarks.landscape_batch [--quick] [--readme]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from benchmarks._common import machine_info
from geomcollapse import landscapes

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 5.0  # issue #3: 1024 landscapes, n = 256, 64 times, 2-core CPU


def _landscapes(num: int, n: int, d: int, seed: int):
    """``num`` landscapes with AIC targets drawn per landscape; stacked ``A, c, F``."""
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), num)
    members = [
        landscapes.make_quadratic_landscape(
            keys[i],
            n,
            d,
            top=np.sort(rng.uniform(1.0, 5.0, d))[::-1],
            tail_mass=float(rng.uniform(0.0, 0.5)),
            epsilon=float(10 ** rng.uniform(-6, -2)),
            coupling=float(rng.uniform(0.2, 2.0)),
        )
        for i in range(num)
    ]
    return members, tuple(jnp.stack([getattr(m, f) for m in members]) for f in ("A", "c", "F"))


def _best_of(fn, args, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(
    quick: bool = False,
    num: int = 1024,
    n: int = 256,
    d: int = 4,
    num_times: int = 64,
    outdir: Path = RESULTS,
    vmap: bool = False,
) -> dict:
    """Run the benchmark and write its JSON; returns the result dict."""
    if not jax.config.jax_enable_x64:
        raise ValueError("the landscape benchmark runs in float64: enable jax_enable_x64")
    t0 = time.perf_counter()
    members, (A, c, F) = _landscapes(num, n, d, seed=0)
    generate_s = time.perf_counter() - t0
    ts = jnp.logspace(-4, 0, num_times)

    sequential = jax.devices()[0].platform == "cpu" and not vmap

    def one(A, c, F):
        return landscapes.quadratic_summary(A, c, F, d, ts)

    batched = jax.jit(
        lambda A, c, F: landscapes.summarize_batch(A, c, F, d, ts, sequential=sequential)
    )
    single = jax.jit(one)
    t0 = time.perf_counter()
    out = jax.block_until_ready(batched(A, c, F))
    compile_s = time.perf_counter() - t0
    repeats = 1 if quick else 3
    vmap_s = _best_of(batched, (A, c, F), repeats)

    def loop(A, c, F):
        return [single(A[i], c[i], F[i]) for i in range(A.shape[0])]

    loop(A[:1], c[:1], F[:1])  # compile once
    loop_s = _best_of(loop, (A, c, F), repeats)
    looped = loop(A, c, F)
    max_dev = max(
        float(np.max(np.abs(np.asarray(out.delta_u[i]) - np.asarray(r.delta_u))))
        / float(np.max(np.abs(np.asarray(r.delta_u))))
        for i, r in enumerate(looped)
    )
    # the batched numbers are each landscape's own AIC report
    checked = range(0, num, max(1, num // 8))
    reference = {i: members[i].aic(d).coupling for i in checked}
    aic_dev = max(abs(float(out.coupling[i]) - ref) / ref for i, ref in reference.items())
    result = {
        "problem": f"{num} quadratic landscapes, n = {n}, d = {d}, AIC + exact flow at "
        f"{num_times} times",
        "machine": machine_info(),
        "num_landscapes": num,
        "n": n,
        "generate_seconds": generate_s,
        "compile_seconds": compile_s,
        "one_call_mode": "sequential lax.map" if sequential else "vmap",
        "vmapped_seconds": vmap_s,
        "loop_seconds": loop_s,
        "per_landscape_ms": {"vmapped": 1e3 * vmap_s / num, "loop": 1e3 * loop_s / num},
        "loop_over_vmapped": loop_s / vmap_s,
        "target_seconds": TARGET_SECONDS,
        "meets_target": vmap_s <= TARGET_SECONDS,
        "max_rel_deviation_vmap_vs_loop": max_dev,
        "max_rel_deviation_coupling_vs_aic": aic_dev,
    }
    _common.write_result("landscape_batch", result, quick, outdir)
    print(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """The README's summary table for one result."""
    p = result["per_landscape_ms"]
    return "\n".join(
        [
            "| batched AIC + exact flow | wall s | per landscape ms | target |",
            "|---|---|---|---|",
            f"| one jitted call, {result['one_call_mode']} ({result['num_landscapes']} "
            f"landscapes, n = {result['n']}) "
            f"| {result['vmapped_seconds']:.2f} | {p['vmapped']:.2f} "
            f"| ≤ {result['target_seconds']:.0f} s |",
            f"| Python loop of the jitted single-landscape call | {result['loop_seconds']:.2f} "
            f"| {p['loop']:.2f} | |",
            f"| loop / one call | {result['loop_over_vmapped']:.2f}× | | |",
            f"| compile (once) / generation (numpy, once) | {result['compile_seconds']:.1f} / "
            f"{result['generate_seconds']:.1f} | | |",
        ]
    )


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of best of 3")
    parser.add_argument("--readme", action="store_true", help="only rewrite README's table")
    parser.add_argument("--vmap", action="store_true", help="vmap the batch on CPU too")
    args = parser.parse_args()
    if args.readme:
        saved = json.loads((RESULTS / "landscape_batch_cpu.json").read_text())
        _common.replace_table("landscape-batch-table", markdown_table(saved))
    else:
        main(args.quick, vmap=args.vmap)
