"""One call that diagnoses a model before fine-tuning: AIC, spectrum, forecast, overlap, warnings.

:func:`diagnose` composes the library's measurements at ``θ*`` for one skill
and one fine-tuning task (docs/theory.md §2, §5, §6): the skill Fisher's top
eigenpairs and trace (:func:`geomcollapse.linalg.top_eigenpairs`,
:func:`geomcollapse.aic.fisher_trace`), the AIC report of Def. 5.1
(:func:`geomcollapse.theory.aic_report`), the Taylor forecast of ``Δu(t)`` and
of the projected loss ``½‖F^{1/2}Px(t)‖²`` with its validity window
(:func:`geomcollapse.series.delta_u_series`), the overlap of the forecast
update with ``M`` (:class:`geomcollapse.subspace.Subspace`), the SGD step at
which ``Δu`` is forecast to cross a threshold (``t = lr·k``), and warnings in
plain words. The result is a :class:`Diagnosis`: JSON round trip, Markdown,
a one-page figure.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse import aic, curvature, linalg, series, theory
from geomcollapse._checks import (
    finite_leaves,
    open_unit_float,
    positive_float,
    positive_int,
    prng_key,
    probe_count,
    subspace_dim,
)
from geomcollapse._progress import progress_bar
from geomcollapse._sharding import (
    Layout,
    is_sharded,
    stack_combine,
    stack_dot,
    tree_dot,
    tree_norm,
)
from geomcollapse.subspace import Subspace

__all__ = [
    "DEFAULT_SHARE",
    "Diagnosis",
    "crossing_step",
    "diagnose",
    "first_order_time",
    "projected_coefficients",
]

PyTree = Any

DEFAULT_SHARE = 0.9  # d=None: the top-d eigenvalues must hold this share of tr F
MAX_ORDER = 12  # the highest series order accepted (its cost grows as 2^order)
DEFAULT_ORDER = 4  # diagnose's series order unless told
REPORT_FILES = ("report.json", "report.md", "report.png")  # what Diagnosis.save writes
DEFAULT_MAX_D = 64  # d=None: the largest d the rule may pick
DENSE_MAX_N = 2048  # spectrum='auto': F formed densely (n matvecs, eigh) up to this n
FIRST_K = 8  # d=None: eigenpairs computed first (then doubled until the share is reached)
NUM_FORECAST_TIMES = 96  # points of the stored forecast curve
_FISHERS = ("true", "empirical")
# The series and the dense F are computed once per diagnosis, so for a small model their
# compile time is what counts: XLA's backend at optimisation level 0 compiled the order-4
# series of a one-block transformer in 7 s of CPU instead of 12 s (2-core CPU), equal to
# rounding. Used only on the CPU and up to DENSE_MAX_N parameters: for a large model the
# run time of unoptimised code would cost more than the compile time saved.
_ONE_SHOT = {"xla_backend_optimization_level": 0}


def _one_shot_options(n: int) -> dict:
    """Compiler options for a once-per-diagnosis program on ``n`` parameters."""
    return _ONE_SHOT if n <= DENSE_MAX_N and jax.default_backend() == "cpu" else {}


# --------------------------------------------------------------------------- the result


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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = _encode(value._asdict() if field.name == "aic" else value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Diagnosis:
        """The inverse of :meth:`to_dict`; ``ValueError`` on missing or unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = set(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"data must hold exactly the fields {sorted(names)}, got {got}")
        values = {}
        for name, value in data.items():
            try:
                values[name] = _decode_field(name, value)
            except (TypeError, ValueError) as err:  # a malformed entry: one line naming it
                raise ValueError(f"data[{name!r}] is malformed: {err}") from err
        return cls(**values)

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON (no bare NaN/Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Diagnosis:
        """The inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- reports

    def to_markdown(self, figure: str | None = None) -> str:
        """A one-page Markdown report; ``figure`` (a path) is linked when given."""
        return _markdown(self, figure)

    def figure(self):
        """A one-page :class:`matplotlib.figure.Figure`: spectrum, forecast with window, AIC bars.

        Built without ``pyplot`` (no global figure state); matplotlib is imported here.
        """
        from geomcollapse._diagnose_plot import diagnosis_figure

        return diagnosis_figure(self)

    def save(self, directory: str | Path) -> tuple[Path, Path, Path]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory`` (created)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = tuple(out / name for name in REPORT_FILES)
        paths[0].write_text(self.to_json() + "\n", encoding="utf-8")
        paths[1].write_text(self.to_markdown(figure=paths[2].name), encoding="utf-8")
        self.figure().savefig(paths[2], dpi=150)
        return paths


_TEXT_FIELDS = {"dtype", "fisher", "d_rule", "trace_method", "spectrum_method", "warnings"}
_INT_FIELDS = {"n", "d", "steps", "order", "crossing_step", "num_matvecs"}


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
        return tuple(value) if isinstance(value, list) else value
    if name in _INT_FIELDS:
        return None if value is None else int(value)
    return _decode(value)


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, str):
        return float(value)
    if isinstance(value, bool) or value is None:
        return value
    return float(value)


# --------------------------------------------------------------------------- crossing step


def crossing_step(
    coefficients: Any, threshold: float, lr: float, t_max: float = math.inf
) -> int | None:
    """The smallest SGD step ``k ≥ 1`` with ``Σ_j c_j (lr·k)^j ≥ threshold`` and ``lr·k ≤ t_max``.

    Found exactly from the real roots of ``Σ_j c_j t^j − threshold`` (each
    interval where the polynomial lies above the threshold is entered at its
    first step), not by scanning ``k``. ``None`` when no such step exists.
    """
    c = np.array(coefficients, np.float64)
    threshold, lr = float(threshold), positive_float(lr, "lr")
    c[0] -= threshold

    def above(t: float) -> bool:
        return float(np.polynomial.polynomial.polyval(t, c)) >= 0

    nonzero = np.flatnonzero(c)
    if nonzero.size == 0:  # the forecast equals the threshold everywhere
        return 1 if lr <= t_max else None
    roots = np.roots(c[: nonzero[-1] + 1][::-1]) if nonzero[-1] > 0 else np.array([])
    real = np.sort(roots[np.abs(roots.imag) <= 1e-9 * np.maximum(np.abs(roots), 1e-300)].real)
    edges = [0.0, *[r for r in real if r > 0], math.inf]
    for a, b in itertools.pairwise(edges):
        first = max(1, math.ceil(a / lr) - 1)  # one step early: the root is rounded
        for k in range(first, first + 4):
            t = lr * k
            if t > t_max or t > b * (1 + 1e-12) + 1e-300:
                break
            if above(t):
                return k
        if lr * first > t_max:
            return None
    return None


def first_order_time(coefficients: Any, time_scale: float, dtype: Any = np.float64) -> float:
    """``t₁ > 0`` with ``|c₁|t₁ = Σ_{k≥2}|c_k|t₁^k``: where Δu's first-order term stops dominating.

    ``nan`` when ``c₁`` is at rounding level: its term ``|c₁|τ`` at the flow's
    time scale ``τ`` is below ``√eps`` × the largest ``|c_k|τ^k`` (the test
    :func:`geomcollapse.series.polynomial_validity_time` applies); ``inf`` when
    no higher coefficient is non-zero.
    """
    c = np.abs(np.asarray(coefficients, np.float64))
    if c.size < 2 or c[1] == 0:
        return math.nan
    if math.isfinite(time_scale) and time_scale > 0:
        terms = c * time_scale ** np.arange(c.size)
        if terms[1] <= float(np.sqrt(np.finfo(dtype).eps)) * float(np.max(terms)):
            return math.nan
    higher = c[2:]
    if not np.any(higher > 0):
        return math.inf
    # |c₁| = Σ_{k≥2} |c_k| t^{k−1}: the right side increases on t > 0, one positive root
    poly = np.r_[-c[1], higher]  # coefficient of t^j, j = 0 … K−1
    top = np.flatnonzero(poly)[-1]
    roots = np.roots(poly[: top + 1][::-1])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(np.abs(roots), 1e-300)].real
    return float(np.min(real[real > 0]))


# --------------------------------------------------------------------------- operators


def _cached(factory: Callable, fn: Callable) -> Callable:
    """``factory(fn)``, the same object for the same ``fn`` (one compile per user function)."""
    try:
        return _CACHED_FACTORIES[factory](fn)
    except TypeError:  # an unhashable function: built (and compiled) per call
        return factory(fn)


def _true_fvp(skill_logits: Callable) -> Callable:
    return curvature.fisher_vp(skill_logits)


def _empirical_fvp(skill_loss: Callable) -> Callable:
    def example_loss(params, example):
        return skill_loss(params, *jax.tree.map(lambda a: a[None], example))

    efvp = curvature.empirical_fisher_vp(example_loss)

    def fvp(params, v, *skill_args):
        return efvp(params, v, tuple(skill_args))

    return fvp


def _flat_operator(fvp: Callable) -> Callable:
    """``(v (n,), params, args) -> ravel(fvp(params, unravel(v), *args))``, jitted."""

    def matvec(v, params, args):
        unravel = ravel_pytree(params)[1]
        return ravel_pytree(fvp(params, unravel(v), *args))[0]

    return jax.jit(matvec)


def _cast_output(fisher: Callable) -> Callable:
    """``fisher`` with its output cast to the dtypes of ``params``."""

    def cast(params, v, *args):
        return jax.tree_util.tree_map(
            lambda o, p: o.astype(p.dtype), fisher(params, v, *args), params
        )

    return cast


_CACHED_FACTORIES = {
    f: functools.lru_cache(maxsize=32)(f)
    for f in (_true_fvp, _empirical_fvp, _flat_operator, _cast_output)
}


# --------------------------------------------------------------------------- validation


def _args_tuple(args: Any, name: str) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise ValueError(
            f"{name} must be a tuple of the loss's extra arguments, got {type(args).__name__} "
            f"(wrap a single array as ({name[:-5]}_array,))"
        )
    return tuple(args)


def _evaluate_abstractly(fn: Callable, args: tuple, name: str, call: str) -> Any:
    """``jax.eval_shape(fn, *args)``: the user's function traced once, nothing computed.

    Whatever it raises (a wrong feature size in the data, too few arguments, a
    missing key in ``params``) becomes one ``ValueError`` line naming ``name``
    and the ``call`` that failed, instead of a JAX traceback from deep inside
    the diagnosis; the original is chained (``__cause__``) for debugging.
    """
    try:
        return jax.eval_shape(fn, *args)
    except Exception as err:  # any failure of a user function is reported in one line
        raise ValueError(
            f"{name}: calling {call} failed: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}"
        ) from err


def _dense_route(spectrum: Any, trace: Any, n: int, sharded: bool) -> bool:
    """Whether ``F`` is formed densely (``spectrum``, ``n``, sharded ``params``); raises on
    a bad ``spectrum`` or ``trace`` and on ``trace='hutchinson'`` with ``spectrum='dense'``,
    whose ``tr F`` is read exactly off ``F``'s diagonal (``'auto'`` then takes Lanczos)."""
    if spectrum not in ("auto", "dense", "lanczos"):
        raise ValueError(f"spectrum must be 'auto', 'dense' or 'lanczos', got {spectrum!r}")
    if trace not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"trace must be 'auto', 'exact' or 'hutchinson', got {trace!r}")
    if spectrum == "dense" and n > DENSE_MAX_N:
        raise ValueError(f"spectrum='dense' forms F as n × n: n={n} exceeds {DENSE_MAX_N}")
    if spectrum == "dense" and sharded:
        raise ValueError(
            "spectrum='dense' forms F as n × n on the host, which gathers params sharded "
            "over several devices; use spectrum='lanczos' (what 'auto' picks for them)"
        )
    # 'auto' takes the dense route only where it can honour the trace asked for
    small = n <= DENSE_MAX_N and trace != "hutchinson"
    dense = not sharded and (spectrum == "dense" or (spectrum == "auto" and small))
    if dense and trace == "hutchinson":
        raise ValueError(
            f"trace='hutchinson' is the Lanczos route's estimate; the dense route (spectrum="
            f"{spectrum!r}, n={n} ≤ {DENSE_MAX_N}) reads tr F exactly off F's diagonal: pass "
            "spectrum='lanczos' for a Hutchinson trace"
        )
    return dense


