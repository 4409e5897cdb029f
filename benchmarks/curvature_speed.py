"""Curvature-operator and top-k eigensolver speed on the fixed benchmark problems (issue #2).

Ratios measured in one run: operator time / gradient time, Lanczos wall /
(matvecs × HVP time), ours against ``scipy.sparse.linalg.eigsh`` on the same
jitted HVP; ``--model mlp`` (default) or ``transformer``. Problems, protocol and
results: docs/benchmarks.md, "Curvature operators and the top-k eigensolver".
Writes ``benchmarks/results/curvature_speed[_transformer]_<platform>.json``.

Run: ``.venv/bin/python -m benchmarks.curvature_speed [--quick] [--model transformer]``.
"""

from __future__ import annotations

import os

# eigsh's ARPACK/BLAS threads oversubscribe the 2 cores XLA already uses.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from benchmarks import _common, block_lanczos
from benchmarks._common import machine_info
from geomcollapse import curvature as cv
from geomcollapse import linalg, models, tasks

RESULTS = Path(__file__).parent / "results"


class TransformerProblem(NamedTuple):
    """A transformer language-modelling problem with :class:`models.MLPProblem`'s methods.

    ``batch.x`` are ``(N, T)`` int32 tokens, ``batch.y`` ``(N, T)`` next-token
    targets; the loss is the mean cross-entropy over all ``N·T`` positions.
    """

    params: Any
    batch: models.Batch
    config: models.TransformerConfig

    def logits(self, params: Any, batch: models.Batch) -> jax.Array:
        """``(N, T, V)`` logits, computed in the dtype of ``params``."""
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        graphdef, _ = models.transformer_abstract(self.config, dtype)
        return models.transformer_logits(graphdef)(params, batch.x)

    def loss(self, params: Any, batch: models.Batch) -> jax.Array:
        """Mean next-token cross-entropy over every position."""
        return models.softmax_cross_entropy(self.logits(params, batch), batch.y)

    def example_loss(self, params: Any, example: models.Batch) -> jax.Array:
        """Mean cross-entropy of one sequence (``x``, ``y`` of shape ``(T,)``)."""
        one = models.Batch(example.x[None], example.y[None])
        return models.softmax_cross_entropy(self.logits(params, one), one.y)


def transformer_problem(
    key: jax.Array, size: str = "small", num_sequences: int = 64, gd_steps: int = 5
) -> TransformerProblem:
    """The fixed transformer problem (see the module docstring)."""
    k_data, k_init = jax.random.split(key)
    data = tasks.base_tasks(k_data, num_sequences).truncated()
    batch = models.Batch(jnp.asarray(data.tokens), jnp.asarray(data.targets))
    config = models.transformer_config(size)
    _, params = models.transformer_init(k_init, config)
    problem = TransformerProblem(params, batch, config)
    grad = jax.jit(jax.grad(problem.loss))
    for _ in range(gd_steps):
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grad(params, batch))
    return problem._replace(params=params)


