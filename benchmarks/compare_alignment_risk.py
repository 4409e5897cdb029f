"""Side by side with alignment-risk 1.14.1: AIC numbers, forecasts, wall time and peak memory.

Both tools on the same MLP with identical weights: the AIC numbers against a
dense truth (1,540 parameters, float64), the Δu forecasts against the ODE flow,
and wall time and peak memory at 1,068,810 parameters, each tool in its own
process. Problems, targets (``TARGETS``, fixed before the run) and results:
docs/benchmarks.md, "Side by side with alignment-risk". Writes
``benchmarks/results/compare_alignment_risk.json`` (``--quick``: ``…_quick.json``
only); without torch or alignment-risk it prints one line and exits 0.

Run: ``python -m benchmarks.compare_alignment_risk [--quick] [--readme]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
RESULT_FILE = "compare_alignment_risk"
DOC_MARKER = "compare-alignment-risk-table"

# Fixed before the run.
TARGETS = {
    "aic_max_rel_error": 1e-8,  # every AIC number of ours against the dense float64 truth
    "forecast_rel_error_smallest_t": 0.01,  # |ours/realised − 1| at the smallest t, L and L̃
    # their wall / our wall: our first call in a second process, whose programs come from
    # the persistent compilation cache the first process filled (as the CLI and diagnose run)
    "speedup_1m": 8.0,
    "memory_ratio_1m": 0.25,  # our peak RSS / theirs
}
SMALL_SIZES = (40, 30, 10)  # 1,540 parameters
SMALL_SKILL, SMALL_TASK = 128, 128
D = 10
STEP = 1e-3  # h: their forecast's step k is flow time h·k
STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
SERIES_ORDER = 6
LARGE_SIZES = (784, 1024, 256, 10)  # 1,068,810 parameters
QUICK_LARGE_SIZES = (64, 48, 10)
LARGE_EXAMPLES = 512  # first 256: skill, last 256: fine-tuning (as benchmarks.aic_large)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring


def missing_requirement() -> str | None:
    """The first of torch, alignment_risk that cannot be imported, else ``None``."""
    for name in ("torch", "alignment_risk"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


# --------------------------------------------------------------------------- 1,540 parameters


def _small_problem():
    import jax
    import jax.numpy as jnp

    from geomcollapse import models

    problem = models.mlp_problem(
        jax.random.key(0), SMALL_SIZES, num_examples=SMALL_SKILL + SMALL_TASK, dtype=jnp.float64
    )
    x, y = problem.batch
    skill_x = x[:SMALL_SKILL]
    task_x, task_y = x[SMALL_SKILL:], (y[SMALL_SKILL:] + 1) % SMALL_SIZES[-1]
    ref = models.mlp_apply(problem.params, skill_x)
    return problem.params, skill_x, ref, task_x, task_y


def _logits(params, x):
    from geomcollapse import models

    return models.mlp_apply(params, x, "tanh")


def _skill_loss(params, x, ref):
    """``u(θ) = mean KL(softmax(z*) ‖ softmax(z_θ))``: ``u(θ*) = 0``, ``∇u(θ*) = 0``, ``∇²u = F``.

    (Exact minimum at ``θ*``; docs/theory.md §5.3.)
    """
    import jax.numpy as jnp

    from geomcollapse import training

    return jnp.mean(training.kl_from_logit_change(ref, _logits(params, x) - ref))


def _task_loss(params, x, y):
    from geomcollapse import models

    return models.softmax_cross_entropy(_logits(params, x), y)


def _orthogonalized(pg, flat_star):
    """``L̃(θ) = L(θ) − ⟨pg, θ − θ*⟩`` (``pg = Pg(θ*)`` of the dense truth, raveled)."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    def loss(params, x, y):
        return _task_loss(params, x, y) - jnp.dot(pg, ravel_pytree(params)[0] - flat_star)

    return loss