def _lanczos_options(
    tol: Any, max_matvecs: Any, num_probes: Any, dtype: Any, n: int, first_k: int
) -> tuple[float, int | None, int]:
    """``(tol, max_matvecs, num_probes)`` checked as the Lanczos route checks them
    (:func:`geomcollapse.linalg.top_eigenpairs`, :func:`geomcollapse.aic.fisher_trace`),
    whatever the route, so that a bad value is refused on the dense route too; ``tol``
    defaults to ``max(1e-8, 100·eps)``. ``first_k``: the pairs Lanczos computes first."""
    if tol is None:
        tol = max(1e-8, 100 * float(jnp.finfo(dtype).eps))
    tol = linalg.certifiable_tol(tol, dtype)
    if max_matvecs is not None:
        max_matvecs = positive_int(max_matvecs, "max_matvecs")
        if min(max_matvecs, n) < first_k:
            raise ValueError(
                f"max_matvecs={max_matvecs} is smaller than k={first_k}, the eigenpairs "
                "Lanczos computes first"
            )
    return tol, max_matvecs, probe_count(num_probes)


def _scalar_loss(fn: Any, params: PyTree, args: tuple, name: str, call: str) -> None:
    """Raise unless ``fn(params, *args)`` (``call`` in messages) runs and returns a
    floating scalar."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
    out = _evaluate_abstractly(fn, (params, *args), name, call)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"{name} must return a floating scalar, got {getattr(out, 'shape', type(out))} "
            f"{getattr(out, 'dtype', '')}".rstrip()
        )


def _fisher_operator(
    fisher: Any, skill_loss: Callable, skill_logits: Any, params: PyTree, skill_args: tuple
) -> tuple[Callable, str]:
    """The skill Fisher's matvec ``fvp(params, v, *skill_args)`` and its label."""
    if callable(fisher):
        return _check_matvec_output(fisher, params, skill_args), "custom"
    if fisher not in _FISHERS:
        raise ValueError(
            f"fisher must be 'true', 'empirical' or a matvec fisher_vp(params, v, *skill_args), "
            f"got {fisher!r}"
        )
    if fisher == "true":
        if skill_logits is None or not callable(skill_logits):
            raise ValueError(
                "skill_logits is required for fisher='true': the logits whose softmax is the "
                "skill's output distribution, skill_logits(params, *skill_args) -> (..., C)"
            )
        out = _evaluate_abstractly(
            skill_logits, (params, *skill_args), "skill_logits", "skill_logits(params, *skill_args)"
        )
        shape = getattr(out, "shape", None)
        if shape is None or not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                f"skill_logits must return floating logits of shape (..., C), got "
                f"{shape or type(out).__name__}"
            )
        if len(shape) < 2 or shape[-1] < 2:
            # (N,) would be read as ONE categorical over N classes (e.g. a binary
            # classifier's single logit per example): refuse rather than guess.
            raise ValueError(
                f"skill_logits must return logits of shape (N, ..., C) with an example axis "
                f"and C ≥ 2 classes, got shape {shape}; for one example return z[None], "
                "for one logit z per example (a binary classifier) "
                "jnp.stack([jnp.zeros_like(z), z], -1)"
            )
        return _cached(_true_fvp, skill_logits), "true"
    leaves = jax.tree.leaves(skill_args)
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        raise ValueError(
            "skill_args must hold arrays sharing one leading example axis for fisher="
            f"'empirical' (per-example gradients), got leading sizes {sorted(map(str, sizes))}"
        )
    # per-example gradients call skill_loss on batches of one example
    first = tuple(jax.tree.map(lambda a: a[:1], skill_args))
    _scalar_loss(
        skill_loss, params, first, "skill_loss", "skill_loss(params, *skill_args) on one example"
    )
    return _cached(_empirical_fvp, skill_loss), "empirical"


