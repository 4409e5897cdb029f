"""The report of a diagnosis: :class:`Diagnosis`, its JSON round trip, Markdown and files.

Every number :func:`geomcollapse.diagnose` measured at ``θ*`` and forecast
(docs/theory.md §2-§6), in a frozen dataclass that needs no array library to read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from geomcollapse import theory
from geomcollapse._checks import writable_directory
from geomcollapse.curvature import as_layout

__all__ = ["ARRAYS_FILE", "REPORT_FILES", "Diagnosis"]

REPORT_FILES = ("report.json", "report.md", "report.png")  # what Diagnosis.save writes
ARRAYS_FILE = "subspace.npz"  # M(θ*) and the forecast's arrays: Diagnosis.save(..., arrays=True)
# the arrays a Diagnosis carries for the monitor (not in JSON: (d, n) and (K, n) numbers)
_ARRAY_FIELDS = ("subspace", "series", "params_layout")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` measured at ``θ*``, and what it forecasts.

    Times ``t`` are gradient-flow times; SGD at learning rate ``lr`` reaches
    ``t = lr·k`` after ``k`` steps. Floats that are not finite are kept as
    such (``inf``: unbounded, ``nan``: unknown) and written as strings in JSON.

    Attributes:
      n: number of parameters.
      dtype: their dtype.
      fisher: ``'true'``, ``'empirical'`` or ``'custom'`` (a matvec passed in).
      d: ``dim M``.
      d_rule: how ``d`` was chosen (the rule, or ``'given'``).
      share: the share of ``tr F`` the rule asks the top ``d`` to hold.
      lr, steps, threshold: the plan given (``None`` where not given).
      order: ``K``, the highest power of the forecast.
      taylor_route: the Taylor engine of the series (:attr:`geomcollapse.series.Series.route`):
        ``'jet'``, or ``'jvp'`` where ``jax.experimental.jet`` could not expand a loss and
        nested ``jvp`` (``2^K`` cost) did.
      aic: the :class:`geomcollapse.theory.AICReport` at ``d`` (Def. 5.1), with
        ``converged`` and ``eigen_residuals`` certifying ``M``.
      eigenvalues: every top eigenvalue computed (``≥ d`` of them), descending.
      eigen_residuals: their ``‖Fv − λv‖``.
      trace: ``tr F`` (exact, or Hutchinson on the deflated tail plus the top eigenvalues).
      trace_stderr: its standard error (0 when exact).
      trace_method: ``'exact'`` or ``'hutchinson'``.
      spectrum_method: ``'dense'`` (``F`` formed from ``n`` matvecs, ``eigh``) or ``'lanczos'``.
      top_share: ``Σ_{i≤d} λ_i / tr F``.
      skill_gradient_norm: ``‖∇u(θ*)‖`` (0 at a minimum of ``u``).
      task_gradient_norm: ``‖g(θ*)‖``.
      delta_u_coefficients: ``c₀ … c_K`` of ``Δu(t)`` (docs/theory.md §6; ``c₁ = −∇u(θ*)ᵀg``).
      projected_coefficients: the same for ``½‖F^{1/2}Px(t)‖²``.
      validity_time: where the last term of ``Δu``'s series reaches 10 % of the sum.
      projected_validity_time: the same for the projected series.
      time_scale: the flow's own time unit ``τ`` (:attr:`geomcollapse.series.Series.time_scale`).
      first_order_time: ``t₁`` where ``|c₁|t = Σ_{k≥2}|c_k|t^k``: the first-order term
        dominates ``Δu`` for ``t < t₁`` (``inf``: always); ``nan`` when ``c₁`` is at
        rounding level (``θ*`` a minimum of ``u``).
      forecast_t, forecast_delta_u, forecast_projected: the two series on a
        log-spaced grid of times (for the figure).
      horizon_time: the time at which the update's overlap is taken: the
        planned ``lr·steps`` clipped to the window, or the window's end.
      overlap_gradient: ``‖Pg‖/‖g‖``, the first update's share in ``M``.
      overlap_baseline: ``(d/n)^{1/2}``, the share of a random direction.
      overlap_geometric: ``‖Px‖/‖x‖`` of the forecast update ``x(horizon_time)``.
      overlap_fisher: ``½‖F^{1/2}Px‖²`` of it (Thm 6.1's bound).
      crossing_step: the smallest SGD step ``k`` with forecast ``Δu(lr·k) ≥ threshold``
        inside the window, else ``None``.
      crossing_time: ``lr·crossing_step``, or ``None``.
      warnings: plain-language warnings (empty when none applies).
      num_matvecs: skill-Fisher matvecs used.
      subspace: ``M(θ*)`` as a :class:`geomcollapse.subspace.Subspace` (the top ``d``
        eigenpairs, basis rows in the parameters' dtype), what
        :func:`geomcollapse.monitor.from_diagnosis` watches; ``None`` for a diagnosis read
        from JSON alone (:meth:`load` restores it from :data:`ARRAYS_FILE`). Not compared,
        not in :meth:`to_dict`.
      series: the forecast as a :class:`geomcollapse.series.Series` made with ``subspace``
        (its ``delta_u`` and ``projected`` are the coefficients above, its displacement
        ``x₁ … x_K``), or ``None`` as ``subspace``.
      batch_size: ``B`` of minibatch SGD when given (``None``: the SGD fields below are too).
      noise_rate: ``½(lr/B)tr(FΣ)``, ``dE[Δu]/dt`` at ``t = 0`` from minibatch noise alone.
      sgd_coefficients: ``E[Δu]`` under SGD as a polynomial in ``t`` at ``lr``
        (:attr:`geomcollapse.series.SGDForecast.mean_coefficients`, docs/theory.md §8).
      sgd_validity_time: its window (:attr:`~geomcollapse.series.SGDForecast.validity_time`).
      sgd_crossing_step: the smallest step with the SGD forecast ``≥ threshold`` inside it.
    """

    n: int
    dtype: str
    fisher: str
    d: int
    d_rule: str
    share: float
    lr: float | None
    steps: int | None
    threshold: float | None
    order: int
    taylor_route: str
    aic: theory.AICReport
    eigenvalues: tuple[float, ...]
    eigen_residuals: tuple[float, ...]
    trace: float
    trace_stderr: float
    trace_method: str
    spectrum_method: str
    top_share: float
    skill_gradient_norm: float
    task_gradient_norm: float
    delta_u_coefficients: tuple[float, ...]
    projected_coefficients: tuple[float, ...]
    validity_time: float
    projected_validity_time: float
    time_scale: float
    first_order_time: float
    forecast_t: tuple[float, ...]
    forecast_delta_u: tuple[float, ...]
    forecast_projected: tuple[float, ...]
    horizon_time: float | None
    overlap_gradient: float
    overlap_baseline: float
    overlap_geometric: float | None
    overlap_fisher: float | None
    crossing_step: int | None
    crossing_time: float | None
    warnings: tuple[str, ...]
    num_matvecs: int
    subspace: Any = dataclasses.field(default=None, compare=False, repr=False, kw_only=True)
    series: Any = dataclasses.field(default=None, compare=False, repr=False, kw_only=True)
    params_layout: Any = dataclasses.field(default=None, compare=False, repr=False, kw_only=True)
    batch_size: int | None = None
    noise_rate: float | None = None
    sgd_coefficients: tuple[float, ...] | None = None
    sgd_validity_time: float | None = None
    sgd_crossing_step: int | None = None

    @property
    def planned_time(self) -> float | None:
        """``lr·steps``, the flow time the planned fine-tuning reaches (``None`` without a plan)."""
        if self.lr is None or self.steps is None:
            return None
        return self.lr * self.steps

    @property
    def window_steps(self) -> float | None:
        """``validity_time / lr``: SGD steps the forecast covers (``None`` without ``lr``)."""
        return None if self.lr is None else self.validity_time / self.lr

    def forecast(self, ts: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(Δu, projected loss)`` of the truncated series at times ``ts`` (float64 numpy)."""
        ts = np.asarray(ts, np.float64)
        return (
            np.polynomial.polynomial.polyval(ts, np.asarray(self.delta_u_coefficients)),
            np.polynomial.polynomial.polyval(ts, np.asarray(self.projected_coefficients)),
        )

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        """A JSON-able dict (non-finite floats as ``'inf'``, ``'-inf'``, ``'nan'``)."""
        out = {}
        for field in _json_fields(type(self)):
            value = getattr(self, field.name)
            out[field.name] = _encode(value._asdict() if field.name == "aic" else value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Diagnosis:
        """The inverse of :meth:`to_dict`; ``ValueError`` on missing or unknown fields."""
        names = {f.name for f in _json_fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = set(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"data must hold exactly the fields {sorted(names)}, got {got}")
        values = {}
        for name, value in data.items():
            try:
                values[name] = _decode_field(name, value)
            except (TypeError, ValueError) as err:  # a malformed entry: one line naming it
                raise ValueError(f"data[{name!r}] is malformed: {err}") from err
        _check_consistent(values)
        return cls(**values)

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON (no bare NaN/Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Diagnosis:
        """The inverse of :meth:`to_json`: ``text`` is the JSON itself (a saved directory
        is read by :meth:`load`); ``ValueError`` when ``text`` is a path."""
        if _is_a_path(text):
            raise ValueError(
                f"text: {str(text)!r} is a path, not JSON text: read a saved diagnosis with "
                "Diagnosis.load(directory), or pass the file's contents"
            )
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- reports

    def to_markdown(self, figure: str | None = None) -> str:
        """A one-page Markdown report; ``figure`` (a path) is linked when given."""
        return _markdown(self, figure)

    def figure(self):
        """A one-page :class:`matplotlib.figure.Figure`: spectrum, forecast with window, AIC bars.

        Built without ``pyplot`` (no global figure state); matplotlib is imported here.
        """
        from geomcollapse.diagnosis.plot import diagnosis_figure

        return diagnosis_figure(self)

    def save(self, directory: str | Path, *, arrays: bool = False) -> tuple[Path, ...]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory`` (created).

        ``arrays=True`` also writes :data:`ARRAYS_FILE` (``M(θ*)`` and the forecast's
        ``x₁ … x_K`` as raveled rows), from which :meth:`load` rebuilds what the monitor
        needs; ``ValueError`` when this diagnosis carries none (read from JSON alone).
        """
        if arrays:
            flat = _flat_arrays(self)  # refuses before anything is written
        out = writable_directory(directory, "directory")  # ValueError, not FileExistsError
        out.mkdir(parents=True, exist_ok=True)
        paths = tuple(out / name for name in REPORT_FILES)
        paths[0].write_text(self.to_json() + "\n", encoding="utf-8")
        paths[1].write_text(self.to_markdown(figure=paths[2].name), encoding="utf-8")
        self.figure().savefig(paths[2], dpi=150)
        if arrays:
            with open(out / ARRAYS_FILE, "wb") as f:
                np.savez(f, **flat)
            paths = (*paths, out / ARRAYS_FILE)
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> Diagnosis:
        """The diagnosis :meth:`save` wrote into ``directory``: ``report.json``, with
        ``subspace`` and ``series`` rebuilt from :data:`ARRAYS_FILE` when it is there
        (raveled ``(d, n)`` and ``(K, n)`` rows, as :func:`geomcollapse.monitor.monitor`
        takes them); ``ValueError`` naming ``directory`` when ``report.json`` is missing."""
        path = Path(directory)
        if not (path / REPORT_FILES[0]).is_file():
            raise ValueError(f"directory: no {REPORT_FILES[0]} in {path}")
        try:
            dg = cls.from_json((path / REPORT_FILES[0]).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"directory: {path / REPORT_FILES[0]} is damaged (not JSON: {err}); "
                "run the diagnosis again"
            ) from None
        if not (path / ARRAYS_FILE).is_file():
            return dg
        return _with_flat_arrays(dg, path / ARRAYS_FILE)


def _is_a_path(text: Any) -> bool:
    """Whether ``text`` names a file or directory rather than holding JSON (no ``{``)."""
    if isinstance(text, Path):
        return True
    if not isinstance(text, str) or "{" in text or not text.strip():
        return False
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # a name too long, or one holding a NUL byte
        return False


def _json_fields(cls) -> list[dataclasses.Field]:
    """The fields :meth:`Diagnosis.to_dict` writes: all but the carried arrays."""
    return [f for f in dataclasses.fields(cls) if f.name not in _ARRAY_FIELDS]


def _flat_arrays(dg: Diagnosis) -> dict[str, np.ndarray]:
    """``M(θ*)`` and the forecast as host arrays, vectors raveled (``ravel_pytree`` order)."""
    if dg.subspace is None or dg.series is None:
        raise ValueError(
            "arrays: this diagnosis carries no subspace (read from JSON alone): save the one "
            "geomcollapse.diagnose returned"
        )
    import jax
    from jax.flatten_util import ravel_pytree

    def rows(stack: Any) -> np.ndarray:
        if isinstance(stack, (np.ndarray, jax.Array)) and np.ndim(stack) == 2:
            return np.asarray(jax.device_get(stack))
        return np.asarray(jax.device_get(jax.vmap(lambda x: ravel_pytree(x)[0])(stack)))

    s, f = dg.subspace, dg.series
    return {
        "values": np.asarray(jax.device_get(s.values)),
        "basis": rows(s.basis),
        "residuals": np.asarray(jax.device_get(s.residuals)),
        "converged": np.asarray(jax.device_get(s.converged)),
        "delta_u": np.asarray(jax.device_get(f.delta_u)),
        "projected": np.asarray(jax.device_get(f.projected)),
        "displacement": rows(f.displacement),
        **(
            {} if dg.params_layout is None else {"layout": np.asarray(json.dumps(dg.params_layout))}
        ),
    }


def _with_flat_arrays(dg: Diagnosis, path: Path) -> Diagnosis:
    """``dg`` with ``subspace`` and ``series`` read from an :data:`ARRAYS_FILE`."""
    import jax.numpy as jnp

    from geomcollapse.series import Series
    from geomcollapse.subspace import Subspace

    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"directory: {path} is damaged ({type(err).__name__}); save the diagnosis again"
        ) from None
    expected = {"values", "basis", "residuals", "converged", "delta_u", "projected"}
    layout = _layout(a.pop("layout", None), dg.n)  # files saved before it carry none
    if set(a) != expected | {"displacement"} or not _arrays_agree(a, dg) or layout is False:
        raise ValueError(f"directory: {path.name} does not hold the arrays of report.json")
    subspace = Subspace(*(jnp.asarray(a[k]) for k in ("values", "basis", "residuals", "converged")))
    series = Series(*(jnp.asarray(a[k]) for k in ("delta_u", "projected", "displacement")))
    return dataclasses.replace(dg, subspace=subspace, series=series, params_layout=layout)


