"""Resumable parameter sweeps: over quadratic landscapes, or over any experiment's Config.

**Experiment sweeps.** A config with an ``"experiment"`` key sweeps the
frozen ``Config`` of an experiment module (``X`` is the module registered as
experiment ``X``, :mod:`geomcollapse.registry`: this repository's
``experiments.X``; a dotted name is imported as written)::

    {"experiment": "my_claim", "output": "my_claim.jsonl",
     "base": {"n": 48}, "grid": {"coupling": [0.5, 1.0], "seed": [0, 1, 2]}}

The module defines ``sweep_cell(config, outdir) -> list[dict]`` (one cell's
rows) and may define ``sweep_cells(configs, outdir) -> list[list[dict]]``
(cells differing only in ``seed``, computed together; used off CPU) and
``report(rows, outdir) -> list[Path]`` (run by :func:`report`), and may name row
fields every row must agree on in ``SWEEP_INVARIANTS`` (rows of another value are
refused before they are appended). ``base`` and
the grid's values replace ``Config()``'s fields (dicts into dataclass fields,
lists into tuples); the grid's cartesian product, in its key order, gives the
cells. Each cell's rows, tagged with ``cell``, ``cell_id``, ``cell_rows`` and
the cell's grid values ``params``, are appended in one write, so a killed
sweep resumes as a landscape sweep does, by whole cells. ``outdir`` (where an
experiment keeps caches such as checkpoints) is the working directory. The
details are in :mod:`geomcollapse._experiment_sweep` and docs/sweeps.md.

**Landscape sweeps.** A config without ``"experiment"`` lists grids of
:func:`geomcollapse.landscapes.make_quadratic_landscape` arguments and seeds::

    {"output": "sweep.jsonl", "batch_size": 64,
     "times": {"start": 1e-4, "stop": 1.0, "num": 32},
     "grid": {"n": [64], "d": [3], "top": [[3.0, 2.0, 1.0]], "tail_mass": [0.0, 0.1],
              "epsilon": [0.0, 1e-3], "coupling": [0.5, 1.0]},
     "seeds": [0, 1, 2]}

Every combination × seed is one run; the landscape of a run depends on its
parameters and seed only. Runs with equal ``(n, d)`` are batched, evaluated by
one jitted call of :func:`geomcollapse.landscapes.summarize_batch` (vmapped on
accelerators, mapped in sequence on CPU) with the batch axis sharded over all
devices (``shard_map``), and each batch is appended to the
JSONL output in one write. A killed sweep resumes: incomplete batches are
dropped (the file is rewritten atomically) and recomputed, so no row is lost
or duplicated and every row equals the uninterrupted run's. Resuming with
another ``batch_size`` (which regroups the runs) is refused, as is a file whose
complete batches are not this config's runs.

**Several processes.** Under ``jax.distributed`` (``geomcollapse sweep CONFIG
--coordinator HOST:PORT --num-processes N --process-id I``), process ``i``
computes the cells (batches) whose index is ``i`` mod ``N`` into its own part
file ``OUTPUT.part-i-of-N``; after a barrier, process 0 merges the output and
the parts into the output (index order, each group once) and deletes them.
Groups done in the output or in any part are never recomputed, so a killed
job resumes when all its processes are restarted (see docs/sweeps.md).

Every number in a config must be finite; a bad config, an unreadable config
file or an unwritable output raise ``ValueError`` naming the key or path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from geomcollapse import _experiment_sweep, _sweep_report, landscapes, theory
from geomcollapse._checks import is_number, positive_float, positive_int
from geomcollapse._sweep_io import (
    append,
    barrier,
    header_of,
    locked_output,
    merge_parts,
    processes,
    read_config_file,
    reject_non_finite,
    reject_repeats,
    reject_unknown,
    whole_lines,
)
from geomcollapse.errors import warn_at_caller
from geomcollapse.progress import progress_bar

__all__ = [
    "FORMAT_VERSION",
    "Cell",
    "ExperimentSweepConfig",
    "SweepConfig",
    "check_runs",
    "expand_cells",
    "expand_runs",
    "landscape_for",
    "load_config",
    "parse_config",
    "plan_batches",
    "read_rows",
    "report",
    "run_sweep",
]

ExperimentSweepConfig = _experiment_sweep.ExperimentSweepConfig
Cell = _experiment_sweep.Cell
expand_cells = _experiment_sweep.expand_cells

TOP_KEYS = {"output", "batch_size", "times", "grid", "seeds", "name"}
GRID_KEYS = (
    "n",
    "d",
    "top",
    "tail_mass",
    "epsilon",
    "coupling",
    "kappa",
    "c_perp_norm",
    "curvature_scale",
)
REQUIRED_GRID = {"n", "d", "top", "tail_mass", "epsilon"}
TIME_KEYS = {"start", "stop", "num"}
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: where to write, batch size, times and the runs' grid."""

    output: Path
    batch_size: int
    times: tuple[float, ...]
    grid: dict[str, tuple]
    seeds: tuple[int, ...]
    name: str
    digest: str  # sha256 of the canonical config: a resumed file must match it


