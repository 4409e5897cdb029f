"""Tables and figures of any sweep's rows: a recorded column against a grid axis.

What ``geomcollapse report OUT --x AXIS --y COLUMN`` draws (and, for a
landscape sweep without ``--x``/``--y``, its ``Δu(t)`` curves). Rows are
grouped by the value of the grid axis ``x`` and by the other grid axes that
vary (one series each); the rows of a group (its seeds, and every row of an
experiment's cell) are aggregated into their mean and a 95 % interval of the
mean (Student's ``t``: ``mean ± t_{0.975, n−1} s/√n``; none for one row).
Non-finite values are left out of a group and its count ``n`` says so.

A plotting module: matplotlib is imported where a figure is drawn, never by
importing the library (:mod:`geomcollapse.diagnosis.plot` is the other one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from geomcollapse._checks import is_number


def sweep_name(value: Any, where: str) -> str:
    """A sweep's ``name``: the stem of its report files, so a plain non-empty file name
    (no directory part, not ``.``/``..``), else ``ValueError`` naming ``where``: a name
    with a path in it would write outside the report's ``--out``."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or value != Path(value).name  # a directory part ("/")
        or any(c in value for c in "\\\0")
    ):
        raise ValueError(f"{where} must be a plain file name (no directory part), got {value!r}")
    return value


# t_{0.975, ν} for ν = 1 … 30, beyond it the Cornish-Fisher expansion below: relative
# error < 3e-5 against scipy.stats.t.ppf for every ν (the table's 4 decimals included)
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
SEED = "seed"  # the grid axis always aggregated, never a series


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's ``t`` with ``dof ≥ 1`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"dof must be ≥ 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )


def mean_interval(values) -> tuple[Any, Any, Any, Any]:
    """``(mean, low, high, n)`` of the finite entries of ``values``, along axis 0.

    The interval is the mean's 95 % Student-t interval; for ``n = 1`` it is the
    value itself, for ``n = 0`` all three are NaN. For rows of several entries (a
    ``Δu(t)`` per row) each column counts its own finite entries, so a row that
    overflowed at a late time still counts at the early ones: then every output,
    ``n`` too, is an array over the columns.
    """
    v = np.asarray(values, np.float64)
    if v.ndim == 0 or len(v) == 0:
        raise ValueError(f"values must be a non-empty sequence, got shape {v.shape}")
    if v.ndim == 1:
        return _finite_interval(v[np.isfinite(v)])
    columns = [_finite_interval(c[np.isfinite(c)]) for c in v.reshape(len(v), -1).T]
    mean, low, high, n = (
        np.reshape(np.asarray(x), v.shape[1:]) for x in zip(*columns, strict=True)
    )
    return mean, low, high, n


def _finite_interval(c: np.ndarray) -> tuple[float, float, float, int]:
    """:func:`mean_interval` of one column's finite values ``c``; values near the float64
    limit are scaled by ``max|c|`` first (their squares would overflow to ``±inf``)."""
    n = c.size
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    with np.errstate(over="ignore"):
        mean, spread = c.mean(), (0.0 if n == 1 else c.std(ddof=1))
    if not (np.isfinite(mean) and np.isfinite(spread)):
        scale = float(np.max(np.abs(c)))
        mean, spread = (
            scale * (c / scale).mean(),
            scale * (0.0 if n == 1 else (c / scale).std(ddof=1)),
        )
    half = 0.0 if n == 1 else t975(n - 1) * spread / math.sqrt(n)
    return float(mean), float(mean - half), float(mean + half), n


def column(row: dict, path: str) -> float:
    """The number at the dotted ``path`` of ``row`` (``aic.coupling``; ``rows.0.measured``);
    NaN where the row records ``None`` there (the aggregates count only finite values); a
    verdict (``true``/``false``) as 1/0, so that its mean is the fraction that holds."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list)
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            if isinstance(value, dict):
                keys = sorted(value)
            elif isinstance(value, list):
                keys = f"a list of {len(value)}"
            else:
                keys = f"the number {value!r}"
            raise ValueError(
                f"--y {path!r}: the rows have no {part!r} there (found {keys}); name a "
                "recorded column with dots, e.g. aic.coupling, and list entries by index"
            )
    if value is None:  # recorded as "none" (e.g. spec_sweep's no crossing): not counted in n
        return math.nan
    if isinstance(value, dict | list):
        raise ValueError(
            f"--y {path!r} is a {type(value).__name__}, not a number; go further down with dots"
        )
    if isinstance(value, bool):  # a verdict: 1/0, so its mean is the fraction that holds
        return float(value)
    if not is_number(value):
        raise ValueError(f"--y {path!r} is {type(value).__name__} ({value!r}), not a number")
    return float(value)


class Series(NamedTuple):
    """One line of the figure: the other varying axes' values, and per ``x`` the aggregate."""

    label: str
    x: list
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def grouped(
    rows: list[dict], params_of: Callable[[dict], dict], leave_out=(), everything: str = ""
) -> dict[str, list[dict]]:
    """``rows`` grouped by the values of the grid axes that vary among them, ``seed`` and
    ``leave_out`` aside, in first-seen order; labelled ``"a=1, b=2"`` (``everything``
    when no axis varies)."""
    axes = list(params_of(rows[0]))
    varying = [
        a
        for a in axes
        if a not in (SEED, *leave_out) and len({_key(params_of(r).get(a)) for r in rows}) > 1
    ]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        p = params_of(row)
        label = ", ".join(f"{a}={p.get(a)}" for a in varying) or everything
        groups.setdefault(label, []).append(row)
    return groups


