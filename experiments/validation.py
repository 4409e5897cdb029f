"""Does ``diagnose`` forecast what fine-tuning then does? Validation on held-out datasets.

For each held-out dataset of the family (``prediction.HELD_OUT``, fixed before
``diagnose`` existed): :func:`geomcollapse.diagnose` at the aligned
transformer ``θ*`` as a user runs it (its own ``d`` rule and validity window),
against the realised KL ``Δu`` of float64 gradient descent on the data the
forecast sees (and, reported, minibatch SGD). Then the ranking of the held-out
datasets by the forecast against the harm the Table 1 study measured. The
pre-registered plan and thresholds are in ``docs/validation.md``.

Run: ``python -m experiments.validation --full`` (the study; writes
``validation_study.*``, committed). ``--quick`` (the main job) re-analyses the
committed study results without recomputing them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _style as style
from experiments import prediction as P
from experiments._common import ROOT, Claim, committed_sweep_rows, conclude, one_theta
from experiments._transformer import aligned_model, theta_digest
from geomcollapse import diagnose, pipeline, stats, tasks, training
from geomcollapse.progress import progress_bar

NAME = "validation"
FULL_FLAG = False
FIGURE_NEEDS = ("rows", "lr", "horizons", "cells")  # what figure() reads


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen configuration (defaults: the pre-registered study, ``tiny`` model)."""

    size: str = "tiny"
    datasets: tuple[str, ...] = P.HELD_OUT
    num_examples: int = 4000  # each dataset as the Table 1 study draws it
    num_eval: int = 300
    forecast_examples: int = 1000  # the task loss the forecast and the GD runs see
    num_prompts: int = 256  # the KL skill loss's prompts (the Table 1 study's)
    lr: float = 1e-3
    horizons: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    seeds: tuple[int, ...] = (0, 1, 2)  # minibatch SGD (reported)
    batch_size: int = 64
    factor: float = 1.5  # row (a): median |log(forecast/realised)| ≤ log factor
    resamples: int = 10_000
    study_horizon: int = 256  # the Table 1 study's K whose harm is ranked
    key_seed: int = 14
    reanalyse: bool = False  # read the committed study results instead of computing
    tag: str = ""

    def __post_init__(self):
        bad = [d for d in self.datasets if d not in tasks.DATASET_FAMILY]
        if bad or not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets must be distinct members of DATASET_FAMILY, got {bad}")
        if list(self.horizons) != sorted(set(self.horizons)) or min(self.horizons) < 1:
            raise ValueError(f"horizons must increase strictly from ≥ 1, got {self.horizons}")
        if not (self.lr > 0 and self.factor > 1 and self.resamples > 0):
            raise ValueError("lr and resamples must be positive and factor above 1")
        if not 0 < self.forecast_examples <= self.num_examples:
            raise ValueError("forecast_examples must lie in [1, num_examples]")


STUDY = Config(tag="study")
QUICK = Config(reanalyse=True)
# The tests' configuration re-analyses the committed study results as the main job does
# (computing one held-out dataset takes minutes); tests/test_validation.py checks the
# computation's parts against dense references.
TINY = QUICK
STUDY_RESULTS = Path("experiments") / "results" / "validation_study.json"


# ------------------------------------------------------------------ computation
def _prediction_config(config: Config) -> P.Config:
    """The Table 1 study's config with this one's data sizes (its datasets and prompts)."""
    return P.Config(
        size=config.size,
        datasets=config.datasets,
        num_examples=config.num_examples,
        num_eval=config.num_eval,
        num_prompts=config.num_prompts,
        key_seed=config.key_seed,
    )


@functools.lru_cache(maxsize=2)
def _theta_star(size: str, num_prompts: int, seed: int, outdir: Path):
    """``θ*`` in float64, its logits map and the KL skill loss's reference (the study's prompts)."""
    aligned = aligned_model(size, outdir)
    graphdef64, params64 = aligned.as_dtype(jnp.float64)
    logits = P.models.transformer_logits(graphdef64)
    prompts = P.skill_prompts(num_prompts, seed)
    return params64, logits, pipeline.skill_reference(logits, params64, prompts)


