"""Matvec overhead of the operator type: ours, an ``equinox.Module``, lineax, the raw function.

Problem: MLP 784-128-10, tanh (101,770 parameters, float32), 512 Gaussian-mixture
examples (``geomcollapse.models.mlp_problem``), on the CPU. Operators compared, each
applied through one ``jax.jit`` whose arguments are the operator and ``v``
(``apply``: the library's own):

* ``raw``: the factory's function jitted directly, ``jit(fvp)(params, v, batch)``;
* ``ours``: ``fvp.bind(params, batch)`` (a frozen dataclass registered with
  ``jax.tree_util.register_dataclass``) applied by a ``jax.jit`` of ``op(v)``: the type alone;
* ``apply``: the same operator through ``curvature.apply`` itself, the public call (its
  jitted body plus the host-side check that commits an uncommitted ``v``);
* ``eqx_module``: the same four fields as an ``equinox.Module``, ``jit``-applied;
* ``lineax``: ``lineax.FunctionLinearOperator(lambda v: fvp(params, v, batch),
  structure, symmetric_tag)`` (its default ``closure_convert=True``), applied by
  ``equinox.filter_jit`` (plain ``jax.jit`` rejects it: the closure-converted
  function holds a jaxpr as a non-array leaf);
* ``lineax_partial``: the same with ``closure_convert=False`` and the parameters
  and data packed in a ``jax.tree_util.Partial`` (so they are leaves, not constants).

Two regimes, for the HVP, the Fisher-VP and an identity operator (no arithmetic:
its time is the dispatch overhead alone, which the matvecs' run-to-run noise on
a shared machine would hide): ``fixed`` (the operator built once,
applied repeatedly: the Lanczos loop) and ``rebuilt`` (a new operator at new
parameters of the same shapes every call: a measurement per checkpoint, a
monitor step), where the traces of the applying jit during the timing are counted.
Timings are per call, the median over interleaved rounds (each round times every
variant once, so machine load hits all alike), and ratios to ``raw`` in the same run.

Run: ``.venv/bin/python -m benchmarks.operator_overhead [--quick]``; writes
``benchmarks/results/operator_overhead.json``. ``--readme`` rewrites the table in
``docs/benchmarks.md`` from that file without rerunning anything.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from benchmarks._common import machine_info, replace_table
from geomcollapse import curvature as cv
from geomcollapse import models

RESULTS = Path(__file__).parent / "results"


class _ModuleOperator(eqx.Module):
    """``curvature.LinearOperator``'s fields as an ``equinox.Module`` (the other candidate)."""

    fn: Callable = eqx.field(static=True)
    params: Any
    args: tuple
    space: Any = eqx.field(static=True)

    def __call__(self, v):
        return self.fn(self.params, v, *self.args)


def _variants(fvp, params, batch, traces: dict):
    """``{name: (make(params) -> operator, apply(operator, v) -> Av)}`` for one factory."""
    structure = jax.eval_shape(lambda: params)

    def packed(p, b, v):
        return fvp(p, v, b)

    def counted(name, fn):
        def wrapped(*a):
            traces[name] = traces.get(name, 0) + 1  # runs only while jit traces
            return fn(*a)

        return wrapped

    raw = jax.jit(counted("raw", fvp.fn))
    ours = jax.jit(counted("ours", lambda op, v: op(v)))  # the type alone, as curvature.apply
    module = jax.jit(counted("eqx_module", lambda op, v: op(v)))
    mv = eqx.filter_jit(counted("lineax", lambda op, v: op.mv(v)))
    mv_partial = eqx.filter_jit(counted("lineax_partial", lambda op, v: op.mv(v)))
    return {
        "raw": (lambda p: p, lambda p, v: raw(p, v, batch)),
        "ours": (lambda p: fvp.bind(p, batch), ours),
        # the public entry itself: its jitted body plus the check that commits an
        # uncommitted v (traces counted by _count_apply_traces)
        "apply": (lambda p: fvp.bind(p, batch), cv.apply),
        "eqx_module": (lambda p: _ModuleOperator(fvp, p, (batch,), cv.space_of(p)), module),
        "lineax": (
            lambda p: lx.FunctionLinearOperator(
                lambda v: fvp(p, v, batch), structure, lx.symmetric_tag
            ),
            mv,
        ),
        "lineax_partial": (
            lambda p: lx.FunctionLinearOperator(
                jax.tree_util.Partial(packed, p, batch),
                structure,
                lx.symmetric_tag,
                closure_convert=False,
            ),
            mv_partial,
        ),
    }


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def _build_us(make, params, calls: int = 20) -> float:
    """Median µs to build one operator at ``params`` (5 rounds of ``calls``)."""
    make(params)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            make(params)
        rounds.append((time.perf_counter() - start) / calls)
    return 1e6 * float(np.median(rounds))