def dense_truth(F: np.ndarray, H: np.ndarray, g: np.ndarray, d: int) -> dict:
    """The AIC numbers (Def. 5.1) from dense ``F``, ``H``, ``g`` by ``numpy.linalg.eigh``."""
    lam, V = np.linalg.eigh(F)
    lam, V = lam[::-1], V[:, ::-1]
    Vd = V[:, :d]
    pg, phg = Vd.T @ g, Vd.T @ (H @ g)
    g_perp = g - Vd @ pg
    fisher_orth = float(np.linalg.norm(np.sqrt(lam[:d]) * pg))
    coupling = float(np.linalg.norm(np.sqrt(lam[:d]) * phg))
    tail_q = float(g_perp @ F @ g_perp)
    return {
        "lambda_d": float(lam[d - 1]),
        "tail_mass": float(lam[d:].sum()),
        "orthogonality": float(np.linalg.norm(pg)),
        "fisher_orthogonality": fisher_orth,
        "coupling": coupling,
        "crossover_time": 2 * fisher_orth / coupling,
        "tail_crossover_time": 2 * np.sqrt(tail_q) / coupling,
        "gradient_norm": float(np.linalg.norm(g)),
        "eigengap_d": float(lam[d - 1] - lam[d]),
        "top_eigenvalues": [float(v) for v in lam[: d + 2]],
    }


