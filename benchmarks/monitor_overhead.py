"""Overhead of the alignment monitor (``geomcollapse.monitor``) on training the `small` transformer.

The ratio wall(monitored window of 50 steps) / wall(plain window), with and
without the rotation of ``M``, and its breakdown (training step, Fisher-VP,
Lanczos, the cheap part). Problem, protocol and results: docs/benchmarks.md,
"Overhead of the training monitor". Writes
``benchmarks/results/monitor_overhead_<platform>.json``.
Run: ``.venv/bin/python -m benchmarks.monitor_overhead [--quick] [--readme]``.
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
from jax.flatten_util import ravel_pytree

from benchmarks import _common
from geomcollapse import curvature, linalg, models, tasks, training
from geomcollapse import monitor as mon
from geomcollapse.subspace import Subspace, warm_eigenpairs

RESULTS = Path(__file__).parent / "results"
TARGET = 1.10
ROTATION_EVERY = 8


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def main(
    quick: bool = False,
    *,
    rounds: int = 8,
    d: int = 10,
    every: int = 50,
    batch_size: int = 64,
    num_prompts: int = 64,
    tol: float = 1e-3,
    max_steps: int = 48,
    outdir: Path = RESULTS,
) -> dict:
    """Run the benchmark; return (and write) the result dictionary."""
    size = "tiny" if quick else "small"
    if quick:
        rounds, every, d, max_steps = 2, 5, 2, 16
    key = jax.random.key(0)
    k_model, k_data, k_prompts, k_m, k_mon, k_order = jax.random.split(key, 6)
    graphdef, theta_star = models.transformer_init(k_model, size)
    logits = models.transformer_logits(graphdef)
    data = tasks.base_tasks(k_data, 4096).truncated()
    arrays = tuple(jnp.asarray(a) for a in (data.tokens, data.targets, data.mask))
    harmful = tasks.harmful_prompts(k_prompts, num_prompts).prompts_only()
    fisher_args = (jnp.asarray(harmful.tokens), jnp.asarray(harmful.answer_start))
    loss = training.sequence_loss(logits)
    fvp = curvature.fisher_vp(training.answer_logits(logits))
    n = curvature.num_params(theta_star)

    # M(θ*): top-d of the skill Fisher at θ*
    fvp_jit = jax.jit(lambda p, v, *a: fvp(p, v, *a))
    start = time.perf_counter()
    pairs = linalg.top_eigenpairs(
        lambda v: fvp_jit(theta_star, v, *fisher_args), theta_star, d, key=k_m, tol=tol
    )
    subspace_s = time.perf_counter() - start
    subspace = Subspace.from_eigenpairs(pairs)

    adam = optax.adam(1e-3)
    variants = {
        "plain": adam,
        "monitor": mon.monitor(
            adam,
            subspace,
            every=every,
            fisher_vp=fvp,
            key=k_mon,
            tol=tol,
            max_steps=max_steps,
        ),
        "monitor_no_rotation": mon.monitor(adam, subspace, every=every),
        # the rotation at every 8th measurement only: one Lanczos run in the 8 timed
        # windows (rounds = 8), so its ratio of sums is one full period
        "monitor_rotation_every_8": mon.monitor(
            adam,
            subspace,
            every=every,
            fisher_vp=fvp,
            key=k_mon,
            tol=tol,
            max_steps=max_steps,
            rotation_every=ROTATION_EVERY,
        ),
    }

    def window_fn(opt, monitored: bool):
        @jax.jit
        def window(params, state, idx, arrays, fisher_args):
            extra = {"fisher_args": fisher_args} if monitored else {}

            def step(carry, rows):
                p, s = carry
                g = jax.grad(loss)(p, *(a[rows] for a in arrays))
                u, s = opt.update(g, s, p, **extra)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(step, (params, state), idx)[0]

        return window

    windows = {name: window_fn(opt, name != "plain") for name, opt in variants.items()}
    carry = {name: (theta_star, opt.init(theta_star)) for name, opt in variants.items()}
    perm = np.asarray(jax.random.permutation(k_order, data.num))
    num_windows = rounds + 1
    idx = np.resize(perm, num_windows * every * batch_size).reshape(num_windows, every, batch_size)

    times: dict[str, list[float]] = {name: [] for name in variants}
    compile_s = {}
    for w in range(num_windows):
        names = list(variants)
        names = names[w % len(names) :] + names[: w % len(names)]  # rotate the order
        for name in names:
            elapsed, carry[name] = _timed(windows[name], *carry[name], idx[w], arrays, fisher_args)
            if w == 0:
                compile_s[name] = elapsed  # compile + a window without a measurement
            else:
                times[name].append(elapsed)

    plain = np.asarray(times["plain"])
    per_round = {name: np.asarray(times[name]) / plain for name in variants if name != "plain"}
    state = carry["monitor"][1]
    log = mon.monitor_log(state)
    assert log.step.size == rounds, "one measurement per timed window"

    # breakdown, at the monitored run's final θ; the Lanczos run and the Fisher-VPs
    # alternate so that the overhead per step compares times from the same minutes
    params = carry["monitor"][0]
    window_plain = float(np.median(plain))
    step_s = window_plain / every

    @jax.jit
    def lanczos(p, basis, key, fisher_args):
        return warm_eigenpairs(
            fvp, p, fisher_args, basis, d, tuple(jax.random.split(key)), tol, max_steps
        )

    alone = jax.block_until_ready(lanczos(params, state.basis, k_mon, fisher_args))
    jax.block_until_ready(fvp_jit(params, params, *fisher_args))
    fvp_runs, lanczos_runs = [], []
    for _ in range(3):
        fvp_runs.append(
            float(np.median([_timed(fvp_jit, params, params, *fisher_args)[0] for _ in range(3)]))
        )
        lanczos_runs.append(_timed(lanczos, params, state.basis, k_mon, fisher_args)[0])
    fvp_s, lanczos_s = float(np.median(fvp_runs)), float(np.median(lanczos_runs))
    per_step = np.asarray(lanczos_runs) / int(alone.num_matvecs) - np.asarray(fvp_runs)
    cheap = jax.jit(lambda p: mon.monitor_measure(p, theta_star, subspace))
    cheap_s = _common.median_time(cheap, params)
    # The floor of any rotation measurement: F(θ_k) applied once to the d rows of the
    # previous basis, as one vmapped block (XLA shares the forward pass); a method that
    # checks or updates a d-dimensional M(θ_k) cannot use fewer Fisher-VPs.
    unravel = ravel_pytree(params)[1]
    block_fvp = jax.jit(
        lambda p, rows, a: jax.vmap(lambda r: ravel_pytree(fvp(p, unravel(r), *a))[0])(rows)
    )
    block_s = _common.median_time(block_fvp, params, state.basis, fisher_args)

    result = {
        "machine": _common.machine_info(),
        "problem": {
            "model": size,
            "num_params": int(n),
            "dtype": "float32",
            "optimizer": "adam(1e-3)",
            "batch_size": batch_size,
            "every": every,
            "d": d,
            "skill_prompts": num_prompts,
            "tol": tol,
            "max_steps": max_steps,
            "rounds": rounds,
        },
        "window_s": {name: list(map(float, t)) for name, t in times.items()},
        "ratio": {name: float(np.median(r)) for name, r in per_round.items()},
        "ratio_of_medians": {
            name: float(np.median(times[name]) / window_plain) for name in per_round
        },
        "ratio_per_round": {name: list(map(float, r)) for name, r in per_round.items()},
        "ratio_of_sums": {name: float(np.sum(times[name]) / np.sum(plain)) for name in per_round},
        "target_ratio": TARGET,
        "compile_and_first_window_s": compile_s,
        "breakdown": {
            "training_step_s": step_s,
            "fisher_vp_s": fvp_s,
            "lanczos_alone_s": lanczos_s,
            "lanczos_alone_matvecs": int(alone.num_matvecs),
            "lanczos_matvecs_logged": log.num_matvecs.tolist(),
            "lanczos_converged_logged": log.converged.tolist(),
            "rotation_every_8_matvecs_logged": mon.monitor_log(
                carry["monitor_rotation_every_8"][1]
            ).num_matvecs.tolist(),
            "lanczos_overhead_per_matvec_s": float(np.median(per_step)),
            "projected_loss_and_overlap_s": cheap_s,
            "subspace_at_theta_star_s": subspace_s,
            "block_fisher_vp_s": block_s,
        },
        "floor_ratio": 1 + (block_s + cheap_s) / window_plain,
        "predicted_ratio": 1 + (lanczos_s + cheap_s) / window_plain,
        "predicted_ratio_rotation_every": {
            str(r): 1 + (lanczos_s / r + cheap_s) / window_plain for r in (2, 4, 8)
        },
        "measured": {
            "steps": log.step.tolist(),
            "projected_loss": log.projected_loss.tolist(),
            "overlap": log.overlap.tolist(),
            "angle": log.angle.tolist(),
            "mean_cos2": log.mean_cos2.tolist(),
        },
    }
    path = _common.write_result("monitor_overhead", result, quick, outdir)
    b = result["breakdown"]
    print(
        f"{size}: n = {n:,}; window of {every} steps {window_plain:.2f} s "
        f"({1e3 * step_s:.0f} ms/step); Fisher-VP {1e3 * fvp_s:.0f} ms"
    )
    print(
        f"monitor / plain = {result['ratio']['monitor']:.3f} (target ≤ {TARGET}); without "
        f"rotation {result['ratio']['monitor_no_rotation']:.3f}; Lanczos alone "
        f"{lanczos_s:.2f} s for {b['lanczos_alone_matvecs']} matvecs"
    )
    print(f"wrote {path}")
    return result


def markdown_table(r: dict) -> str:
    """The docs/benchmarks.md table of one result."""
    m, p, b = r["machine"], r["problem"], r["breakdown"]
    matvecs = b["lanczos_matvecs_logged"]
    amortised = ", ".join(f"{k}: {v:.2f}" for k, v in r["predicted_ratio_rotation_every"].items())
    rows = [
        "| quantity | value |",
        "|---|---|",
        f"| problem | `{p['model']}` transformer, {p['num_params']:,} parameters ({p['dtype']}), "
        f"{p['optimizer']}, batch {p['batch_size']}; d = {p['d']}, skill Fisher on "
        f"{p['skill_prompts']} prompts, Lanczos tol {p['tol']} |",
        f"| plain window of k = {p['every']} steps (median) | "
        f"{np.median(r['window_s']['plain']):.2f} s ({1e3 * b['training_step_s']:.0f} ms/step) |",
        f"| **monitored / plain**, median of {p['rounds']} interleaved rounds | "
        f"**{r['ratio']['monitor']:.2f}** (target ≤ {r['target_ratio']}); ratio of medians "
        f"{r['ratio_of_medians']['monitor']:.2f} |",
        f"| monitored without rotation / plain | {r['ratio']['monitor_no_rotation']:.2f} |",
        f"| monitored, rotation at every {ROTATION_EVERY}th measurement / plain, sums over "
        f"{p['rounds']} rounds | {r['ratio_of_sums']['monitor_rotation_every_8']:.2f} |",
        f"| one skill Fisher-VP / one training step | {1e3 * b['fisher_vp_s']:.0f} ms / "
        f"{1e3 * b['training_step_s']:.0f} ms |",
        f"| warm-started Lanczos alone: wall, matvecs (logged per measurement: "
        f"{min(matvecs)}–{max(matvecs)}) | {b['lanczos_alone_s']:.2f} s, "
        f"{b['lanczos_alone_matvecs']} ({b['lanczos_overhead_per_matvec_s'] * 1e3:.0f} ms "
        "per step beyond its matvec) |",
        f"| projected loss + overlap alone | {1e3 * b['projected_loss_and_overlap_s']:.1f} ms |",
        f"| predicted from the parts: every measurement / rotation every r-th | "
        f"{r['predicted_ratio']:.2f} / r = {amortised} |",
    ]
    if "floor_ratio" in r:  # results from before it was recorded lack it
        rows.append(
            f"| floor of any rotation measurement: F(θ_k) on the {p['d']} basis vectors "
            f"once, one vmapped block | {1e3 * b['block_fisher_vp_s']:.0f} ms: ratio "
            f"≥ **{r['floor_ratio']:.2f}** |"
        )
    rows.append(f"\n{m['cpu_count']}-core {m['platform'].upper()}, jax {m['jax']}, {m['date']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny transformer, k = 5")
    parser.add_argument("--rounds", type=int, default=8, help="timed windows per variant")
    parser.add_argument(
        "--readme", action="store_true", help="also rewrite the table of docs/benchmarks.md"
    )
    args = parser.parse_args()
    result = main(quick=args.quick, rounds=args.rounds)
    if args.readme and not args.quick:
        _common.replace_table("monitor-overhead-table", markdown_table(result))
