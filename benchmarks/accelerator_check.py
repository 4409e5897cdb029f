"""The accelerator runbook: experiments at ``--full``, the sweeps and the benchmarks, in stages.

Run on a GPU (or TPU) machine: ``python -m benchmarks.accelerator_check``
(every stage not done yet; ``--list``, ``STAGE ...``, ``--budget-s S``,
``--force``, ``--archive FILE.tar.gz``). Each stage runs in its own process and
is recorded in ``OUTDIR/stages.json``; this script never imports JAX. The
stages, their targets and the way to run them in chunks: docs/accelerators.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUTDIR = RESULTS / "accelerator"
FULL_EXPERIMENTS = (  # geomcollapse.cli.EXPERIMENTS (tested equal; not imported: no jax here)
    "spectrum_mlp",
    "quartic_quadratic",
    "crossover",
    "aic_phase",
    "logistic_onset",
    "gd_vs_flow",
    "transformer_finetune",  # before transformer_fisher, which ranks tasks by its harm
    "transformer_fisher",
    "transformer_onset",
    "prediction",
    "defences",
    "validation",
    "early_warning",  # re-analyses committed rows: --full is the same as --quick
    "sgd_onset",  # the quadratic row; the transformer rows are a sweep's committed rows
)
SWEEPS = ("prediction", "defences")
# Targets of the issue for one H100/H200-class GPU.
TARGET_FULL_SUITE_S = 30 * 60
TARGET_HVP_PER_GRADIENT = 2.0
TARGET_FISHER_TOP10_S = 2.0


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the runbook: a command, its expected seconds, the results it leaves."""

    name: str
    argv: tuple[str, ...]
    expected_s: float  # a guess for one H100/H200-class GPU, for --budget-s
    results: tuple[str, ...] = ()  # stems of benchmarks/results/<stem>_<platform>.json
    cwd: str = ""  # relative to OUTDIR when set (sweeps keep their caches there)


def stages(outdir: Path) -> list[Stage]:
    """The runbook, in order."""
    py = sys.executable
    me = (py, "-m", "benchmarks.accelerator_check")
    out = [
        Stage("env", (*me, "--stage-env", str(outdir)), 60),
        Stage("operators-mlp", (py, "-m", "benchmarks.curvature_speed"), 180, ("curvature_speed",)),
        Stage(
            "operators-transformer",
            (py, "-m", "benchmarks.curvature_speed", "--model", "transformer"),
            300,
            ("curvature_speed_transformer",),
        ),
        Stage("fisher-top10-small", (*me, "--stage-fisher", str(outdir)), 120),
        Stage("aic-large", (py, "-m", "benchmarks.aic_large"), 180, ("aic_large",)),
        Stage(
            "monitor-overhead",
            (py, "-m", "benchmarks.monitor_overhead"),
            300,
            ("monitor_overhead",),
        ),
        Stage(
            "sharded-scaling", (py, "-m", "benchmarks.sharded_scaling"), 240, ("sharded_scaling",)
        ),
    ]
    for name in FULL_EXPERIMENTS:
        argv = (py, "-m", f"experiments.{name}", "--full", "--outdir", str(outdir / "full"))
        out.append(
            Stage(f"full-{name}", argv, 300 if name.startswith(("transformer", "pr")) else 90)
        )
    for name in SWEEPS:
        config = outdir / "sweeps" / f"{name}_tiny.json"
        argv = (py, "-m", "geomcollapse.cli", "sweep", str(config), "--no-progress")
        out.append(Stage(f"sweep-{name}", argv, 480, cwd="sweeps"))
    out.append(Stage("report", (*me, "--stage-report", str(outdir)), 5))
    return out


# ------------------------------------------------------------------------------- records


def _load(outdir: Path) -> dict:
    path = outdir / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(outdir: Path, records: dict) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / "stages.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, outdir / "stages.json")


def _prepare(stage: Stage, outdir: Path) -> str | None:
    """Anything a stage needs before it runs; a reason to skip it, or None."""
    if (
        stage.name == "monitor-overhead"
        and not (ROOT / "benchmarks" / "monitor_overhead.py").exists()
    ):
        return "benchmarks/monitor_overhead.py does not exist in this checkout"
    if stage.name.startswith("sweep-"):
        name = stage.name.removeprefix("sweep-")
        config = json.loads((ROOT / "sweeps" / f"{name}_tiny.json").read_text())
        config["output"] = f"{name}_tiny.jsonl"  # beside the copy, under OUTDIR/sweeps
        (outdir / "sweeps").mkdir(parents=True, exist_ok=True)
        (outdir / "sweeps" / f"{name}_tiny.json").write_text(json.dumps(config, indent=1))
    return None