def _layout(stored: Any, n: int) -> tuple | bool | None:
    """The ``params_layout`` an arrays file stores as JSON text (``None``: it has none;
    ``False``: it is damaged or its shapes do not hold ``n`` parameters)."""
    if stored is None:
        return None
    try:
        layout = as_layout(json.loads(str(stored)))
    except (ValueError, TypeError):
        return False
    return layout if sum(math.prod(shape) for _, shape in layout) == n else False


def _arrays_agree(a: dict, dg: Diagnosis) -> bool:
    """Shapes of ``d`` eigenpairs and ``K = order`` coefficients on ``n`` parameters, every
    number finite, and ``values`` and ``delta_u`` those of ``report.json``."""
    d, n, k = dg.d, dg.n, len(dg.delta_u_coefficients) - 1
    shapes = {"values": (d,), "basis": (d, n), "residuals": (d,), "converged": ()}
    shapes.update(delta_u=(k + 1,), projected=(k + 1,), displacement=(k, n))
    if any(np.shape(a[key]) != shape for key, shape in shapes.items()):
        return False
    if not all(np.all(np.isfinite(a[key])) for key in shapes if key != "converged"):
        return False
    if bool(a["converged"]) != bool(dg.aic.converged):  # M certified as report.json says
        return False
    values = np.asarray(dg.eigenvalues[:d], np.float64)
    return np.allclose(a["values"], values, rtol=1e-6, atol=0) and np.allclose(
        a["delta_u"], dg.delta_u_coefficients, rtol=1e-6, atol=1e-300
    )