def _as_float64(batch: models.Batch) -> models.Batch:
    """``batch`` with its floating leaves in float64 (token ids stay integers)."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, batch
    )


def _once(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def round_robin(calls: dict, rounds: int) -> dict:
    """Seconds of each ``name: (fn, args)``, timed in interleaved rounds.

    Interleaving puts every operator under the same background load, so the
    per-round ratios stay meaningful on a noisy machine. Returns
    ``{name: [seconds per round]}`` after two warm-up calls each.
    """
    for fn, args in calls.values():
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            times[name].append(_once(fn, args))
    return times


def ggn_vp_jvp_vjp(predict_fn, output_loss_fn):
    """The alternative GGN-VP: separate ``jax.jvp`` and ``jax.vjp`` (for comparison)."""

    def ggn(params, v, *args):
        z, jv = jax.jvp(lambda p: predict_fn(p, *args), (params,), (v,))
        hjv = jax.jvp(jax.grad(lambda zz: output_loss_fn(zz, *args)), (z,), (jv,))[1]
        return jax.vjp(lambda p: predict_fn(p, *args), params)[1](hjv)[0]

    return ggn


def operator_timings(problem, repeats):
    params, batch = problem.params, problem.batch
    v = jax.tree_util.tree_map(jnp.ones_like, params)

    def ce(z, b):
        return models.softmax_cross_entropy(z, b.y)

    ops = {
        "gradient": (jax.jit(cv.gradient(problem.loss)), (params, batch)),
        "hvp": (jax.jit(cv.hessian_vp(problem.loss)), (params, v, batch)),
        "ggn_vp": (jax.jit(cv.ggn_vp(problem.logits, ce)), (params, v, batch)),
        "ggn_vp_jvp_vjp": (jax.jit(ggn_vp_jvp_vjp(problem.logits, ce)), (params, v, batch)),
        "fisher_vp": (jax.jit(cv.fisher_vp(problem.logits)), (params, v, batch)),
        "empirical_fisher_vp": (
            jax.jit(cv.empirical_fisher_vp(problem.example_loss)),
            (params, v, batch),
        ),
    }
    vs = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 10), v)
    batched = jax.jit(jax.vmap(ops["hvp"][0], in_axes=(None, 0, None)))
    ops["hvp_vmap10"] = (batched, (params, vs, batch))
    times = {k: np.asarray(t) for k, t in round_robin(ops, repeats).items()}
    times["hvp_vmap10_per_vector"] = times.pop("hvp_vmap10") / 10
    grad = times["gradient"]
    return {
        "seconds": {k: float(np.median(t)) for k, t in times.items()},
        "ratio_to_gradient": {k: float(np.median(t / grad)) for k, t in times.items()},
        "rounds": repeats,
    }


def eigsh_top(flat_hvp, n, dtype, k, tol, seed):
    count = [0]

    def mv(x):
        count[0] += 1
        return np.asarray(flat_hvp(jnp.asarray(x, dtype)))

    op = LinearOperator((n, n), matvec=mv, dtype=dtype)
    v0 = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    t0 = time.perf_counter()
    vals = eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1], count[0], time.perf_counter() - t0


def eigen_benchmarks(
    problem, grad_seconds, tols, k=10, repeats=3, seed_runs=5, block_sizes=(), block_seeds=3
):
    params, batch = problem.params, problem.batch
    hvp = jax.jit(cv.hessian_vp(problem.loss))
    flat, unravel = cv.ravel(params)
    n = flat.size

    @jax.jit
    def flat_hvp_args(x, params, batch):
        return cv.ravel(hvp(params, unravel(x), batch))[0]

    def flat_hvp(x):  # data as arguments, not closure constants (XLA would fold them)
        return flat_hvp_args(x, params, batch)

    # float64 reference on the same parameters (x64 enabled only for this block).
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        b64 = _as_float64(batch)
        hvp64 = jax.jit(cv.hessian_vp(problem.loss))
        t0 = time.perf_counter()
        ref = linalg.top_eigenpairs(
            lambda u: hvp64(p64, u, b64), p64, k, key=jax.random.key(123), tol=1e-10
        )
        ref_values = np.asarray(ref.values, np.float64)
        ref_seconds = time.perf_counter() - t0
        ref_matvecs = ref.num_matvecs

    def ours_run(tol, seed=0):  # the same jitted flat matvec as eigsh gets
        return linalg.top_eigenpairs(flat_hvp, flat, k, key=jax.random.key(seed), tol=tol)

    jax.block_until_ready(flat_hvp(flat))  # compiled outside the timed region
    t0 = time.perf_counter()
    jax.block_until_ready(ours_run(tols[0]).vectors)
    cold_seconds = time.perf_counter() - t0  # includes compiling the basis-shape kernels

    def hvp_seconds_now(count: int) -> float:
        """Per-HVP seconds of ``count`` chained, synced HVPs, timed right now.

        The machine's throughput drifts by ~50 % between minutes, so each
        solver run is normalised by HVPs timed in the same window.
        """
        x = flat / jnp.linalg.norm(flat)
        t0 = time.perf_counter()
        for _ in range(count):
            x = flat_hvp(x)
            x = x / float(jnp.linalg.norm(x))
        return (time.perf_counter() - t0) / count

    rows = []
    for tol in tols:
        jax.block_until_ready(ours_run(tol).vectors)  # warm: kernels for every basis shape
        walls, e_walls, per_hvp, e_per_hvp = [], [], [], []
        for _ in range(repeats):  # alternate the solvers and their HVP baselines; medians
            t0 = time.perf_counter()
            ours = ours_run(tol)
            jax.block_until_ready(ours.vectors)
            walls.append(time.perf_counter() - t0)
            per_hvp.append(hvp_seconds_now(ours.num_matvecs))
            e_vals, e_count, e_wall = eigsh_top(flat_hvp, n, np.float32, k, tol, seed=0)
            e_walls.append(e_wall)
            e_per_hvp.append(hvp_seconds_now(e_count))
        wall, e_wall = float(np.median(walls)), float(np.median(e_walls))
        hvp_seconds = float(np.median(per_hvp + e_per_hvp))
        values = np.asarray(ours.values, np.float64)
        rows.append(
            {
                "tol": tol,
                "ours": {
                    "matvecs": ours.num_matvecs,
                    "wall_s": wall,
                    "wall_over_matvecs_x_hvp": float(
                        np.median(np.array(walls) / (ours.num_matvecs * np.array(per_hvp)))
                    ),
                    "gradient_times": wall / grad_seconds,
                    "max_rel_eig_error": float(np.max(np.abs(values - ref_values) / ref_values[0])),
                    "all_converged": bool(np.all(np.asarray(ours.converged))),
                },
                "eigsh": {
                    "matvecs": e_count,
                    "wall_s": e_wall,
                    "wall_over_matvecs_x_hvp": float(
                        np.median(np.array(e_walls) / (e_count * np.array(e_per_hvp)))
                    ),
                    "gradient_times": e_wall / grad_seconds,
                    "max_rel_eig_error": float(np.max(np.abs(e_vals - ref_values) / ref_values[0])),
                },
                "hvp_seconds_in_window": hvp_seconds,
                "speedup_vs_eigsh": e_wall / wall,
                # What a solver with our matvec count and no overhead at all would reach.
                "speedup_vs_eigsh_at_zero_overhead": e_wall / (ours.num_matvecs * hvp_seconds),
            }
        )
    seeds = {"ours": [], "eigsh": []}
    for seed in range(seed_runs):  # matvec counts only: is the count the start vector's luck?
        seeds["ours"].append(ours_run(tols[0], seed).num_matvecs)
        seeds["eigsh"].append(eigsh_top(flat_hvp, n, np.float32, k, tols[0], seed=seed)[1])
    blocks = block_counts(flat_hvp_args, params, batch, flat, k, tols[0], block_sizes, block_seeds)
    return {
        "k": k,
        "reference": {
            "method": "geomcollapse Lanczos, float64, tol 1e-10",
            "values": ref_values.tolist(),
            "matvecs": ref_matvecs,
            "wall_s": ref_seconds,
        },
        "ours_cold_first_call_s": cold_seconds,
        "runs": rows,
        "matvecs_by_start_seed": {"tol": tols[0], "seeds": list(range(seed_runs)), **seeds},
        "block_lanczos": blocks,
    }


def block_counts(flat_hvp_args, params, batch, flat, k, tol, block_sizes, num_seeds) -> list:
    """Matvecs block Lanczos needs for the top-``k`` at ``tol``, per block size.

    Also the vmapped HVP's time per vector relative to one HVP (interleaved
    rounds), so ``matvecs × that ratio`` is the count in single-HVP times.
    """
    rows = []
    single = (flat_hvp_args, (flat, params, batch))
    batched = jax.jit(jax.vmap(flat_hvp_args, in_axes=(0, None, None)))

    def matvec(V):
        return np.asarray(batched(jnp.asarray(V, flat.dtype), params, batch))

    for b in block_sizes:
        xs = jnp.stack([flat] * b)
        times = round_robin({"one": single, "batch": (batched, (xs, params, batch))}, 10)
        per_vector = float(np.median(np.asarray(times["batch"]) / (b * np.asarray(times["one"]))))
        counts = [
            block_lanczos.block_lanczos_top(matvec, flat.size, k, b, tol=tol, seed=seed)[0]
            for seed in range(num_seeds)
        ]
        rows.append({"block_size": b, "matvecs": counts, "vmapped_time_per_vector": per_vector})
    return rows


def markdown_table(result: dict) -> str:
    """The summary table of docs/benchmarks.md for one benchmark result."""
    r = result["operators"]["ratio_to_gradient"]
    lines = [
        "| operator | time / gradient | target |",
        "|---|---|---|",
        f"| gradient ({result['operators']['seconds']['gradient'] * 1e3:.1f} ms) | 1.00 | |",
        f"| HVP (forward-over-reverse) | {r['hvp']:.2f} | ≤ 1.9 |",
        f"| HVP, vmapped batch of 10, per vector | {r['hvp_vmap10_per_vector']:.2f} | |",
        f"| GGN-VP (linearize + transpose) | {r['ggn_vp']:.2f} | ≤ 1.6 |",
        f"| GGN-VP (jvp + vjp, for comparison) | {r['ggn_vp_jvp_vjp']:.2f} | |",
        f"| Fisher-VP (softmax) | {r['fisher_vp']:.2f} | |",
        f"| empirical Fisher-VP | {r['empirical_fisher_vp']:.2f} | |",
        "",
        "| top-10 Hessian | tol | matvecs | wall s | wall / (matvecs × HVP) | gradient-times "
        "| max rel. eigenvalue error | speed-up vs eigsh | same, at zero overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["top10_hessian"]["runs"]:
        for name in ("ours", "eigsh"):
            s = run[name]
            speed = bound = ""
            if name == "ours":
                speed = f"{run['speedup_vs_eigsh']:.2f}×"
                if "speedup_vs_eigsh_at_zero_overhead" in run:
                    bound = f"{run['speedup_vs_eigsh_at_zero_overhead']:.2f}×"
            lines.append(
                f"| {'geomcollapse Lanczos' if name == 'ours' else 'scipy eigsh'} | {run['tol']:g} "
                f"| {s['matvecs']} | {s['wall_s']:.2f} | {s['wall_over_matvecs_x_hvp']:.2f} "
                f"| {s['gradient_times']:.0f} | {s['max_rel_eig_error']:.1e} | {speed} | {bound} |"
            )
    seeds = result["top10_hessian"].get("matvecs_by_start_seed")
    if seeds:
        lines += [
            "",
            f"Matvecs at tol {seeds['tol']:g} over start vectors (seeds "
            f"{seeds['seeds'][0]}–{seeds['seeds'][-1]}): geomcollapse Lanczos "
            f"{', '.join(map(str, seeds['ours']))}; "
            f"scipy eigsh {', '.join(map(str, seeds['eigsh']))}.",
        ]
    block_rows = result["top10_hessian"].get("block_lanczos", [])
    if block_rows:
        lines += [
            "",
            f"| block Lanczos, top-10 at {seeds['tol']:g} | matvecs (start seeds 0, 1, …) "
            "| vmapped HVP time per vector / one HVP | matvecs in one-HVP times |",
            "|---|---|---|---|",
        ]
        for row in block_rows:
            counts = [c for c in row["matvecs"] if c is not None]
            equivalent = np.median(counts) * row["vmapped_time_per_vector"] if counts else np.nan
            lines.append(
                f"| block size {row['block_size']} | {', '.join(map(str, row['matvecs']))} "
                f"| {row['vmapped_time_per_vector']:.2f} | {equivalent:.0f} |"
            )
    return "\n".join(lines)


def main(
    quick: bool = False,
    sizes: tuple[int, ...] = (784, 256, 256, 10),
    num_examples: int = 512,
    outdir: Path = RESULTS,
    model: str = "mlp",
    transformer_size: str = "small",
) -> dict:
    """Run the benchmark; the defaults are the fixed problems.

    ``model='mlp'`` uses ``sizes`` and ``num_examples`` (269,322 parameters by
    default); ``model='transformer'`` uses ``transformer_size`` (``'small'``:
    1,016,256 parameters) and ``num_examples`` sequences.
    """
    if model == "mlp":
        problem = models.mlp_problem(jax.random.key(0), sizes, num_examples)
        label = (
            f"MLP {'-'.join(map(str, sizes))} tanh, {num_examples} examples, mean CE, 5 GD steps"
        )
    elif model == "transformer":
        problem = transformer_problem(jax.random.key(0), transformer_size, num_examples)
        label = (
            f"transformer '{transformer_size}', {num_examples} base-task sequences of "
            f"{problem.batch.x.shape[1]} tokens, mean next-token CE, 5 GD steps"
        )
    else:
        raise ValueError(f"model must be 'mlp' or 'transformer', got {model!r}")
    n = cv.num_params(problem.params)
    ops = operator_timings(problem, repeats=5 if quick else 30)
    s = ops["seconds"]
    eig = eigen_benchmarks(
        problem,
        s["gradient"],
        tols=(1e-3,) if quick else (1e-3, 1e-6),
        repeats=1 if quick else 3,
        seed_runs=1 if quick else 5,
        block_sizes=() if quick else (2, 4, 10) if model == "mlp" else (2, 10),
        block_seeds=3 if model == "mlp" else 1,  # one transformer HVP is ~0.16 s
    )
    result = {
        "problem": label,
        "model": model,
        "num_params": n,
        "machine": machine_info(),
        "operators": ops,
        "top10_hessian": eig,
    }
    stem = "curvature_speed" if model == "mlp" else "curvature_speed_transformer"
    _common.write_result(stem, result, quick, outdir)
    print(markdown_table(result))
    return result


def update_doc(result: dict, doc: Path = _common.DOC) -> None:
    """Replace the table between docs/benchmarks.md's markers for the result's model."""
    marker = (
        "benchmark-table" if result.get("model", "mlp") == "mlp" else "benchmark-table-transformer"
    )
    _common.replace_table(marker, markdown_table(result), doc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (one solver run each), tol 1e-3 only"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="only rewrite the tables of docs/benchmarks.md from the saved CPU results",
    )
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    args = parser.parse_args()
    if args.readme:
        for stem in ("curvature_speed", "curvature_speed_transformer"):
            path = RESULTS / f"{stem}_cpu.json"
            if path.exists():
                update_doc(json.loads(path.read_text()))
    elif args.model == "transformer":
        main(args.quick, num_examples=64, model="transformer")
    else:
        main(args.quick)