def aggregate(rows: list[dict], params_of: Callable[[dict], dict], x: str, y: str) -> list[Series]:
    """``y`` of ``rows`` against the grid axis ``x``, one series per value of the other
    varying axes (``seed`` always aggregated); ``ValueError`` naming a bad ``x`` or ``y``."""
    if not rows:
        raise ValueError("the sweep holds no complete row yet: run it first")
    axes = list(params_of(rows[0]))
    if x not in axes or x == SEED:
        choices = [a for a in axes if a != SEED]
        raise ValueError(f"--x {x!r} is not a grid axis of this sweep; its axes: {choices}")
    xs: dict[str, Any] = {}
    series = []
    for label, members in grouped(rows, params_of, leave_out=(x,)).items():
        by_x: dict[str, list[float]] = {}
        for row in members:
            p = params_of(row)
            if x not in p:
                raise ValueError(f"--x {x!r}: the row {_where(row)} records no value of it")
            xs.setdefault(_key(p[x]), p[x])
            by_x.setdefault(_key(p[x]), []).append(column(row, y))
        keys = sorted(by_x, key=lambda k: _sort_key(xs[k]))
        stats = [mean_interval(by_x[k]) for k in keys]
        mean, low, high, n = (np.array([s[i] for s in stats]) for i in range(4))
        series.append(Series(label, [xs[k] for k in keys], mean, low, high, n))
    return series


def _where(row: dict) -> str:
    return str(row.get("cell", row.get("id", "?")))


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if is_number(value) else (1, 0, _key(value))


def _numeric(values: list) -> bool:
    return all(is_number(v) for v in values)