_TEXT_FIELDS = {
    "dtype",
    "fisher",
    "d_rule",
    "taylor_route",
    "trace_method",
    "spectrum_method",
    "warnings",
}
_SEQUENCE_FIELDS = {
    "eigenvalues",
    "eigen_residuals",
    "delta_u_coefficients",
    "projected_coefficients",
    "forecast_t",
    "forecast_delta_u",
    "forecast_projected",
    "sgd_coefficients",
}
_INT_FIELDS = {
    "n",
    "d",
    "steps",
    "order",
    "crossing_step",
    "num_matvecs",
    "batch_size",
    "sgd_crossing_step",
}


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode_field(name: str, value: Any) -> Any:
    """The field ``name`` of a :class:`Diagnosis` from its :meth:`Diagnosis.to_dict` form."""
    if name == "aic":
        fields = set(theory.AICReport._fields)
        if not isinstance(value, dict) or set(value) != fields:
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"it must hold exactly the fields {sorted(fields)}, got {got}")
        report = {k: _decode(v) for k, v in value.items()}
        kind = {"eigen_residuals": "a list of numbers", "converged": "true or false"}
        for k, v in report.items():  # eigen_residuals a list of numbers, converged a bool
            items = v if isinstance(v, tuple) else (v,)
            ok = isinstance(v, tuple) == (k == "eigen_residuals") and all(
                isinstance(x, bool) if k == "converged" else isinstance(x, float) for x in items
            )
            if not ok:
                raise ValueError(f"{k} must be {kind.get(k, 'a number')}, got {value[k]!r}")
        return theory.AICReport(**{**report, "d": int(report["d"])})
    if name in _TEXT_FIELDS:
        text = tuple(value) if isinstance(value, list) else value
        items = text if name == "warnings" and isinstance(text, tuple) else (text,)
        if isinstance(text, tuple) != (name == "warnings") or not all(
            isinstance(x, str) for x in items
        ):
            kind = "a list of strings" if name == "warnings" else "a string"
            raise ValueError(f"it must be {kind}, got {value!r}")
        return text
    if name in _SEQUENCE_FIELDS and not (isinstance(value, list) or value is None):
        raise ValueError(f"it must be a list of numbers, got {value!r}")
    if name in _INT_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"it must be an integer, got {value!r}")
        return int(value)
    return _decode(value)