def parse_config(
    raw: dict, base_dir: Path = Path()
) -> SweepConfig | _experiment_sweep.ExperimentSweepConfig:
    """Validate a config dict (module docstring); a relative ``output`` is under ``base_dir``.

    A config with an ``"experiment"`` key is an experiment sweep's, and the
    experiment is imported to check the fields its ``base`` and ``grid`` set.
    """
    if not isinstance(raw, dict):
        raise ValueError("a sweep config must be a mapping")
    if "experiment" in raw:
        return _experiment_sweep.parse_config(raw, base_dir)
    reject_non_finite(raw, "")
    reject_unknown(raw, TOP_KEYS, "the sweep config")
    for key in ("output", "grid", "seeds", "times"):
        if key not in raw:
            raise ValueError(f"the sweep config needs {key!r}")
    if not isinstance(raw["output"], str) or not raw["output"]:
        raise ValueError(f"output must name a file, got {raw['output']!r}")
    grid = raw["grid"]
    if not isinstance(grid, dict):
        raise ValueError("grid must be a mapping of parameter name to a list of values")
    reject_unknown(grid, GRID_KEYS, "grid")
    missing = REQUIRED_GRID - set(grid)
    if missing:
        raise ValueError(f"grid needs {sorted(missing)}")
    if ("coupling" in grid) == ("kappa" in grid):
        raise ValueError("grid needs exactly one of 'coupling' (target γ) or 'kappa'")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list, got {values!r}")
        reject_repeats(values, f"grid[{key!r}]")
        for value in values:
            numbers = value if key == "top" and isinstance(value, list) else [value]
            if not numbers or not all(is_number(v) for v in numbers):
                raise ValueError(f"grid[{key!r}] holds {value!r}: its values must be numbers")
    times = raw["times"]
    if isinstance(times, dict):
        reject_unknown(times, TIME_KEYS, "times")
        if set(times) != TIME_KEYS:
            raise ValueError(f"times needs {sorted(TIME_KEYS)} (log-spaced) or a list")
        start, stop = (
            positive_float(times["start"], "times.start"),
            positive_float(times["stop"], "times.stop"),
        )
        num = positive_int(times["num"], "times.num")
        if num < 2:  # logspace would give [start] alone and drop stop without a word
            raise ValueError(f"times.num must be ≥ 2 with start and stop, got {num} (a list "
                             "gives one time: times = [t])")  # fmt: skip
        ts = np.logspace(np.log10(start), np.log10(stop), num)
    else:
        if not isinstance(times, list) or not all(is_number(t) for t in times):
            raise ValueError(
                f"times must be a list of numbers (or {sorted(TIME_KEYS)}), got {times!r}"
            )
        ts = np.asarray(times, np.float64)
    if ts.ndim != 1 or ts.size == 0 or np.any(ts < 0) or np.any(np.diff(ts) <= 0):
        raise ValueError("times must be strictly increasing and ≥ 0")
    seeds = raw["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ValueError(f"seeds must be a non-empty list of integers in [0, 2**63), got {seeds!r}")
    reject_repeats(seeds, "seeds")
    canonical = json.dumps({"grid": grid, "seeds": seeds, "times": ts.tolist()}, sort_keys=True)
    return SweepConfig(
        output=(base_dir / raw["output"]).resolve(),
        batch_size=positive_int(raw.get("batch_size", 64), "batch_size"),
        times=tuple(float(t) for t in ts),
        grid={k: tuple(grid[k]) for k in GRID_KEYS if k in grid},
        seeds=tuple(seeds),
        name=_sweep_report.sweep_name(raw.get("name", Path(raw["output"]).stem), "name"),
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
    )


def load_config(
    path: str | os.PathLike,
) -> SweepConfig | _experiment_sweep.ExperimentSweepConfig:
    """Read and validate a ``.json`` (or, on Python ≥ 3.11, ``.toml``) sweep config."""
    path = Path(path)
    raw = read_config_file(path)
    return parse_config(raw, path.parent)


def expand_runs(config: SweepConfig) -> list[dict[str, Any]]:
    """Every grid combination × seed, in a fixed order, each with its ``id``."""
    keys = list(config.grid)
    runs = []
    for values in itertools.product(*(config.grid[k] for k in keys)):
        for seed in config.seeds:
            runs.append({"id": len(runs), "seed": seed, **dict(zip(keys, values, strict=True))})
    return runs


def plan_batches(config: SweepConfig) -> list[list[dict[str, Any]]]:
    """Runs grouped by ``(n, d)`` (in first-seen order), chunked by ``batch_size``."""
    groups: dict[tuple[int, int], list] = {}
    for run in expand_runs(config):
        groups.setdefault((run["n"], run["d"]), []).append(run)
    return [
        runs[i : i + config.batch_size]
        for runs in groups.values()
        for i in range(0, len(runs), config.batch_size)
    ]


def landscape_for(run: dict[str, Any]) -> landscapes.QuadraticLandscape:
    """The landscape of a run (or of an output row): rebuilt from its parameters and seed."""
    params = {k: v for k, v in run.items() if k in GRID_KEYS and k not in ("n", "d")}
    return landscapes.make_quadratic_landscape(
        jax.random.key(run["seed"]), run["n"], run["d"], **params
    )


def check_runs(config: SweepConfig) -> None:
    """Refuse a config any of whose runs cannot be drawn, before a sweep writes anything.

    Every run's landscape is drawn once (with ``coupling`` the attainable ``γ``
    depends on the seed); with ``kappa`` the arguments do not, so one seed per
    grid combination is drawn. Raises ``ValueError`` naming the run's parameters.
    """
    checked = set()
    for run in expand_runs(config):
        combination = json.dumps({k: v for k, v in run.items() if k not in ("id", "seed")})
        if "kappa" in config.grid and combination in checked:
            continue
        checked.add(combination)
        try:
            landscape_for(run)
        except ValueError as err:
            where = ", ".join(f"{k}={v}" for k, v in run.items() if k != "id")
            raise ValueError(f"grid run {run['id']} ({where}): {err}") from None


def _evaluator(d: int, devices: list) -> tuple[Any, NamedSharding]:
    """A jitted ``(A, c, F, ts) -> QuadraticSummary`` over a batch sharded on ``devices``.

    Each device evaluates its shard with :func:`landscapes.summarize_batch`:
    sequentially on CPU (batched LAPACK can deadlock XLA's CPU thread pool; see
    there), vmapped on accelerators.
    """
    mesh = Mesh(np.asarray(devices), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    sequential = devices[0].platform == "cpu"

    def local(A, c, F, ts):
        return landscapes.summarize_batch(A, c, F, d, ts, sequential=sequential)

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch"), P()), out_specs=P("batch")
    )
    return jax.jit(sharded), sharding


def _read_groups(
    path: Path, config: SweepConfig, batches: list[list[dict]]
) -> tuple[str | None, dict[int, list[str]]]:
    """The header line of ``path`` and the lines of its complete batches, by batch index.

    ``(None, {})`` for a missing or empty file. Raises ``ValueError`` if the
    file is another config's, was written with another ``batch_size``, or holds
    a complete batch whose runs are not the ones ``batches`` puts there (rows
    are matched to runs by ``id``, so no row is duplicated or lost on resume).
    """
    if not path.exists():
        return None, {}
    lines = whole_lines(path.read_text())
    if not lines:
        return None, {}
    header = header_of(path, lines, config.digest)
    if header is None:  # another config's header alone: started afresh
        return None, {}
    written = header.get("batch_size")
    if written is not None and written != config.batch_size:
        raise ValueError(
            f"{path} was written with batch_size={written}; resume it with that batch_size "
            f"(batch_size={config.batch_size} would regroup the runs) or move it away"
        )
    by_batch: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    expected: dict[int, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            b, count, run_id = row["batch"], row["batch_rows"], row["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{path} line {number} is not a sweep row; move the file away"
            ) from None
        by_batch.setdefault(b, []).append(line)
        ids.setdefault(b, []).append(run_id)
        expected[b] = count
    done = {b for b, rows in by_batch.items() if len(rows) == expected[b]}
    for b in sorted(done):
        planned = [run["id"] for run in batches[b]] if 0 <= b < len(batches) else None
        if ids[b] != planned:
            raise ValueError(
                f"{path} batch {b} holds runs {ids[b]}, but this config's batch {b} is runs "
                f"{planned} (was it written with another batch_size?); move it away"
            )
    return lines[0], {b: by_batch[b] for b in sorted(done)}


def _rows(batch_index: int, runs: list[dict], summary: landscapes.QuadraticSummary) -> list[str]:
    out = []
    arrays = {k: np.asarray(v, np.float64) for k, v in summary._asdict().items()}
    measures = [
        f for f in landscapes.QuadraticSummary._fields if f not in ("delta_u", "projected_loss")
    ]
    for i, run in enumerate(runs):
        report = theory.report_from_measures(run["d"], **{f: arrays[f][i] for f in measures})
        aic = {k: v for k, v in report._asdict().items() if k != "d"}
        row = {
            **run,
            "batch": batch_index,
            "batch_rows": len(runs),
            "aic": aic,
            "delta_u": arrays["delta_u"][i].tolist(),
            "projected_loss": arrays["projected_loss"][i].tolist(),
        }
        out.append(json.dumps(row, allow_nan=True))
    return out


def _header(config: SweepConfig) -> str:
    """A landscape sweep's first line: its name, digest, format, batch size, times and
    run count (a report of fewer rows says it is incomplete)."""
    return json.dumps(
        {
            "sweep": config.name,
            "config_sha256": config.digest,
            "format": FORMAT_VERSION,
            "batch_size": config.batch_size,
            "times": list(config.times),
            "runs": len(expand_runs(config)),
        }
    )


def _summarise(evaluate, sharding, runs: list[dict], num_devices: int, ts: jax.Array) -> dict:
    """One batch's summaries: its landscapes stacked, padded to split evenly, evaluated."""
    members = [landscape_for(run) for run in runs]
    pad = (-len(members)) % num_devices  # the batch axis must split evenly
    stacked = [
        np.stack([np.asarray(getattr(m, f)) for m in members + members[-1:] * pad])
        for f in ("A", "c", "F")
    ]
    summary = evaluate(*(jax.device_put(a, sharding) for a in stacked), ts)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[: len(runs)], summary)


def run_sweep(
    config: SweepConfig | _experiment_sweep.ExperimentSweepConfig,
    *,
    progress: bool = True,
    devices: list | None = None,
    outdir: Path | None = None,
    batch_seeds: bool | None = None,
) -> Path:
    """Run (or resume) ``config``; return the JSONL path.

    Landscape sweep: the first line is a header (config digest, times); then
    one row per run: its parameters, ``id``, ``seed``, ``batch``, the AIC
    numbers and the exact ``delta_u`` and ``projected_loss`` at the config's
    times. ``devices`` (default: all) shard each batch.

    Experiment sweep: the header records the experiment, ``base``, ``grid``
    and the config digest; then each cell's rows as its ``sweep_cell`` returned
    them, with ``cell``, ``cell_id``, ``cell_rows`` and ``params`` (the cell's
    grid values) added. ``outdir`` (default: the working directory) is passed to
    the experiment. ``batch_seeds`` (default: on when JAX's backend is not the
    CPU) computes cells that differ only in ``seed`` by one ``sweep_cells`` call
    where the experiment defines it; otherwise cells run one by one.
    """
    if isinstance(config, _experiment_sweep.ExperimentSweepConfig):
        if devices is not None:
            raise ValueError("devices shards landscape sweeps; an experiment places its arrays")
        return _experiment_sweep.run_sweep(
            config, progress=progress, outdir=outdir, batch_seeds=batch_seeds
        )
    if outdir is not None or batch_seeds is not None:
        raise ValueError("outdir and batch_seeds apply to experiment sweeps only")
    if not jax.config.jax_enable_x64:
        raise ValueError("sweeps run in float64: enable jax_enable_x64 first")
    process, count = processes()
    if devices is None:  # several processes: each shards its batches over its own devices
        devices = jax.devices() if count == 1 else jax.local_devices()
    devices = list(devices)
    path = config.output
    batches = plan_batches(config)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; 'output' must name a file")
    check_runs(config)  # a refused config writes nothing
    header = _header(config)

    def read(p: Path) -> tuple[str | None, dict[int, list[str]]]:
        return _read_groups(p, config, batches)

    with locked_output(path, header, read, process, count) as (target, done):
        _compute_batches(config, batches, devices, target, done, process, count, progress)
        barrier("geomcollapse-sweep-computed")
        if process == 0:
            merge_parts(path, header, read)
        barrier("geomcollapse-sweep-merged")
    return path


def _compute_batches(
    config: SweepConfig,
    batches: list[list[dict]],
    devices: list,
    target: Path,
    done: set[int],
    process: int,
    count: int,
    progress: bool,
) -> None:
    """Compute and append this process's batches that no file holds yet."""
    ts = jnp.asarray(config.times, jnp.float64)
    evaluators: dict[int, tuple] = {}
    todo = [b for b in range(len(batches)) if b not in done and b % count == process]
    for b in progress_bar(todo, desc=f"sweep {config.name}", enabled=progress):
        runs = batches[b]
        d = runs[0]["d"]
        if d not in evaluators:
            evaluators[d] = _evaluator(d, devices)
        summary = _summarise(*evaluators[d], runs, len(devices), ts)
        try:
            append(target, _rows(b, runs, summary))
        except OSError as err:
            raise ValueError(f"cannot write the sweep output {target} ('output'): {err}") from None


def read_rows(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The header and the rows of a sweep's JSONL output.

    Landscape sweep: every row, sorted by ``id``. Experiment sweep: the rows
    of complete cells (a killed sweep's partial cell is left out), sorted by
    ``cell``, each cell's rows in the order its experiment returned them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a sweep output (not UTF-8 text: {err.reason})") from None
    lines = [line for line in text.split("\n") if line]
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "format" not in header:
        raise ValueError(f"{path} is not a sweep output (its first line is not a sweep header)")
    if "experiment" in header:
        return _experiment_sweep.read_rows(path, text)
    times = header.get("times")
    num_times = len(times) if isinstance(times, list) else -1  # -1: no row can match
    return header, _landscape_rows(path, whole_lines(text)[1:], num_times)


_LANDSCAPE_ROW = ("id", "seed", "aic", "delta_u")  # what report reads of every row


def _landscape_rows(path: Path, lines: list[str], num_times: int) -> list[dict]:
    """The rows of a landscape sweep's whole lines (a partial last line, from a kill
    mid-write, is left out as on resume), sorted by ``id``; ``ValueError`` naming the
    file and line of one that is not a row (or whose ``Δu`` is not one value per time
    of the header: a row of another sweep), or of an ``id`` written twice."""
    rows, seen = [], {}
    for number, line in enumerate(lines, start=2):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            missing = ["(not a JSON object)"]
        else:  # aic is read as a mapping of numbers
            missing = [k for k in _LANDSCAPE_ROW if k not in row]
            missing = missing or ([] if isinstance(row["aic"], dict) else ["aic"])
            curve = row.get("delta_u")
            if not missing and not (isinstance(curve, list) and len(curve) == num_times):
                missing = [f"a delta_u of {num_times} values, one per time of the header"]
        if missing:
            raise ValueError(
                f"{path} line {number} is not a sweep row (missing {', '.join(missing)}); "
                "move the file away, or run the sweep again to a new output"
            )
        if row["id"] in seen:
            raise ValueError(
                f"{path} holds run id {row['id']} twice (lines {seen[row['id']]} and {number})"
            )
        seen[row["id"]] = number
        rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def _landscape_params(row: dict) -> dict:
    """A landscape row's grid values and seed (what ``report`` groups by)."""
    return {k: row[k] for k in (*GRID_KEYS, "seed") if k in row}


def report(
    path: str | os.PathLike,
    outdir: str | os.PathLike | None = None,
    *,
    x: str | None = None,
    y: str | None = None,
) -> list[Path]:
    """A sweep's tables and figures, rebuilt from its rows; the paths written.

    With ``x`` (a grid axis) and ``y`` (a recorded column, dotted: ``aic.coupling``),
    any sweep: ``y`` against ``x``, one series per value of the other varying grid
    axes, the rows of each point (its seeds) aggregated into their mean and 95 %
    interval (:mod:`geomcollapse._sweep_report`), as ``NAME_Y_vs_X.png`` and ``.md``.
    Without them, an experiment sweep calls its experiment's ``report(rows, outdir)``
    (complete cells only), and a landscape sweep draws every grid combination's
    mean ``Δu(t)`` over seeds with its band (``NAME_delta_u.png``) and tabulates the
    AIC numbers (``NAME_aic.md``). ``outdir`` defaults to the working directory.
    Raises ``ValueError`` if ``path`` does not exist or is not a sweep's output,
    holds no complete row, names no such axis or column, or (without ``x``/``y``)
    the experiment has no ``report``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"sweep output {str(path)!r} is a directory; name the .jsonl file")
    if not path.is_file():
        raise ValueError(f"sweep output {str(path)!r} does not exist")
    if (x is None) != (y is None):
        raise ValueError("give --x (a grid axis) and --y (a recorded column) together")
    header, rows = read_rows(path)
    outdir = Path.cwd() if outdir is None else Path(outdir)
    experiment = "experiment" in header
    note = _sweep_report.incomplete(header, rows)
    if note and rows:  # said here and in what is written, not left to be noticed
        warn_at_caller(f"{path} is {note}: the report covers the rows there", UserWarning)
    if x is None and experiment:
        return _experiment_sweep.report(header, rows, path, outdir)
    if not rows:
        raise ValueError(f"{path} holds no complete row yet: run the sweep first")
    if x is None:
        return _landscape_report(header, rows, outdir, note)
    params_of = (lambda row: row["params"]) if experiment else _landscape_params
    series = _sweep_report.aggregate(rows, params_of, x, y)
    name = _sweep_report.sweep_name(header.get("sweep", path.stem), f"{path}'s sweep name")
    title = f"{name}: {y} against {x}; mean and 95% interval over seeds"
    title += f" ({note})" if note else ""
    figure = _sweep_report.column_figure(series, x, y, title)
    png = _sweep_report.save(figure, outdir / f"{name}_{y}_vs_{x}.png")
    md = png.with_suffix(".md")
    md.write_text(f"# {title}\n\n{_sweep_report.table(series, x, y)}\n", encoding="utf-8")
    return [png, md]


def _landscape_report(header: dict, rows: list[dict], outdir: Path, note: str) -> list[Path]:
    """A landscape sweep's default report: mean ``Δu(t)`` curves and a table of AIC numbers."""
    groups = _sweep_report.grouped(rows, _landscape_params, everything="every run")
    name = _sweep_report.sweep_name(header.get("sweep", "sweep"), "the sweep's name in its header")
    times = np.asarray(header["times"], np.float64)
    curves = [
        (label, _sweep_report.mean_interval([r["delta_u"] for r in members]))
        for label, members in groups.items()
    ]
    title = f"{name}: mean Δu(t) over seeds with its 95% interval"
    title += f" ({note})" if note else ""
    png = _sweep_report.save(
        _sweep_report.curves_figure(times, curves, title), outdir / f"{name}_delta_u.png"
    )
    fields = [k for k, v in rows[0]["aic"].items() if k != "d" and type(v) in (int, float)]
    lines = [f"| grid | rows | {' | '.join(fields)} |", "|---|---|" + "---|" * len(fields)]
    for label, members in groups.items():
        cells = []
        for f in fields:
            mean, low, high, _ = _sweep_report.mean_interval([r["aic"][f] for r in members])
            cells.append(f"{mean:.4g} [{low:.4g}, {high:.4g}]")
        lines.append(f"| {label} | {len(members)} | {' | '.join(cells)} |")
    md = outdir / f"{name}_aic.md"
    intro = f"# {name}: AIC numbers, mean [95% interval] over seeds\n\n"
    intro += _sweep_report.unfinished(note)
    md.write_text(intro + "\n".join(lines) + "\n", encoding="utf-8")
    return [png, md]