AIC_FIELDS = (
    "lambda_d",
    "tail_mass",
    "orthogonality",
    "fisher_orthogonality",
    "coupling",
    "crossover_time",
    "tail_crossover_time",
)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _projected_realised(displacement, basis: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``½‖F^{1/2}Px(t)‖²`` of the flow's displacements, ``P`` from the dense truth."""
    import jax
    from jax.flatten_util import ravel_pytree

    xs = np.asarray(jax.vmap(lambda x: ravel_pytree(x)[0])(displacement), np.float64)
    coords = xs @ basis
    return 0.5 * np.sum(lam * coords**2, axis=1)


def small_comparison(quick: bool = False) -> dict:
    """AIC numbers and forecasts on the 1,540-parameter MLP, float64 (parts 1 and 2)."""
    import jax
    import jax.numpy as jnp
    import torch
    from jax.flatten_util import ravel_pytree

    from benchmarks import _alignment_risk_side as ars
    from geomcollapse import aic, curvature, flow, series

    params, skill_x, ref, task_x, task_y = _small_problem()
    flat, unravel = ravel_pytree(params)
    n = int(flat.size)

    # Dense float64 truth.
    J = jax.jacobian(lambda f: _logits(unravel(f), skill_x))(flat)  # (N, C, n)
    p = jax.nn.softmax(ref, axis=-1)
    lam_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    F = np.asarray(jnp.einsum("icn,icd,idm->nm", J, lam_out, J) / SMALL_SKILL)
    Hu = np.asarray(jax.hessian(lambda f: _skill_loss(unravel(f), skill_x, ref))(flat))
    H = np.asarray(jax.hessian(lambda f: _task_loss(unravel(f), task_x, task_y))(flat))
    g = np.asarray(jax.grad(lambda f: _task_loss(unravel(f), task_x, task_y))(flat))
    truth = dense_truth(F, H, g, D)
    lam_all, V_all = np.linalg.eigh(F)
    basis, lam_top = V_all[:, ::-1][:, :D], lam_all[::-1][:D]
    pg = basis @ (basis.T @ g)
    orth_loss = _orthogonalized(jnp.asarray(pg), flat)
    truth_orth = dense_truth(F, H, g - pg, D)
    checks = {
        "hessian_of_u_vs_F_max_rel": float(np.max(np.abs(Hu - F)) / np.max(np.abs(F))),
        "grad_u_at_theta_star_norm": float(
            np.linalg.norm(jax.grad(lambda f: _skill_loss(unravel(f), skill_x, ref))(flat))
        ),
    }

    # Ours: measure_aic with the true Fisher matvec, defaults.
    fvp = curvature.fisher_vp(_logits)
    ours = {}
    for name, loss, tr in (("L", _task_loss, truth), ("L_orth", orth_loss, truth_orth)):
        start = time.perf_counter()
        m = aic.measure_aic(
            fvp,
            loss,
            params,
            D,
            key=jax.random.key(1),
            fisher_args=(skill_x,),
            loss_args=(task_x, task_y),
        )
        wall = time.perf_counter() - start
        r = m.report._asdict()
        ours[name] = {
            **{f: r[f] for f in AIC_FIELDS},
            "wall_s": wall,
            "converged": bool(m.report.converged),
            "num_matvecs": int(m.num_matvecs),
            "rel_error": {
                f: _rel(r[f], tr[f]) for f in AIC_FIELDS if f != "orthogonality" or name == "L"
            },
        }
    ours["L_orth"]["orthogonality_over_gradient_norm"] = (
        ours["L_orth"]["orthogonality"] / truth_orth["gradient_norm"]
    )
    # Pg̃ = 0 in exact arithmetic: compared through ‖Pg̃‖/‖g̃‖ above, not relatively
    for f in ("fisher_orthogonality", "crossover_time"):
        ours["L_orth"]["rel_error"].pop(f)

    # Theirs, same weights in torch.
    layers = [(np.asarray(layer["w"]), np.asarray(layer["b"])) for layer in params]
    model = ars.torch_mlp(layers, torch.float64)
    t_skill = (torch.as_tensor(np.asarray(skill_x)), torch.as_tensor(np.asarray(ref)))
    t_task = (torch.as_tensor(np.asarray(task_x)), torch.as_tensor(np.asarray(task_y)))
    logit_diff = float(np.max(np.abs(model(t_skill[0]).detach().numpy() - np.asarray(ref))))
    rows = ars.fisher_rows(np.asarray(skill_x), np.asarray(ref), torch.float64)
    pg_layers = [(np.asarray(layer["w"]), np.asarray(layer["b"])) for layer in unravel(pg)]
    t_orth = ars.orthogonalized_cross_entropy(pg_layers, model)
    max_steps = STEPS[-1]
    common = {"learning_rate": STEP, "max_steps": max_steps}
    theirs = {
        "default_at_minimum": ars.run_pipeline(
            model, [t_skill], ars.kl_skill_loss, t_task, ars.cross_entropy, d=None, **common
        ),
        "true_fisher_L": ars.run_pipeline(
            model,
            [rows],
            ars.fisher_rows_loss,
            t_task,
            ars.cross_entropy,
            d=D,
            max_samples=len(rows[0]),
            **common,
        ),
        "true_fisher_L_orth": ars.run_pipeline(
            model,
            [rows],
            ars.fisher_rows_loss,
            t_task,
            t_orth,
            d=D,
            max_samples=len(rows[0]),
            **common,
        ),
    }
    for key, tr in (("true_fisher_L", truth), ("true_fisher_L_orth", truth_orth)):
        r = theirs[key]
        their_numbers = {
            "lambda_d": r["lambda_d"],
            "orthogonality": r["orthogonality"],
            "fisher_orthogonality": r["epsilon_hat"],
            "coupling": r["gamma_hat"],
            "crossover_time": 2 * r["epsilon_hat"] / r["gamma_hat"],
        }
        r["rel_error"] = {
            f: _rel(v, tr[f])
            for f, v in their_numbers.items()
            if key == "true_fisher_L" or f in ("lambda_d", "coupling")
        }

    # Forecasts against the realised Δu of the float64 flow.
    ts = np.asarray([STEP * k for k in STEPS])
    forecasts = {}
    for name, loss, their_key in (
        ("L", _task_loss, "true_fisher_L"),
        ("L_orth", orth_loss, "true_fisher_L_orth"),
    ):
        start = time.perf_counter()
        fl = flow.ode_flow(loss, params, ts, args=(task_x, task_y))
        change = flow.skill_change(_skill_loss, params, fl.displacement, args=(skill_x, ref))
        flow_wall = time.perf_counter() - start
        realised = np.asarray(change.delta_u, np.float64)
        projected = _projected_realised(fl.displacement, basis, lam_top)
        start = time.perf_counter()
        s = series.delta_u_series(
            _skill_loss,
            loss,
            params,
            SERIES_ORDER,
            skill_args=(skill_x, ref),
            task_args=(task_x, task_y),
        )
        ours_f = np.asarray(s.evaluate(ts).delta_u, np.float64)
        series_wall = time.perf_counter() - start
        theirs_f = np.asarray(theirs[their_key]["estimated_loss"])[list(STEPS)]
        default_f = np.asarray(theirs["default_at_minimum"]["estimated_loss"])[list(STEPS)]
        forecasts[name] = {
            "t": ts.tolist(),
            "realised": realised.tolist(),
            "realised_rel_error_estimate": float(np.max(np.asarray(change.error) / realised)),
            "realised_projected": projected.tolist(),
            "ours": ours_f.tolist(),
            "ours_over_realised": (ours_f / realised).tolist(),
            "ours_validity_time": s.validity_time,
            "theirs": theirs_f.tolist(),
            "theirs_over_realised": (theirs_f / realised).tolist(),
            "theirs_over_realised_projected": (theirs_f / projected).tolist(),
            "theirs_default": default_f.tolist(),
            "flow_wall_s": flow_wall,
            "series_wall_s": series_wall,
        }
    for r in theirs.values():
        r.pop("estimated_loss")
    return {
        "problem": {
            "sizes": list(SMALL_SIZES),
            "num_params": n,
            "dtype": "float64",
            "skill_inputs": SMALL_SKILL,
            "task_inputs": SMALL_TASK,
            "d": D,
            "series_order": SERIES_ORDER,
            "step": STEP,
        },
        "identical_weights_max_abs_logit_diff": logit_diff,
        "checks": checks,
        "truth": {"L": truth, "L_orth": truth_orth},
        "ours": ours,
        "theirs": theirs,
        "forecasts": forecasts,
    }


# --------------------------------------------------------------------------- 1M parameters


def _save_large_problem(path: Path, sizes) -> int:
    """The ``benchmarks.aic_large`` problem (float32) as ``.npz`` for both child processes."""
    import jax

    from geomcollapse import models

    with jax.enable_x64(False):
        problem = models.mlp_problem(jax.random.key(0), sizes, num_examples=LARGE_EXAMPLES)
        half = LARGE_EXAMPLES // 2
        x, y = np.asarray(problem.batch.x), np.asarray(problem.batch.y, np.int64)
        arrays = {}
        for i, layer in enumerate(problem.params):
            arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(layer["w"]), np.asarray(layer["b"])
        ref = np.asarray(_logits(problem.params, problem.batch.x[:half]))
    np.savez(
        path,
        **arrays,
        skill_x=x[:half],
        skill_y=y[:half],
        task_x=x[half:],
        task_y=y[half:],
        skill_logits=ref,
    )
    return sum(a.size for a in arrays.values())


def ours_child(path: str, d: int, cache: str | None = None) -> dict:
    """``measure_aic`` on the weights and data of ``path``; this process's wall and peak memory.

    ``cache``: a directory for JAX's persistent compilation cache, turned on as the CLI
    and ``diagnose`` turn it on (:func:`geomcollapse.compilation_cache.enable`), so that a
    second process with the same ``cache`` loads its programs instead of compiling them.
    """
    import jax

    from benchmarks import _common
    from benchmarks._alignment_risk_side import peak_rss_bytes
    from geomcollapse import aic, compilation_cache, curvature, models

    if cache is not None:
        os.environ[compilation_cache.ENV] = cache
        compilation_cache.enable()

    data = np.load(path)
    count = sum(1 for k in data.files if k.startswith("w"))
    params = [
        {"w": jax.numpy.asarray(data[f"w{i}"]), "b": jax.numpy.asarray(data[f"b{i}"])}
        for i in range(count)
    ]
    skill_x = jax.numpy.asarray(data["skill_x"])
    task_x, task_y = jax.numpy.asarray(data["task_x"]), jax.numpy.asarray(data["task_y"], "int32")
    jax.block_until_ready((params, skill_x, task_x, task_y))
    rss_before = peak_rss_bytes()

    def task_loss(p, x, y):
        return models.softmax_cross_entropy(_logits(p, x), y)

    fvp = curvature.fisher_vp(_logits)
    compiles: list[float] = []  # XLA backend compile durations, as jax reports them
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compiles.append(secs) if event == BACKEND_COMPILE_EVENT else None
    )
    walls, cpus, reports, compile_s = [], [], [], []
    for _ in range(2):  # the first call compiles
        compiles.clear()
        start, cpu = time.perf_counter(), time.process_time()
        m = aic.measure_aic(
            fvp,
            task_loss,
            params,
            d,
            key=jax.random.key(1),
            fisher_args=(skill_x,),
            loss_args=(task_x, task_y),
        )
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        compile_s.append(sum(compiles))
        reports.append(m)
    m = reports[-1]
    # one Fisher-VP alone (compiled, warm): what the call's matvecs cost without the rest
    fvp_s = _common.median_time(jax.jit(fvp), params, params, skill_x, repeats=7)
    logit_diff = float(np.max(np.abs(np.asarray(_logits(params, skill_x)) - data["skill_logits"])))
    return {
        "wall_s": walls[0],
        "wall_warm_s": walls[1],
        "cpu_s": cpus[0],
        "cpu_warm_s": cpus[1],
        "compile_s": compile_s[0],
        "compile_warm_s": compile_s[1],
        "fisher_vp_s": fvp_s,
        "num_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
        "d": d,
        "num_matvecs": int(m.num_matvecs),
        "converged": bool(m.report.converged),
        "lambda_d": m.report.lambda_d,
        "coupling": m.report.coupling,
        "fisher_orthogonality": m.report.fisher_orthogonality,
        "tail_mass": m.report.tail_mass,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_before,
        "logits_max_abs_diff": logit_diff,
        "jax": jax.__version__,
    }


