"""Early warning: does the skill subspace see harm coming, on fresh seeds and on ``small``?

Re-analyses committed sweep rows of the prediction experiment (nothing is
trained here): the exploration rows ``sweeps/prediction_tiny.jsonl`` (tiny,
seeds 0–2; they chose the hypothesis and the stop rule's thresholds) and the
confirmatory rows ``sweeps/early_warning_tiny.jsonl`` (tiny, seeds 3–5) and
``sweeps/early_warning_small.jsonl`` (small, seeds 0–1). Per (method,
optimizer): Spearman ρ over datasets of seed-averaged ``E_k = ‖P₅₀Δθ_k‖``,
``harm_k`` and ``Δu_k`` with ``harm_256``, bootstrap intervals over datasets,
paired bootstrap differences, and the stop rule ``½‖F^{1/2}P₅₀Δθ_16‖² ≥ τ``
applied per run. The plan, with every threshold fixed before the runs, is
``docs/early_warning.md``; rows (a)–(f) are computed from it by code.

Run: ``python -m experiments.early_warning`` (the rows are produced by
``geomcollapse sweep sweeps/early_warning_tiny.json`` and
``geomcollapse sweep sweeps/early_warning_small.json``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from experiments import _style as style
from experiments._common import ROOT, Claim, committed_sweep_rows, conclude, one_theta
from geomcollapse import stats

NAME = "early_warning"
FULL_FLAG = False
CELLS = (("sgd", "full"), ("adamw", "full"), ("sgd", "lora8"), ("adamw", "lora8"))
RULES = ("projected", "delta_u", "harm")  # the stop rule's score, then its two baselines
# τ per (optimizer, method) and rule: docs/early_warning.md, chosen on the exploration rows.
THRESHOLDS = (
    ("sgd", "full", 0.152477, 0.766682, 0.156),
    ("adamw", "full", 0.111369, 0.203413, 0.046),
    ("sgd", "lora8", 0.0329538, 0.057531, 0.024),
    ("adamw", "lora8", 0.0251697, 0.0216797, 0.014),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The pre-registered analysis (docs/early_warning.md); every threshold is the plan's."""

    exploration: str = "sweeps/prediction_tiny.jsonl"
    tiny: str = "sweeps/early_warning_tiny.jsonl"
    small: str = "sweeps/early_warning_small.jsonl"
    dim: int = 50  # the primary subspace: E_k and the stop rule use P₅₀
    side_dim: int = 10  # shown beside it, no verdict
    early: int = 16
    first: int = 1
    late: int = 256
    rho_min: float = 0.7  # (a), (d), (e)
    lower_min: float = 0.4  # (a), (d)
    margin: float = -0.2  # (b): non-inferiority
    harmful_at: float = 0.5  # a run is harmful when harm_256 ≥ this
    choice_false_alarms: float = 0.2  # τ's choice on the exploration rows
    recall_tolerance: float = 0.15  # (f)
    false_alarms_max: float = 0.25  # (f)
    num_resamples: int = 4000
    key_seed: int = 27
    thresholds: tuple = THRESHOLDS

    def __post_init__(self):
        for opt, method, *taus in self.thresholds:
            if (opt, method) not in CELLS or len(taus) != len(RULES):
                raise ValueError(f"thresholds: bad entry {(opt, method, *taus)}")
        if self.num_resamples < 1:
            raise ValueError(f"num_resamples must be ≥ 1, got {self.num_resamples}")


STUDY = Config()
QUICK = STUDY  # the main job re-analyses the committed rows with the plan's statistics
TINY = Config(num_resamples=200)  # tests only: fewer resamples, the same rows and thresholds


