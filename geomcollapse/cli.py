"""The ``geomcollapse`` command line: ``geomcollapse sweep CONFIG``."""

from __future__ import annotations

import argparse
import sys

import jax


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geomcollapse`` console script."""
    parser = argparse.ArgumentParser(prog="geomcollapse", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser(
        "sweep", help="run or resume a parameter sweep over quadratic landscapes"
    )
    sweep.add_argument("config", help="sweep config (.json, or .toml on Python ≥ 3.11)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # theory numbers are float64 (docs/theory.md §5)
    from geomcollapse import sweep as sweep_module

    try:
        config = sweep_module.load_config(args.config)
        path = sweep_module.run_sweep(config, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad config or file-system error: a message, no trace
        print(f"geomcollapse sweep: error: {err}", file=sys.stderr)
        return 2
    _, rows = sweep_module.read_rows(path)
    print(f"{len(rows)} rows in {path} ({len(jax.devices())} device(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
