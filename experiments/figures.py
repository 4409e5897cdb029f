"""Redraw every figure from its results file, without recomputing anything.

For each ``experiments/results/<name>.json`` (and the ``<name>_small.json`` of
the GPU-sized ``--full`` runs) call that experiment's ``figure(results, path)``,
which writes ``figures/<name>.png`` and ``figures/<name>.pdf``. A results file
that lacks what its figure reads (``FIGURE_NEEDS``; older files, written before
the figure needed it) is reported and skipped: rerun that experiment.

Run: ``python -m experiments.figures [--results DIR] [--figures DIR] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments import reproduce
from experiments._common import GPU_SIZES, ROOT, TAGS

MODULES = {module.NAME: module for module in reproduce.EXPERIMENTS}


def module_for(stem: str):
    """The experiment module of results file ``<stem>.json``.

    ``<name>``, ``<name>_<size>`` or either with ``_<tag>`` (a config's ``tag``,
    one of ``TAGS``); ``None`` for any other stem.
    """
    bases = [stem] + [stem[: -len(t) - 1] for t in TAGS if stem.endswith(f"_{t}")]
    for base in bases:
        if base in MODULES:
            return MODULES[base]
        name, _, size = base.rpartition("_")
        if size in GPU_SIZES and name in MODULES:
            return MODULES[name]
    return None


def missing(module, results: dict) -> list[str]:
    """The keys ``module.figure`` reads that ``results`` lacks."""
    return [key for key in ("config", *module.FIGURE_NEEDS) if key not in results]


def redraw(results_dir: Path, figures_dir: Path, names: tuple[str, ...] = ()) -> dict:
    """Redraw the figure of every results file in ``results_dir``; ``{stem: paths or missing}``.

    Each value is the list of written files, or ``{"missing": [keys]}`` where
    the results file lacks data its figure needs.
    """
    report = {}
    for path in sorted(results_dir.glob("*.json")):
        module = module_for(path.stem)
        if module is None or (names and path.stem not in names):
            continue
        results = json.loads(path.read_text())
        lacking = missing(module, results)
        if lacking:
            report[path.stem] = {"missing": lacking}
            continue
        written = module.figure(results, figures_dir / f"{path.stem}.png")
        report[path.stem] = [str(p) for p in written]
    return report


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, redraw, print one line per results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="results stems to redraw (default: all)")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    args = parser.parse_args(argv)
    report = redraw(args.results, args.figures, tuple(args.names))
    for stem, out in report.items():
        if isinstance(out, dict):
            print(f"{stem}: SKIPPED, results lack {', '.join(out['missing'])} (rerun it)")
        else:
            print(f"{stem}: {', '.join(out)}")
    return report


if __name__ == "__main__":
    main()