# ---------------------------------------------------------------- row values
def value(row: dict, name: str, dim: int) -> float:
    """A named per-run quantity of a prediction row (``E``, ``projected``, ``harm``, …)."""
    if name == "E":
        return row[f"update_p_d{dim}"]
    if name == "projected":  # the exploration rows predate update_fisher_half_d{d}
        half = row.get(f"update_fisher_half_d{dim}")
        return half if half is not None else 0.5 * row[f"update_fisher_p_d{dim}"] ** 2
    if name == "overlap":
        return row[f"update_p_ratio_d{dim}"]
    return row[{"harm": "harmfulness", "delta_u": "delta_u"}[name]]


def select(rows: list[dict], opt: str, method: str, K: int) -> list[dict]:
    """The rows of one (optimizer, method) at horizon ``K``."""
    return [r for r in rows if r["optimizer"] == opt and r["method"] == method and r["K"] == K]


def per_dataset(rows: list[dict], name: str, dim: int, datasets: list[str]) -> np.ndarray:
    """Seed mean of ``name`` per dataset, in ``datasets`` order."""
    return np.array(
        [np.mean([value(r, name, dim) for r in rows if r["dataset"] == d]) for d in datasets]
    )


# ---------------------------------------------------------------- statistics
def rho_interval(x, y, *, key: jax.Array, num_resamples: int) -> dict:
    """Spearman ρ of ``x`` and ``y`` with its 95 % percentile bootstrap interval over pairs."""
    lo, hi = stats.bootstrap_interval(stats.spearman, x, y, key=key, num_resamples=num_resamples)
    return {"rho": stats.spearman(x, y), "interval": [lo, hi]}


def paired_difference(x1, x2, y, *, key: jax.Array, num_resamples: int) -> dict:
    """ρ(x1, y) − ρ(x2, y) with a paired bootstrap interval (both on the same resamples).

    A constant variable ranks nothing: its ρ (``nan``) counts as 0 (docs/early_warning.md).
    """
    x1, x2, y = (np.asarray(a, np.float64) for a in (x1, x2, y))

    def diff(i, _):
        i = np.asarray(i).astype(int)
        r1, r2 = stats.spearman(x1[i], y[i]), stats.spearman(x2[i], y[i])
        return np.nan_to_num(r1, nan=0.0) - np.nan_to_num(r2, nan=0.0)

    idx = np.arange(y.size, dtype=np.float64)
    lo, hi = stats.bootstrap_interval(diff, idx, idx, key=key, num_resamples=num_resamples)
    return {"difference": float(diff(idx, idx)), "interval": [lo, hi]}


def rates(scores, harmful, tau: float) -> tuple[float, float]:
    """Recall and false alarms (false-positive rate) of ``scores ≥ tau``; nan if undefined."""
    scores, harmful = np.asarray(scores, np.float64), np.asarray(harmful, bool)
    flagged = scores >= tau
    pos, neg = harmful.sum(), (~harmful).sum()
    recall = float((flagged & harmful).sum() / pos) if pos else float("nan")
    false = float((flagged & ~harmful).sum() / neg) if neg else float("nan")
    return recall, false


def choose_threshold(scores, harmful, false_alarms_max: float) -> float:
    """The plan's rule: the τ among ``scores`` of highest recall with false alarms ≤ the bound.

    Ties in recall go to the largest τ; ``nan`` when no τ meets the bound.
    """
    best, best_recall = float("nan"), -1.0
    for tau in np.unique(np.asarray(scores, np.float64))[::-1]:
        recall, false = rates(scores, harmful, tau)
        if false <= false_alarms_max and recall > best_recall:
            best, best_recall = float(tau), recall
    return best


def floor_digits(x: float, digits: int = 6) -> float:
    """``x`` rounded down to ``digits`` significant digits (how the plan writes τ)."""
    scale = 10.0 ** (math.floor(math.log10(abs(x))) - digits + 1)
    return float(f"{math.floor(x / scale) * scale:.{digits}g}")


def _key(config: Config, *path: int) -> jax.Array:
    key = jax.random.key(config.key_seed)
    for i in path:
        key = jax.random.fold_in(key, i)
    return key


