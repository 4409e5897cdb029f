"""Sweeps over any experiment's frozen ``Config``: one cell per grid point, resumable.

The public entry points are in :mod:`geomcollapse.sweep`, which sends a config
with an ``"experiment"`` key here. An experiment module (a bare name ``X`` is
the module registered as experiment ``X``, :mod:`geomcollapse.registry`; a
dotted name is imported as written) defines

- ``Config``: a frozen dataclass whose defaults are a complete configuration;
- ``sweep_cell(config, outdir: Path) -> list[dict]``: the JSON rows of one cell;
- optionally ``sweep_cells(configs: list, outdir: Path) -> list[list[dict]]``:
  the rows of several cells whose configs differ only in ``seed``, computed
  together (e.g. the seeds vmapped in one compiled call), in the order given;
- optionally ``report(rows: list[dict], outdir: Path) -> list[Path]``: the
  tables and figures rebuilt from a sweep's rows, and the paths written;
- optionally ``check_config(config) -> None``: raises ``ValueError`` for a
  config it cannot run; every cell is checked before the sweep writes anything.

``base`` and every grid value set fields of ``Config()`` through
``dataclasses.replace`` (``base`` first, then the cell's grid values): a dict
given for a dataclass-valued field replaces inside it, and a JSON list given
for a tuple-typed field becomes a tuple. Cells are the grid's cartesian product
in the config's key order; cell ``i`` has the id ``"i-<hash>"``, the hash of its
resolved field values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from geomcollapse import registry
from geomcollapse._sweep_io import (
    append,
    barrier,
    header_of,
    locked_output,
    merge_parts,
    part_paths,
    processes,
    reject_non_finite,
    reject_unknown,
    whole_lines,
)
from geomcollapse._sweep_report import columns_table, sweep_name
from geomcollapse.progress import progress_bar

TOP_KEYS = {"experiment", "output", "base", "grid", "name"}
FORMAT_VERSION = 1
# what the sweep adds to each of an experiment's rows
CELL_KEYS = ("cell", "cell_id", "cell_rows", "params")


@dataclasses.dataclass(frozen=True)
class ExperimentSweepConfig:
    """A validated experiment sweep: where to write, the experiment, its base and grid."""

    output: Path
    experiment: str  # as written in the config
    module: str  # the module it names
    base: dict[str, Any]
    grid: dict[str, tuple]  # Config field → values, in the config's key order
    name: str
    digest: str  # sha256 of the canonical (module, base, grid): a resumed file must match it


class Cell(NamedTuple):
    """One grid point: its position, stable id, grid values and resolved ``Config``."""

    index: int
    id: str
    params: dict[str, Any]
    config: Any


def module_name(experiment: str) -> str:
    """The module an ``experiment`` names: ``X`` the one registered as ``X``, a dotted name itself.

    Raises ``ValueError`` for a bare name that no package registered.
    """
    return experiment if "." in experiment else registry.experiment_module(experiment)


def import_experiment(experiment: str) -> types.ModuleType:
    """Import the module ``experiment`` names; ``ValueError`` if there is none."""
    name = module_name(experiment)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        # only the named module (or a package above it) missing is the config's fault;
        # a dependency missing inside it is a broken install and keeps its traceback
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise ValueError(f"unknown experiment {experiment!r}: no module {name!r}") from None
        raise


def _sweepable(experiment: str) -> types.ModuleType:
    module = import_experiment(experiment)
    config_cls = getattr(module, "Config", None)
    if not (
        isinstance(config_cls, type)
        and dataclasses.is_dataclass(config_cls)
        and config_cls.__dataclass_params__.frozen
    ):
        raise ValueError(
            f"experiment {experiment!r} ({module.__name__}) defines no frozen dataclass Config"
        )
    if not callable(getattr(module, "sweep_cell", None)):
        raise ValueError(
            f"experiment {experiment!r} ({module.__name__}) defines no "
            "sweep_cell(config, outdir): it cannot be swept"
        )
    return module


def _coerce(value: Any, hint: Any, current: Any) -> Any:
    """A JSON value as the field's type wants it: lists → tuples, ints → floats (NumPy
    scalars, from a config built in Python, as the Python numbers they hold)."""
    if isinstance(value, np.generic):
        value = value.item()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(value) in args:
            return value
        for arg in args:  # the first member the value fits, e.g. tuple in `tuple[...] | None`
            if (arg is float and isinstance(value, int | float)) or (
                isinstance(value, list) and (arg is tuple or typing.get_origin(arg) is tuple)
            ):
                return _coerce(value, arg, current)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list) and (hint is tuple or origin is tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], None) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(v, a, None) for v, a in zip(value, args, strict=True))
        return _as_tuple(value)
    if isinstance(value, list) and isinstance(current, tuple):  # no usable annotation
        return _as_tuple(value)
    return value


_SCALARS = (bool, int, float, str)


def _scalar_members(hint: Any) -> tuple | None:
    """The members of a scalar field's annotation (``int``, ``float``, ``str``, ``bool``, or
    a union of them and ``None``); ``None`` for any other (tuples, dataclasses, none)."""
    members = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    if not members or not all(m in _SCALARS or m is type(None) for m in members):
        return None
    return members


def _fits(value: Any, hint: Any, default: Any) -> bool:
    """Whether ``value`` is of a scalar field's type: a bool is no int, ``21.5`` no int,
    ``"0.1"`` no float; ``None`` fits a field whose default is ``None``."""
    members = _scalar_members(hint)
    if members is None or (value is None and default is None):
        return True
    return type(value) in members


def _type_name(hint: Any) -> str:
    """``int``, ``float | None``: a scalar annotation as it is written."""
    members = _scalar_members(hint) or (hint,)
    return " | ".join(
        "None" if m is type(None) else getattr(m, "__name__", str(m)) for m in members
    )


def _as_tuple(values: list) -> tuple:
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in values)


def _with_fields(instance: Any, values: dict, where: str, experiment: str, path: str = "") -> Any:
    """``dataclasses.replace(instance, **values)`` with JSON values made the fields' types.

    Dicts replace inside dataclass fields, lists become tuples in tuple fields and
    ints floats in float fields (so ``1`` and ``1.0`` make the same cell). An
    unknown key raises ``ValueError`` naming it, the experiment and the fields.
    """
    fields = [f.name for f in dataclasses.fields(instance) if f.init]
    try:
        hints = typing.get_type_hints(type(instance))
    except Exception:  # an annotation naming what its module does not import at run time
        hints = {}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(
                f"unknown field {path + key!r} in {where} of experiment {experiment!r}: "
                f"{type(instance).__name__} has fields {fields}"
            )
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _with_fields(current, value, where, experiment, f"{path}{key}.")
        else:
            value = _coerce(value, hints.get(key), current)
            if not _fits(value, hints.get(key), current):
                raise ValueError(
                    f"{path + key} = {value!r} in {where} of experiment {experiment!r}: "
                    f"the field takes {_type_name(hints[key])}"
                )
        changes[key] = value
    return dataclasses.replace(instance, **changes)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


OMIT_AT_DEFAULT = "omit_at_default"  # a Config field's metadata["cell_id"] (cell_fields)


def cell_fields(config: Any) -> dict:
    """The fields a cell's id hashes: ``dataclasses.asdict(config)`` less the fields marked
    ``metadata={"cell_id": "omit_at_default"}`` that hold their default.

    A field added to an experiment's ``Config`` later, with a default that keeps the
    old behaviour, is marked so: the cells of sweeps written before it keep their ids
    and those files still resume (and are still refused if the field is set).
    """
    out = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        marked = field.metadata.get("cell_id") == OMIT_AT_DEFAULT
        if marked and getattr(config, field.name) == field.default:
            del out[field.name]
    return out


def parse_config(raw: dict, base_dir: Path = Path()) -> ExperimentSweepConfig:
    """Validate an experiment sweep config; imports the experiment to check its fields."""
    reject_non_finite(raw, "")
    reject_unknown(raw, TOP_KEYS, "the experiment sweep config")
    for key in ("experiment", "output", "grid"):
        if key not in raw:
            raise ValueError(f"the experiment sweep config needs {key!r}")
    experiment = raw["experiment"]
    if not isinstance(experiment, str) or not all(
        part.isidentifier() for part in experiment.split(".")
    ):
        raise ValueError(f"experiment must be a module name, got {experiment!r}")
    if not isinstance(raw["output"], str) or not raw["output"]:
        raise ValueError(f"output must name a file, got {raw['output']!r}")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise ValueError("base must be a mapping of Config field to value")
    grid = raw["grid"]
    if not isinstance(grid, dict):
        raise ValueError("grid must be a mapping of Config field to a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list, got {values!r}")
    module = module_name(experiment)
    canonical = _canonical(
        {"module": module, "base": base, "grid": [[k, v] for k, v in grid.items()]}
    )
    config = ExperimentSweepConfig(
        output=(base_dir / raw["output"]).resolve(),
        experiment=experiment,
        module=module,
        base=base,
        grid={k: tuple(v) for k, v in grid.items()},
        name=sweep_name(raw.get("name", Path(raw["output"]).stem), "name"),
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
    )
    expand_cells(config)  # unknown experiment or field: refused now, not mid-sweep
    return config


def expand_cells(config: ExperimentSweepConfig) -> list[Cell]:
    """The grid's cartesian product in the config's key order, each with its resolved Config.

    Every cell is resolved, and checked by the experiment's ``check_config(config)``
    where it defines one, so a sweep refuses a bad cell before it writes anything:
    ``ValueError`` naming the cell (its index and grid values).
    """
    module = _sweepable(config.experiment)
    base = _with_fields(module.Config(), config.base, "base", config.experiment)
    keys = list(config.grid)
    fixed = sorted(set(keys) & set(getattr(module, "SWEEP_FIXED", ())))
    if fixed:  # e.g. spec_sweep's model: rows of two would be one sweep's seeds
        raise ValueError(
            f"grid[{fixed[0]!r}]: {config.experiment} cannot vary {fixed[0]!r} within one "
            f"sweep (its SWEEP_FIXED); set it in base and run one sweep per value"
        )
    cells, seen = [], {}
    check = getattr(module, "check_config", None)
    for index, values in enumerate(itertools.product(*(config.grid[k] for k in keys))):
        params = dict(zip(keys, values, strict=True))
        try:
            resolved = _with_fields(base, params, "grid", config.experiment)
            if callable(check):
                check(resolved)
        except (ValueError, TypeError) as err:
            raise ValueError(f"grid cell {index} {params}: {err}") from None
        digest = hashlib.sha256(_canonical(cell_fields(resolved)).encode()).hexdigest()
        if digest in seen:  # one run counted as two samples: `seed: [0, 0]`, `1` and `1.0`
            raise ValueError(
                f"grid cells {seen[digest]} and {index} {params} resolve to the same Config: "
                "each grid value must be distinct (a repeated value or seed would run one "
                "cell twice and count it as two samples)"
            )
        seen[digest] = index
        cells.append(Cell(index, f"{index}-{digest[:10]}", params, resolved))
    return cells


def _header(config: ExperimentSweepConfig, cells: int) -> str:
    return json.dumps(
        {
            "sweep": config.name,
            "format": FORMAT_VERSION,
            "experiment": config.experiment,
            "module": config.module,
            "base": config.base,
            "grid": {k: list(v) for k, v in config.grid.items()},
            "cells": cells,
            "config_sha256": config.digest,
        }
    )


def _parse_header(path: Path, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not a sweep output (its first line is not JSON)") from None


def _parse_rows(path: Path, lines: list[str]) -> dict[int, list[tuple[str, dict]]]:
    """Per cell, the ``(line, row)`` pairs of ``lines`` (the rows after the header)."""
    by_cell: dict[int, list[tuple[str, dict]]] = {}
    for number, line in enumerate(lines, start=2):
        try:
            row = json.loads(line)
            cell, _, count = row["cell"], row["cell_id"], row["cell_rows"]
            if not isinstance(cell, int) or not isinstance(count, int):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{path} line {number} is not an experiment sweep row; move the file away"
            ) from None
        by_cell.setdefault(cell, []).append((line, row))
    return by_cell


def _complete(by_cell: dict[int, list[tuple[str, dict]]]) -> list[int]:
    """Cells holding exactly the rows they announce, in cell order."""
    return sorted(c for c, rows in by_cell.items() if len(rows) == rows[0][1]["cell_rows"])


def _read_groups(
    path: Path, config: ExperimentSweepConfig, cells: list[Cell]
) -> tuple[str | None, dict[int, list[str]]]:
    """The header line of ``path`` and the lines of its complete cells, by cell index.

    ``(None, {})`` for a missing or empty file. Raises ``ValueError`` if the
    file is another config's sweep, or holds a complete cell whose id is not
    the one this config gives that cell (the experiment's ``Config`` defaults
    changed since it was written).
    """
    if not path.exists():
        return None, {}
    lines = whole_lines(path.read_text())
    if not lines:
        return None, {}
    if header_of(path, lines, config.digest) is None:  # another config's header alone
        return None, {}
    by_cell = _parse_rows(path, lines[1:])
    done = _complete(by_cell)
    for c in done:
        written = by_cell[c][0][1]["cell_id"]
        planned = cells[c].id if 0 <= c < len(cells) else None
        if written != planned:
            raise ValueError(
                f"{path} cell {c} has id {written!r}, but this config's cell {c} is {planned!r} "
                f"(did {config.module}.Config's defaults change?); move the file away"
            )
    return lines[0], {c: [line for line, _ in by_cell[c]] for c in done}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _cell_lines(cell: Cell, rows: Any, config: ExperimentSweepConfig) -> list[str]:
    where = f"{config.module}.sweep_cell for cell {cell.index}"
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where} returned {rows!r:.80}, not a non-empty list of dicts")
    meta = {"cell": cell.index, "cell_id": cell.id, "cell_rows": len(rows), "params": cell.params}
    lines = []
    for row in rows:
        clash = sorted(set(CELL_KEYS) & set(row))
        if clash:
            raise ValueError(f"{where} returned rows with the sweep's own keys {clash}")
        try:
            lines.append(json.dumps({**meta, **row}, allow_nan=True, default=_json_default))
        except TypeError as err:
            raise ValueError(f"{where} returned a row that is not JSON: {err}") from None
    return lines


def _seed_groups(cells: list[Cell]) -> list[list[Cell]]:
    """Cells whose configs differ only in ``seed``, grouped in first-seen order."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        fields = dataclasses.asdict(cell.config)
        if "seed" in fields:
            fields.pop("seed")
            key = _canonical(fields)
        else:
            key = cell.id
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def run_sweep(
    config: ExperimentSweepConfig,
    *,
    progress: bool = True,
    outdir: Path | None = None,
    batch_seeds: bool | None = None,
) -> Path:
    """Run (or resume) an experiment sweep; return the JSONL path (see ``sweep.run_sweep``)."""
    module = _sweepable(config.experiment)
    cells = expand_cells(config)
    outdir = Path.cwd() if outdir is None else Path(outdir)
    path = config.output
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; 'output' must name a file")
    process, count = processes()
    header = _header(config, len(cells))

    def read(p: Path) -> tuple[str | None, dict[int, list[str]]]:
        return _read_groups(p, config, cells)

    if batch_seeds is None:
        batch_seeds = jax.default_backend() != "cpu"
    with locked_output(path, header, read, process, count) as (target, done):
        todo = [c for c in cells if c.index not in done and c.index % count == process]
        if batch_seeds and callable(getattr(module, "sweep_cells", None)):
            groups = _seed_groups(todo)
        else:
            groups = [[cell] for cell in todo]
        agreed = _invariants(module, list(dict.fromkeys((path, target))), read)
        _compute_cells(module, config, groups, target, outdir, progress, agreed)
        barrier("geomcollapse-sweep-computed")
        if process == 0:
            _check_agreed_parts(module, path, read)
            merge_parts(path, header, read)
        barrier("geomcollapse-sweep-merged")
    return path