def _count_apply_traces(traces: dict) -> None:
    """Count ``curvature.apply``'s traces in ``traces["apply"]`` (JAX's trace event names
    the traced function; the library's compiled body is ``_apply``)."""
    traces["apply"] = 0

    def listen(event: str, seconds: float, **kw) -> None:
        traced = event == "/jax/core/compile/jaxpr_trace_duration"
        if traced and kw.get("fun_name") in ("_apply", "jit(_apply)"):
            traces["apply"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)


def _uncommitted_apply_us(fvp, params, batch, fresh) -> float:
    """Median µs of ``curvature.apply`` on a ``v`` not committed to a device (drawn at
    random, built from numpy): each call commits it first (5 rounds of 20 calls)."""
    op = fvp.bind(params, batch)
    jax.block_until_ready(cv.apply(op, fresh))
    return 1e6 * float(np.median([_time(lambda: cv.apply(op, fresh), 20) for _ in range(5)]))


def measure(fvp, params, batch, v, rounds: int, calls: int) -> dict:
    """Per-call medians (s), ratios to ``raw`` and trace counts, fixed and rebuilt regimes."""
    traces: dict = {}
    _count_apply_traces(traces)
    variants = _variants(fvp, params, batch, traces)
    build_us = {name: _build_us(make, params) for name, (make, _) in variants.items()}
    points = [jax.tree_util.tree_map(lambda x, s=s: x * (1 + 1e-3 * s), params) for s in range(4)]
    fixed = {k: make(params) for k, (make, _) in variants.items()}
    out: dict = {"build_us": build_us}
    for regime in ("fixed", "rebuilt"):
        runs = {}
        for name, (make, app) in variants.items():
            if regime == "fixed":
                op = fixed[name]
                runs[name] = lambda app=app, op=op: app(op, v)
            else:
                it = iter(range(10**9))
                runs[name] = lambda app=app, make=make, it=it: app(make(points[next(it) % 4]), v)
            jax.block_until_ready(runs[name]())  # compile outside the timing
        before = dict(traces)
        samples = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                samples[name].append(_time(run, calls))
        med = {name: float(np.median(s)) for name, s in samples.items()}
        out[regime] = {
            "seconds": med,
            "ratio_to_raw": {name: med[name] / med["raw"] for name in med},
            "traces_during_timing": {name: traces[name] - before[name] for name in runs},
        }
    return out


NAMES = {
    "ours": "ours (registered dataclass)",
    "apply": "`curvature.apply` (ours, the public call)",
    "eqx_module": "`equinox.Module`",
    "lineax": "lineax `FunctionLinearOperator`",
    "lineax_partial": "lineax, `closure_convert=False` + `Partial`",
}


def _range(values) -> str:
    lo, hi = min(values), max(values)
    fmt = (lambda x: f"{x / 1e3:.1f} ms") if hi >= 1e3 else (lambda x: f"{x:.0f} µs")
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


def _ratio(regime: dict, name: str) -> str:
    x = regime["ratio_to_raw"][name]
    return f"**{x:.0f}**" if x >= 10 else f"{x:.2f}"