# ------------------------------------------------------------------ analysis
SERIES = ("E", "E_side", "harm", "delta_u")  # ρ(·_k, harm_256) against k, per cell


def _series(config: Config, name: str) -> tuple[str, int]:
    return ("E", config.side_dim) if name == "E_side" else (name, config.dim)


def cell_curves(config: Config, rows: list[dict], opt: str, method: str, key) -> dict:
    """ρ(·_k, harm_late) with intervals per k, for ``E`` (both d), ``harm_k`` and ``Δu_k``."""
    late = select(rows, opt, method, config.late)
    datasets = sorted({r["dataset"] for r in late})
    y = per_dataset(late, "harm", config.dim, datasets)
    horizons = sorted({r["K"] for r in rows if r["optimizer"] == opt and r["method"] == method})
    out: dict = {"datasets": datasets, "horizons": horizons}
    for i, name in enumerate(SERIES):
        field, dim = _series(config, name)
        out[name] = [
            rho_interval(
                per_dataset(select(rows, opt, method, K), field, dim, datasets),
                y,
                key=jax.random.fold_in(key, 100 * i + j),
                num_resamples=config.num_resamples,
            )
            for j, K in enumerate(horizons)
        ]
    overlap = per_dataset(late, "overlap", config.side_dim, datasets)
    out["overlap_late"] = rho_interval(
        overlap, y, key=jax.random.fold_in(key, 999), num_resamples=config.num_resamples
    )
    return out


def cell_comparisons(config: Config, rows: list[dict], opt: str, method: str, key) -> dict:
    """Paired ρ differences: E_16 − harm_16, E_16 − Δu_16 (row b), E_1 − harm_1 (row c)."""
    late = select(rows, opt, method, config.late)
    datasets = sorted({r["dataset"] for r in late})
    y = per_dataset(late, "harm", config.dim, datasets)
    at = lambda K, name: per_dataset(select(rows, opt, method, K), name, config.dim, datasets)  # noqa: E731
    pairs = {
        "E_minus_harm": (config.early, "harm"),
        "E_minus_delta_u": (config.early, "delta_u"),
        "E_minus_harm_first": (config.first, "harm"),
    }
    return {
        label: paired_difference(
            at(K, "E"),
            at(K, other),
            y,
            key=jax.random.fold_in(key, 500 + i),
            num_resamples=config.num_resamples,
        )
        for i, (label, (K, other)) in enumerate(pairs.items())
    }


def run_scores(config: Config, rows: list[dict], opt: str, method: str, name: str):
    """Per run (dataset, seed): the score ``name`` at ``early`` and whether harm_late ≥ the cut."""
    early = {(r["dataset"], r["seed"]): r for r in select(rows, opt, method, config.early)}
    late = {(r["dataset"], r["seed"]): r for r in select(rows, opt, method, config.late)}
    runs = sorted(set(early) & set(late))
    scores = np.array([value(early[k], name, config.dim) for k in runs])
    harmful = np.array([late[k]["harmfulness"] >= config.harmful_at for k in runs])
    return scores, harmful


def apply_rules(config: Config, rows: list[dict], taus: dict) -> dict:
    """Every cell's rules at the plan's τ: recall, false alarms, harmful runs, runs."""
    out = {}
    for opt, method in CELLS:
        cell = {}
        for rule in RULES:
            scores, harmful = run_scores(config, rows, opt, method, rule)
            if not scores.size:
                continue
            tau = taus[(opt, method)][rule]
            recall, false = rates(scores, harmful, tau)
            cell[rule] = {
                "tau": tau,
                "recall": recall,
                "false_alarms": false,
                "harmful": int(harmful.sum()),
                "runs": int(scores.size),
            }
        if cell:
            out[f"{opt}/{method}"] = cell
    return out