def table(series: list[Series], x: str, y: str) -> str:
    """A Markdown table of the aggregate: series, ``x``, rows, mean and its interval (the
    count is headed ``rows``, never ``n``, which a grid axis may be called)."""
    lines = [
        f"| series | {x} | rows | mean {y} | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for s in series:
        for i, xv in enumerate(s.x):
            lines.append(
                f"| {s.label or '-'} | {xv} | {s.count[i]} | {s.mean[i]:.6g} | "
                f"[{s.low[i]:.6g}, {s.high[i]:.6g}] |"
            )
    return "\n".join(lines)


_ROW_KEYS = ("cell", "cell_id", "cell_rows", "params", "seed")  # the runner's, not recorded


def scalar_columns(row: dict, prefix: str = "") -> list[str]:
    """The dotted paths of every number and verdict (true/false, read as 1/0) in ``row``
    outside lists (what ``--y`` can name)."""
    out = []
    for key, value in row.items():
        if not prefix and key in _ROW_KEYS:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += scalar_columns(value, f"{path}.")
        elif is_number(value) or isinstance(value, bool):
            out.append(path)
    return out


def incomplete(header: dict, rows: list[dict]) -> str:
    """``"incomplete: k of N cells"`` (``runs`` for a landscape sweep) when the header
    announces more than ``rows`` complete, else ``""`` (complete, or a header that
    announces no count: landscape sweeps written before it did)."""
    if "cells" in header:
        done, total, unit = len({row["cell"] for row in rows}), header["cells"], "cells"
    elif "runs" in header:
        done, total, unit = len(rows), header["runs"], "runs"
    else:
        return ""
    return f"incomplete: {done} of {total} {unit}" if done < total else ""


def unfinished(note: str) -> str:
    """The Markdown line a report of an unfinished sweep opens with (``""`` for none)."""
    return f"**{note}**: the sweep has not finished; this is what is there.\n\n" if note else ""


def columns_table(header: dict, rows: list[dict], outdir: Path) -> Path:
    """An experiment sweep's default report: each number column of ``rows`` (any row's),
    mean [95 % interval] over the rows of each combination of the grid axes that vary
    (``seed`` aggregated); one Markdown table (a line per column, a column per
    combination; ``–`` where no row of it holds a number). The path written."""
    groups = grouped(rows, lambda row: row["params"], everything="every row")  # seeds pooled
    lines = [
        f"| column | {' | '.join(groups)} |",
        "|---|" + "---|" * len(groups),
        f"| rows | {' | '.join(str(len(m)) for m in groups.values())} |",
    ]
    columns = dict.fromkeys(path for row in rows for path in scalar_columns(row))
    for path in columns:  # every row's numbers, in first-seen order (None in some rows)
        cells = []
        for members in groups.values():
            values = [_number_or_nan(r, path) for r in members]
            mean, low, high, n = mean_interval(values)
            cells.append("–" if n == 0 else f"{mean:.4g} [{low:.4g}, {high:.4g}]")
        lines.append(f"| {path} | {' | '.join(cells)} |")
    name = sweep_name(header.get("sweep", "sweep"), "the sweep's name in its header")
    note = incomplete(header, rows)
    intro = (
        f"# {name}: every number column, mean [95% interval] over each cell's rows\n\n"
        + unfinished(note)
        + "Plot one against a grid axis: `geomcollapse report OUTPUT --x AXIS --y COLUMN`.\n\n"
    )
    md = outdir / f"{name}_columns.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(intro + "\n".join(lines) + "\n", encoding="utf-8")
    return md


def _number_or_nan(row: dict, path: str) -> float:
    try:
        return column(row, path)
    except ValueError:  # missing in this row, or not a number there (None is NaN already)
        return math.nan


def _log_scale(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and bool(np.all(v > 0)) and v.max() / v.min() > 100


def column_figure(series: list[Series], x: str, y: str, title: str):
    """Each series' mean against ``x``, with error bars and a band for its 95 % interval."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    all_x = [v for s in series for v in s.x]
    numeric = _numeric(all_x)
    categories = sorted({_key(v) for v in all_x}, key=lambda k: _sort_key(json.loads(k)))
    for i, s in enumerate(series):
        xs = (
            np.asarray(s.x, np.float64)
            if numeric
            else np.array([categories.index(_key(v)) for v in s.x], np.float64)
        )
        err = np.vstack([s.mean - s.low, s.high - s.mean])
        # a marker per series, hollow every other one: equal series stay visible
        line = ax.errorbar(
            xs,
            s.mean,
            yerr=err,
            marker=MARKERS[i % len(MARKERS)],
            ms=7 - 2 * (i % 2),
            mfc="none" if i % 2 else None,
            capsize=3,
            label=s.label,
        )
        ax.fill_between(xs, s.low, s.high, color=line[0].get_color(), alpha=0.15, lw=0)
    if numeric and _log_scale(np.asarray(all_x, np.float64)):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), [str(json.loads(k)) for k in categories])
    if _log_scale(np.concatenate([s.low for s in series] + [s.high for s in series])):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    if any(s.label for s in series):
        ax.legend(fontsize=7)
    return fig


def curves_figure(times: np.ndarray, curves: list[tuple[str, tuple]], title: str):
    """Mean ``Δu(t)`` of each grid combination with its 95 % band over seeds, log-log."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    positive = [x[x > 0] for _, (m, low, _, _) in curves for x in (m, low)]
    floor = min((x.min() for x in positive if x.size), default=1.0) / 10
    for label, (mean, low, high, n) in curves:
        keep = mean > 0  # a log axis: what is ≤ 0 (or no finite row) is said, not drawn
        (line,) = ax.plot(times[keep], mean[keep], label=_curve_label(label, n, keep, low))
        # a band reaching ≤ 0 is drawn down to below every curve, not dropped
        ax.fill_between(
            times[keep], np.where(low > 0, low, floor)[keep], high[keep],
            color=line.get_color(), alpha=0.15, lw=0,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-flow time t")
    ax.set_ylabel("Δu(t)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    return fig


def _curve_label(label: str, n: np.ndarray, keep: np.ndarray, low: np.ndarray) -> str:
    """``label`` with its row count (a range where some rows are not finite at some
    times) and what the log axis cannot show."""
    counts = n[n > 0]
    said = (
        f"rows={counts.min()}"
        if counts.size and counts.min() == counts.max()
        else (f"rows={counts.min()}–{counts.max()} by t" if counts.size else "rows=0")
    )
    if not keep.all():
        said += f"; {int((~keep).sum())} of {keep.size} times ≤ 0 or none, not drawn"
    if np.any(keep & ~(low > 0)):
        said += "; band to ≤ 0 drawn to the bottom"
    return f"{label} ({said})"


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (directories created); the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