def _invariants(module: types.ModuleType, paths: list[Path], read: Callable) -> dict[str, set]:
    """Per field of the module's ``SWEEP_INVARIANTS``, the values that the rows of the
    complete cells in ``paths`` (read by ``read``) record (``None`` where a row records
    none): fields every row of one sweep must agree on, e.g. the digest of the model
    the rows were computed at. A module without invariants reads nothing: ``{}``."""
    fields = getattr(module, "SWEEP_INVARIANTS", ())
    if not fields:
        return {}
    cells = [read(p)[1] for p in paths]
    rows = [json.loads(line) for groups in cells for lines in groups.values() for line in lines]
    return {f: {row.get(f) for row in rows} for f in fields}


def _named(values: set) -> str:
    return ", ".join(sorted("not recorded" if v is None else str(v) for v in values))


def _check_agreed(agreed: dict[str, set], rows: list[dict], where: str, target: Path) -> None:
    """Refuse ``rows`` when they record another value of an invariant field than the
    rows before them (already in the output, or computed earlier in this run)."""
    for field, seen in agreed.items():
        new = {row.get(field) for row in rows}
        if (seen and new != seen) or len(new) > 1:
            raise ValueError(
                f"{where} returned rows with {field} = {_named(new)}, but the rows before"
                f" them in {target} record {_named(seen) or 'nothing'}: the rows of one sweep"
                f" must agree on {field}; move the output away (or restore what the rows"
                " were computed with)"
            )
        seen |= new