def _data(config: Config, name: str) -> tuple[tuple, tasks.TokenBatch]:
    train, _ = P.dataset_split(_prediction_config(config), name)
    fields = tuple(jnp.asarray(getattr(train, f)) for f in ("tokens", "targets", "mask"))
    return fields, train


@functools.lru_cache(maxsize=4)
def _descent(logits, steps: int, lr: float):
    """Jitted ``(θ*, data, idx, ref) → Δu`` per step of GD/SGD on the displacement ``x``.

    ``idx`` ``(steps, b)`` selects each step's rows of ``data``; ``x`` is the
    state (``θ = θ* + x`` is formed only to evaluate ``L``), and ``Δu`` is
    ``training.kl_skill_change`` of ``x`` itself: no cancellation at small ``t``.
    """
    grad = jax.grad(training.sequence_loss(logits))
    change = training.kl_skill_change(logits)

    def run(theta, data, idx, ref):
        def step(x, rows):
            batch = tuple(a[rows] for a in data)
            g = grad(jax.tree.map(jnp.add, theta, x), *batch)
            x = jax.tree.map(lambda xi, gi: xi - lr * gi, x, g)
            return x, change(theta, x, *ref)

        x0 = jax.tree.map(jnp.zeros_like, theta)
        return jax.lax.scan(step, x0, idx)[1]

    return jax.jit(run)


def _dataset_row(config: Config, name: str, outdir: Path) -> dict:
    """The diagnosis of ``name`` at ``θ*`` and the realised ``Δu`` of GD and minibatch SGD."""
    theta, logits, ref = _theta_star(config.size, config.num_prompts, config.key_seed, outdir)
    data, _ = _data(config, name)
    head = tuple(a[: config.forecast_examples] for a in data)
    K = config.horizons[-1]
    dg = diagnose(
        training.kl_skill_loss(logits),
        training.sequence_loss(logits),
        theta,
        skill_args=tuple(ref),
        task_args=head,
        skill_logits=training.kl_skill_logits(logits),
        lr=config.lr,
        steps=K,
        key=jax.random.key(config.key_seed),
    )
    run = _descent(logits, K, config.lr)
    full = np.arange(config.forecast_examples)[None].repeat(K, 0)
    gd = np.asarray(run(theta, head, jnp.asarray(full), tuple(ref)), np.float64)
    family = sorted(tasks.DATASET_FAMILY)
    sgd = []
    for seed in config.seeds:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), family.index(name)), 1)
        idx = P.minibatch_order(key, config.num_examples, K, config.batch_size)
        sgd.append(np.asarray(run(theta, data, jnp.asarray(idx), tuple(ref)), np.float64))
    at = np.asarray(config.horizons) - 1
    ts = config.lr * np.asarray(config.horizons, np.float64)
    return {
        "dataset": name,
        "d": dg.d,
        "validity_time": dg.validity_time,
        "coefficients": [float(c) for c in dg.delta_u_coefficients],
        "forecast": [float(v) for v in dg.forecast(ts)[0]],
        "gd": gd[at].tolist(),
        "sgd": np.mean(np.stack(sgd), 0)[at].tolist(),
        "warnings": list(dg.warnings),
        "aic_converged": bool(dg.aic.converged),
    }


def compute(config: Config, outdir: Path) -> dict:
    """Every held-out dataset's row (diagnosis, forecast, realised ``Δu``)."""
    rows = [
        _dataset_row(config, name, Path(outdir))
        for name in progress_bar(config.datasets, desc="held-out datasets", enabled=True)
    ]
    return {"rows": rows, "lr": config.lr, "horizons": list(config.horizons)}


# --------------------------------------------------------------------- analysis
def study_harm(config: Config, outdir: Path) -> dict[str, float] | None:
    """Seed-mean harmfulness of the Table 1 study's SGD full fine-tuning at ``study_horizon``."""
    return seed_means(study_harms(config, outdir))