def plan_thresholds(config: Config) -> dict:
    """``{(optimizer, method): {rule: τ}}`` from the config (the plan's numbers)."""
    return {(o, m): dict(zip(RULES, taus, strict=True)) for o, m, *taus in config.thresholds}


def check_thresholds(config: Config, exploration: list[dict]) -> None:
    """Raise ``ValueError`` unless the plan's τ are the rule's output on the exploration rows."""
    for (opt, method), taus in plan_thresholds(config).items():
        for rule, tau in taus.items():
            scores, harmful = run_scores(config, exploration, opt, method, rule)
            chosen = choose_threshold(scores, harmful, config.choice_false_alarms)
            if floor_digits(chosen) != tau:
                raise ValueError(
                    f"thresholds: the plan's τ {tau} for {opt}/{method}/{rule} is not the "
                    f"rule's {chosen!r} on the exploration rows"
                )


def analyse_model(config: Config, rows: list[dict] | None, index: int) -> dict | None:
    """Curves, paired comparisons and the rules at the plan's τ for one set of rows."""
    if not rows:
        return None
    cells = {}
    for c, (opt, method) in enumerate(CELLS):
        if not select(rows, opt, method, config.late):
            continue
        key = _key(config, index, c)
        cells[f"{opt}/{method}"] = {
            **cell_curves(config, rows, opt, method, key),
            "comparisons": cell_comparisons(config, rows, opt, method, key),
        }
    seeds = sorted({r["seed"] for r in rows})
    rules = apply_rules(config, rows, plan_thresholds(config))
    return {"cells": cells, "rules": rules, "seeds": seeds, "rows": len(rows)}


def analyse(config: Config, exploration, tiny, small) -> dict:
    """The study's results from the three sets of rows (``None`` where not committed)."""
    return {
        "exploration": analyse_model(config, exploration, 0),
        "tiny": analyse_model(config, tiny, 1),
        "small": analyse_model(config, small, 2),
    }


# -------------------------------------------------------------------- claims
NOT_RUN = ("not run", "not run")


def _fmt(c: dict) -> str:
    lo, hi = c["interval"]
    return f"ρ = {c['rho']:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt_diff(c: dict) -> str:
    lo, hi = c["interval"]
    return f"{c['difference']:+.2f} [{lo:.2f}, {hi:.2f}]"


def _at(cell: dict, name: str, K: int) -> dict | None:
    return cell[name][cell["horizons"].index(K)] if K in cell["horizons"] else None


def _not_run(claim: str, command: str, predicted: str, why: str) -> Claim:
    return Claim(claim, command, predicted, why, False, labels=NOT_RUN)


def rows_rho(model: dict | None, config: Config, command: str, label: str) -> list[Claim]:
    """(a) on tiny's fresh seeds, (d) on small: ρ(E_16, harm_256) ≥ 0.7, lower bound ≥ 0.4."""
    out = []
    for opt in ("sgd", "adamw"):
        claim = (
            f"{label} ({opt}, full fine-tuning): E_{config.early} = ‖P₅₀Δθ_{config.early}‖ "
            f"ranks datasets by harm_{config.late}"
        )
        predicted = (
            f"Spearman ρ ≥ {config.rho_min}, 95 % interval's lower bound ≥ {config.lower_min}"
        )
        cell = (model or {}).get("cells", {}).get(f"{opt}/full")
        main = cell and _at(cell, "E", config.early)
        if not main:
            out.append(_not_run(claim, command, predicted, "rows not committed"))
            continue
        side = _at(cell, "E_side", config.early)
        measured = f"d = {config.dim}: {_fmt(main)}; d = {config.side_dim}: {_fmt(side)}"
        measured += f"; {len(cell['datasets'])} datasets, seeds {model['seeds']}"
        passed = main["rho"] >= config.rho_min and main["interval"][0] >= config.lower_min
        out.append(Claim(claim, command, predicted, measured, bool(passed)))
    return out


