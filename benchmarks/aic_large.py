"""The AIC (d = 10) of a 1,068,810-parameter MLP: wall time against its Fisher matvecs.

Measures ``measure_aic``'s wall over (Fisher matvecs × one Fisher-VP), warm and
cold, and the matvec's first call with weights as jit arguments against closure
constants. Problem, protocol and results: docs/benchmarks.md, "The AIC of a
1M-parameter model". Writes ``benchmarks/results/aic_large_<platform>.json``.
Run: ``.venv/bin/python -m benchmarks.aic_large [--quick] [--skip-closure] [--readme]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread beside XLA's pool

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from geomcollapse import aic, curvature, models

RESULTS = Path(__file__).parent / "results"
SIZES = (784, 1024, 256, 10)
QUICK_SIZES = (64, 48, 10)
WARM_REPEATS = 5  # warm wall = median of these calls (single calls vary ±15 % on the 2-core VM)


def main(quick: bool = False, skip_closure: bool = False, outdir: Path = RESULTS) -> dict:
    """Run the benchmark; return (and write) the result dictionary."""
    sizes = QUICK_SIZES if quick else SIZES
    problem = models.mlp_problem(jax.random.key(0), sizes, num_examples=512)
    params, batch = problem.params, problem.batch
    skill_x = batch.x[:256]
    task = models.Batch(batch.x[256:], batch.y[256:])
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))

    def logits(p, x):
        return models.mlp_apply(p, x, problem.activation)

    fvp = curvature.fisher_vp(logits)

    def task_loss(p, x, y):
        return models.softmax_cross_entropy(logits(p, x), y)

    v = jax.tree_util.tree_map(jnp.ones_like, params)
    fvp_time = _common.median_time(jax.jit(fvp), params, v, skill_x, repeats=7)
    grad_time = _common.median_time(jax.jit(jax.grad(task_loss)), params, task.x, task.y, repeats=7)

    def run(fisher_vp, fisher_args):
        start = time.perf_counter()
        m = aic.measure_aic(
            fisher_vp,
            task_loss,
            params,
            10,
            key=jax.random.key(1),
            fisher_args=fisher_args,
            loss_args=(task.x, task.y),
        )
        return m, time.perf_counter() - start

    cold, cold_wall = run(fvp, (skill_x,))
    warm_runs = [run(fvp, (skill_x,)) for _ in range(WARM_REPEATS)]
    warm = warm_runs[-1][0]
    warm_wall = float(np.median([wall for _, wall in warm_runs]))
    matvecs = warm.num_matvecs
    result = {
        "machine": _common.machine_info(),
        "problem": {"sizes": list(sizes), "num_params": int(n), "d": 10, "dtype": "float32"},
        "fisher_vp_s": fvp_time,
        "gradient_s": grad_time,
        "fisher_matvecs": int(matvecs),
        "lanczos_matvecs": int(warm.eigenpairs.num_matvecs),
        "wall_warm_s": warm_wall,
        "wall_cold_s": cold_wall,
        "ratio_warm": warm_wall / (matvecs * fvp_time),
        "ratio_cold": cold_wall / (matvecs * fvp_time),
        "target_ratio": 1.3,
        "converged": bool(warm.report.converged),
        "coupling": warm.report.coupling,
        "coupling_cold_equal": cold.report.coupling == warm.report.coupling,
        "max_rel_residual": max(warm.report.eigen_residuals) / float(warm.eigenpairs.values[0]),
    }
    if not skip_closure:
        # Compile + first call of the Fisher matvec, weights as jit arguments vs as
        # closure constants (the pre-fix convention, which XLA constant-folds).
        def first_call(fn, *args):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            return time.perf_counter() - start

        as_args = first_call(jax.jit(lambda w, p, x: fvp(p, w, x)), v, params, skill_x)
        as_constants = first_call(jax.jit(lambda w: fvp(params, w, skill_x)), v)
        result["matvec_first_call_args_s"] = as_args
        result["matvec_first_call_constants_s"] = as_constants
    path = _common.write_result("aic_large", result, quick, outdir)
    print(
        f"n = {n:,}; one Fisher-VP {1e3 * fvp_time:.1f} ms, one gradient {1e3 * grad_time:.1f} ms"
    )
    print(
        f"measure_aic: {matvecs} Fisher matvecs; warm {warm_wall:.2f} s "
        f"(ratio {result['ratio_warm']:.2f}), cold {cold_wall:.2f} s "
        f"(ratio {result['ratio_cold']:.2f}); target ≤ 1.3"
    )
    if "matvec_first_call_args_s" in result:
        print(
            f"Fisher matvec compile + first call: weights as arguments "
            f"{result['matvec_first_call_args_s']:.2f} s, as closure constants "
            f"{result['matvec_first_call_constants_s']:.2f} s"
        )
    print(f"wrote {path}")
    return result


def markdown_table(r: dict) -> str:
    """The docs/benchmarks.md table of one result."""
    m, p = r["machine"], r["problem"]
    sizes = "-".join(map(str, p["sizes"]))
    fvp_ms, grad_ms = 1e3 * r["fisher_vp_s"], 1e3 * r["gradient_s"]
    rows = [
        "| quantity | value |",
        "|---|---|",
        f"| parameters | {p['num_params']:,} (MLP {sizes}, {p['dtype']}) |",
        f"| one Fisher-VP / one gradient | {fvp_ms:.1f} ms / {grad_ms:.1f} ms |",
        f"| Fisher matvecs (Lanczos incl. certification + trace + tail) | {r['fisher_matvecs']} "
        f"({r['lanczos_matvecs']} Lanczos) |",
        f"| wall, warm / cold | {r['wall_warm_s']:.2f} s / {r['wall_cold_s']:.2f} s |",
        f"| wall / (matvecs × Fisher-VP), warm / cold | {r['ratio_warm']:.2f} / "
        f"{r['ratio_cold']:.2f} (target ≤ {r['target_ratio']}) |",
    ]
    if "matvec_first_call_args_s" in r:
        rows.append(
            "| Fisher matvec compile + first call: weights as arguments / as closure constants | "
            f"{r['matvec_first_call_args_s']:.2f} s / {r['matvec_first_call_constants_s']:.2f} s |"
        )
    rows.append(f"| converged, max ‖Fv − λv‖/λ₁ | {r['converged']}, {r['max_rel_residual']:.1e} |")
    rows.append(f"\n{m['cpu_count']}-core {m['platform'].upper()}, jax {m['jax']}, {m['date']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 3,600-parameter MLP (seconds)")
    parser.add_argument(
        "--skip-closure", action="store_true", help="skip the closure-constant comparison"
    )
    parser.add_argument(
        "--readme", action="store_true", help="also rewrite the table of docs/benchmarks.md"
    )
    args = parser.parse_args()
    result = main(quick=args.quick, skip_closure=args.skip_closure)
    if args.readme and not args.quick:
        _common.replace_table("aic-large-table", markdown_table(result))
