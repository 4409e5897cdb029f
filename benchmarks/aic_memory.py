"""Peak memory above the loaded model: ``measure_aic`` (d = 10), ``top_eigenpairs``, one FVP at 1M.

Problem: MLP 784-1024-256-10 (1,068,810 parameters, float32), the true Fisher
on 256 examples. For each call (twice: cold, then warm), this process's
``VmRSS`` before it and its ``VmHWM`` (peak, reset through
``/proc/self/clear_refs`` just before the call) after it, with the Lanczos
basis size (steps rounded up to blocks of 8 rows × n × 4 bytes) for scale.
Linux only. Run: ``.venv/bin/python -m benchmarks.aic_memory {aic|lanczos|fvp}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import sys
import time

import jax

from geomcollapse import aic, curvature, linalg, models


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(which: str) -> dict:
    problem = models.mlp_problem(jax.random.key(0), (784, 1024, 256, 10), num_examples=512)
    params, batch = problem.params, problem.batch
    skill_x, task_x, task_y = batch.x[:256], batch.x[256:], batch.y[256:]
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))

    def logits(p, x):
        return models.mlp_apply(p, x, problem.activation)

    def task_loss(p, x, y):
        return models.softmax_cross_entropy(logits(p, x), y)

    fvp = curvature.fisher_vp(logits)
    jfvp = jax.jit(fvp)
    out: dict = {"n": int(n), "which": which}
    for run in ("cold", "warm"):
        jax.block_until_ready(params)
        base = _status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        if which == "fvp":  # one Fisher-vector product: the goal's "workspace"
            jax.block_until_ready(jfvp(params, params, skill_x))
            pairs = None
        elif which == "lanczos":
            pairs = linalg.top_eigenpairs(
                lambda v: jfvp(params, v, skill_x), params, 10, key=jax.random.key(1)
            )
        else:
            pairs = aic.measure_aic(
                fvp,
                task_loss,
                params,
                10,
                key=jax.random.key(1),
                fisher_args=(skill_x,),
                loss_args=(task_x, task_y),
            ).eigenpairs
        steps = 0 if pairs is None else int(pairs.num_matvecs) - 10
        out[run] = {
            "peak_above_MiB": (_status("VmHWM:") - base) / 2**20,
            "basis_MiB": 8 * -(-steps // 8) * n * 4 / 2**20,
            "steps": steps,
            "wall_s": time.perf_counter() - start,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "aic")))
