"""Strong and weak scaling of ``measure_aic`` on parameters sharded over 1, 2 and 4 devices.

Warm times of ``measure_aic`` on a tanh MLP whose hidden dimension and examples
are sharded over D devices (forced host devices on a CPU, one subprocess per
D), and the bytes of the Lanczos basis one device holds. Problem, protocol and
results: docs/benchmarks.md, "The sharded AIC: strong and weak scaling". Writes
``benchmarks/results/sharded_scaling_<platform>.json`` and that table.
Run: ``python -m benchmarks.sharded_scaling [--quick] [--readme]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread beside XLA's pool

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEVICES = (1, 2, 4)
STRONG_WIDTH = 1024
WEAK_BASE_WIDTH = 512
INPUTS, CLASSES = 64, 10
D_SUBSPACE, PROBES, BASIS_STEPS, REPEATS = 5, 16, 16, 3


def num_params(h: int) -> int:
    """Parameters of the ``64-h-h-10`` MLP."""
    return INPUTS * h + h + h * h + h + h * CLASSES + CLASSES


def weak_width(devices: int) -> int:
    """The hidden width (a multiple of 4) whose MLP has about ``devices ×`` the base's size."""
    target = devices * num_params(WEAK_BASE_WIDTH)
    return min(range(4, 4096, 4), key=lambda h: abs(num_params(h) - target))


def _worker(devices: int, widths: list[int], quick: bool) -> dict:
    """Measure in this process (its device count fixed at start-up)."""
    from benchmarks._common import machine_info

    return {
        "devices": devices,
        "machine": machine_info(),
        "runs": [_measure(devices, h, quick) for h in widths],
    }