def _run_child(args: list[str]) -> dict:
    """Run ``python -m …`` in a fresh process: its JSON line, plus its wall seen from here.

    Peak memory is the child's own ``VmHWM`` (reset at ``exec``): ``ru_maxrss`` of
    ``wait4`` would count the pages the child shared with this process at ``fork``.
    """
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=Path(__file__).parent.parent,
        )
        out, _ = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{tail}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result.update(process_wall_s=wall, load_average_before=load)
    return result


def large_comparison(quick: bool = False) -> dict:
    """Wall time and peak memory of both tools, each in its own process (part 3)."""
    sizes = QUICK_LARGE_SIZES if quick else LARGE_SIZES
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "problem.npz"
        n = _save_large_problem(path, sizes)
        print(f"  {n:,} parameters: geomcollapse in its own process …", flush=True)
        ours = _run_child(["benchmarks.compare_alignment_risk", "--child-ours", str(path)])
        print(f"  … {ours['wall_s']:.1f} s; twice more with a compilation cache …", flush=True)
        child = ["benchmarks.compare_alignment_risk", "--child-ours", str(path)]
        cache = ["--cache", str(Path(tmp) / "xla")]
        filled = _run_child([*child, *cache])  # fills the cache: a user's first process
        second = _run_child([*child, *cache])  # a user's second process: loads the programs
        print(f"  … {filled['wall_s']:.1f} s, then {second['wall_s']:.1f} s", flush=True)
        print("  alignment-risk in its own process …", flush=True)
        theirs = _run_child(["benchmarks._alignment_risk_side", str(path), str(D)])
        print(f"  … {theirs['wall_s']:.1f} s", flush=True)
    return {
        "problem": {"sizes": list(sizes), "num_params": n, "dtype": "float32", "d": D},
        "ours": ours,
        "ours_cache_filled": filled,
        "ours_second_process": second,
        "theirs": theirs,
        "speedup": theirs["wall_s"] / ours["wall_s"],
        "speedup_second_process": theirs["wall_s"] / second["wall_s"],
        "speedup_warm": theirs["wall_s"] / ours["wall_warm_s"],
        "cpu_ratio": theirs["cpu_s"] / ours["cpu_s"],
        "memory_ratio": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
    }


