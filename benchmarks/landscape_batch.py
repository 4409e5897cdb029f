"""Batched theory on quadratic landscapes: AIC + exact flow of many in one call (issue #3).

1024 landscapes (n = 256) in one jitted call by the Krylov route
(:func:`geomcollapse.landscapes.quadratic_summary_krylov`) and the dense one
(:func:`geomcollapse.landscapes.summarize_batch`), each against a Python loop of
its single-landscape call. Protocol, the landscapes' drift gain and results:
docs/benchmarks.md, "Batched theory on quadratic landscapes". Writes
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
            kappa=float(rng.uniform(0.1, 2.0)),
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


def _timed_route(one, batched, args, repeats: int) -> dict:
    """Compile, then time the one-call ``batched`` and a Python loop of jitted ``one``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(batched(*args))
    compile_s = time.perf_counter() - t0
    call_s = _best_of(batched, args, repeats)

    def loop(*arrays):
        return [one(*(a[i] for a in arrays)) for i in range(arrays[0].shape[0])]

    loop(*(a[:1] for a in args))  # compile once
    loop_s = _best_of(loop, args, repeats)
    return {"out": out, "looped": loop(*args), "compile": compile_s, "call": call_s, "loop": loop_s}


def _summary(out) -> landscapes.QuadraticSummary:
    return out.summary if isinstance(out, landscapes.KrylovSummary) else out


def _field_scales(c: jax.Array, F: jax.Array) -> dict:
    """Per landscape, the scale each summary field's deviation is measured against.

    Its own magnitude, except where the field is a small difference of large
    terms and float64 fixes only its absolute accuracy: the tail mass
    ``tr F − Σ_{i≤d} λ_i`` (scale ``tr F``) and the orthogonalities ``‖Pc‖``,
    ``‖F^{1/2}Pc‖`` of a ``c`` nearly orthogonal to ``M`` (scale ``‖c‖``,
    ``√(tr F)·‖c‖``).
    """
    trace = np.trace(np.asarray(F), axis1=1, axis2=2)
    norm_c = np.linalg.norm(np.asarray(c), axis=1)
    return {
        "tail_mass": trace,
        "orthogonality": norm_c,
        "fisher_orthogonality": np.sqrt(trace) * norm_c,
    }