def _measure(devices: int, h: int, quick: bool) -> dict:
    """Warm and cold ``measure_aic`` of the ``64-h-h-10`` MLP on ``devices``; basis bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from geomcollapse import aic, curvature, linalg, models

    problem = models.mlp_problem(jax.random.key(0), (INPUTS, h, h, CLASSES), 512, gd_steps=2)
    params, batch = problem.params, problem.batch
    if devices > 1:
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ("model",))
        specs = [
            {"b": P("model"), "w": P(None, "model")},
            {"b": P("model"), "w": P(None, "model")},
            {"b": P(), "w": P("model", None)},
        ]
        params = jax.device_put(params, [{k: NamedSharding(mesh, s[k]) for k in s} for s in specs])
        batch = jax.device_put(batch, NamedSharding(mesh, P("model")))
    skill = jax.tree_util.tree_map(lambda a: a[:256], batch)
    task = jax.tree_util.tree_map(lambda a: a[256:], batch)
    fvp = curvature.fisher_vp(problem.logits)

    def run(seed: int):
        return aic.measure_aic(
            fvp,
            problem.loss,
            params,
            D_SUBSPACE,
            key=jax.random.key(seed),
            fisher_args=(skill,),
            loss_args=(task,),
            trace="hutchinson",
            num_probes=PROBES,
            allow_unconverged=True,
        )

    start = time.perf_counter()
    first = run(0)
    cold = time.perf_counter() - start
    warm = []
    for seed in range(1, (1 if quick else REPEATS) + 1):
        start = time.perf_counter()
        run(seed)
        warm.append(time.perf_counter() - start)
    # The Lanczos basis after BASIS_STEPS steps: its bytes on device 0.
    jfvp = jax.jit(fvp)
    blocks = linalg.lanczos_basis(
        lambda v: jfvp(params, v, skill), params, BASIS_STEPS, key=jax.random.key(0)
    )
    device0 = jax.devices()[0]
    on_device0 = sum(
        shard.data.nbytes
        for block in blocks
        for leaf in jax.tree_util.tree_leaves(block)
        for shard in leaf.addressable_shards
        if shard.device == device0
    )
    rows = sum(jax.tree_util.tree_leaves(block)[0].shape[0] for block in blocks)
    n = num_params(h)
    return {
        "width": h,
        "num_params": n,
        "params_per_device": n / devices,
        "cold_s": cold,
        "warm_s": float(np.median(warm)),
        "num_matvecs": int(first.num_matvecs),
        "lanczos_matvecs": int(first.eigenpairs.num_matvecs),
        "basis_bytes_per_param_per_vector_device0": on_device0 / (rows * n),
        "dtype": str(jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype)),
    }


def _spawn(devices: int, widths: list[int], quick: bool, forced: bool) -> dict:
    env = dict(os.environ)
    if forced:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "benchmarks.sharded_scaling", "--worker", str(devices)]
    cmd += ["--widths", ",".join(map(str, widths))] + (["--quick"] if quick else [])
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker D={devices} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _accelerators() -> int:
    """How many GPUs or TPUs JAX sees here, 0 on a CPU (asked in a subprocess)."""
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return 0
    backend, count = proc.stdout.split()[-2:]
    return int(count) if backend != "cpu" else 0


def main(quick: bool = False, outdir: Path = RESULTS, devices: tuple = DEVICES) -> dict:
    """Run every device count; write and return the result."""
    strong, weak = [], []
    accelerators = _accelerators()
    if accelerators:  # real devices: as many of the counts as there are devices
        devices = tuple(d for d in devices if d <= accelerators)
    for d in devices:
        widths = sorted({STRONG_WIDTH, weak_width(d)})
        got = _spawn(d, widths, quick, forced=not accelerators)
        by_width = {r["width"]: r for r in got["runs"]}
        strong.append({"devices": d, **by_width[STRONG_WIDTH]})
        weak.append({"devices": d, **by_width[weak_width(d)]})
        machine = got["machine"]
    result = {"machine": machine, "quick": quick, "strong": strong, "weak": weak}
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"sharded_scaling_{machine['platform']}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """The docs/benchmarks.md table of one result."""
    m = result["machine"]
    base_strong, base_weak = result["strong"][0]["warm_s"], result["weak"][0]["warm_s"]
    lines = [
        "| devices | strong: n | warm s | speed-up | weak: n (per device) | warm s | "
        "efficiency | basis bytes / parameter / vector, one device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, w in zip(result["strong"], result["weak"], strict=True):
        lines.append(
            f"| {s['devices']} | {s['num_params']:,} | {s['warm_s']:.2f} | "
            f"{base_strong / s['warm_s']:.2f}× | {w['num_params']:,} "
            f"({w['params_per_device']:,.0f}) | {w['warm_s']:.2f} | "
            f"{base_weak / w['warm_s']:.2f} | {s['basis_bytes_per_param_per_vector_device0']:.2f} |"
        )
    forced = m["platform"] == "cpu"
    lines.append("")
    lines.append(
        f"{m['platform'].upper()} ({m['device']}), {m['cpu_count']} cores"
        + (", devices forced on the host (they share the cores)" if forced else "")
        + f", jax {m['jax']}, {m['date']}; float32, d = {D_SUBSPACE}, {PROBES} Hutchinson "
        f"probes, warm = median of {REPEATS if not result['quick'] else 1} calls."
    )
    return "\n".join(lines)


def update_doc(result: dict) -> None:
    """Replace the table between docs/benchmarks.md's ``sharded-scaling-table`` markers."""
    from benchmarks import _common

    _common.replace_table("sharded-scaling-table", markdown_table(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one warm call instead of 3")
    parser.add_argument(
        "--readme", action="store_true", help="only rewrite the docs table from the CPU result"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--widths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        import jax

        jax.config.update("jax_enable_x64", False)
        widths = [int(w) for w in args.widths.split(",")]
        print(json.dumps(_worker(args.worker, widths, args.quick)))
    elif args.readme:
        update_doc(json.loads((RESULTS / "sharded_scaling_cpu.json").read_text()))
    else:
        res = main(args.quick)
        if not args.quick and res["machine"]["platform"] == "cpu":
            update_doc(res)