def rows_b(model: dict | None, config: Config, command: str) -> list[Claim]:
    """(b): paired ρ(E_16) − ρ(harm_16) and − ρ(Δu_16), lower bounds ≥ the margin, per cell."""
    out = []
    for opt, method in CELLS:
        claim = (
            f"(b) tiny, fresh seeds ({opt}, {method}): E_{config.early} ranks harm_{config.late} "
            f"not worse than watching harm_{config.early} or Δu_{config.early}"
        )
        predicted = f"paired differences of ρ, both lower bounds ≥ {config.margin}"
        cell = (model or {}).get("cells", {}).get(f"{opt}/{method}")
        if not cell:
            out.append(_not_run(claim, command, predicted, "rows not committed"))
            continue
        comp = cell["comparisons"]
        a, b = comp["E_minus_harm"], comp["E_minus_delta_u"]
        measured = (
            f"ρ(E) − ρ(harm) {_fmt_diff(a)}; ρ(E) − ρ(Δu) {_fmt_diff(b)}; "
            f"ρ(E) {_fmt(_at(cell, 'E', config.early))}"
        )
        passed = min(a["interval"][0], b["interval"][0]) >= config.margin
        out.append(Claim(claim, command, predicted, measured, bool(passed)))
    return out


def row_c(model: dict | None, config: Config, command: str) -> Claim:
    """(c): LoRA r = 8 under SGD, paired ρ(E_1) − ρ(harm_1) with lower bound > 0."""
    claim = (
        f"(c) tiny, fresh seeds (sgd, lora8): earlier than harm, E_{config.first} ranks "
        f"harm_{config.late} better than harm_{config.first} does"
    )
    predicted = "paired ρ(E_1) − ρ(harm_1), lower bound > 0"
    cell = (model or {}).get("cells", {}).get("sgd/lora8")
    if not cell:
        return _not_run(claim, command, predicted, "rows not committed")
    c = cell["comparisons"]["E_minus_harm_first"]
    measured = (
        f"{_fmt_diff(c)}; ρ(E_1) {_fmt(_at(cell, 'E', config.first))}, "
        f"ρ(harm_1) {_fmt(_at(cell, 'harm', config.first))}"
    )
    return Claim(claim, command, predicted, measured, bool(c["interval"][0] > 0))


def rows_e(model: dict | None, config: Config, command: str) -> list[Claim]:
    """(e): on small, the overlap score (d = 10) at K = 256 ranks harm, ρ ≥ 0.7, lower bound > 0."""
    out = []
    for opt in ("sgd", "adamw"):
        claim = (
            f"(e) small ({opt}, full fine-tuning, K = {config.late}): the overlap score "
            "‖PΔθ‖/‖Δθ‖ ranks datasets by harmfulness (the paper's Table 1)"
        )
        predicted = f"Spearman ρ ≥ {config.rho_min}, interval above 0 (d = {config.side_dim})"
        cell = (model or {}).get("cells", {}).get(f"{opt}/full")
        if not cell:
            out.append(_not_run(claim, command, predicted, "rows not committed"))
            continue
        c = cell["overlap_late"]
        passed = c["rho"] >= config.rho_min and c["interval"][0] > 0
        out.append(Claim(claim, command, predicted, _fmt(c), bool(passed)))
    return out


def _rule_text(rule: dict, reference: dict | None) -> str:
    ref = f" (in-sample {reference['recall']:.2f})" if reference else ""
    return (
        f"recall {rule['recall']:.2f}{ref}, false alarms {rule['false_alarms']:.2f} "
        f"({rule['harmful']}/{rule['runs']} harmful)"
    )


def _transfers(config: Config, fresh: dict | None, reference: dict | None) -> bool:
    if not fresh or not reference:
        return False
    gap = abs(fresh["recall"] - reference["recall"])
    return bool(gap <= config.recall_tolerance and fresh["false_alarms"] <= config.false_alarms_max)