def _check_matvec_output(fisher: Callable, params: PyTree, skill_args: tuple) -> Callable:
    """A custom ``fisher(params, v, *skill_args)`` must return floating arrays shaped like
    ``params``; one of another floating dtype (a float64 ``F v`` for float32 params) is
    cast to ``params``' dtypes. Returns the matvec to use."""
    out = _evaluate_abstractly(
        fisher, (params, params, *skill_args), "fisher", "fisher(params, v, *skill_args)"
    )
    want = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(out)

    def leaves(tree) -> list[str]:
        return [f"{jnp.dtype(a.dtype).name}{list(np.shape(a))}" for a in jax.tree.leaves(tree)]

    shapes_ok = got == want and all(
        np.shape(o) == np.shape(p) and jnp.issubdtype(o.dtype, jnp.floating)
        for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True)
    )
    if not shapes_ok:
        raise ValueError(
            "fisher must return F v as a pytree like params (same structure and shapes, "
            f"floating): params have {want.num_leaves} leaves "
            f"{', '.join(leaves(params))[:200]}; it returned {got.num_leaves}: "
            f"{', '.join(leaves(out))[:200]}"
        )
    if leaves(out) == leaves(params):
        return fisher
    return _cached(_cast_output, fisher)


# --------------------------------------------------------------------------- the diagnosis


def check_plan(n: int, *, d: Any, lr: Any, steps: Any, threshold: Any, order: Any) -> tuple:
    """:func:`diagnose`'s ``(d, lr, steps, threshold, order)``, checked for ``n`` parameters.

    Needs no array, so a caller that knows ``n`` (``diagnose_checkpoint``, from
    the architecture) checks them before loading anything. ``d`` and ``lr``
    may be ``None``; ``steps`` and ``threshold`` need ``lr`` (``t = lr·k``).
    """
    order = positive_int(order, "order")
    if not 2 <= order <= MAX_ORDER:
        raise ValueError(
            f"order must lie in [2, {MAX_ORDER}] (a validity window needs two terms; the "
            f"series costs about 2^order gradients), got {order}"
        )
    d = None if d is None else subspace_dim(d, n)
    lr = None if lr is None else positive_float(lr, "lr")
    steps = None if steps is None else positive_int(steps, "steps")
    threshold = None if threshold is None else positive_float(threshold, "threshold")
    if lr is None and (steps is not None or threshold is not None):
        which = "steps" if steps is not None else "threshold"
        raise ValueError(f"lr is required with {which}: SGD steps map to flow time as t = lr·k")
    return d, lr, steps, threshold, order