def _deviation(ours, ref, scale=None) -> float:
    """max |ours − ref| / scale over all entries (scale defaults to |ref|, 1 where 0)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if scale is None:
        scale = np.where(ref == 0.0, 1.0, np.abs(ref))
    else:
        scale = np.asarray(scale, np.float64).reshape((-1,) + (1,) * (ref.ndim - 1))
    return float(np.max(np.abs(ours - ref) / scale))


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
    keys = jax.random.split(jax.random.key(1), num)
    generate_s = time.perf_counter() - t0
    ts = jnp.logspace(-4, 0, num_times)
    on_cpu = jax.devices()[0].platform == "cpu"
    repeats = 1 if quick else 3

    def dense_one(A, c, F):
        return landscapes.quadratic_summary(A, c, F, d, ts)

    def krylov_one(A, c, F, key):
        return landscapes.quadratic_summary_krylov(A, c, F, d, ts, key)

    dense_sequential = on_cpu and not vmap
    dense = _timed_route(
        jax.jit(dense_one),
        jax.jit(lambda *a: landscapes.map_landscapes(dense_one, *a, sequential=dense_sequential)),
        (A, c, F),
        repeats,
    )
    krylov = _timed_route(
        jax.jit(krylov_one),
        jax.jit(lambda *a: landscapes.map_landscapes(krylov_one, *a, sequential=on_cpu)),
        (A, c, F, keys),
        repeats,
    )
    ref, ours = dense["out"], krylov["out"]
    scales = _field_scales(c, F)
    loop_dev = max(
        _deviation(
            jnp.stack([getattr(_summary(r), f) for r in route["looped"]]),
            getattr(_summary(route["out"]), f),
            scales.get(f),
        )
        for route in (dense, krylov)
        for f in landscapes.QuadraticSummary._fields
    )
    deviation = {
        f: _deviation(getattr(ours.summary, f), getattr(ref, f), scales.get(f)) for f in ref._fields
    }
    # the batched numbers are each landscape's own AIC report
    checked = range(0, num, max(1, num // 8))
    reference = {i: members[i].aic(d).coupling for i in checked}
    aic_dev = max(abs(float(ours.summary.coupling[i]) - r) / r for i, r in reference.items())
    krylov_s = krylov["call"]
    result = {
        "problem": f"{num} quadratic landscapes, n = {n}, d = {d}, AIC + exact flow at "
        f"{num_times} times",
        "machine": machine_info(),
        "num_landscapes": num,
        "n": n,
        "generate_seconds": generate_s,
        "one_call_mode": {
            "krylov": "sequential lax.map" if on_cpu else "vmap",
            "dense": "sequential lax.map" if dense_sequential else "vmap",
        },
        "compile_seconds": {"krylov": krylov["compile"], "dense": dense["compile"]},
        "one_call_seconds": {"krylov": krylov_s, "dense": dense["call"]},
        "loop_seconds": {"krylov": krylov["loop"], "dense": dense["loop"]},
        "per_landscape_ms": {
            "krylov": 1e3 * krylov_s / num,
            "dense": 1e3 * dense["call"] / num,
            "krylov_loop": 1e3 * krylov["loop"] / num,
            "dense_loop": 1e3 * dense["loop"] / num,
        },
        "dense_over_krylov": dense["call"] / krylov_s,
        "loop_over_one_call": {
            "krylov": krylov["loop"] / krylov_s,
            "dense": dense["loop"] / dense["call"],
        },
        "target_seconds": TARGET_SECONDS,
        "meets_target": krylov_s <= TARGET_SECONDS,
        "krylov_all_converged": bool(np.all(np.asarray(ours.converged))),
        "krylov_matvecs": {
            "F_max": int(np.max(ours.eig_matvecs)),
            "F_mean": float(np.mean(ours.eig_matvecs)),
            "A_max": int(np.max(ours.flow_matvecs)),
            "A_mean": float(np.mean(ours.flow_matvecs)),
        },
        "krylov_max_eig_residual": float(np.max(ours.eig_residual)),
        "krylov_max_flow_error_estimate": float(np.max(ours.flow_error)),
        "deviation_scales": "each field's magnitude; tr F for tail_mass, ‖c‖ for "
        "orthogonality, √(tr F)·‖c‖ for fisher_orthogonality (absolute accuracy only)",
        "max_rel_deviation_krylov_vs_dense": deviation,
        "max_rel_deviation_one_call_vs_loop": loop_dev,
        "max_rel_deviation_coupling_vs_aic": aic_dev,
        "all_finite": bool(
            all(np.all(np.isfinite(np.asarray(getattr(ours.summary, f)))) for f in ref._fields)
        ),
    }
    _common.write_result("landscape_batch", result, quick, outdir)
    print(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """The summary table of docs/benchmarks.md for one result."""
    p, mode = result["per_landscape_ms"], result["one_call_mode"]
    mv, dev = result["krylov_matvecs"], result["max_rel_deviation_krylov_vs_dense"]
    size = f"{result['num_landscapes']} landscapes, n = {result['n']}"
    return "\n".join(
        [
            "| batched AIC + exact flow | wall s | per landscape ms | target |",
            "|---|---|---|---|",
            f"| **Krylov** route, one jitted call, {mode['krylov']} ({size}) "
            f"| {result['one_call_seconds']['krylov']:.2f} | {p['krylov']:.2f} "
            f"| ≤ {result['target_seconds']:.0f} s |",
            f"| dense-eigh route, one jitted call, {mode['dense']} "
            f"| {result['one_call_seconds']['dense']:.2f} | {p['dense']:.2f} | |",
            f"| Python loop of the jitted single-landscape call: Krylov / dense "
            f"| {result['loop_seconds']['krylov']:.2f} / {result['loop_seconds']['dense']:.2f} "
            f"| {p['krylov_loop']:.2f} / {p['dense_loop']:.2f} | |",
            f"| dense / Krylov (one call) | {result['dense_over_krylov']:.1f}× | | |",
            f"| Krylov matvecs per landscape, F / A (max) | {mv['F_max']} / {mv['A_max']} "
            f"| all converged: {result['krylov_all_converged']} | |",
            f"| Krylov vs dense, max rel. deviation: coupling / Δu / projected loss "
            f"| {dev['coupling']:.1e} / {dev['delta_u']:.1e} / {dev['projected_loss']:.1e} | | |",
            f"| compile Krylov / dense (once); generation (numpy, once) "
            f"| {result['compile_seconds']['krylov']:.1f} / "
            f"{result['compile_seconds']['dense']:.1f}; {result['generate_seconds']:.1f} | | |",
        ]
    )


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of best of 3")
    parser.add_argument(
        "--readme", action="store_true", help="only rewrite the table of docs/benchmarks.md"
    )
    parser.add_argument("--vmap", action="store_true", help="vmap the dense route on CPU too")
    args = parser.parse_args()
    if args.readme:
        saved = json.loads((RESULTS / "landscape_batch_cpu.json").read_text())
        _common.replace_table("landscape-batch-table", markdown_table(saved))
    else:
        main(args.quick, vmap=args.vmap)
