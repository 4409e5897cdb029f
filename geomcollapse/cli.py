"""The ``geomcollapse`` command line.

``geomcollapse reproduce [--quick | --full] [--outdir DIR]`` runs the main job;
``geomcollapse run EXPERIMENT [--quick | --full] [--outdir DIR]`` one
experiment; ``geomcollapse sweep CONFIG`` a sweep (of quadratic landscapes, or
of an experiment's config; over several processes with ``--coordinator HOST:PORT
--num-processes N --process-id I`` or ``--distributed``); ``geomcollapse report
SWEEP_OUTPUT [--out DIR] [--x AXIS --y COLUMN]`` a sweep's tables and figures;
``geomcollapse diagnose --spec FILE.py[:FUNCTION]`` any model's diagnosis, ``geomcollapse
diagnose --checkpoint DIR --skill FILE --task FILE`` a transformer checkpoint's
(docs/diagnose.md); ``geomcollapse --version``.
``--quick`` (the default) is the CPU-minutes configuration of the main job,
``--full`` the long one, on every experiment.

This is an entry point, not library code. ``run`` and ``reproduce`` are the
experiments' commands: the CLI parses them and hands them to the functions the
experiments package registers (:mod:`geomcollapse.registry`), so the library
never imports it.
"""

from __future__ import annotations

import os

# Threaded OpenBLAS inside XLA's CPU thread pool oversubscribes small machines
# (the LAPACK behind jnp.linalg.eigh and scipy's eigsh; a run hung on the 2-core
# CPU), and one BLAS thread is as fast there. Set by the entry points (this CLI,
# experiments, benchmarks, tests) before numpy loads, never by importing the
# library; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from pathlib import Path

import jax

from geomcollapse import compilation_cache
from geomcollapse._checks import positive_int, writable_directory
from geomcollapse.registry import EXPERIMENTS, TRANSFORMER, command, runtime_help

JOBS_HELP = (
    "experiments at once, each in a fresh process of its own (default: 2 on a CPU with "
    "2 or more cores; on an accelerator all of them in this one process)"
)


def positive_count(text: str) -> int:
    """An ``argparse`` type: a positive integer, else a usage error naming the value."""
    try:
        return positive_int(int(text), "the count")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None


def _distributed(args: argparse.Namespace) -> str | None:
    """Start JAX's multi-controller runtime as the flags ask; an error message or None."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            return "--coordinator, --num-processes and --process-id go together"
        if not 0 <= args.process_id < args.num_processes:
            return f"--process-id must be in [0, {args.num_processes}), got {args.process_id}"
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed:  # the cluster's own variables (Slurm, Open MPI, Cloud TPU, ...)
        jax.distributed.initialize()
    return None


def _sweep(args: argparse.Namespace) -> int:
    from geomcollapse import sweep as sweep_module

    problem = _distributed(args)
    if problem is not None:
        print(f"geomcollapse sweep: error: {problem}", file=sys.stderr)
        return 2
    try:
        config = sweep_module.load_config(args.config)
        path = sweep_module.run_sweep(config, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad config or file-system error: a message, no trace
        print(f"geomcollapse sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: whole rows are on disk; nothing to trace
        print(
            f"geomcollapse sweep: interrupted; the rows written are kept: run "
            f"`geomcollapse sweep {args.config}` again to resume",
            file=sys.stderr,
        )
        return 130
    _, rows = sweep_module.read_rows(path)
    where = f"{len(jax.devices())} device(s)"
    if jax.process_count() > 1:
        where += f", process {jax.process_index()} of {jax.process_count()}"
    print(f"{len(rows)} rows in {path} ({where})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from geomcollapse import sweep as sweep_module

    problem = None if args.out is None else _out_problem(Path(args.out), ())
    if problem is not None:
        print(f"geomcollapse report: error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        paths = sweep_module.report(args.output, args.out, x=args.x, y=args.y)
    except (ValueError, OSError) as err:  # missing or foreign file: a message, no trace
        print(f"geomcollapse report: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


# jax.random.key takes a signed 64-bit seed (OverflowError beyond it), and a
# negative seed aliases a large one (-1 and 2**64 - 1 give the same key bits).
SEED_LIMIT = 2**63


def _diagnose_args_problem(args: argparse.Namespace) -> str | None:
    """Why ``diagnose``'s own arguments cannot work, checked before any compute; or None."""
    checkpoint = [args.checkpoint, args.skill, args.task]
    if args.spec is not None and any(a is not None for a in checkpoint):
        return "--spec replaces --checkpoint, --skill and --task: give one or the other"
    if args.spec is None and any(a is None for a in checkpoint):
        return "give --spec FILE.py[:function] (any model) or --checkpoint, --skill and --task"
    if not 0 <= args.seed < SEED_LIMIT:
        return f"--seed must be an integer in [0, 2**63), got {args.seed}"
    problem = _out_problem(args.out)
    if problem is not None:
        return f"--out {args.out}: {problem}"
    return None