def diagnose(
    skill_loss: Callable[..., jax.Array],
    task_loss: Callable[..., jax.Array],
    params: PyTree,
    *,
    skill_args: tuple = (),
    task_args: tuple = (),
    skill_logits: Callable[..., jax.Array] | None = None,
    fisher: str | Callable[..., PyTree] = "true",
    d: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    order: int = DEFAULT_ORDER,
    share: float = DEFAULT_SHARE,
    max_d: int = DEFAULT_MAX_D,
    key: jax.Array,
    tol: float | None = None,
    max_matvecs: int | None = None,
    num_probes: int = 64,
    trace: str = "auto",
    spectrum: str = "auto",
    progress: bool = False,
) -> Diagnosis:
    """Diagnose ``θ* = params`` for a skill to keep and a fine-tuning task (docs/theory.md §2-§6).

    Measures the skill Fisher's spectrum and trace, the AIC of Def. 5.1, the
    Taylor forecast of ``Δu(t)`` and of ``½‖F^{1/2}Px(t)‖²`` along gradient
    flow on the task with its validity window, the overlap of the forecast
    update with ``M``, the SGD step at which ``Δu`` crosses ``threshold``
    (``t = lr·k``), and says in words what to distrust.

    The skill Fisher ``F`` (``fisher``):

    * ``'true'`` (default): ``Jᵀ(diag p − ppᵀ)J`` of the softmax of
      ``skill_logits(params, *skill_args)`` (:func:`geomcollapse.curvature.fisher_vp`):
      the Fisher of the model's output distribution the paper defines. It is
      the default because the *empirical* Fisher ``(1/m)Σ ∇ℓ_i∇ℓ_iᵀ`` vanishes
      at a minimum of a soft-label skill loss: for the loss whose Hessian at
      ``θ*`` is ``F`` (``u = mean KL(p_{θ*} ‖ p_θ)``, docs/theory.md §5.3) every
      per-example gradient is zero at ``θ*``, so the empirical ``F`` is 0 and
      there is no ``M`` to find.
    * ``'empirical'``: from per-example gradients of ``skill_loss``
      (:func:`geomcollapse.curvature.empirical_fisher_vp`); every array in
      ``skill_args`` must carry the example axis first and ``skill_loss`` must
      be the mean of the per-example losses.
    * a matvec ``fisher(params, v, *skill_args) -> F v`` (``v`` like ``params``).

    The spectrum (``spectrum``): ``'dense'`` forms ``F`` from its ``n`` columns
    ``F e_i`` (one compiled, batched call) and diagonalises it with
    ``numpy.linalg.eigh``: exact, and cheaper than Lanczos for small models;
    ``'lanczos'`` finds the top eigenpairs by
    :func:`geomcollapse.linalg.top_eigenpairs` (certified by residuals) and
    ``tr F`` by :func:`geomcollapse.aic.fisher_trace`; ``'auto'`` is dense for
    ``n ≤ 2048`` unless ``params`` are sharded over several devices.

    The rule for ``d=None``: the smallest ``d ≤ max_d`` whose top-``d``
    eigenvalues hold at least ``share`` (90 %) of ``tr F``, the trace measured
    on ``F`` itself (the diagonal of the dense ``F``; or exactly by ``n``
    matvecs for ``n ≤ 4096``, else by Hutchinson probes on ``(I−P)F(I−P)``
    plus the top eigenvalues), never on the truncated spectrum. With Lanczos,
    eigenpairs are computed for ``k = 8`` first, then ``k`` doubles until the
    share is reached or ``k = max_d``. If even ``max_d`` falls short,
    ``d = max_d`` and a tail warning says so.

    Warnings (each a stated rule):

    * *θ* is not a minimum of u*: ``c₁ = −∇u(θ*)ᵀg`` is above rounding
      (:func:`first_order_time`): Δu starts linearly, the first-order term
      dominating up to ``t₁`` where ``|c₁|t₁ = Σ_{k≥2}|c_k|t₁^k``.
    * *tail mass large, condition 1 fails*: ``Σ_{i≤d}λ_i < share · tr F``.
    * *forecast window shorter than the plan*: ``lr·steps > validity_time``.
    * *no crossing inside the window*, *eigenpairs not converged*.

    Args:
      skill_loss: ``u(params, *skill_args) -> scalar``, the skill to keep.
      task_loss: ``L(params, *task_args) -> scalar``, the fine-tuning loss.
      params: ``θ*``, any pytree of finite floating arrays (flax nnx ``State`` included).
        Leaves sharded over a device mesh (``NamedSharding``, one dtype) take the
        Lanczos route with every vector of ``R^n`` (basis, probes, ``x_k``, ``g``,
        ``Hg``) a pytree sharded like them; only scalars and ``k``-, ``K``- or
        ``(K, d)``-sized arrays reach the host (``spectrum='dense'`` is refused).
      skill_args, task_args: tuples of the losses' extra arguments (data).
      skill_logits: ``(params, *skill_args) -> (..., C)`` logits, for ``fisher='true'``.
      fisher: ``'true'``, ``'empirical'`` or a Fisher matvec (above).
      d: ``dim M`` (``1 ≤ d < n``), or ``None`` for the rule above.
      lr: SGD learning rate: maps steps to flow time, ``t = lr·k``.
      steps: planned number of SGD steps (needs ``lr``).
      threshold: ``Δu`` level whose crossing step is forecast (needs ``lr``).
      order: ``K ≥ 2``, the forecast's highest power.
      share: the rule's share of ``tr F``, in ``(0, 1)``.
      max_d: the rule's largest ``d``.
      key: ``jax.random`` key (Lanczos starts, Hutchinson probes).
      tol: Lanczos eigenpair tolerance (default as :func:`geomcollapse.aic.measure_aic`).
      max_matvecs: Lanczos budget per run.
      num_probes: Hutchinson probes (Lanczos route with ``n > 4096`` or ``trace='hutchinson'``).
      trace: ``'auto'``, ``'exact'`` or ``'hutchinson'``: the Lanczos route's trace. The
        dense route reads ``tr F`` exactly off ``F``'s diagonal: ``'hutchinson'`` makes
        ``spectrum='auto'`` take Lanczos and is refused with ``spectrum='dense'``.
        ``tol``, ``max_matvecs`` and ``num_probes`` are checked on every route, though
        only Lanczos reads them.
      spectrum: ``'auto'``, ``'dense'`` or ``'lanczos'``.
      progress: a progress bar over the stages.

    Returns:
      A :class:`Diagnosis`.

    Raises:
      ValueError: a bad argument (named in the message), non-finite ``params``,
        a user function that raises (evaluated once abstractly up front), a loss
        that is not a scalar or whose value or derivatives at ``θ*`` are not
        finite (the mean over an empty batch), or a skill Fisher that vanishes at ``θ*``.
    """
    finite_leaves(params, "params")
    key = prng_key(key)
    skill_args = _args_tuple(skill_args, "skill_args")
    task_args = _args_tuple(task_args, "task_args")
    # Parameters sharded over a mesh: every vector of R^n stays a pytree laid out like them
    # (geomcollapse._sharding); only scalars and d- or K-sized arrays reach the host.
    layout = Layout(params, "params") if is_sharded(params) else None
    if layout is None:
        flat, _ = ravel_pytree(params)
        n, dtype = int(flat.size), flat.dtype
    else:
        flat, n, dtype = None, layout.n, layout.dtype
    if n < 2:
        raise ValueError(
            f"params must hold at least 2 numbers (M must be a proper subspace), got {n}"
        )
    d, lr, steps, threshold, order = check_plan(
        n, d=d, lr=lr, steps=steps, threshold=threshold, order=order
    )
    max_d = min(positive_int(max_d, "max_d"), n - 1)
    share = open_unit_float(share, "share")
    dense = _dense_route(spectrum, trace, n, layout is not None)
    tol, max_matvecs, num_probes = _lanczos_options(
        tol, max_matvecs, num_probes, dtype, n, d if d is not None else min(FIRST_K, max_d)
    )
    # the Fisher first: fisher='empirical' names mismatched example axes before skill_loss
    # trips over them
    fvp, fisher_name = _fisher_operator(fisher, skill_loss, skill_logits, params, skill_args)
    _scalar_loss(skill_loss, params, skill_args, "skill_loss", "skill_loss(params, *skill_args)")
    _scalar_loss(task_loss, params, task_args, "task_loss", "task_loss(params, *task_args)")

    stages = ("spectrum", "forecast", "AIC")
    bar = progress_bar(total=len(stages), desc="diagnose", enabled=progress)

    def done(stage: str) -> None:
        bar.update(1)
        bar.set_postfix(stage=stage)

    try:
        # ---- spectrum and trace of F
        trace_method = (
            "exact"
            if trace == "exact" or (trace == "auto" and n <= aic.EXACT_TRACE_MAX_N)
            else "hutchinson"
        )
        krylov = partial(
            _krylov_spectrum,
            fisher_name=fisher_name,
            share=share,
            max_d=max_d,
            d=d,
            key=key,
            tol=tol,
            max_matvecs=max_matvecs,
            trace=trace_method,
            progress=progress,
        )
        if layout is not None:  # Lanczos on pytrees laid out like params (no dense route)
            static_fvp = aic._hashable(fvp)

            def tree_matvec(v):
                return aic._tree_fvp(static_fvp, layout, params, v, skill_args)

            def tree_trace(method, k, deflate):
                return aic._tree_fisher_trace(
                    static_fvp,
                    layout,
                    params,
                    skill_args,
                    method,
                    key=k,
                    num_probes=num_probes,
                    deflate=deflate,
                )

            sp = krylov(tree_matvec, params, tree_trace, host_vectors=False)
        elif dense:
            op = _cached(_flat_operator, fvp)
            sp = _dense_spectrum(op, n, (params, skill_args), fisher_name, share, max_d, d)
        else:
            op = _cached(_flat_operator, fvp)
            fargs = (params, skill_args)

            def flat_matvec(v):
                return op(v, *fargs)

            def flat_trace(method, k, deflate):
                return aic.fisher_trace(
                    op,
                    n,
                    dtype,
                    method=method,
                    key=k,
                    num_probes=num_probes,
                    deflate=deflate,
                    args=fargs,
                )

            sp = krylov(flat_matvec, flat, flat_trace, host_vectors=True)
        if fisher_name == "empirical":
            if layout is None:
                op = _cached(_flat_operator, fvp)
                v1 = jnp.asarray(sp.vectors[0], dtype)

                def along_v1(theta):  # ⟨v₁, F(θ) v₁⟩
                    return float(jnp.vdot(v1, op(v1, theta, skill_args)))
            else:
                v1 = jax.tree_util.tree_map(lambda a: a[0], sp.vectors)

                def along_v1(theta):
                    fv = aic._tree_fvp(static_fvp, layout, theta, v1, skill_args)
                    return float(jax.device_get(tree_dot(v1, fv)))

            _refuse_rounding_noise(along_v1, params, sp.trace, jax.random.fold_in(key, 7))
        lam, tr, d_final = sp.values, sp.trace, sp.d
        converged = sp.converged
        done("spectrum")

        # ---- the flow's Taylor coefficients, Δu's series, the AIC at d and the coordinates
        # ⟨v_i, x_k⟩ of the forecast update in M
        measure = _at_d_flat if layout is None else partial(_at_d_sharded, layout)
        m = measure(
            sp,
            skill_loss,
            task_loss,
            order,
            params,
            skill_args,
            task_args,
            dtype,
            done=done,
        )
        c_du, report, tau = m.delta_u, m.report, m.time_scale
        done("AIC")

        c_proj = series.projected_from_coordinates(
            np.asarray(lam[:d_final], np.float64), np.asarray(m.coordinates, np.float64)
        )
        validity = m.validity_time
        p_validity = series.polynomial_validity_time(c_proj, time_scale=tau)
        t_plan = None if lr is None or steps is None else lr * steps
        window = validity if math.isfinite(validity) else None
        horizon = None
        if t_plan is not None:
            horizon = t_plan if window is None or t_plan <= window else window
        elif window is not None:
            horizon = window
        if horizon is not None and not np.isnan(validity):
            coords, x_norm = m.overlap(horizon)
            ov_geo = float(np.linalg.norm(coords) / x_norm) if x_norm > 0 else 0.0
            ov_fisher = float(0.5 * np.sum(np.maximum(lam[:d_final], 0.0) * coords**2))
        else:
            horizon, ov_geo, ov_fisher = None, None, None
        crossing = None
        if threshold is not None and lr is not None and not np.isnan(validity):
            crossing = crossing_step(c_du, threshold, lr, validity)
        ts = _forecast_grid(t_plan, validity, p_validity, tau)
        polyval = np.polynomial.polynomial.polyval
    finally:  # the bar's end line, also when a stage raises
        bar.close()

    g_norm = m.task_gradient_norm
    t_linear = first_order_time(c_du, tau, dtype)
    warnings = _warnings(
        c_du=c_du,
        first_order_time=t_linear,
        grad_u_norm=m.skill_gradient_norm,
        top_share=float(lam[:d_final].sum() / tr),
        share=share,
        report=report,
        trace=tr,
        d_rule=sp.d_rule,
        max_d=max_d,
        validity=validity,
        t_plan=t_plan,
        lr=lr,
        steps=steps,
        threshold=threshold,
        crossing=crossing,
        converged=converged,
        d=d_final,
        lambda_1=float(lam[0]),
    )
    return Diagnosis(
        n=n,
        dtype=str(np.dtype(dtype)),
        fisher=fisher_name,
        d=d_final,
        d_rule=sp.d_rule,
        share=share,
        lr=lr,
        steps=steps,
        threshold=threshold,
        order=order,
        aic=report,
        eigenvalues=tuple(float(x) for x in lam),
        eigen_residuals=tuple(float(x) for x in sp.residuals),
        trace=float(tr),
        trace_stderr=float(sp.trace_stderr),
        trace_method=sp.trace_method,
        spectrum_method=sp.method,
        top_share=float(lam[:d_final].sum() / tr),
        skill_gradient_norm=m.skill_gradient_norm,
        task_gradient_norm=g_norm,
        delta_u_coefficients=tuple(float(x) for x in c_du),
        projected_coefficients=tuple(float(x) for x in c_proj),
        validity_time=float(validity),
        projected_validity_time=float(p_validity),
        time_scale=float(tau),
        forecast_t=tuple(float(x) for x in ts),
        forecast_delta_u=tuple(float(x) for x in polyval(ts, c_du)),
        forecast_projected=tuple(float(x) for x in polyval(ts, c_proj)),
        first_order_time=t_linear,
        horizon_time=None if horizon is None else float(horizon),
        overlap_gradient=float(report.orthogonality / g_norm) if g_norm > 0 else 0.0,
        overlap_baseline=float(np.sqrt(d_final / n)),
        overlap_geometric=ov_geo,
        overlap_fisher=ov_fisher,
        crossing_step=crossing,
        crossing_time=None if crossing is None else float(lr * crossing),
        warnings=tuple(warnings),
        num_matvecs=sp.num_matvecs + (0 if sp.method == "dense" else 1),
    )


