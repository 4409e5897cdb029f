"""What registers itself with the library: experiments for the sweep runner, commands for the CLI.

The library never imports an experiment; experiments register themselves. A
package lists, in its ``pyproject.toml``:

- ``[project.entry-points."geomcollapse.experiments"]``: ``name = "package.module"``,
  the modules that ``geomcollapse sweep`` (a config's ``"experiment": "name"``)
  and ``geomcollapse report`` resolve by name;
- ``[project.entry-points."geomcollapse.commands"]``: ``run`` and ``reproduce``
  as ``"package.module:function"``, each ``function(args) -> exit status`` of
  the parsed command line (:mod:`geomcollapse.cli` parses it and hands it over).

This repository registers its ``experiments`` package so. The entries come
from :func:`importlib.metadata.entry_points` (installed packages) and from the
``pyproject.toml`` beside the library, if any: a checkout run without installing
(``PYTHONPATH=.``), or installed before an entry was added, still finds them.

It also holds what ``--help`` says about the main job's experiments (their
names, in the main job's order, and their ``--quick`` run time), so that the CLI
and the experiments share it without importing each other.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = [
    "COMMAND_GROUP",
    "EXPERIMENTS",
    "EXPERIMENT_GROUP",
    "QUICK_MAIN_JOB_S",
    "QUICK_RUNTIME_S",
    "TRANSFORMER",
    "command",
    "experiment_module",
    "load_experiment",
    "registered",
    "runtime_help",
]

EXPERIMENT_GROUP = "geomcollapse.experiments"  # entry points: name -> module
COMMAND_GROUP = "geomcollapse.commands"  # entry points: CLI command -> function(args) -> int

# Wall time of each experiment's --quick configuration in the main job on the
# 2-core CPU with warm caches (θ* restored from its checkpoint, XLA programs from the
# compilation cache), from the stage lines of `make reproduce` at 187d34d, when it ran the
# experiments one after another in one process (transformer_onset: 120 s at 3a5f0a6, where
# it reads Thm 6.1's C and D from experiments/results/at_theta instead of searching them);
# the main job also orders its parallel schedule by them.
QUICK_RUNTIME_S = {
    "spectrum_mlp": 28,
    "quartic_quadratic": 5,
    "crossover": 4,
    "aic_phase": 5,
    "logistic_onset": 15,
    "gd_vs_flow": 3,
    "transformer_finetune": 40,
    "transformer_fisher": 61,
    "transformer_onset": 120,
    "prediction": 64,
    "defences": 119,
    "validation": 1,
    "early_warning": 8,
    "sgd_onset": 39,
}
EXPERIMENTS = tuple(QUICK_RUNTIME_S)  # the main job's experiments, in its order
# the main job two experiments at a time on a fresh clone, with a cold XLA cache (492 s at
# eb8d50d, 500 s at c1436d6; 825 and 841 s before Thm 6.1's C, D and the predictors at θ*
# were committed)
QUICK_MAIN_JOB_S = 492
TRANSFORMER = frozenset({"transformer_finetune", "transformer_fisher", "transformer_onset"})


def runtime_help(name: str | None = None) -> str:
    """What ``--help`` says about run time (one experiment, or all of them)."""
    full = (
        "--full: the landscape experiments' long configurations are not timed; the "
        "1M-parameter transformer runs take 11-18 minutes each on that CPU (meant for a GPU)"
    )
    if name is None:
        quick = ", ".join(f"{k} {v} s" for k, v in QUICK_RUNTIME_S.items())
        total = sum(QUICK_RUNTIME_S.values())
        return (
            f"--quick on a 2-core CPU, each alone with warm caches: {quick} (about "
            f"{round(total / 60)} minutes one after another); the main job two at a time "
            f"(the default there) on a fresh clone: about {round(QUICK_MAIN_JOB_S / 60)} "
            f"minutes; {full}."
        )
    if name not in QUICK_RUNTIME_S:  # an experiment the main job does not run (yet)
        return f"--quick is not part of the main job and not timed here; {full}."
    return f"--quick takes about {QUICK_RUNTIME_S[name]} s on a 2-core CPU; {full}."


def _checkout_table(group: str) -> dict[str, str]:
    """``group``'s table in the ``pyproject.toml`` of the checkout holding the library, if any."""
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: only installed entry points
        return {}
    if not path.is_file():
        return {}
    project = tomllib.loads(path.read_text()).get("project", {})
    return dict(project.get("entry-points", {}).get(group, {}))


def registered(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """Every entry of the entry-point ``group`` by name: installed ones over the checkout's."""
    table = {
        name: importlib.metadata.EntryPoint(name=name, value=value, group=group)
        for name, value in _checkout_table(group).items()
    }
    return {**table, **{ep.name: ep for ep in importlib.metadata.entry_points(group=group)}}


def experiment_module(name: str) -> str:
    """The module registered as experiment ``name``; ``ValueError`` if none is."""
    entries = registered(EXPERIMENT_GROUP)
    if name not in entries:
        raise ValueError(
            f"unknown experiment {name!r}: not registered (registered: {sorted(entries)}; "
            f"name any other module with its dots, package.module)"
        )
    return entries[name].value


def load_experiment(name: str) -> ModuleType:
    """Import and return the module registered as experiment ``name`` (see above)."""
    return importlib.import_module(experiment_module(name))


def command(name: str) -> Callable[..., int] | None:
    """The function registered as CLI command ``name``, or None where none is."""
    entry = registered(COMMAND_GROUP).get(name)
    return None if entry is None else entry.load()