# --------------------------------------------------------------------------- result


def evaluate_targets(small: dict, large: dict) -> dict:
    """Pass/fail of each target in ``TARGETS``, with the measured value."""
    aic_err = max(max(o["rel_error"].values()) for o in small["ours"].values())
    forecast_err = max(abs(f["ours_over_realised"][0] - 1) for f in small["forecasts"].values())
    return {
        "aic_max_rel_error": {
            "value": aic_err,
            "target": TARGETS["aic_max_rel_error"],
            "pass": bool(aic_err <= TARGETS["aic_max_rel_error"]),
        },
        "forecast_rel_error_smallest_t": {
            "value": forecast_err,
            "target": TARGETS["forecast_rel_error_smallest_t"],
            "pass": bool(forecast_err <= TARGETS["forecast_rel_error_smallest_t"]),
        },
        "speedup_1m": {  # the first call of a second process: what the cache is for
            "value": large["speedup_second_process"],
            "target": TARGETS["speedup_1m"],
            "pass": bool(large["speedup_second_process"] >= TARGETS["speedup_1m"]),
        },
        "memory_ratio_1m": {
            "value": large["memory_ratio"],
            "target": TARGETS["memory_ratio_1m"],
            "pass": bool(large["memory_ratio"] <= TARGETS["memory_ratio_1m"]),
        },
    }