class _AtD(NamedTuple):
    """What the forecast and the AIC at ``d`` hand on to the report (host numbers only)."""

    delta_u: np.ndarray  # (K+1,) float64, c₀ … c_K of Δu(t)
    time_scale: float
    validity_time: float
    report: theory.AICReport
    coordinates: np.ndarray  # (K, d) float64, ⟨v_i, x_k⟩
    skill_gradient_norm: float
    task_gradient_norm: float
    overlap: Callable[[float], tuple[np.ndarray, float]]  # t_h ↦ (Px(t_h) coordinates, ‖x(t_h)‖)


def _check_derivatives(
    values: tuple[float, float], task_ok: bool, skill_gradient_ok: bool, delta_u: np.ndarray
) -> None:
    """Raise unless the losses' values ``(u(θ*), L(θ*))`` and derivatives at ``θ*`` are finite.

    The values first: a loss that is ``nan`` at ``θ*`` (the mean over an empty
    batch) can still have finite, zero, derivatives, and would forecast nothing.
    """
    for name, value in zip(("skill_loss", "task_loss"), values, strict=True):
        if not math.isfinite(value):
            raise ValueError(
                f"{name}: its value at params is {value}, not finite (e.g. a mean over an "
                f"empty batch in {name[:-5]}_args)"
            )
    checks = (("task_loss", task_ok), ("skill_loss", skill_gradient_ok))
    for name, ok in (*checks, ("skill_loss", bool(np.all(np.isfinite(delta_u))))):
        if not ok:
            raise ValueError(f"{name} has non-finite derivatives at params")


def _at_d_flat(
    sp, skill_loss, task_loss, order, params, skill_args, task_args, dtype, *, done
) -> _AtD:
    """The series, ``∇u(θ*)`` and the AIC at ``d`` with vectors as float64 ``(n,)`` host rows."""
    s, grad_u, values = _forecast(skill_loss, task_loss, order, params, skill_args, task_args)
    c_du = np.asarray(s.delta_u, np.float64)
    xs = np.concatenate(  # x₁ … x_K as (K, n) rows, ravel_pytree order
        [np.reshape(a, (order, -1)) for a in jax.tree.leaves(s.displacement)], axis=1
    ).astype(np.float64)
    grad_u = np.asarray(grad_u, np.float64)
    g, Hg = -xs[0], 2.0 * xs[1]  # x₁ = −g, x₂ = ½Hg (docs/theory.md §6)
    _check_derivatives(
        tuple(float(v) for v in values),
        bool(np.all(np.isfinite(xs))),
        bool(np.all(np.isfinite(grad_u))),
        c_du,
    )
    done("forecast")
    d, lam, Vd = sp.d, sp.values, sp.vectors[: sp.d]
    subspace = Subspace(
        values=jnp.asarray(lam[:d], dtype),
        basis=jnp.asarray(Vd, dtype),
        residuals=jnp.asarray(sp.residuals[:d]),
        converged=jnp.asarray(bool(np.all(sp.converged[:d]))),
    )
    report = theory.aic_report(
        subspace,
        g,
        Hg,
        tail_mass=sp.tail + float(lam[d:].sum()),
        tail_quadratic=aic.tail_quadratic(sp.matvec, Vd, g, dtype),
    )

    def overlap(horizon: float) -> tuple[np.ndarray, float]:
        # x(t_h) = Σ_k x_k t_h^k in numpy: eager jnp ops would each compile
        x_h = (horizon ** np.arange(1, order + 1)) @ xs
        return Vd @ x_h, float(np.linalg.norm(x_h))

    return _AtD(
        delta_u=c_du,
        time_scale=s.time_scale,
        validity_time=s.validity_time,
        report=report,
        coordinates=xs @ Vd.T,
        skill_gradient_norm=float(np.linalg.norm(grad_u)),
        task_gradient_norm=float(np.linalg.norm(g)),
        overlap=overlap,
    )


