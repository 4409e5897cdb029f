"""Shared plumbing for experiment scripts: float64 + headless plotting, claims, results, CLI.

Importing this module is what makes an experiment an entry point: it enables
``jax_enable_x64`` (theory checks are float64, docs/theory.md §5) and selects the
headless matplotlib backend, once, before any experiment code runs.
"""

from __future__ import annotations

import os
import sys

# One BLAS thread beside XLA's pool (see geomcollapse.cli); before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import matplotlib

jax.config.update("jax_enable_x64", True)
matplotlib.use("Agg")

from geomcollapse import registry, tasks  # noqa: E402
from geomcollapse.registry import runtime_help  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Claim:
    """One row of ``paper_repro.md``: a claim, how it was checked and the verdict."""

    claim: str
    command: str
    predicted: str
    measured: str
    passed: bool
    labels: tuple[str, str] = ("reproduced", "NOT reproduced")  # verdict if passed / not

    @property
    def verdict(self) -> str:
        return self.labels[0] if self.passed else self.labels[1]


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically (temp file + rename): no half-written results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    os.replace(tmp, path)


def require_x64(name: str) -> None:
    """Raise unless float64 is on (it is, once this module is imported)."""
    if not jax.config.jax_enable_x64:
        raise ValueError(f"{name} runs in float64: enable jax_enable_x64 before calling main")


GPU_SIZES = ("small",)  # configs a ``--full`` run selects
TAGS = ("all_tasks", "tasks", "study")  # a config's ``tag``: a --tasks run beside the main files


def result_name(name: str, config) -> str:
    """``name``, ``<name>_<size>`` for a GPU-sized config (see :func:`finish`), then ``_<tag>``.

    A config's ``tag`` (set by :func:`config_from_args` for a ``--tasks`` run
    whose tasks differ from the config's) keeps that run beside the main files.
    """
    size = getattr(config, "size", None)
    stem = f"{name}_{size}" if size in GPU_SIZES else name
    tag = getattr(config, "tag", "")
    return f"{stem}_{tag}" if tag else stem