def row_f(results: dict, config: Config, command: str) -> Claim:
    """(f): the plan's τ applied to tiny seeds 3–5, every cell; the baselines reported beside."""
    claim = (
        f"(f) a stop rule that transfers: flag a run when ½‖F^{{1/2}}P₅₀Δθ_{config.early}‖² ≥ τ "
        "(τ per cell from tiny seeds 0–2), applied unchanged to tiny seeds 3–5"
    )
    predicted = (
        f"in every (method, optimizer) cell: recall within {config.recall_tolerance} of its "
        f"in-sample value and false alarms ≤ {config.false_alarms_max}"
    )
    if not results["tiny"]:
        return _not_run(claim, command, predicted, "rows not committed")
    explored, fresh = results["exploration"]["rules"], results["tiny"]["rules"]
    parts, passed = [], True
    for opt, method in CELLS:
        name = f"{opt}/{method}"
        ref, cell = explored.get(name, {}), fresh.get(name)
        if not cell:
            parts.append(f"{name}: rows not committed")
            passed = False
            continue
        passed &= _transfers(config, cell.get("projected"), ref.get("projected"))
        text = "; ".join(
            f"{rule} τ = {cell[rule]['tau']:.3g}: {_rule_text(cell[rule], ref.get(rule))}"
            for rule in RULES
            if rule in cell
        )
        parts.append(f"{name}: {text}")
    return Claim(claim, command, predicted, " | ".join(parts), bool(passed))