def _at_d_sharded(
    layout, sp, skill_loss, task_loss, order, params, skill_args, task_args, dtype, *, done
) -> _AtD:
    """As :func:`_at_d_flat` for params sharded on a mesh: ``x_k``, ``g``, ``Hg`` and ``M``'s
    basis stay pytrees laid out like them; only norms, ``(K+1,)`` coefficients and the
    ``(K, d)`` and ``(d,)`` coordinates come back to the host (``jax.device_get``).
    """
    s = series.delta_u_series(
        skill_loss, task_loss, params, order, skill_args=skill_args, task_args=task_args
    )
    grad_u_norm, grad_u_ok, values = jax.device_get(
        _tree_skill_gradient(
            aic._hashable(skill_loss),
            aic._hashable(task_loss),
            layout,
            params,
            skill_args,
            task_args,
        )
    )
    d, lam = sp.d, sp.values
    basis = _tree_leading(sp.vectors, d, layout)
    g, Hg, ys, xs_ok = _tree_task_vectors(s.displacement, basis, layout)
    c_du = np.asarray(jax.device_get(s.delta_u), np.float64)
    _check_derivatives(
        tuple(float(v) for v in values), bool(jax.device_get(xs_ok)), bool(grad_u_ok), c_du
    )
    done("forecast")
    put = layout.put
    subspace = Subspace(
        values=put(np.asarray(lam[:d], dtype)),
        basis=basis,
        residuals=put(sp.residuals[:d]),
        converged=put(np.asarray(bool(np.all(sp.converged[:d])))),
    )
    g_perp = aic._tree_deflate(basis, g, layout)
    tail_q, g_norm = jax.device_get(aic._tree_tail_and_norm(g_perp, sp.matvec(g_perp), g))
    report = theory.aic_report(
        subspace,
        g,
        Hg,
        tail_mass=sp.tail + float(lam[d:].sum()),
        tail_quadratic=float(tail_q),
        compiled=True,
    )

    def overlap(horizon: float) -> tuple[np.ndarray, float]:
        powers = put(np.asarray(horizon ** np.arange(1, order + 1), dtype))
        coords, x_norm = jax.device_get(_tree_overlap(s.displacement, basis, powers, layout))
        return np.asarray(coords, np.float64), float(x_norm)

    return _AtD(
        delta_u=c_du,
        time_scale=s.time_scale,
        validity_time=s.validity_time,
        report=report,
        coordinates=np.asarray(jax.device_get(ys), np.float64),
        skill_gradient_norm=float(grad_u_norm),
        task_gradient_norm=float(g_norm),
        overlap=overlap,
    )


def _all_finite(tree: PyTree) -> jax.Array:
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    )


@partial(jax.jit, static_argnums=(0, 1, 2))
def _tree_skill_gradient(
    skill_loss, task_loss, layout: Layout, params: PyTree, skill_args: tuple, task_args: tuple
):
    """``‖∇u(θ*)‖``, whether ``∇u(θ*)`` is finite (``∇u`` laid out like ``params``) and the
    losses' values ``(u(θ*), L(θ*))``."""
    value, grad = jax.value_and_grad(skill_loss)(params, *skill_args)
    grad = jax.lax.with_sharding_constraint(grad, layout.shardings)
    return tree_norm(grad), _all_finite(grad), (value, task_loss(params, *task_args))


@partial(jax.jit, static_argnums=(1, 2))
def _tree_leading(stack: PyTree, d: int, layout: Layout) -> PyTree:
    """The first ``d`` vectors of a stack, laid out like the parameters."""
    return jax.lax.with_sharding_constraint(jax.tree.map(lambda b: b[:d], stack), layout.stacked)


@partial(jax.jit, static_argnums=2)
def _tree_task_vectors(displacement: PyTree, basis: PyTree, layout: Layout):
    """``g = −x₁``, ``Hg = 2x₂`` (laid out like the parameters), the ``(K, d)``
    coordinates ``⟨v_i, x_k⟩`` and whether every ``x_k`` is finite."""
    g = jax.tree.map(lambda x: -x[0], displacement)
    Hg = jax.tree.map(lambda x: 2.0 * x[1], displacement)
    ys = jax.vmap(lambda x: stack_dot(basis, x))(displacement)
    return (
        jax.lax.with_sharding_constraint(g, layout.shardings),
        jax.lax.with_sharding_constraint(Hg, layout.shardings),
        ys,
        _all_finite(displacement),
    )


@partial(jax.jit, static_argnums=3)
def _tree_overlap(displacement: PyTree, basis: PyTree, powers: jax.Array, layout: Layout):
    """``(⟨v_i, x(t_h)⟩ (d,), ‖x(t_h)‖)`` of ``x(t_h) = Σ_k t_h^k x_k`` (``powers`` ``(K,)``)."""
    x_h = stack_combine(powers, displacement)
    x_h = jax.lax.with_sharding_constraint(x_h, layout.shardings)
    return stack_dot(basis, x_h), tree_norm(x_h)


def _at_theta_star(skill_loss, task_loss, order, params, skill_args, task_args):
    """The Taylor series (no subspace), the raveled ``∇u(θ*)`` and ``(u(θ*), L(θ*))``.

    ``u(θ*)`` comes with its gradient; ``L(θ*)`` is one forward pass in the same
    compiled call (the series differentiates ``L`` but never returns its value).
    """
    s = series.delta_u_series(
        skill_loss, task_loss, params, order, skill_args=skill_args, task_args=task_args
    )
    value, grad = jax.value_and_grad(skill_loss)(params, *skill_args)
    return s, ravel_pytree(grad)[0], (value, task_loss(params, *task_args))


_JITTED_AT_THETA_STAR = {
    small: jax.jit(
        _at_theta_star, static_argnums=(0, 1, 2), compiler_options=_ONE_SHOT if small else {}
    )
    for small in (True, False)
}


def _forecast(skill_loss, task_loss, order, params, skill_args, task_args):
    """:func:`series.delta_u_series` (no subspace), ``∇u(θ*)`` and the losses' values at
    ``θ*``, compiled once per losses, order and shapes.

    ``g = −x₁`` and ``Hg = 2x₂`` come with the series, so the whole at-``θ*``
    differentiation is one compiled call. ``delta_u_series`` alone compiles
    afresh on every call; under this jit a second diagnosis with the same
    losses and shapes reuses it, whatever its ``d`` (the projected series is
    formed from ``x₁ … x_K`` outside, :func:`projected_coefficients`).
    Unhashable losses: compiled per call.
    """
    options = _one_shot_options(ravel_pytree(params)[0].size)
    try:
        hash((skill_loss, task_loss))
    except TypeError:
        fn = jax.jit(
            partial(_at_theta_star, skill_loss, task_loss, order), compiler_options=options
        )
        return fn(params, skill_args, task_args)
    jitted = _JITTED_AT_THETA_STAR[bool(options)]
    return jitted(skill_loss, task_loss, order, params, skill_args, task_args)


def projected_coefficients(values: Any, basis: Any, xs: Any) -> np.ndarray:
    """``c₀ … c_K`` of ``½‖F^{1/2}Px(t)‖² = ½Σ_i λ_i⟨v_i, x(t)⟩²`` from ``x₁ … x_K``.

    Args:
      values: ``(d,)`` eigenvalues ``λ_i`` (clipped at 0).
      basis: ``(d, n)`` orthonormal rows ``v_i``.
      xs: ``(K, n)`` the flow's Taylor coefficients ``x₁ … x_K``.

    Returns:
      ``(K+1,)`` float64; ``c_m = ½ Σ_{j+l=m} Σ_i λ_i ⟨v_i,x_j⟩⟨v_i,x_l⟩`` (exact up to ``t^K``).
    """
    ys = np.asarray(xs, np.float64) @ np.asarray(basis, np.float64).T  # (K, d)
    return series.projected_from_coordinates(np.asarray(values, np.float64), ys)