def markdown_table(result: dict) -> str:
    """The docs/benchmarks.md table of a saved result."""
    products = ("hvp", "fisher_vp", "identity")
    head = "| per call | raw `jit(fvp)` | " + " | ".join(NAMES.values()) + " |"
    rows = [head, "|" + "---|" * (len(NAMES) + 2)]
    builds = [_range([result[f]["build_us"][k] for f in products]) for k in NAMES]
    rows.append("| build one operator | — | " + " | ".join(builds) + " |")
    for f, label in (("hvp", "HVP"), ("fisher_vp", "Fisher-VP")):
        fixed, rebuilt = result[f]["fixed"], result[f]["rebuilt"]
        raw = f"{1e3 * fixed['seconds']['raw']:.2f} / {1e3 * rebuilt['seconds']['raw']:.2f} ms"
        cells = [f"{_ratio(fixed, k)} / {_ratio(rebuilt, k)}" for k in NAMES]
        rows.append(f"| {label}, fixed / rebuilt (× raw) | {raw} | " + " | ".join(cells) + " |")
    ident = result["identity"]["fixed"]["seconds"]
    cells = [f"{1e6 * ident[k]:.0f} µs" for k in ("raw", *NAMES)]
    rows.append("| identity, fixed (dispatch alone) | " + " | ".join(cells) + " |")
    if "apply_uncommitted_us" in result["identity"]:  # absent from results before it was kept
        us = result["identity"]["apply_uncommitted_us"]
        cells = ["—", "—", f"{us:.0f} µs"] + ["—"] * (len(NAMES) - 2)
        label = "| identity, `v` uncommitted (committed each call) | "
        rows.append(label + " | ".join(cells) + " |")
    traces = [
        max(result[f]["rebuilt"]["traces_during_timing"][k] for f in products)
        for k in ("raw", *NAMES)
    ]
    calls = result["rounds"] * result["calls_per_round"]
    rows.append(
        f"| traces while timing rebuilt ({calls} calls) | "
        + " | ".join(str(t) for t in traces)
        + " |"
    )
    m = result["machine"]
    rows.append("")
    rows.append(
        f"{m['platform'].upper()}, {m['cpu_count']} cores, jax {m['jax']}, {m['date']}; "
        f"{result['problem']['model']}, n = {result['problem']['n']:,}, "
        f"{result['problem']['examples']} examples, float32."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--readme", action="store_true", help="rewrite the docs table only")
    cli = parser.parse_args()
    if cli.readme:
        saved = json.loads((RESULTS / "operator_overhead.json").read_text())
        replace_table("operator-overhead-table", markdown_table(saved))
        return
    rounds, calls = (3, 2) if cli.quick else (15, 5)
    problem = models.mlp_problem(jax.random.key(0), (784, 128, 10), 512, dtype=jnp.float32)
    params, batch = problem.params, problem.batch
    flat, unravel = cv.ravel(params)
    fresh = unravel(jax.random.normal(jax.random.key(1), flat.shape, flat.dtype))
    # committed, as every v of a loop after its first (each the previous call's output)
    v = jax.device_put(fresh, jax.devices()[0])
    factories = {
        "hvp": cv.hessian_vp(problem.loss),
        "fisher_vp": cv.fisher_vp(problem.logits),
        # no arithmetic: the per-call dispatch overhead itself, free of the matvec's noise
        "identity": cv.VectorProduct(lambda params, v, batch: v),
    }
    result = {
        "problem": {"model": "mlp 784-128-10 tanh", "n": int(flat.size), "examples": 512},
        "rounds": rounds,
        "calls_per_round": calls,
        "machine": machine_info(),
    }
    for name, fvp in factories.items():
        result[name] = measure(fvp, params, batch, v, rounds, calls)
        result[name]["apply_uncommitted_us"] = _uncommitted_apply_us(fvp, params, batch, fresh)
        print(name, json.dumps(result[name], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"operator_overhead{'_quick' if cli.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