def _check_agreed_parts(module: types.ModuleType, path: Path, read: Callable) -> None:
    """Before the part files of several processes are merged into ``path``: refuse
    parts whose rows disagree on a ``SWEEP_INVARIANTS`` field (nothing is merged)."""
    parts = part_paths(path)
    agreed = _invariants(module, [path, *parts], read) if parts else {}
    for field, seen in agreed.items():
        if len(seen) > 1:
            raise ValueError(
                f"the rows of {path} and its part files record {field} = {_named(seen)}:"
                f" the rows of one sweep must agree on {field}, so they are not merged;"
                " move the output and its parts away"
            )


def _group_results(
    module: types.ModuleType, config: ExperimentSweepConfig, group: list[Cell], outdir: Path
) -> Any:
    """The experiment's rows for a group of cells, one row list per cell (checked for a
    batched ``sweep_cells``); a ``ValueError`` it raises (a value that only fails when
    computed) names the cells and their grid values."""
    try:
        if len(group) == 1:
            return [module.sweep_cell(group[0].config, outdir)]
        results = module.sweep_cells([cell.config for cell in group], outdir)
    except ValueError as err:
        cells = "; ".join(f"cell {c.index} {json.dumps(c.params)}" for c in group)
        raise ValueError(f"{config.module} failed on {cells}: {err}") from err
    if not isinstance(results, list) or len(results) != len(group):
        raise ValueError(
            f"{config.module}.sweep_cells returned {type(results).__name__} "
            f"for {len(group)} configs, not a list of {len(group)} row lists"
        )
    return results