def _out_problem(out: Path, files: tuple[str, ...] | None = None) -> str | None:
    """Why the reports cannot be written into ``out`` (created if missing), or None.

    Creates nothing: the nearest existing ancestor must be a writable directory, and
    none of ``files`` (default: a diagnosis' report files) a directory there.
    """
    if os.path.lexists(out) and not out.is_dir():  # a file, or a link to nothing
        return "exists and is not a directory"
    target = out
    while not os.path.lexists(target) and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return f"cannot be created: {target} is not a directory"
    if not os.access(target, os.W_OK | os.X_OK):
        return "is not writable" if target == out else f"cannot be created in {target}"
    if files is None:
        from geomcollapse.diagnosis import REPORT_FILES

        files = REPORT_FILES
    for name in files:
        if (out / name).is_dir():
            return f"{name} there is a directory"
    return None


def _diagnose(args: argparse.Namespace) -> int:
    from geomcollapse import token_files

    problem = _diagnose_args_problem(args)
    if problem is not None:
        print(f"geomcollapse diagnose: error: {problem}", file=sys.stderr)
        return 2
    options = {
        "key": jax.random.key(args.seed),
        "d": args.d,
        "lr": args.lr,
        "steps": args.steps,
        "threshold": args.threshold,
        "order": args.order,
        "progress": not args.no_progress,
    }
    try:
        if args.spec is not None:
            from geomcollapse import model_spec

            diagnosis = model_spec.diagnose_spec(model_spec.load_spec(args.spec), **options)
        else:
            diagnosis = token_files.diagnose_checkpoint(
                args.checkpoint, args.skill, args.task, **options
            )
    except (ValueError, OSError) as err:  # malformed input: one line naming the file, no trace
        message = " ".join(str(err).split())
        print(f"geomcollapse diagnose: error: {message}", file=sys.stderr)
        return 2
    try:
        paths = diagnosis.save(args.out, arrays=args.arrays)
    except OSError as err:  # checked above, but the file system can still refuse (disk full)
        message = " ".join(str(err).split())
        print(f"geomcollapse diagnose: error: --out {args.out}: {message}", file=sys.stderr)
        return 2
    for warning in diagnosis.warnings:
        print(f"warning: {warning}")
    for path in paths:
        print(path)
    return 0


def _registered(name: str, args: argparse.Namespace) -> int:
    """Hand the parsed command line to the command the experiments registered as ``name``."""
    run = command(name)
    if run is None:
        print(
            f"geomcollapse {name}: error: no experiments are registered "
            "(install geomcollapse from its repository: pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return run(args)


def _parser() -> argparse.ArgumentParser:
    from geomcollapse import __version__

    parser = argparse.ArgumentParser(prog="geomcollapse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"geomcollapse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sweep(commands)
    _add_report(commands)
    _add_diagnose(commands)
    _add_experiment_commands(commands)
    return parser


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run or resume a parameter sweep (of quadratic landscapes, or of an "
        "experiment's config)",
    )
    sweep.add_argument("config", help="sweep config (.json, or .toml on Python ≥ 3.11)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    many = sweep.add_argument_group(
        "several processes",
        "run the same command in every process: each computes its share of the cells "
        "(batches) into its own part file, and process 0 merges the parts into the output; "
        "after a kill, restart every process (see docs/sweeps.md)",
    )
    many.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() from the cluster's environment (Slurm, MPI, TPU)",
    )
    many.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    many.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    many.add_argument("--process-id", type=int, metavar="I", help="this process, 0 ≤ I < N")


def _add_report(commands) -> None:
    report = commands.add_parser(
        "report",
        help="a sweep's tables and figures, from its rows (any sweep: --x AXIS --y COLUMN)",
        description="with --x and --y: COLUMN against the grid axis AXIS, one series per "
        "value of the other varying axes, seeds aggregated (mean and 95% interval); "
        "without: an experiment sweep's report(rows, outdir), or a landscape sweep's Δu(t) "
        "curves and AIC table. Prints the paths written (docs/sweeps.md)",
    )
    report.add_argument("--x", metavar="AXIS", help="a grid axis, e.g. kappa")
    report.add_argument(
        "--y", metavar="COLUMN", help="a recorded column, dotted, e.g. aic.coupling"
    )
    report.add_argument("output", type=Path, metavar="SWEEP_OUTPUT", help="the sweep's JSONL")
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write (default: the working directory)",
    )