def seed_means(harms: dict[str, list[float]] | None) -> dict[str, float] | None:
    """Per dataset, the mean over seeds of :func:`study_harms`' values (None stays None)."""
    return None if harms is None else {d: float(np.mean(h)) for d, h in harms.items()}


def study_harms(
    config: Config, outdir: Path, theta: str | None = None
) -> dict[str, list[float]] | None:
    """Per dataset, the harmfulness of each seed of the Table 1 study (see ``study_harm``).

    ``theta``: the digest of the ``θ*`` that runs compared with these harms were computed
    at; ``ValueError`` when the study's rows record another ``θ*`` (rows without a record
    pass: they predate it, docs/reading-paper_repro.md § Reproducibility).
    """
    path, rows = Path(outdir) / P.STUDY_OUTPUT, committed_sweep_rows(outdir, P.STUDY_OUTPUT)
    if not rows:  # the repository's committed study rows when ``outdir`` has none
        path, rows = ROOT / P.STUDY_OUTPUT, committed_sweep_rows(ROOT, P.STUDY_OUTPUT)
    if rows is None:
        return None
    recorded = one_theta(rows, str(path))
    if theta is not None and recorded not in (None, theta):
        raise ValueError(
            f"{path} was computed at θ* {recorded}, but this run's θ* ({outdir}) is {theta}: "
            "its harm is not this θ*'s; rerun the study or restore its θ*"
        )
    sel = [
        r
        for r in rows
        if r["method"] == "full" and r["optimizer"] == "sgd" and r["K"] == config.study_horizon
    ]
    out = {}
    for d in config.datasets:
        harms = [float(r["harmfulness"]) for r in sel if r["dataset"] == d]
        if harms:
            out[d] = harms
    return out


def analyse(
    config: Config,
    computed: dict,
    harm: dict[str, float] | None,
    harms: dict[str, list[float]] | None = None,
) -> dict:
    """Row (a)'s in-window cells and log-ratios; row (b)'s ranking with its interval.

    ``harm``: seed-mean harm per dataset; ``harms`` (optional): each seed's, whose range
    the ranking records as ``harm_range`` (the figure's bars).
    """
    ts = computed["lr"] * np.asarray(computed["horizons"], np.float64)
    cells = []
    for r in computed["rows"]:
        for t, f, g in zip(ts, r["forecast"], r["gd"], strict=True):
            if t <= r["validity_time"]:
                ok = f > 0 and g > 0
                cells.append(
                    {"dataset": r["dataset"], "t": float(t), "forecast": f, "realised": g,
                     "log_ratio": abs(math.log(f / g)) if ok else float("inf")}
                )  # fmt: skip
    logs = [c["log_ratio"] for c in cells]
    out = {
        "cells": cells,
        "median_log_ratio": float(np.median(logs)) if logs else float("nan"),
        "rows": computed["rows"],
        "lr": computed["lr"],
        "horizons": computed["horizons"],
    }
    names = [r["dataset"] for r in computed["rows"] if harm and r["dataset"] in harm]
    if len(names) >= 3:
        t0 = min(r["validity_time"] for r in computed["rows"])
        by = {r["dataset"]: r for r in computed["rows"]}
        x = np.array([np.polynomial.polynomial.polyval(t0, by[d]["coefficients"]) for d in names])
        y = np.array([harm[d] for d in names])
        key = jax.random.key(0)
        lo, hi = stats.bootstrap_interval(
            stats.spearman, x, y, key=key, num_resamples=config.resamples
        )
        out["ranking"] = {
            "t0": t0,
            "datasets": names,
            "forecast": x.tolist(),
            "harm": y.tolist(),
            "rho": float(stats.spearman(x, y)),
            "interval": [lo, hi],
        }
        if harms:
            out["ranking"]["harm_range"] = [[min(harms[d]), max(harms[d])] for d in names]
    return out