class _Spectrum(NamedTuple):
    """The top of ``F``'s spectrum, its trace and the chosen ``d``."""

    values: np.ndarray  # (k,) descending, k ≥ d
    vectors: Any  # (k, n) orthonormal rows; sharded params: a stack laid out like them
    residuals: np.ndarray  # (k,) ‖Fv − λv‖
    converged: np.ndarray  # (k,) bool
    trace: float
    trace_stderr: float
    tail: float  # tr F − Σ_{i≤k} λ_i
    d: int
    d_rule: str
    method: str
    trace_method: str
    num_matvecs: int
    matvec: Callable  # v (n,) ↦ F v; sharded params: v like them ↦ F v like them


def _rule(lam: np.ndarray, tr: float, share: float, max_d: int) -> int | None:
    """The smallest ``d ≤ max_d`` with ``Σ_{i≤d} λ_i ≥ share · tr F``, else ``None``."""
    reached = np.flatnonzero(np.cumsum(lam[:max_d]) >= share * tr)
    return int(reached[0]) + 1 if reached.size else None


def _rule_text(max_d: int, share: float, how: str) -> str:
    return f"smallest d ≤ {max_d} whose top-d eigenvalues hold ≥ {share:.0%} of tr F ({how})"


def _columns(op, n, params, args):
    eye = jnp.eye(n, dtype=ravel_pytree(params)[0].dtype)
    return jax.lax.map(lambda e: op(e, params, args), eye, batch_size=min(n, 256))


_JITTED_COLUMNS = jax.jit(_columns, static_argnums=(0, 1), compiler_options=_ONE_SHOT)


def _dense_spectrum(op, n, fargs, fisher_name, share, max_d, d) -> _Spectrum:
    """``F`` formed from its ``n`` columns ``F e_i`` (one compiled, batched call) and ``eigh``.

    Exact spectrum and trace; cheaper than Lanczos plus a trace for small ``n``
    (the one-block test transformer, n = 249: one compile instead of three).
    """
    try:
        hash(op)
        cols = _JITTED_COLUMNS(op, n, *fargs)
    except TypeError:
        cols = jax.jit(partial(_columns, op, n), compiler_options=_ONE_SHOT)(*fargs)
    C = np.asarray(cols, np.float64)
    if not np.all(np.isfinite(C)):
        raise ValueError("fisher: the skill Fisher's matvec returned non-finite values at params")
    tr = float(np.trace(C))
    if not tr > 0:
        raise ValueError(_bad_fisher(fisher_name, tr))
    asym = float(np.max(np.abs(C - C.T)))
    scale = float(np.max(np.abs(C)))
    eps = float(np.finfo(cols.dtype).eps)
    if asym > np.sqrt(eps) * scale:  # rounding noise (an empirical F at a minimum) is asymmetric
        detail = f"max |F − Fᵀ| / max |F| = {asym / scale:.2g}"
        raise ValueError(_bad_fisher(fisher_name, tr, asymmetry=detail))
    F = 0.5 * (C + C.T)
    lam, U = np.linalg.eigh(F)
    lam, U = lam[::-1], U[:, ::-1]
    if lam[-1] < -np.sqrt(eps) * lam[0]:  # beyond rounding: an indefinite "Fisher"
        raise ValueError(_bad_fisher(fisher_name, tr, min_eigenvalue=float(lam[-1])))
    if d is None:
        found = _rule(lam, tr, share, max_d)
        d, rule = (max_d if found is None else found), _rule_text(max_d, share, "dense eigh")
    else:
        rule = "given"
    k = min(n - 1, max(2 * d, 2 * FIRST_K))
    V = U[:, :k].T
    residuals = np.linalg.norm(V @ F - lam[:k, None] * V, axis=1)
    return _Spectrum(
        values=lam[:k],
        vectors=V,
        residuals=residuals,
        converged=np.ones(k, bool),
        trace=tr,
        trace_stderr=0.0,
        tail=tr - float(lam[:k].sum()),
        d=d,
        d_rule=rule,
        method="dense",
        trace_method="exact",
        num_matvecs=n,
        matvec=lambda v: F @ np.asarray(v, np.float64),
    )


def _krylov_spectrum(
    matvec,
    like,
    trace_of,
    fisher_name,
    share,
    max_d,
    d,
    *,
    key,
    tol,
    max_matvecs,
    trace,
    progress,
    host_vectors,
) -> _Spectrum:
    """Top eigenpairs by Lanczos (``k = 8, 16, …`` until the rule is met) and ``tr F``.

    The trace is exact (``n`` matvecs) or Hutchinson on ``(I−P)F(I−P)`` deflated by
    the ``k`` pairs found, plus their eigenvalues: ``trace_of(method, key, deflate)``
    returns ``(value, stderr, matvecs)`` as :func:`geomcollapse.aic.fisher_trace`.
    ``matvec`` maps vectors like ``like`` (``(n,)``, or a pytree sharded like the
    parameters); with ``host_vectors`` the eigenvectors come back as ``(k, n)``
    float64 rows, else they stay a stack on the devices. Eigenvalues and
    residuals are ``(k,)`` host arrays either way.
    """
    k_eig, k_trace = jax.random.split(key)
    trace_matvecs = lanczos_matvecs = 0
    exact_trace = None
    if trace == "exact":
        exact_trace, _, trace_matvecs = trace_of("exact", None, None)
        if not exact_trace > 0:
            raise ValueError(_bad_fisher(fisher_name, exact_trace))
    k = d if d is not None else min(FIRST_K, max_d)
    while True:
        try:
            pairs = linalg.top_eigenpairs(
                matvec,
                like,
                k,
                key=jax.random.fold_in(k_eig, k),
                tol=tol,
                max_matvecs=max_matvecs,
                progress=progress,
            )
        except ValueError as err:  # a matvec of pure rounding noise is caught as non-symmetric
            if "not symmetric" not in str(err):
                raise
            raise ValueError(_bad_fisher(fisher_name, exact_trace, asymmetry=str(err))) from None
        lanczos_matvecs += int(pairs.num_matvecs)
        lam = np.asarray(jax.device_get(pairs.values), np.float64)
        V = np.asarray(pairs.vectors, np.float64) if host_vectors else pairs.vectors
        if exact_trace is not None:
            tr, tr_se, tail = exact_trace, 0.0, exact_trace - lam.sum()
        else:
            tail, tr_se, used = trace_of("hutchinson", jax.random.fold_in(k_trace, k), V)
            trace_matvecs += used
            tr = tail + lam.sum()
            if not tr > 0:
                raise ValueError(_bad_fisher(fisher_name, tr))
        if d is not None:
            break
        found = _rule(lam, tr, share, max_d)
        if found is not None or k == max_d:
            break
        k = min(2 * k, max_d)
    if d is None:
        d, rule = (max_d if found is None else found), _rule_text(max_d, share, f"{trace} trace")
    else:
        rule = "given"
    return _Spectrum(
        values=lam,
        vectors=V,
        residuals=np.asarray(jax.device_get(pairs.residuals), np.float64),
        converged=np.asarray(jax.device_get(pairs.converged), bool),
        trace=float(tr),
        trace_stderr=float(tr_se),
        tail=float(tail),
        d=d,
        d_rule=rule,
        method="lanczos",
        trace_method=trace,
        num_matvecs=trace_matvecs + lanczos_matvecs,
        matvec=matvec,
    )