def row_f_small(results: dict, config: Config, command: str) -> Claim:
    """(f) on small: the tiny τ, recall and false alarms, no verdict."""
    claim = "(f) on small: the tiny τ of the stop rule and of its baselines (full fine-tuning)"
    predicted = "reported (no verdict)"
    if not results["small"]:
        return _not_run(claim, command, predicted, "rows not committed")
    parts = []
    for name, cell in results["small"]["rules"].items():
        text = "; ".join(f"{rule}: {_rule_text(cell[rule], None)}" for rule in RULES)
        parts.append(f"{name}: {text}")
    return Claim(claim, command, predicted, " | ".join(parts), True, ("measured", "measured"))


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Rows (a)–(f) of the plan (docs/early_warning.md), verdicts from its thresholds."""
    tiny, small = results["tiny"], results["small"]
    return [
        *rows_rho(tiny, config, command, "(a) tiny, fresh seeds"),
        *rows_b(tiny, config, command),
        row_c(tiny, config, command),
        *rows_rho(small, config, command, "(d) small"),
        *rows_e(small, config, command),
        row_f(results, config, command),
        row_f_small(results, config, command),
    ]


# -------------------------------------------------------------------- figure
LABELS = {"E": "E_k (d = 50)", "E_side": "E_k (d = 10)", "harm": "harm_k", "delta_u": "Δu_k"}
MARKERS = {"E": "o", "E_side": "s", "harm": "^", "delta_u": "D"}
# top row: E_k against the two baselines; bottom row: E_k at the two d (E_k in both, same mark)
PANEL_SERIES = (("E", "harm", "delta_u"), ("E", "E_side"))
FIGURE_NEEDS = ("tiny", "exploration", "small")  # what figure() reads from the results


def _curve(ax, cell: dict, name: str, offset: float) -> None:
    """ρ(name_k, harm_256) against k with its 95 % interval as bars (no caps: one line)."""
    rho = np.array([c["rho"] for c in cell[name]])
    lo, hi = (np.array([c["interval"][i] for c in cell[name]]) for i in (0, 1))
    ks = np.array(cell["horizons"]) * 2.0**offset  # side by side on the log axis
    color = style.PALETTE[list(LABELS).index(name)]
    ax.errorbar(
        ks,
        rho,
        yerr=[rho - lo, hi - rho],
        fmt="-",
        marker=MARKERS[name],
        ms=3,
        lw=1,
        elinewidth=0.8,
        capsize=0,
        color=color,
        label=LABELS[name],
    )


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """ρ(·_k, harm_256) against k with 95 % intervals, per cell: one column per (optimizer,
    method), E_k beside harm_k and Δu_k (top) and beside E_k at d = 10 (middle); fresh tiny
    seeds when committed, else the exploration rows; a bottom row for ``small`` (full
    fine-tuning only) once its rows are committed."""
    which = "tiny" if results.get("tiny") else "exploration"
    panels = [(results[which]["cells"], names) for names in PANEL_SERIES]
    small = results.get("small")
    if small:
        panels.append((small["cells"], PANEL_SERIES[0]))
    fig, axes = style.subplots(
        len(CELLS), len(panels), height=2.3 * len(panels), sharex=True, sharey=True
    )
    for row, (cells, names) in enumerate(panels):
        model = "small" if small and row == len(PANEL_SERIES) else "tiny"
        for col, (opt, method) in enumerate(CELLS):
            ax = axes[row, col]
            letter = "abcdefghijkl"[row * len(CELLS) + col]
            ax.set_title(f"({letter}) {model}: {opt}, {method}", fontsize=8)
            ax.axhline(0.7, color="0.5", lw=0.8, ls=":")  # row (a)'s bar
            ax.axhline(0.0, color="0.8", lw=0.6)
            cell = cells.get(f"{opt}/{method}")
            for j, name in enumerate(names if cell is not None else ()):
                _curve(ax, cell, name, 0.12 * (j - (len(names) - 1) / 2))
            if cell is None:  # small: full fine-tuning only (the plan); or rows not committed
                ax.text(0.5, 0.3, "no runs in this cell", transform=ax.transAxes, ha="center")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 4, 16, 64, 256], ["1", "4", "16", "64", "256"])
            ax.set_ylim(-1, 1)
            if row == len(panels) - 1:
                ax.set_xlabel("k (steps)")
            if col == 0:
                ax.set_ylabel("ρ with harm_256")
    seeds = ", ".join(str(s) for s in results[which].get("seeds", []))
    title = f"tiny, {'fresh' if which == 'tiny' else 'exploration'} seeds {seeds}"
    if small:
        title += f"; small, seeds {', '.join(str(s) for s in small.get('seeds', []))}"
    fig.suptitle(f"{title}; bars: 95 % bootstrap over datasets", fontsize=8)
    style.legend_below(fig, ncol=4)
    return style.save(fig, path)


# -------------------------------------------------------------- running it all
def load_rows(config: Config, outdir: Path) -> tuple:
    """The exploration, tiny and small rows: ``outdir``'s committed sweeps, else this checkout's."""

    def rows(path: str):
        return committed_sweep_rows(outdir, Path(path)) or committed_sweep_rows(ROOT, Path(path))

    exploration = rows(config.exploration)
    if exploration is None:
        raise FileNotFoundError(f"exploration rows {config.exploration} are not committed")
    tiny = rows(config.tiny)
    # τ is chosen on the exploration's runs and tested on the confirmatory runs: one θ*
    explored = one_theta(exploration, config.exploration)
    confirmed = one_theta(tiny or [], config.tiny)
    if None not in (explored, confirmed) and explored != confirmed:
        raise ValueError(
            f"{config.exploration} and {config.tiny} were computed at different θ* "
            f"({explored}, {confirmed}); the confirmatory rows must share θ* with the exploration"
        )
    return exploration, tiny, rows(config.small)


def main(config: Config = STUDY, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Re-analyse the committed rows (nothing is trained): results, figure and rows (a)–(f)."""
    outdir = Path(outdir)
    exploration, tiny, small = load_rows(config, outdir)
    check_thresholds(config, exploration)
    results = analyse(config, exploration, tiny, small)
    return conclude(NAME, config, outdir, command, results, figure, claims)


if __name__ == "__main__":
    from experiments._common import cli

    cli(NAME, __doc__, main, STUDY, QUICK, full_flag=False)