def _compute_cells(
    module: types.ModuleType,
    config: ExperimentSweepConfig,
    groups: list[list[Cell]],
    target: Path,
    outdir: Path,
    progress: bool,
    agreed: dict[str, set],
) -> None:
    """Run each group of cells and append its rows to ``target`` in one write, after
    checking them against ``agreed`` (:func:`_invariants`)."""
    todo = sum(len(group) for group in groups)
    with progress_bar(total=todo, desc=f"sweep {config.name}", enabled=progress) as bar:
        for group in groups:
            results = _group_results(module, config, group, outdir)
            lines = [
                line
                for cell, rows in zip(group, results, strict=True)
                for line in _cell_lines(cell, rows, config)
            ]
            where = f"{config.module} for cell {', '.join(str(c.index) for c in group)}"
            _check_agreed(agreed, [json.loads(line) for line in lines], where, target)
            try:
                append(target, lines)  # a group's cells in one write
            except OSError as err:
                raise ValueError(
                    f"cannot write the sweep output {target} ('output'): {err}"
                ) from None
            bar.update(len(group))


def read_rows(path: Path, text: str) -> tuple[dict, list[dict]]:
    """The header and the rows of complete cells of ``text`` (``path``'s), sorted by cell.

    A partial last line and the rows of an incomplete cell (a killed sweep's)
    are left out; the rows of one cell keep their order. A cell holding more rows
    than it announces (a line written twice: no killed run leaves one) raises
    ``ValueError``; a resumed sweep rewrites the file without it.
    """
    lines = whole_lines(text)
    by_cell = _parse_rows(path, lines[1:])
    for c, rows in sorted(by_cell.items()):
        if len(rows) > rows[0][1]["cell_rows"]:
            raise ValueError(
                f"{path} holds {len(rows)} rows of cell {c}, which announces"
                f" {rows[0][1]['cell_rows']}: a row is there twice (the file was edited or"
                " copied into); resume the sweep to rewrite it, or move it away"
            )
    return _parse_header(path, lines[0]), [row for c in _complete(by_cell) for _, row in by_cell[c]]


def report(header: dict, rows: list[dict], path: Path, outdir: Path) -> list[Path]:
    """Call the experiment's ``report(rows, outdir)`` on a sweep's rows, or, where it
    defines none, write :func:`~geomcollapse._sweep_report.columns_table`; the paths written."""
    module = import_experiment(header["experiment"])
    if not rows:
        raise ValueError(f"{path} holds no complete cell yet: run the sweep first")
    build = getattr(module, "report", None)
    if not callable(build):  # every number column, per grid combination
        return [columns_table(header, rows, outdir)]
    return [Path(p) for p in build(rows, outdir)]