def _check_consistent(v: dict) -> None:
    """What a diagnosis's fields say of each other: ``1 ≤ d < n``, at least ``d``
    eigenvalues (as many residuals), ``K + 1`` coefficients, a positive ``lr`` or none."""
    d, n, order = v["d"], v["n"], v["order"]
    problems = []
    if not 1 <= d < n:
        problems.append(f"d = {d} is not in [1, n) with n = {n}")
    if len(v["eigenvalues"]) < d or len(v["eigen_residuals"]) != len(v["eigenvalues"]):
        problems.append(
            f"{len(v['eigenvalues'])} eigenvalues and {len(v['eigen_residuals'])} residuals "
            f"for d = {d}"
        )
    if order < 1 or len(v["delta_u_coefficients"]) != order + 1:
        problems.append(f"{len(v['delta_u_coefficients'])} coefficients for order {order}")
    lr = v["lr"]
    if lr is not None and not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr = {lr!r} is not a positive number")
    problems += _more_inconsistencies(v)
    if problems:
        raise ValueError(f"data is inconsistent: {'; '.join(problems)}")


def _more_inconsistencies(v: dict) -> list[str]:
    """``K + 1`` projected coefficients, equally long forecast curves, ``aic.d = d``, counts
    (``steps``, ``crossing_step``, ``batch_size``, ...) ``≥ 1`` or none, a positive
    ``threshold`` or none."""
    problems, order = [], v["order"]
    if len(v["projected_coefficients"]) != order + 1:
        problems.append(
            f"{len(v['projected_coefficients'])} projected coefficients for order {order}"
        )
    curves = {k: len(v[k]) for k in ("forecast_t", "forecast_delta_u", "forecast_projected")}
    if len(set(curves.values())) != 1:
        problems.append(f"forecast curves of different lengths {curves}")
    if v["aic"].d != v["d"]:
        problems.append(f"aic.d = {v['aic'].d} but d = {v['d']}")
    for key in ("steps", "crossing_step", "batch_size", "sgd_crossing_step", "num_matvecs"):
        if v[key] is not None and v[key] < (0 if key == "num_matvecs" else 1):
            problems.append(f"{key} = {v[key]} is not a count")
    threshold = v["threshold"]
    if threshold is not None and not (
        isinstance(threshold, float) and math.isfinite(threshold) and threshold > 0
    ):
        problems.append(f"threshold = {threshold!r} is not a positive number")
    return problems


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, str):
        return float(value)
    if isinstance(value, bool) or value is None:
        return value
    return float(value)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4g}"