def _refuse_rounding_noise(along_v1: Callable, params: PyTree, trace: float, key) -> None:
    """Refuse an empirical Fisher that is rounding noise, whatever its symmetry.

    At a minimum of the loss it is built from every per-example gradient is 0 up
    to rounding, and what is left is not a property of the model: moving ``θ*``
    by four units in the last place of each entry (``θ_j(1 ± 4·eps)``) redraws
    it. ``q(θ) = v₁ᵀF(θ)v₁`` along the top eigenvector then changes by ``O(q)``,
    while a real empirical Fisher, with per-example residuals ``r`` well above
    rounding (``r ≫ eps·|z|``, ``z`` the logits), changes by about ``8·eps·|z|/r``
    of itself. A change above half of ``q`` is refused. Scale-free: the loss's
    units and ``θ``'s cancel in the ratio (a loss scaled by 1e-12, far from its
    minimum, is kept).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [
        a + 4 * jnp.finfo(a.dtype).eps * jnp.abs(a) * jax.random.rademacher(k, a.shape, a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    q0 = along_v1(params)
    q1 = along_v1(jax.tree_util.tree_unflatten(treedef, moved))
    if not abs(q1 - q0) <= 0.5 * max(abs(q0), abs(q1)):
        raise ValueError(
            _vanishing_fisher(
                "empirical",
                trace,
                f"v₁ᵀFv₁ = {q0:.3g} becomes {q1:.3g} when θ* moves by 4 units in the last "
                "place: rounding noise",
            )
        )


def _bad_fisher(
    fisher_name: str, tr: float | None, asymmetry: str = "", min_eigenvalue: float | None = None
) -> str:
    """The message refusing a skill Fisher at ``θ*``: zero (or rounding noise), not
    symmetric (``asymmetry`` says by how much) or not positive semidefinite.

    An empirical Fisher that vanishes at a minimum is rounding noise, which is
    neither symmetric nor of one sign: for it every failure reads as vanishing.
    """
    if fisher_name != "empirical":
        if asymmetry:
            return (
                f"fisher: the skill Fisher's matvec is not symmetric at params ({asymmetry}); "
                "it must compute F v for a symmetric positive semidefinite F"
            )
        if tr is not None and tr < 0:
            return (
                f"fisher: the skill Fisher is not positive semidefinite at params "
                f"(tr F = {tr:.3g} < 0); a Fisher Jᵀ Λ J has no negative eigenvalue"
            )
        if min_eigenvalue is not None:
            return (
                f"fisher: the skill Fisher is not positive semidefinite at params (smallest "
                f"eigenvalue {min_eigenvalue:.3g}, tr F = {tr:.3g})"
            )
    return _vanishing_fisher(fisher_name, tr, asymmetry)


def _vanishing_fisher(fisher_name: str, tr: float | None, detail: str = "") -> str:
    """The message for a skill Fisher that is zero (or rounding noise) at ``θ*``."""
    hint = (
        ": the empirical Fisher vanishes at a minimum of the skill loss it is built from "
        "(every per-example gradient is 0 there, up to rounding); use fisher='true' with "
        "skill_logits"
        if fisher_name == "empirical"
        else ""
    )
    size = "" if tr is None else f"tr F = {tr:.3g}"
    if detail:
        size = f"{size}; {detail}" if size else detail
    return f"fisher: the skill Fisher vanishes at params ({size}){hint}"


def _forecast_grid(t_plan, validity, p_validity, tau) -> np.ndarray:
    """Log-spaced times up to 1.5 × the larger of the plan and the window (else ``τ``)."""
    finite = [t for t in (t_plan, validity, p_validity) if t is not None and math.isfinite(t)]
    top = 1.5 * max(finite) if finite else (tau if math.isfinite(tau) else 1.0)
    return np.geomspace(top * 1e-4, top, NUM_FORECAST_TIMES)


def _warnings(
    *,
    c_du,
    first_order_time,
    grad_u_norm,
    top_share,
    share,
    report,
    trace,
    d_rule,
    max_d,
    validity,
    t_plan,
    lr,
    steps,
    threshold,
    crossing,
    converged,
    d,
    lambda_1,
) -> list[str]:
    """The plain-language warnings, each from the rule stated in :func:`diagnose`."""
    out = []
    # θ* not a minimum of u: c₁ = −∇u(θ*)ᵀg above rounding; it dominates Δu for t < t₁
    if math.isfinite(first_order_time) or first_order_time == math.inf:
        until = (
            "at every t (no higher term)"
            if first_order_time == math.inf
            else f"for t < {first_order_time:.3g}"
            + ("" if lr is None else f" (k < {first_order_time / lr:.3g} SGD steps)")
        )
        out.append(
            f"θ* is not a minimum of the skill loss u: ∇u(θ*) ≠ 0 (‖∇u‖ = {grad_u_norm:.3g}) "
            f"and the first-order term c₁t (c₁ = −∇u(θ*)ᵀg = {c_du[1]:.3g}) dominates the "
            f"forecast {until}: Δu starts linearly, not as the t²/t⁴ onset of Thm 6.2. Use a "
            "skill loss minimised at θ*, e.g. the KL from θ*'s own outputs."
        )
    if lambda_1 <= 0:
        out.append(f"the skill Fisher's top eigenvalue is {lambda_1:.3g} ≤ 0: it is not PSD")
    if top_share < share:
        capped = " (the rule's cap max_d)" if d_rule != "given" and d == max_d else ""
        out.append(
            f"tail mass large: condition 1 of the AIC (low-rank concentration) fails: the top "
            f"d = {d}{capped} eigenvalues hold {top_share:.1%} of tr F = {trace:.3g} (< "
            f"{share:.0%}; tail mass {report.tail_mass:.3g}). M misses much of F: Δu also grows "
            "through the tail's t² floor ½t²gᵀ(I−P)F(I−P)g, beyond the projected loss."
        )
    if not np.all(converged):
        out.append(
            f"{int(np.sum(~converged))} of {converged.size} eigenpairs did not converge: "
            "M and the numbers measured against it are not certified (raise max_matvecs)"
        )
    if math.isnan(validity):
        out.append(
            "the forecast window is unknown: Δu's series has a single non-zero term (raise order)"
        )
    elif t_plan is not None and t_plan > validity:
        out.append(
            f"forecast window shorter than the plan: the series is trusted up to t = "
            f"{validity:.3g} (k ≈ {validity / lr:.3g} SGD steps at lr = {lr:g}), the plan runs "
            f"steps = {steps} (t = {t_plan:.3g}); beyond the window it is no forecast "
            "(raise order, or diagnose again at an intermediate checkpoint)"
        )
    if threshold is not None and crossing is None:
        where = "" if math.isnan(validity) else f" (t ≤ {validity:.3g}, k ≤ {validity / lr:.3g})"
        out.append(
            f"no crossing: the forecast Δu does not reach threshold = {threshold:g} inside the "
            f"validity window{where}; crossing_step is None"
        )
    return out


# --------------------------------------------------------------------------- Markdown


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4g}"


def _markdown(dg: Diagnosis, figure: str | None) -> str:
    r = dg.aic
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
        f"({dg.d_rule}), forecast order {dg.order}"
        + (": " + ", ".join(plan) if plan else "")
        + ".",
        "",
        "## Warnings",
        "",
    ]
    lines += [f"- {w}" for w in dg.warnings] if dg.warnings else ["None."]
    crossing = (
        f"step {dg.crossing_step} (t = {_fmt(dg.crossing_time)})"
        if dg.crossing_step is not None
        else "—"
    )
    lines += [
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
    lines += [
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
        "",
        "## Overlap with M (Section 7)",
        "",
        f"- first update ‖Pg‖/‖g‖ = {_fmt(dg.overlap_gradient)} (a random direction: "
        f"(d/n)^{{1/2}} = {_fmt(dg.overlap_baseline)})",
        f"- forecast update x(t) at t = {_fmt(dg.horizon_time)}: ‖Px‖/‖x‖ = "
        f"{_fmt(dg.overlap_geometric)}, ½‖F^{{1/2}}Px‖² = {_fmt(dg.overlap_fisher)}",
        "",
    ]
    if figure is not None:
        lines += [f"![spectrum, forecast and AIC]({figure})", ""]
    return "\n".join(lines)