def main(quick: bool = False, outdir: Path = RESULTS) -> dict | None:
    """Run all three parts; write and return the result (``None`` when skipped)."""
    missing = missing_requirement()
    if missing is not None:
        print(
            f"compare_alignment_risk: skipped: {missing} is not installed "
            "(`make compare` installs torch and alignment-risk)"
        )
        return None
    import alignment_risk
    import jax
    import torch

    from benchmarks import _common

    print("1,540 parameters, float64: AIC numbers and forecasts …", flush=True)
    with jax.enable_x64(True):
        small = small_comparison(quick)
    print("wall time and peak memory, each tool in its own process …", flush=True)
    large = large_comparison(quick)
    machine = _common.machine_info()
    machine.update(torch=torch.__version__, alignment_risk=alignment_risk.__version__)
    machine["torch_threads"] = large["theirs"].get("torch_threads")
    result = {
        "machine": machine,
        "targets": TARGETS,
        "small": small,
        "large": large,
        "results": evaluate_targets(small, large),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{RESULT_FILE}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    for name, r in result["results"].items():
        print(f"{name}: {r['value']:.3g} (target {r['target']}): {'pass' if r['pass'] else 'FAIL'}")
    print(f"wrote {path}")
    return result


# --------------------------------------------------------------------------- docs table


def _second_process_rows(large: dict) -> list[str]:
    """The first call of a process whose programs a first process cached (none in old results)."""
    if "ours_second_process" not in large:
        return []
    second, filled, lt = large["ours_second_process"], large["ours_cache_filled"], large["theirs"]
    return [
        f"| first call of a second process, programs from the persistent compilation cache "
        f"(s) | {second['wall_s']:.1f} (XLA compilation {second['compile_s']:.1f} s; the "
        f"process that filled the cache: {filled['wall_s']:.1f}) | {lt['wall_s']:.1f} "
        f"| {large['speedup_second_process']:.1f}× faster |"
    ]


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def _ratio(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def markdown_table(r: dict) -> str:
    """The docs/benchmarks.md tables of one result."""
    s, large = r["small"], r["large"]
    tr, ours, th = s["truth"]["L"], s["ours"]["L"], s["theirs"]["true_fisher_L"]
    default = s["theirs"]["default_at_minimum"]
    theirs_vals = {
        "lambda_d": th["lambda_d"],
        "orthogonality": th["orthogonality"],
        "fisher_orthogonality": th["epsilon_hat"],
        "coupling": th["gamma_hat"],
        "crossover_time": 2 * th["epsilon_hat"] / th["gamma_hat"],
    }
    default_vals = {
        "lambda_d": default["lambda_d"],
        "orthogonality": default["orthogonality"],
        "fisher_orthogonality": default["epsilon_hat"],
        "coupling": default["gamma_hat"],
    }
    labels = {
        "lambda_d": "λ_d",
        "tail_mass": "tail mass Σ_{j>d} λ_j",
        "orthogonality": "‖Pg‖",
        "fisher_orthogonality": "‖F^{1/2}Pg‖ (their ε̂)",
        "coupling": "γ = ‖F^{1/2}PHg‖ (their γ̂)",
        "crossover_time": "t_c = 2‖F^{1/2}Pg‖/γ",
        "tail_crossover_time": "tail crossover 2(gᵀ(I−P)F(I−P)g)^{1/2}/γ",
    }
    p = s["problem"]
    rows = [
        f"MLP {'-'.join(map(str, p['sizes']))} ({p['num_params']:,} parameters, float64), "
        f"d = {p['d']}; same weights in both (largest logit difference "
        f"{s['identical_weights_max_abs_logit_diff']:.1e}).",
        "",
        "| AIC number, loss L | dense truth | geomcollapse (rel. error) | "
        "alignment-risk, fed the true Fisher (rel. error) | alignment-risk at its defaults |",
        "|---|---|---|---|---|",
    ]
    for f in AIC_FIELDS:
        theirs_cell = (
            f"{theirs_vals[f]:.10g} ({th['rel_error'][f]:.1e})" if f in theirs_vals else "—"
        )
        default_cell = f"{default_vals[f]:.2g}" if f in default_vals else "—"
        rows.append(
            f"| {labels[f]} | {tr[f]:.10g} | {ours[f]:.10g} ({ours['rel_error'][f]:.1e}) "
            f"| {theirs_cell} | {default_cell} |"
        )
    rows.append(
        f"| wall (s) | | {ours['wall_s']:.1f} | {th['wall_s']:.1f} | {default['wall_s']:.1f} |"
    )
    to, oo = s["truth"]["L_orth"], s["ours"]["L_orth"]
    tho = s["theirs"]["true_fisher_L_orth"]
    rows.append(
        f"\nOn the orthogonalised L̃ (Pg̃ = 0 exactly): γ̃ = {to['coupling']:.10g}, "
        f"geomcollapse {oo['coupling']:.10g} ({oo['rel_error']['coupling']:.1e}), "
        f"alignment-risk fed the true Fisher {tho['gamma_hat']:.10g} "
        f"({tho['rel_error']['coupling']:.1e}); tail crossover {to['tail_crossover_time']:.4g} "
        f"(geomcollapse {oo['rel_error']['tail_crossover_time']:.1e}); ‖Pg̃‖/‖g̃‖ "
        f"geomcollapse {oo['orthogonality_over_gradient_norm']:.1e}."
    )
    rows.append(
        f"\nAt its defaults alignment-risk keeps d = {default['d']} eigenvalues of the empirical "
        f"Fisher, all ≤ {max(default['eigenvalues']):.0e}, and reports: “{default['warning']}”"
    )
    fl, fo = s["forecasts"]["L"], s["forecasts"]["L_orth"]
    rows += [
        "",
        "| t | Δu realised, L | geomcollapse / realised | alignment-risk / realised "
        "| Δu realised, L̃ | geomcollapse / realised | alignment-risk / realised "
        "| alignment-risk / realised ½‖F^{1/2}Px‖² |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def beyond(f, i):  # past the series' own validity time
        return " †" if f["t"][i] > f["ours_validity_time"] else ""

    for i, t in enumerate(fl["t"]):
        rows.append(
            f"| {t:g} | {fl['realised'][i]:.3e} | {fl['ours_over_realised'][i]:.6f}{beyond(fl, i)} "
            f"| {_ratio(fl['theirs_over_realised'][i])} | {fo['realised'][i]:.3e} "
            f"| {fo['ours_over_realised'][i]:.6f}{beyond(fo, i)} "
            f"| {_ratio(fo['theirs_over_realised'][i])} "
            f"| {_ratio(fo['theirs_over_realised_projected'][i])} |"
        )
    rows.append(
        f"\n† past the series' own validity time (order {p['series_order']}, last term 10 % of "
        f"the sum): {fl['ours_validity_time']:.2f} for L, {fo['ours_validity_time']:.2f} for L̃. "
        f"alignment-risk's step k is t = {p['step']:g}·k; at its defaults (empirical Fisher) "
        f"its forecast is ≤ {max(fl['theirs_default']):.0e} at every t."
    )
    lo, lt = large["ours"], large["theirs"]
    lp = large["problem"]
    rows += [
        "",
        f"| {lp['num_params']:,} parameters (MLP {'-'.join(map(str, lp['sizes']))}, "
        f"{lp['dtype']}), d = {lp['d']} | geomcollapse | alignment-risk | ratio |",
        "|---|---|---|---|",
        f"| wall of the call (s) | {lo['wall_s']:.1f} (first call) / {lo['wall_warm_s']:.1f} "
        f"(warm) | {lt['wall_s']:.1f} | {large['speedup']:.1f}× / "
        f"{large['speedup_warm']:.1f}× faster |",
        *_second_process_rows(large),
        f"| CPU time of the call, all threads (s) | {lo['cpu_s']:.1f} / {lo['cpu_warm_s']:.1f} "
        f"| {lt['cpu_s']:.1f} | {large['cpu_ratio']:.1f}× less |",
        f"| load average before (2 cores, shared) | {lo['load_average_before']:.1f} "
        f"| {lt['load_average_before']:.1f} | |",
        f"| peak RSS of its process | {_mb(lo['peak_rss_bytes'])} | {_mb(lt['peak_rss_bytes'])} "
        f"| {large['memory_ratio']:.2f} |",
        f"| RSS before the call | {_mb(lo['rss_before_bytes'])} "
        f"| {_mb(lt['rss_before_bytes'])} | |",
        f"| Fisher | true, 256 inputs, {lo['num_matvecs']} matvecs | empirical, 128 samples | |",
    ]
    if "compile_s" in lo:  # results from before these were recorded lack them
        budget = lt["wall_s"] / TARGETS["speedup_1m"]
        matvecs = lo["num_matvecs"] * lo["fisher_vp_s"]
        rows += [
            f"| of our first call: XLA compilation | {lo['compile_s']:.1f} s "
            f"(warm call: {lo['compile_warm_s']:.1f} s) | | |",
            f"| of our warm call: its {lo['num_matvecs']} Fisher-VPs at "
            f"{1e3 * lo['fisher_vp_s']:.1f} ms each / the rest | {matvecs:.1f} s / "
            f"{lo['wall_warm_s'] - matvecs:.1f} s | | |",
            f"| the ≥ {TARGETS['speedup_1m']:g}× target allows our first call | "
            f"{budget:.1f} s | | |",
        ]
    rows += ["", "| target | measured | pass |", "|---|---|---|"]
    names = {
        "aic_max_rel_error": "every AIC number of geomcollapse ≤ {t:g} relative to the truth",
        "forecast_rel_error_smallest_t": "geomcollapse forecast within {t:.0%} of realised "
        "at the smallest t (L and L̃)",
        "speedup_1m": "≥ {t:g}× faster at 1M parameters (first call of a second process)",
        "memory_ratio_1m": "≤ {t:g} of the peak memory at 1M parameters",
    }
    for key, res in r["results"].items():
        rows.append(
            f"| {names[key].format(t=res['target'])} | {res['value']:.3g} "
            f"| {'yes' if res['pass'] else 'no'} |"
        )
    m = r["machine"]
    rows.append(
        f"\n{m['cpu_count']}-core {m['platform'].upper()}, jax {m['jax']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), alignment-risk {m['alignment_risk']}, {m['date']}."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a 3,600-parameter model in part 3 (a minute)"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="only rewrite the table of docs/benchmarks.md from the saved result",
    )
    parser.add_argument("--child-ours", metavar="NPZ", help=argparse.SUPPRESS)
    parser.add_argument("--cache", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ours:
        print(json.dumps(ours_child(args.child_ours, D, args.cache)))
    elif args.readme:
        from benchmarks import _common

        saved = json.loads((RESULTS / f"{RESULT_FILE}.json").read_text())
        _common.replace_table(DOC_MARKER, markdown_table(saved))
    else:
        result = main(quick=args.quick)
        if result is not None and not args.quick:
            from benchmarks import _common

            _common.replace_table(DOC_MARKER, markdown_table(result))