def _markdown(dg: Diagnosis, figure: str | None) -> str:
    """The one-page Markdown report of :meth:`Diagnosis.to_markdown`."""
    lines = ["# geomcollapse diagnosis", ""]
    plan = []
    if dg.lr is not None:
        plan.append(f"SGD at lr = {dg.lr:g} (t = lr·k)")
    if dg.steps is not None:
        plan.append(f"{dg.steps} planned steps (t = {dg.planned_time:.4g})")
    if dg.threshold is not None:
        plan.append(f"threshold Δu = {dg.threshold:g}")
    lines += [
        f"n = {dg.n} parameters ({dg.dtype}), {dg.fisher} skill Fisher, d = {dg.d} "
        f"({dg.d_rule}), forecast order {dg.order} (Taylor route {dg.taylor_route})"
        + (": " + ", ".join(plan) if plan else "")
        + ".",
        "",
        "## Warnings",
        "",
    ]
    lines += [f"- {w}" for w in dg.warnings] if dg.warnings else ["None."]
    lines += _markdown_aic(dg) + _markdown_forecast(dg)
    if figure is not None:
        lines += [f"![spectrum, forecast and AIC]({figure})", ""]
    return "\n".join(lines)


def _markdown_aic(dg: Diagnosis) -> list[str]:
    """The AIC table and the skill spectrum's table."""
    r = dg.aic
    lines = [
        "",
        "## Alignment Instability Condition (Def. 5.1)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| tail mass Σ_{{j>d}} λ_j | {_fmt(r.tail_mass)} |",
        f"| λ_d | {_fmt(r.lambda_d)} |",
        f"| ‖Pg‖ (orthogonality) | {_fmt(r.orthogonality)} |",
        f"| ‖F^{{1/2}}Pg‖ | {_fmt(r.fisher_orthogonality)} |",
        f"| γ = ‖F^{{1/2}}PHg‖ (coupling) | {_fmt(r.coupling)} |",
        f"| quartic coefficient γ²/8 | {_fmt(r.quartic_coefficient)} |",
        f"| crossover t_c = 2‖F^{{1/2}}Pg‖/γ | {_fmt(r.crossover_time)} |",
        f"| tail crossover 2(gᵀ(I−P)F(I−P)g)^{{1/2}}/γ | {_fmt(r.tail_crossover_time)} |",
        f"| eigenpairs converged | {r.converged} (max residual "
        f"{_fmt(max(r.eigen_residuals) if r.eigen_residuals else None)}) |",
        "",
        "## Skill spectrum",
        "",
        f"tr F = {_fmt(dg.trace)} ± {_fmt(dg.trace_stderr)} ({dg.trace_method}); the top d = "
        f"{dg.d} hold {dg.top_share:.1%}.",
        "",
        "| i | λ_i | share of tr F (cumulative) | residual |",
        "|---|---|---|---|",
    ]
    cum = np.cumsum(dg.eigenvalues) / dg.trace
    for i, (lam, c, res) in enumerate(
        zip(dg.eigenvalues, cum, dg.eigen_residuals, strict=True), start=1
    ):
        mark = " ← d" if i == dg.d else ""
        lines.append(f"| {i}{mark} | {_fmt(lam)} | {c:.1%} | {_fmt(res)} |")
    return lines