def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Row (a) (thresholded) and row (b) (measured) of docs/validation.md."""
    n = len(results["rows"])
    cells = results["cells"]
    med = results["median_log_ratio"]
    ratios = ", ".join(f"{math.exp(c['log_ratio']):.3g}" for c in cells)  # every one
    ts = [r["validity_time"] for r in results["rows"]]
    out = [
        Claim(
            claim=(
                f"diagnose on {n} held-out datasets: the Taylor forecast of Δu(ηK) matches "
                f"float64 gradient descent (η = {results['lr']:g}) inside its validity window"
            ),
            command=command,
            predicted=f"median |log(forecast/realised)| ≤ log {config.factor} over in-window cells",
            measured=(
                f"{len(cells)} in-window cells, median |log ratio| = {med:.3g} "
                f"(factor {math.exp(med) if cells else float('nan'):.3g}); ratios {ratios}; "
                f"windows {min(ts):.2g}–{max(ts):.2g}"
            ),
            passed=bool(cells) and med <= math.log(config.factor),
        )
    ]
    rank = results.get("ranking")
    if rank is not None:
        lo, hi = rank["interval"]
        out.append(
            Claim(
                claim=(
                    f"diagnose on {len(rank['datasets'])} held-out datasets: the forecast Δu at "
                    f"t₀ = {rank['t0']:.2g} ranks the harm of SGD fine-tuning "
                    f"(K = {config.study_horizon}, the Table 1 study)"
                ),
                command=command,
                predicted="Spearman ρ with a 95 % bootstrap interval (measured, no threshold)",
                measured=f"ρ = {rank['rho']:.2f} [{lo:.2f}, {hi:.2f}]",
                passed=True,
                labels=("measured", "measured"),
            )
        )
    return out


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Forecast / realised ``Δu`` at every (dataset, ``K``), in and beyond the window; ranking."""
    fig, axes = style.subplots(2, height=3.2)
    ax = axes[0][0]
    ts = results["lr"] * np.asarray(results["horizons"], np.float64)
    inside, beyond = [], []
    for r in results["rows"]:
        for t, f, g in zip(ts, r["forecast"], r["gd"], strict=True):
            if f > 0 and g > 0:
                (inside if t <= r["validity_time"] else beyond).append((t, f / g))
    for cells, color, marker in ((beyond, "0.6", "x"), (inside, style.PALETTE[0], "o")):
        if cells:
            ax.loglog(*np.array(cells).T, marker, color=color, ms=4, ls="none")
    factor = results["config"]["factor"]
    for level in (factor, 1 / factor):
        ax.axhline(level, color="0.3", lw=0.8, ls=":")
    ax.set(xlabel="t = ηK", ylabel="forecast / realised Δu (GD)")
    ax.set_title("(a) in window (o), beyond (x)", loc="left")
    ax = axes[0][1]
    rank = results.get("ranking")
    if rank is not None:
        y = np.maximum(rank["harm"], 1e-3)
        ylabel = "harmfulness (Table 1)"
        if "harm_range" in rank:  # the seeds' range around their mean
            lo, hi = np.maximum(np.asarray(rank["harm_range"]).T, 1e-3)
            ax.errorbar(
                rank["forecast"],
                y,
                yerr=[y - lo, hi - y],
                fmt="none",
                lw=0.6,
                color=style.PALETTE[0],
            )
            ylabel = "harm (Table 1): seed mean, range"
        ax.loglog(rank["forecast"], y, "o", ls="none", color=style.PALETTE[0])
        for x, yy, d in zip(rank["forecast"], y, rank["datasets"], strict=True):
            ax.annotate(d, (x, yy), fontsize=8)
        ax.set(xlabel=f"forecast Δu(t₀ = {rank['t0']:.2g})", ylabel=ylabel)
        ax.set_title(f"(b) ranking, ρ = {rank['rho']:.2f}", loc="left")
    return style.save(fig, path)


