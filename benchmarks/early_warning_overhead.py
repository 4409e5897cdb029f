"""Overhead of the monitor's early-warning rule on fine-tuning the `small` transformer.

Plain SGD against the same SGD wrapped by ``monitor(..., every=50,
early_warning=EarlyWarning(subspace₅₀, threshold=τ, at=16))`` without the
rotation of ``M``: the measurements at k = 16, 50, 100, … record the projected
loss and overlap on ``M`` (d = 10) and ``E_k`` and the projected loss on the
rule's subspace (d = 50). Whole runs of the study's horizon (256 steps, one
compiled scan each) alternate plain / monitored, ``rounds`` times; the ratio is
monitored / plain per round (wall and process CPU time, one process). The
cost of a measurement is that of a ``(d, n)`` product, whatever the rows: the
subspaces here are random orthonormal rows (QR), not the skill Fisher's
eigenvectors, which would only add minutes of Lanczos before the timing.
Writes ``benchmarks/results/early_warning_overhead_<platform>.json``.
Run: ``.venv/bin/python -m benchmarks.early_warning_overhead [--quick] [--readme]``.
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
import optax

from benchmarks import _common
from geomcollapse import curvature, models, tasks, training
from geomcollapse import monitor as mon
from geomcollapse.subspace import Subspace

RESULTS = Path(__file__).parent / "results"
TARGET = 1.02


def _random_subspace(key: jax.Array, d: int, n: int) -> Subspace:
    """``d`` orthonormal rows in ``R^n`` (QR of a Gaussian), eigenvalues ``1 … 1/d``."""
    q = jnp.linalg.qr(jax.random.normal(key, (n, d), jnp.float32))[0]
    return Subspace.exact(1.0 / jnp.arange(1, d + 1, dtype=jnp.float32), q.T)


def _timed(fn, *args) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(
    quick: bool = False,
    *,
    rounds: int = 4,
    steps: int = 256,
    every: int = 50,
    at: int = 16,
    batch_size: int = 64,
    outdir: Path = RESULTS,
) -> dict:
    """Run the benchmark; return (and write) the result dictionary."""
    size = "tiny" if quick else "small"
    k_model, k_data, k_main, k_early, k_order = jax.random.split(jax.random.key(0), 5)
    graphdef, theta_star = models.transformer_init(k_model, size)
    loss = training.sequence_loss(models.transformer_logits(graphdef))
    data = tasks.base_tasks(k_data, 4096).truncated()
    arrays = tuple(jnp.asarray(a) for a in (data.tokens, data.targets, data.mask))
    n = curvature.num_params(theta_star)
    main_m, early_m = _random_subspace(k_main, 10, n), _random_subspace(k_early, 50, n)
    rule = mon.EarlyWarning(early_m, threshold=0.1, at=at)
    sgd = optax.sgd(0.03)
    variants = {"plain": sgd, "monitor": mon.monitor(sgd, main_m, every=every, early_warning=rule)}

    def run_fn(opt):
        @jax.jit
        def run(params, state, idx, arrays):
            def step(carry, rows):
                p, s = carry
                u, s = opt.update(jax.grad(loss)(p, *(a[rows] for a in arrays)), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(step, (params, state), idx)[0]

        return run

    runs = {name: run_fn(opt) for name, opt in variants.items()}
    perm = np.asarray(jax.random.permutation(k_order, data.num))
    idx = np.resize(perm, steps * batch_size).reshape(steps, batch_size)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    compile_s, last = {}, {}
    for r in range(rounds + 1):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]  # alternate the order
        for name in names:
            init = (theta_star, variants[name].init(theta_star))
            w, c, last[name] = _timed(runs[name], *init, idx, arrays)
            if r == 0:
                compile_s[name] = w  # compile + one run
            else:
                wall[name].append(w)
                cpu[name].append(c)
    log = mon.monitor_log(last["monitor"][1])
    expected = sorted({at, *range(every, steps, every)})
    assert log.step.tolist() == expected, (log.step, expected)
    ratio = {
        k: np.asarray(v["monitor"]) / np.asarray(v["plain"])
        for k, v in (("wall", wall), ("cpu", cpu))
    }
    result = {
        "machine": _common.machine_info(),
        "problem": {
            "model": size,
            "num_params": int(n),
            "dtype": "float32",
            "optimizer": "sgd(0.03)",
            "batch_size": batch_size,
            "steps": steps,
            "every": every,
            "at": at,
            "d_monitor": 10,
            "d_early_warning": 50,
            "rounds": rounds,
            "measurements": expected,
        },
        "run_s": wall,
        "cpu_s": cpu,
        "ratio_per_round": {k: list(map(float, v)) for k, v in ratio.items()},
        "ratio": float(np.median(ratio["wall"])),
        "ratio_cpu": float(np.median(ratio["cpu"])),
        "ratio_of_sums": float(np.sum(wall["monitor"]) / np.sum(wall["plain"])),
        "target_ratio": TARGET,
        "compile_and_first_run_s": compile_s,
    }
    path = _common.write_result("early_warning_overhead", result, quick, outdir)
    print(
        f"{size}: n = {n:,}; {steps} steps plain {np.median(wall['plain']):.2f} s; monitored / "
        f"plain = {result['ratio']:.3f} wall, {result['ratio_cpu']:.3f} CPU (target ≤ {TARGET})"
    )
    print(f"wrote {path}")
    return result


def markdown_table(r: dict) -> str:
    """The docs/benchmarks.md table of one result."""
    m, p = r["machine"], r["problem"]
    per_round = ", ".join(f"{x:.3f}" for x in r["ratio_per_round"]["wall"])
    rows = [
        "| quantity | value |",
        "|---|---|",
        f"| problem | `{p['model']}` transformer, {p['num_params']:,} parameters ({p['dtype']}), "
        f"{p['optimizer']}, batch {p['batch_size']}, {p['steps']} steps |",
        f"| monitor | every {p['every']} steps, d = {p['d_monitor']}, no rotation; early warning "
        f"d = {p['d_early_warning']} at k = {p['at']}: measured at k = "
        f"{', '.join(map(str, p['measurements']))} |",
        f"| plain run (median of {p['rounds']}) | {np.median(r['run_s']['plain']):.2f} s |",
        f"| **monitored / plain**, median of {p['rounds']} interleaved rounds (wall) | "
        f"**{r['ratio']:.3f}** (target ≤ {r['target_ratio']}); per round {per_round} |",
        f"| the same in process CPU time | {r['ratio_cpu']:.3f} |",
        f"| ratio of sums (wall) | {r['ratio_of_sums']:.3f} |",
    ]
    rows.append(f"\n{m['cpu_count']}-core {m['platform'].upper()}, jax {m['jax']}, {m['date']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny transformer")
    parser.add_argument("--rounds", type=int, default=4, help="timed runs per variant")
    parser.add_argument(
        "--readme", action="store_true", help="also rewrite the table of docs/benchmarks.md"
    )
    args = parser.parse_args()
    result = main(quick=args.quick, rounds=args.rounds)
    if args.readme:
        _common.replace_table("early-warning-overhead-table", markdown_table(result))