def run_stage(stage: Stage, outdir: Path, records: dict, timeout: float | None) -> dict:
    """Run one stage in its own process; its record (also saved)."""
    skip = _prepare(stage, outdir)
    record: dict = {"command": " ".join(stage.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if skip is not None:
        record.update(status="skipped", reason=skip, seconds=0.0)
        print(f"== {stage.name}: skipped ({skip})", flush=True)
    else:
        print(f"== {stage.name}: {record['command']}", flush=True)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env["PYTHONUNBUFFERED"] = "1"
        cwd = outdir / stage.cwd if stage.cwd else ROOT
        start, wall_start = time.perf_counter(), time.time() - 1.0
        try:
            proc = subprocess.run(
                stage.argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
            status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timeout after {timeout:.0f} s"
            output = (err.stdout or b"").decode() + (err.stderr or b"").decode()
        record.update(status=status, seconds=round(time.perf_counter() - start, 1))
        record["output_tail"] = output[-3000:]
        print(output[-1500:], flush=True)
        print(f"== {stage.name}: {status}, {record['seconds']} s", flush=True)
        if stage.name == "env" and (outdir / "env.json").exists():
            record["info"] = json.loads((outdir / "env.json").read_text())
        for stem in stage.results:  # what this stage wrote: copied beside the records
            for src in sorted(RESULTS.glob(f"{stem}_*.json")):
                if src.stat().st_mtime >= wall_start and not src.stem.endswith("_quick"):
                    shutil.copy2(src, outdir / src.name)
                    record.setdefault("results", []).append(src.name)
    records[stage.name] = record
    _save(outdir, records)
    return record


# ------------------------------------------------------------------- stages run in here


def stage_env(outdir: Path) -> None:
    """Device, driver and versions into ``OUTDIR/env.json``; the CUDA plugin if JAX lacks it."""
    smi = shutil.which("nvidia-smi")
    info: dict = {"nvidia_smi": None}
    if smi:
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        run = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = run.stdout.strip() or run.stderr.strip()
    backend = _jax_backend()
    if smi and backend == "cpu":
        version = _jax_version()
        print(f"nvidia-smi sees a GPU but JAX {version} runs on the CPU: pip install jax[cuda12]")
        pip = [sys.executable, "-m", "pip", "install", "-q", f"jax[cuda12]=={version}"]
        done = subprocess.run(pip, capture_output=True, text=True)
        info["cuda_install"] = (done.stdout + done.stderr)[-2000:] or "ok"
        backend = _jax_backend()
    code = (
        "import json, platform, jax, numpy, flax, optax, diffrax\n"
        "d = jax.devices()\n"
        "print(json.dumps({'platform': d[0].platform, 'device_kind': d[0].device_kind,\n"
        "  'devices': [str(x) for x in d], 'process_count': jax.process_count(),\n"
        "  'jax': jax.__version__, 'jaxlib': jax.lib.__version__ if hasattr(jax.lib,\n"
        "  '__version__') else None, 'numpy': numpy.__version__, 'flax': flax.__version__,\n"
        "  'optax': optax.__version__, 'diffrax': diffrax.__version__,\n"
        "  'python': platform.python_version(), 'cpu_count': __import__('os').cpu_count()}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info.update(json.loads(run.stdout.strip().splitlines()[-1]))
    info["backend"] = backend
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def _jax_backend() -> str:
    code = "import jax; print(jax.default_backend())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return run.stdout.strip().splitlines()[-1] if run.returncode == 0 else "none"


def _jax_version() -> str:
    code = "import jax; print(jax.__version__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return run.stdout.strip()


def stage_fisher(outdir: Path) -> None:
    """Top-10 true-Fisher eigenpairs of the `small` transformer at tol 1e-3: warm wall time."""
    import jax
    import numpy as np

    from benchmarks.curvature_speed import transformer_problem
    from geomcollapse import curvature, linalg

    problem = transformer_problem(jax.random.key(0), "small", 64)
    fvp = jax.jit(curvature.fisher_vp(problem.logits))

    def run(seed: int):
        pairs = linalg.top_eigenpairs(
            lambda v: fvp(problem.params, v, problem.batch),
            problem.params,
            10,
            key=jax.random.key(seed),
            tol=1e-3,
        )
        jax.block_until_ready(pairs.vectors)
        return pairs

    start = time.perf_counter()
    first = run(0)
    cold = time.perf_counter() - start
    warm, matvecs = [], []
    for seed in (1, 2, 3):
        start = time.perf_counter()
        pairs = run(seed)
        warm.append(time.perf_counter() - start)
        matvecs.append(int(pairs.num_matvecs))
    v = jax.tree_util.tree_map(lambda p: p * 0 + 1, problem.params)
    jax.block_until_ready(fvp(problem.params, v, problem.batch))
    start = time.perf_counter()
    for _ in range(10):
        out = fvp(problem.params, v, problem.batch)
    jax.block_until_ready(out)
    result = {
        "device": jax.devices()[0].device_kind,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(problem.params))),
        "tol": 1e-3,
        "cold_s": cold,
        "warm_s": float(np.median(warm)),
        "warm_runs_s": warm,
        "matvecs": matvecs,
        "fisher_vp_s": (time.perf_counter() - start) / 10,
        "converged": bool(np.all(first.converged)),
        "target_s": TARGET_FISHER_TOP10_S,
    }
    (outdir / "fisher_top10_small.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def stage_report(outdir: Path) -> dict:
    """``report.json`` and ``report.md``: device, stages, and the targets met or not."""
    records = _load(outdir)
    env = records.get("env", {}).get("info", {})
    platform = env.get("platform", "unknown")
    full = {k: v for k, v in records.items() if k.startswith("full-")}
    full_done = len(full) == len(FULL_EXPERIMENTS) and all(
        v["status"] == "ok" for v in full.values()
    )
    targets = {
        "full_suite_s": {
            "measured": sum(v.get("seconds", 0.0) for v in full.values()) if full_done else None,
            "target": TARGET_FULL_SUITE_S,
        }
    }
    ops = outdir / f"curvature_speed_transformer_{platform}.json"
    if ops.exists():
        ratio = json.loads(ops.read_text())["operators"]["ratio_to_gradient"]["hvp"]
        targets["hvp_per_gradient_small"] = {"measured": ratio, "target": TARGET_HVP_PER_GRADIENT}
    fisher = outdir / "fisher_top10_small.json"
    if fisher.exists():
        warm = json.loads(fisher.read_text())["warm_s"]
        targets["fisher_top10_small_s"] = {"measured": warm, "target": TARGET_FISHER_TOP10_S}
    for t in targets.values():
        t["met"] = None if t["measured"] is None else t["measured"] <= t["target"]
    report = {"env": env, "targets": targets, "stages": records}
    (outdir / "report.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Accelerator check: {env.get('device_kind', '?')} ({platform})",
        "",
        f"jax {env.get('jax')}, {env.get('nvidia_smi') or 'no nvidia-smi'}.",
        "",
        "| target | measured | target | met |",
        "|---|---|---|---|",
    ]
    for name, t in targets.items():
        measured = "not run" if t["measured"] is None else f"{t['measured']:.3g}"
        lines.append(f"| {name} | {measured} | ≤ {t['target']:g} | {t['met']} |")
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    for name, r in records.items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} |")
    (outdir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


# ---------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="stages to run (default: all not yet done)")
    parser.add_argument("--outdir", type=Path, default=None, help="results folder")
    parser.add_argument("--list", action="store_true", help="print the stages and their status")
    parser.add_argument("--force", action="store_true", help="rerun stages already recorded ok")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop before a stage that would not fit"
    )
    parser.add_argument("--archive", type=Path, default=None, help="pack OUTDIR into this .tar.gz")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="go on when JAX finds no accelerator (hours)"
    )
    parser.add_argument("--stage-env", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-fisher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_env:
        stage_env(args.stage_env)
        return 0
    if args.stage_fisher:
        stage_fisher(args.stage_fisher)
        return 0
    if args.stage_report:
        stage_report(args.stage_report)
        return 0
    outdir = (args.outdir or DEFAULT_OUTDIR).resolve()
    plan = stages(outdir)
    names = [s.name for s in plan]
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {names}")
    records = _load(outdir)
    if args.list:
        for s in plan:
            r = records.get(s.name, {})
            print(f"{s.name:28s} {r.get('status', 'not run'):22s} {r.get('seconds', '')}")
        return 0
    chosen = [s for s in plan if not args.stages or s.name in args.stages]
    start = time.perf_counter()
    for stage in chosen:
        done = records.get(stage.name, {}).get("status") in ("ok", "skipped")
        if done and not args.force and stage.name != "report":
            continue
        timeout = None
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - start)
            if stage.expected_s > left:
                print(
                    f"stopped before {stage.name} (expects {stage.expected_s:.0f} s, "
                    f"{left:.0f} s left): rerun the same command to go on",
                    flush=True,
                )
                break
            timeout = left
        record = run_stage(stage, outdir, records, timeout)
        backend = record.get("info", {}).get("backend")
        if stage.name == "env" and backend in ("cpu", "none") and not args.allow_cpu:
            print("JAX finds no accelerator here: stopped (--allow-cpu to run on the CPU)")
            return 2
    if args.archive is not None:
        args.archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(outdir, arcname=outdir.name)
        print(f"packed {outdir} into {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