def check_fields(
    config, *, positive=(), counts=(), nonnegative=(), indices=(), choices=None, at_most=None
) -> None:
    """Refuse a config whose numbers a run cannot use, naming the field (a sweep's up-front check).

    ``positive``: finite numbers ``> 0``; ``counts``: integers ``≥ 1``;
    ``nonnegative``: finite numbers ``≥ 0``; ``indices``: integers ``≥ 0`` (seeds);
    ``choices``: ``{field: allowed values}``; ``at_most``: ``{field: bound field}``
    (e.g. a batch within the examples). A tuple field is checked element by element.
    Raises ``ValueError`` naming the field and its value.
    """
    rules = [(f, "a finite number > 0", _positive) for f in positive]
    rules += [(f, "an integer ≥ 1", _count) for f in counts]
    rules += [(f, "a finite number ≥ 0", _nonnegative) for f in nonnegative]
    rules += [(f, "an integer ≥ 0", _index) for f in indices]
    for field, wanted, ok in rules:
        value = getattr(config, field)
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(ok(v) for v in values):
            each = " (each)" if isinstance(value, tuple) else ""
            raise ValueError(f"{field} must be {wanted}{each}, got {value!r}")
    for field, allowed in (choices or {}).items():
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"{field} must be one of {sorted(allowed)}, got {value!r}")
    for field, bound in (at_most or {}).items():
        value, limit = getattr(config, field), getattr(config, bound)
        if value > limit:
            raise ValueError(f"{field}={value} exceeds {bound}={limit}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _is_number(v) and v > 0


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _nonnegative(v) -> bool:
    return _is_number(v) and v >= 0


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def float64_main(name: str, default, compute: Callable, figure, claims) -> Callable:
    r"""``main(config=default, outdir=ROOT, command=None)`` of a float64 theory experiment.

    Checks that float64 is on, runs ``compute(config)`` and :func:`conclude`\ s
    it (results, figure and claims under ``outdir``); returns what that returns.
    """

    def main(config=default, outdir: Path = ROOT, command: str | None = None) -> dict:
        require_x64(name)
        return conclude(name, config, outdir, command, compute(config), figure, claims)

    main.__doc__ = f"Run ``{name}``; write its results and figure under ``outdir``."
    return main


def theory_sweep_cell(name: str, compute: Callable, claims: Callable, keys: tuple[str, ...]):
    """``sweep_cell(config, outdir)`` of a float64 theory experiment (docs/sweeps.md).

    One row per cell: ``compute(config)``'s entries ``keys`` (the scalars and
    small tables; the figure's curves are left out), each claim's verdict as
    ``passed`` (a list, in ``claims``' order) and ``all_passed``. ``outdir`` is
    unused: these experiments keep no cache.
    """

    def sweep_cell(config, outdir: Path) -> list[dict]:
        require_x64(name)
        results = compute(config)
        verdicts = [c.passed for c in claims(results, config, f"geomcollapse sweep ({name})")]
        row = {k: results[k] for k in keys}
        return [{**row, "passed": verdicts, "all_passed": all(verdicts)}]

    sweep_cell.__doc__ = f"One sweep row of ``{name}``: {', '.join(keys)} and the verdicts."
    return sweep_cell


def conclude(
    name: str, config, outdir: Path, command: str | None, results: dict, figure, claims
) -> dict:
    """``finish`` an experiment run: its ``claims(results, config, command)`` and files.

    ``command`` defaults to ``python -m experiments.<name>`` (a direct ``main()`` call).
    """
    command = command or f"python -m experiments.{name}"
    return finish(name, config, outdir, figure, claims(results, config, command), **results)


def finish(
    name: str, config, outdir: Path, figure: Callable, claims: list[Claim], **payload
) -> dict:
    """Write the results JSON of experiment ``name``, then its figure from that file.

    ``figure(results, path)`` draws from the JSON as written (what
    ``python -m experiments.figures`` reloads later) and saves
    ``figures/<name>.png`` and ``.pdf``; the results are
    ``experiments/results/<name>.json``. A GPU-sized config (``--full``,
    ``config.size`` in ``GPU_SIZES``) writes ``<name>_<size>.*`` beside them, so
    it never overwrites what the main job made. Returns ``{result, claims}``.
    """
    name = result_name(name, config)
    png = outdir / "figures" / f"{name}.png"
    result = {
        "config": dataclasses.asdict(config),
        **payload,
        "figure": str(png.relative_to(outdir)),
        "claims": [dict(asdict(c), verdict=c.verdict) for c in claims],
    }
    path = outdir / "experiments" / "results" / f"{name}.json"
    write_json(path, result)
    figure(json.loads(path.read_text()), png)
    return {"result": result, "claims": claims}


def quick_command(module) -> str:
    """The command that runs ``module``'s CPU configuration (what the main job runs)."""
    return f"python -m experiments.{module.NAME} --quick"


def default_outdir() -> Path:
    """Where results go by default: this checkout's root, else the working directory."""
    return ROOT if (ROOT / "pyproject.toml").is_file() else Path.cwd()


def outputs_help(name: str) -> str:
    """The files an experiment writes, for ``--help``."""
    return (
        f"writes OUTDIR/figures/{name}.png (+ .pdf) and OUTDIR/experiments/results/{name}.json; "
        "--full runs of the transformer experiments write <name>_small.* beside them. "
        + runtime_help(name)
    )


def add_run_arguments(parser: argparse.ArgumentParser, *, tasks_option: bool) -> None:
    """``--quick`` / ``--full`` / ``--outdir`` (and ``--tasks``): the same on every experiment."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="the CPU-minutes configuration the main job runs (the default)",
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the long configuration (more landscapes and times; the 1M-parameter "
        "transformer): minutes to hours on a CPU, meant for a GPU",
    )
    parser.add_argument(
        "--outdir",
        type=Path,
        default=None,
        help="where figures/ and experiments/results/ go (default: the repository root "
        "of this checkout, else the working directory)",
    )
    if tasks_option:
        parser.add_argument(
            "--tasks", help="comma-separated benign tasks, or all (default: the config's)"
        )


def config_from_args(name: str, full, quick, args: argparse.Namespace) -> tuple[object, str]:
    """The config and the command line that ``args`` select; ``ValueError`` for bad ``--tasks``."""
    config, flag = (full, " --full") if args.full else (quick, " --quick")
    if getattr(args, "tasks", None):
        chosen = task_subset(args.tasks)
        if "tag" in {f.name for f in dataclasses.fields(config)} and chosen != config.tasks:
            tag = "all_tasks" if set(chosen) == set(tasks.BENIGN_TASKS) else "tasks"
            config = dataclasses.replace(config, tag=tag)
        config = dataclasses.replace(config, tasks=chosen)
        flag += f" --tasks {args.tasks}"
    return config, f"python -m experiments.{name}{flag}"


def run_from_args(name: str, main: Callable, full, quick, args: argparse.Namespace) -> list[Claim]:
    """Run one experiment as its parsed ``args`` say; return its claims.

    Prints a start and an end line (with the wall time), as the main job does
    for each experiment, so an unwatched run says where it is.
    """
    config, command = config_from_args(name, full, quick, args)
    outdir = args.outdir if args.outdir is not None else default_outdir()
    print(f"== {name} ==", flush=True)
    start = time.perf_counter()
    claims = main(config, outdir, command=command)["claims"]
    print(f"== {name}: {time.perf_counter() - start:.0f} s ==", flush=True)
    return claims


def run_command(args: argparse.Namespace) -> int:
    """``geomcollapse run EXPERIMENT [--quick | --full] [--outdir DIR] [--tasks ...]``.

    Registered with the library in ``pyproject.toml`` (:mod:`geomcollapse.registry`),
    which also names the module of each experiment.
    """
    module = registry.load_experiment(args.experiment)
    try:
        config_from_args(module.NAME, module.Config(), module.QUICK, args)
    except ValueError as err:
        print(f"geomcollapse run: error: {err}", file=sys.stderr)
        return 2
    for c in run_from_args(module.NAME, module.main, module.Config(), module.QUICK, args):
        print(f"[{c.verdict}] {c.claim}: {c.measured}")
    return 0


def cli(name: str, doc: str, main: Callable, full, quick, *, full_flag: bool = False) -> None:
    """The ``__main__`` of an experiment: ``[--quick | --full] [--outdir DIR]``.

    Every experiment: ``--quick`` (the default) is the configuration the main
    job runs on a CPU in minutes; ``--full`` the long one. The transformer
    experiments (``full_flag=True``) also take ``--tasks a,b`` (a subset of the
    benign tasks).
    """
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog=outputs_help(name),
    )
    add_run_arguments(parser, tasks_option=full_flag)
    args = parser.parse_args()
    try:
        config_from_args(name, full, quick, args)
    except ValueError as err:
        parser.error(str(err))
    for c in run_from_args(name, main, full, quick, args):
        print(f"[{c.verdict}] {c.claim}: {c.measured}")


def task_subset(text: str) -> tuple[str, ...]:
    """``'a,b'`` → ``('a', 'b')``, each a benign task (``'all'``: all six); ``ValueError`` else."""
    if text.strip() == "all":
        return tuple(tasks.BENIGN_TASKS)
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in tasks.BENIGN_TASKS]
    if not names or unknown:
        raise ValueError(
            f"--tasks must list benign tasks from {sorted(tasks.BENIGN_TASKS)}, got {text!r}"
        )
    return names


# each row of a study on the transformer: the digest of the θ* it was computed at
# (``_transformer.theta_digest``); rows written before it was recorded lack it
THETA_FIELD = "theta_sha256"


def stamp(rows: list[dict], digest: str) -> list[dict]:
    """``rows``, each with ``THETA_FIELD: digest`` (``_transformer.theta_digest`` of the
    ``θ*`` they were computed at), so that no analysis mixes rows of two ``θ*``."""
    return [{**row, THETA_FIELD: digest} for row in rows]


def one_theta(rows: list[dict], where: str) -> str | None:
    """The one ``θ*`` digest that ``rows`` record (``None``: none records one).

    Raises ``ValueError`` naming ``where`` when the rows mix ``θ*``: two digests (a sweep
    resumed after ``θ*`` was retrained), or a digest beside rows without one (rows of a
    version that did not record ``θ*``, resumed by one that does).
    """
    seen = {row.get(THETA_FIELD) for row in rows}
    if len(seen) > 1:
        named = ", ".join(sorted("not recorded" if d is None else d for d in seen))
        why = (
            "rows written before θ* was recorded, resumed since"
            if None in seen
            else "a sweep resumed after θ* changed"
        )
        raise ValueError(
            f"{where} holds rows computed at {len(seen)} different θ* ({named}): {why}; "
            "move the file away or keep the rows of one θ*"
        )
    return next(iter(seen), None)


def committed_sweep_rows(outdir: Path, output: Path) -> list[dict] | None:
    """The rows of a committed sweep output ``outdir / output`` (complete cells), if present;
    ``ValueError`` if they mix ``θ*`` (:func:`one_theta`)."""
    from geomcollapse import sweep

    path = Path(outdir) / output
    if not path.is_file():
        return None
    rows = sweep.read_rows(path)[1]
    one_theta(rows, str(path))
    return rows