def _markdown_forecast(dg: Diagnosis) -> list[str]:
    """The series' coefficients, the window, the crossing and the overlap with ``M``."""
    crossing = (
        f"step {dg.crossing_step} (t = {_fmt(dg.crossing_time)})"
        if dg.crossing_step is not None
        else "—"
    )
    lines = [
        "",
        "## Forecast along gradient flow (docs/theory.md §6)",
        "",
        "| k | c_k of Δu(t) | c_k of ½‖F^{1/2}Px(t)‖² |",
        "|---|---|---|",
    ]
    for k, (a, b) in enumerate(
        zip(dg.delta_u_coefficients, dg.projected_coefficients, strict=True)
    ):
        lines.append(f"| {k} | {_fmt(a)} | {_fmt(b)} |")
    window_steps = "" if dg.lr is None else f" (k ≈ {_fmt(dg.window_steps)} SGD steps)"
    lines += [
        "",
        f"- validity window of Δu: t ≤ {_fmt(dg.validity_time)}{window_steps}; of the "
        f"projected loss: t ≤ {_fmt(dg.projected_validity_time)}",
        f"- ‖∇u(θ*)‖ = {_fmt(dg.skill_gradient_norm)}, ‖g(θ*)‖ = {_fmt(dg.task_gradient_norm)}",
        f"- Δu crosses the threshold at: {crossing}",
        *_markdown_sgd(dg),
        "",
        "## Overlap with M (Section 7)",
        "",
        f"- first update ‖Pg‖/‖g‖ = {_fmt(dg.overlap_gradient)} (a random direction: "
        f"(d/n)^{{1/2}} = {_fmt(dg.overlap_baseline)})",
        f"- forecast update x(t) at t = {_fmt(dg.horizon_time)}: ‖Px‖/‖x‖ = "
        f"{_fmt(dg.overlap_geometric)}, ½‖F^{{1/2}}Px‖² = {_fmt(dg.overlap_fisher)}",
        "",
    ]
    return lines


def _markdown_sgd(dg: Diagnosis) -> list[str]:
    """The minibatch-SGD forecast's lines (none without ``batch_size``)."""
    if dg.batch_size is None:
        return []
    return [
        f"- minibatch SGD (B = {dg.batch_size}, docs/theory.md §8): noise rate ½(lr/B)tr(FΣ) = "
        f"{_fmt(dg.noise_rate)} per unit t; E[Δu] window t ≤ {_fmt(dg.sgd_validity_time)}; "
        f"crosses the threshold at step {_fmt(dg.sgd_crossing_step)}",
    ]