def _add_diagnose(commands) -> None:
    diagnose = commands.add_parser(
        "diagnose",
        help="diagnose a model (--spec) or a transformer checkpoint for a skill and a "
        "fine-tuning task: AIC, spectrum, forecast of Δu, overlap, warnings",
        description="writes report.json, report.md and report.png (the spec contract and the "
        "token-file formats: docs/diagnose.md)",
    )
    diagnose.add_argument(
        "--spec",
        metavar="FILE.py[:FUNCTION]",
        help="any model: a Python file (or package.module) whose FUNCTION (default: spec) "
        "returns skill_loss, task_loss, params and the data (docs/diagnose.md)",
    )
    diagnose.add_argument("--checkpoint", type=Path, metavar="DIR", help="a transformer checkpoint")
    diagnose.add_argument(
        "--skill",
        type=Path,
        metavar="FILE",
        help="skill prompts (.npy, .npz or .jsonl token ids)",
    )
    diagnose.add_argument(
        "--task",
        type=Path,
        metavar="FILE",
        help="fine-tuning sequences (.npy, .npz or .jsonl token ids)",
    )
    diagnose.add_argument(
        "--d", type=int, default=None, help="dim M (default: the 90%%-of-tr F rule)"
    )
    diagnose.add_argument("--lr", type=float, default=None, help="SGD learning rate (t = lr·k)")
    diagnose.add_argument("--steps", type=int, default=None, metavar="K", help="planned steps")
    diagnose.add_argument(
        "--threshold", type=float, default=None, help="Δu level whose crossing step is forecast"
    )
    diagnose.add_argument(
        "--order", type=int, default=4, help="forecast order K (raise it for a longer window)"
    )
    diagnose.add_argument("--seed", type=int, default=0, help="random seed (Lanczos, probes)")
    diagnose.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="output directory (default: .)"
    )
    diagnose.add_argument(
        "--arrays",
        action="store_true",
        help="also write subspace.npz (M(θ*) and the forecast's x_1..x_K, (d + K) × n floats), "
        "so Diagnosis.load(DIR) can hand the report to monitor()",
    )
    diagnose.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_experiment_commands(commands) -> None:
    """``reproduce`` and ``run``: the experiments' shared flags, added here by hand so that
    ``--help`` works without importing the experiments."""
    for name, help_text, epilog in (
        (
            "reproduce",
            "run every experiment and regenerate paper_repro.md",
            "writes OUTDIR/paper_repro.md (paper_repro_full.md with --full), "
            "OUTDIR/figures/ and OUTDIR/experiments/results/. " + runtime_help(),
        ),
        (
            "run",
            "run one experiment",
            "writes OUTDIR/figures/EXPERIMENT.png (+ .pdf) and "
            "OUTDIR/experiments/results/EXPERIMENT.json (EXPERIMENT_small.* for --full "
            "transformer runs). " + runtime_help(),
        ),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        if name == "run":
            sub.add_argument("experiment", choices=EXPERIMENTS, help="the experiment to run")
            sub.add_argument(
                "--tasks", help="transformer experiments: comma-separated benign tasks"
            )
        else:
            sub.add_argument(
                "--jobs", type=positive_count, default=None, help=JOBS_HELP, metavar="N"
            )
        size = sub.add_mutually_exclusive_group()
        size.add_argument("--quick", action="store_true", help="the CPU configuration (default)")
        size.add_argument("--full", action="store_true", help="the long configuration")
        sub.add_argument(
            "--outdir",
            type=Path,
            default=None,
            help="output root (default: the repository root of this checkout, else the "
            "working directory)",
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geomcollapse`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run" and args.tasks and args.experiment not in TRANSFORMER:
        print(
            "geomcollapse run: error: --tasks applies to the transformer experiments",
            file=sys.stderr,
        )
        return 2
    jax.config.update("jax_enable_x64", True)  # theory numbers are float64 (docs/theory.md §5)
    compilation_cache.enable()  # before any compilation: a second run loads programs from disk
    commands = {"sweep": _sweep, "report": _report, "diagnose": _diagnose}
    if args.command in commands:
        return commands[args.command](args)
    if args.outdir is not None:  # run, reproduce: refused before the experiment, not after
        try:
            writable_directory(args.outdir, "--outdir")
        except ValueError as err:
            print(f"geomcollapse {args.command}: error: {err}", file=sys.stderr)
            return 2
    return _registered(args.command, args)  # run, reproduce: the experiments' own


if __name__ == "__main__":
    sys.exit(main())