def _ratio_cells(results: dict, r: dict, realised: list[float]) -> list[str]:
    """forecast / ``realised`` at every horizon; in parentheses beyond the window."""
    ts = results["lr"] * np.asarray(results["horizons"], np.float64)
    cells = []
    for t, f, g in zip(ts, r["forecast"], realised, strict=True):
        ratio = f"{f / g:.3g}" if g > 0 else "—"
        cells.append(ratio if t <= r["validity_time"] else f"({ratio})")
    return cells


def sgd_log_ratios(results: dict) -> list[float]:
    """``|log(forecast / SGD seed-mean Δu)|`` of the in-window cells (reported, not tested)."""
    ts = results["lr"] * np.asarray(results["horizons"], np.float64)
    out = []
    for r in results["rows"]:
        for t, f, g in zip(ts, r["forecast"], r["sgd"], strict=True):
            if t <= r["validity_time"]:
                out.append(abs(math.log(f / g)) if f > 0 and g > 0 else float("inf"))
    return out


def results_table(results: dict, factor: float) -> str:
    """Markdown: per dataset, ``d``, the window, and forecast / realised at every horizon,
    against full-batch GD (row (a)) and, beside it, against minibatch SGD (every horizon)."""
    head = " | ".join(f"K={k}" for k in results["horizons"])
    n = len(results["horizons"])
    lines = [
        f"| dataset | d | window t_v | forecast / GD: {head} | forecast / SGD: {head} |",
        "|---|---|---|" + "---|" * (2 * n),
    ]
    for r in results["rows"]:
        lines.append(
            f"| `{r['dataset']}` | {r['d']} | {r['validity_time']:.2g} | "
            + " | ".join(_ratio_cells(results, r, r["gd"]))
            + " | "
            + " | ".join(_ratio_cells(results, r, r["sgd"]))
            + " |"
        )
    sgd = sgd_log_ratios(results)
    sgd_within = sum(x <= math.log(factor) for x in sgd)
    lines.append("")
    lines.append(
        f"Ratios in parentheses lie beyond the forecast's window (t = ηK > t_v, η = "
        f"{results['lr']:g}). In-window cells: {len(results['cells'])}, median "
        f"|log(forecast/realised)| = {results['median_log_ratio']:.3g} against GD; against "
        f"the SGD seed mean (B = 64, reported, not tested) on the same cells "
        f"{float(np.median(sgd)) if sgd else float('nan'):.3g}, {sgd_within} of {len(sgd)} "
        f"within ×{factor:g}."
    )
    rank = results.get("ranking")
    if rank is not None:
        lo, hi = rank["interval"]
        lines.append(
            f"Ranking: Spearman ρ = {rank['rho']:.2f} [{lo:.2f}, {hi:.2f}] between the forecast "
            f"Δu at t₀ = {rank['t0']:.2g} and the Table 1 study's harmfulness."
        )
    return "\n".join(lines)


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run ``config`` (``reanalyse``: from the committed study results) and write its files."""
    outdir = Path(outdir)
    stored_at = next(
        (p for p in (outdir / STUDY_RESULTS, ROOT / STUDY_RESULTS) if p.is_file()), None
    )
    if config.reanalyse and stored_at is not None:
        stored = json.loads(stored_at.read_text())
        computed = {k: stored[k] for k in ("rows", "lr", "horizons")}
        spec, theta = dataclasses.replace(STUDY, tag=""), None  # stored runs: θ* unknown
    else:
        spec = dataclasses.replace(config, reanalyse=False)
        computed = compute(spec, outdir)
        theta = theta_digest(aligned_model(spec.size, outdir).params)  # the runs' θ*
    harms = study_harms(spec, outdir, theta)
    results = analyse(spec, computed, seed_means(harms), harms)
    out = conclude(NAME, config, outdir, command, results, figure, claims)
    if outdir.resolve() == ROOT and config in (STUDY, QUICK):  # this checkout's docs
        P.write_between(
            ROOT / "docs" / "validation.md", "results", results_table(results, spec.factor)
        )
    return out


if __name__ == "__main__":
    from experiments._common import cli

    cli(NAME, __doc__, main, STUDY, QUICK, full_flag=False)
