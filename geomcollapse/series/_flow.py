"""Taylor forecast of the alignment loss along gradient flow, on any model (docs/theory.md §6).

Gradient flow from the aligned model, ``x' = −g(θ* + x)``, ``x(0) = 0``
(``x = θ − θ*``, ``g = ∇L``), has a Taylor series ``x(t) = Σ_{k≥1} x_k t^k``
with ``x₁ = −g``, ``x₂ = ½Hg``, ``x₃ = −⅙(H²g + ∇H[g,g])``, … (all at ``θ*``).
:func:`flow_taylor` computes ``x₁ … x_K`` by Taylor-mode automatic
differentiation, never writing ``H`` or ``∇H`` out: feeding the truncated
series of ``x`` through ``g`` gives ``x_{k+1} = −[g(θ* + x(t))]_k / (k+1)``,
where ``[·]_k`` is the ``t^k`` coefficient. :func:`delta_u_series` composes
the skill loss with the same series, ``Δu(t) = u(θ* + x(t)) − u(θ*) = Σ_k c_k t^k``,
and the projected loss of Thm 6.1, ``½‖F^{1/2}Px(t)‖²``.

Typical use::

    s = series.delta_u_series(skill_loss, task_loss, params, 4, subspace=(lam, basis))
    s.delta_u            # (5,) c₀ … c₄ of Δu(t); c₀ = 0
    s.projected          # (5,) the same for ½‖F^{1/2}Px(t)‖²
    s.evaluate(ts)       # both series at times ts
    s.validity_time      # where the t⁴ term reaches 10 % of the sum
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from geomcollapse._checks import (
    check_data,
    check_params,
    finite_leaves,
    flat_loss,
    is_concrete,
    positive_float,
    positive_int,
    scalar_loss,
)
from geomcollapse._sharding import Layout, is_sharded, stack_dot
from geomcollapse.errors import FlatLossWarning, warn_at_caller
from geomcollapse.subspace import check_orthonormal

__all__ = [
    "Series",
    "SeriesValues",
    "TaylorFallbackWarning",
    "TaylorRoute",
    "crossing_step",
    "delta_u_series",
    "first_order_time",
    "flow_taylor",
    "polynomial_validity_time",
    "projected_from_coordinates",
]

PyTree = Any

_METHODS = ("auto", "jet", "jvp")

# What ``jet`` raises where it cannot propagate a series: ``KeyError`` for a
# primitive without a Taylor rule (e.g. ``sort``), ``UnexpectedTracerError``
# for ``custom_jvp`` functions such as ``jax.nn.relu`` and ``jax.nn.softplus``
# (jax-ml/jax#30352, open on jax 0.10), ``NotImplementedError`` for rules that
# exist but refuse an input. ``method='auto'`` falls back to nested ``jvp``.
_JET_FAILURES = (KeyError, NotImplementedError, jax.errors.UnexpectedTracerError)


class TaylorFallbackWarning(UserWarning):
    """``method='auto'``: ``jet`` could not expand a loss, nested ``jvp`` did (``2^k`` cost)."""


@jax.tree_util.register_static
class TaylorRoute(str):
    """The Taylor engine a series used, ``'jet'`` or ``'jvp'``: a ``str`` that is static
    data in a pytree (it passes through ``jit`` as part of the tree's structure)."""


# --------------------------------------------------------------------------- Taylor engines


def _jet_coefficients(
    fn: Callable, leaves: Sequence[jax.Array], xs: Sequence[Sequence[jax.Array]]
) -> list:
    """Taylor coefficients ``[fn(θ* + Σ_j x_j t^j)]_k``, ``k = 0 … len(xs)``, by ``jet``.

    ``fn`` maps parameter leaves to a tuple of output leaves; ``xs[j-1]`` holds
    the leaves of ``x_j``. Returns one tuple of output leaves per ``k``.
    ``jet`` works with derivatives, ``k! × coefficient``, on both sides.
    """
    m = len(xs)
    series_in = tuple(
        [math.factorial(j + 1) * xs[j][i] for j in range(m)] for i in range(len(leaves))
    )
    primal_out, series_out = jet.jet(fn, tuple(leaves), series_in)
    coeffs = [tuple(primal_out)]
    for k in range(1, m + 1):
        coeffs.append(tuple(terms[k - 1] / math.factorial(k) for terms in series_out))
    return coeffs


def _jvp_coefficients(
    fn: Callable, leaves: Sequence[jax.Array], xs: Sequence[Sequence[jax.Array]]
) -> list:
    """As :func:`_jet_coefficients`, by ``len(xs)`` nested ``jax.jvp`` in the scalar ``t``.

    The ``k``-fold nesting costs ``2^k`` evaluations of ``fn``'s linearisation:
    fine for the orders used here, and it needs no Taylor rule beyond ``jvp``.
    """
    m = len(xs)
    dtype = jnp.result_type(*leaves)

    def curve(t):
        # Horner: θ* + t(x₁ + t(x₂ + … + t x_m)), exact derivatives at t = 0.
        point = []
        for i, leaf in enumerate(leaves):
            acc = xs[m - 1][i]
            for j in range(m - 2, -1, -1):
                acc = xs[j][i] + t * acc
            point.append(leaf + t * acc)
        return tuple(fn(*point))

    def derivatives(level):
        if level == 0:
            return lambda t: (curve(t),)
        inner = derivatives(level - 1)

        def outer(t):
            primal, tangent = jax.jvp(inner, (t,), (jnp.ones((), dtype),))
            return (*primal, tangent[-1])

        return outer

    zero = jnp.zeros((), dtype)
    derivs = derivatives(m)(zero)
    return [tuple(leaf / math.factorial(k) for leaf in d) for k, d in enumerate(derivs)]


def _coefficients(fn, leaves, xs, method: str) -> tuple[list, str]:
    """The Taylor coefficients of ``fn`` along the series ``xs`` and the engine that made them.

    ``method='auto'`` tries ``jet`` and, where it fails, warns
    (:class:`TaylorFallbackWarning`) and uses nested ``jvp``.
    """
    if method == "jvp":
        return _jvp_coefficients(fn, leaves, xs), "jvp"
    if method == "jet":
        return _jet_coefficients(fn, leaves, xs), "jet"
    try:
        return _jet_coefficients(fn, leaves, xs), "jet"
    except _JET_FAILURES as err:
        warn_at_caller(
            f"series: jax.experimental.jet cannot expand this loss ({type(err).__name__}); "
            "falling back to nested jax.jvp, whose cost grows as 2^order "
            "(Series.route == 'jvp'; pass method='jvp' to choose it without this warning)",
            TaylorFallbackWarning,
        )
        return _jvp_coefficients(fn, leaves, xs), "jvp"


def _route(routes: Sequence[str]) -> TaylorRoute:
    """``'jvp'`` if any expansion took nested ``jvp``, else ``'jet'``."""
    return TaylorRoute("jvp" if "jvp" in routes else "jet")


def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled once for this call (arrays traced, everything else static).

    Eager ``jet`` dispatches each Taylor rule op by op: ``delta_u_series`` at
    order 4 on a 51-parameter MLP took 10 s eagerly against 2.4 s to compile
    and run. ``fn`` is a fresh closure over the user's losses, so nothing is
    cached across calls (loss functions need not be hashable, e.g. methods of
    array-holding dataclasses); jit at the call site to reuse the compilation.
    Inside an outer ``jit`` this is an inlined nested call.
    """
    return eqx.filter_jit(fn)


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method


def _displacement_leaves(task_loss, leaves, treedef, order, loss_args, method) -> tuple:
    """``(x₁ … x_order as lists of leaves, the engines used)`` (the recursion of
    :func:`flow_taylor`)."""

    def gradient(*ls):
        grad = jax.grad(task_loss)(treedef.unflatten(ls), *loss_args)
        return tuple(treedef.flatten_up_to(grad))

    xs, routes = [tuple(-g for g in gradient(*leaves))], []
    for k in range(1, order):
        # [g(θ* + x(t))]_k needs x₁ … x_k only, so the truncated series is exact here.
        coeffs, route = _coefficients(gradient, leaves, xs, method)
        xs.append(tuple(-a / (k + 1) for a in coeffs[k]))
        routes.append(route)
        method = route if method == "auto" and route == "jvp" else method  # jet failed: once
    return xs, routes


def _params_leaves(params, name: str = "params"):
    check_params(params, name)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return [jnp.asarray(leaf) for leaf in leaves], treedef


def flow_taylor(
    task_loss: Callable[..., jax.Array],
    params: PyTree,
    order: int,
    *loss_args: Any,
    method: str = "auto",
) -> tuple[PyTree, ...]:
    """Exact Taylor coefficients ``x₁ … x_order`` of the gradient-flow displacement.

    ``x(t) = θ(t) − θ* = Σ_k x_k t^k`` for ``x' = −g(θ* + x)``, ``x(0) = 0``, so
    ``x₁ = −g``, ``x₂ = ½Hg``, ``x₃ = −⅙(H²g + ∇H[g,g])`` (docs/theory.md §6), computed
    by the recursion ``x_{k+1} = −[g(θ* + Σ_{j≤k} x_j t^j)]_k / (k+1)`` in
    Taylor-mode automatic differentiation (no finite differences, no dense
    tensors). Jit-able (``order`` and ``method`` static).

    Engines (``method``): ``'jet'`` runs ``jax.experimental.jet`` on the
    gradient; ``'jvp'`` nests ``jax.jvp`` in the scalar ``t`` (``2^k`` gradient
    linearisations for ``x_{k+1}``); ``'auto'`` (default) tries ``jet`` and falls
    back to ``'jvp'`` where ``jet`` has no rule (``sort``) or breaks on
    ``custom_jvp`` functions (``jax.nn.relu``, ``softplus``: jax-ml/jax#30352).
    ``jet`` is the faster engine (docs/benchmarks.md, "Taylor engines of the
    series"); the two agree to rounding.

    Args:
      task_loss: ``task_loss(params, *loss_args) -> scalar``, the fine-tuning loss ``L``.
      params: ``θ*``, a pytree of finite floating arrays.
      order: number of coefficients ``K ≥ 1``.
      *loss_args: extra arguments of ``task_loss`` (data); treated as constants.
      method: ``'auto'``, ``'jet'`` or ``'jvp'``.

    Returns:
      A tuple ``(x₁, …, x_K)``, each a pytree like ``params`` (same shapes, dtypes).

    Raises:
      ValueError: ``params`` non-finite or not floating, ``order < 1``, bad ``method``.
    """
    leaves, treedef = _params_leaves(params)
    order = positive_int(order, "order")
    _check_method(method)

    def run(leaves, loss_args):
        return _displacement_leaves(task_loss, leaves, treedef, order, loss_args, method)[0]

    xs = _compiled(run)(leaves, loss_args)
    return tuple(treedef.unflatten(x) for x in xs)


# --------------------------------------------------------------------------- the forecast


class SeriesValues(NamedTuple):
    """A :class:`Series` evaluated at times ``t``.

    Attributes:
      t: ``(T,)`` times.
      delta_u: ``(T,)`` the truncated ``Δu(t) = Σ_{k≤K} c_k t^k``.
      projected: ``(T,)`` the truncated ``½‖F^{1/2}Px(t)‖²``, or ``None``.
    """

    t: jax.Array
    delta_u: jax.Array
    projected: jax.Array | None


def _polyval(coeffs: jax.Array, ts: jax.Array) -> jax.Array:
    """``Σ_k coeffs[k] t^k`` by Horner, for ``ts`` of any shape."""
    out = jnp.zeros(jnp.shape(ts), jnp.result_type(coeffs, ts))
    for c in coeffs[::-1]:
        out = out * ts + c
    return out


def _significant(coeffs: np.ndarray, tau: float, tol: float) -> np.ndarray:
    """Mask of the coefficients whose terms ``|c_k| τ^k`` exceed ``tol`` × the largest term."""
    if not np.isfinite(tau) or tau <= 0:
        return coeffs != 0
    terms = np.abs(coeffs) * tau ** np.arange(coeffs.size)
    top = np.max(terms)
    return terms > tol * top if top > 0 else np.zeros(coeffs.size, bool)


def _real_roots(coeffs: np.ndarray) -> np.ndarray:
    """The real roots of ``Σ_j coeffs[j] t^j`` (lowest power first), float64, unsorted.

    A root counts as real when its imaginary part is below ``1e-9`` of its modulus
    (``numpy.roots`` returns a real double root as a conjugate pair at rounding level).
    """
    r = np.roots(np.asarray(coeffs, np.float64)[::-1])  # numpy wants the highest power first
    return r[np.abs(r.imag) <= 1e-9 * np.maximum(np.abs(r), 1e-300)].real


def polynomial_validity_time(
    coeffs: Any,
    fraction: float = 0.1,
    *,
    time_scale: float | None = None,
    rtol: float | None = None,
) -> float:
    """Smallest ``t > 0`` where the last term of ``Σ c_k t^k`` reaches ``fraction`` of the sum.

    Solves ``|c_K| t^K = fraction · |Σ_k c_k t^k|`` (``K`` the highest non-zero
    coefficient) for its smallest positive root: a truncated series is
    trusted while its last term is small against the sum (docs/theory.md §6).

    Coefficients at rounding level would fake a root at a tiny ``t`` (with
    ``Pg = 0``, ``c₃`` of the projected loss is ``eps``-small, not zero), so
    with ``time_scale = τ`` a coefficient counts as zero when its term
    ``|c_k| τ^k`` is below ``rtol`` (default ``√eps``) × the largest term.

    Returns:
      The time (a float); ``inf`` when no term is non-zero or the last term
      never reaches the fraction; ``nan`` when only one term is non-zero (a
      single term cannot bound its own error: raise the order).
    """
    c = np.asarray(jax.device_get(coeffs), np.float64)
    if c.ndim != 1 or not np.all(np.isfinite(c)):
        raise ValueError(f"coeffs must be a finite 1-D array, got shape {c.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if rtol is None:
        rtol = float(np.sqrt(np.finfo(np.asarray(jax.device_get(coeffs)).dtype).eps))
    keep = _significant(c, np.inf if time_scale is None else time_scale, rtol)
    c = np.where(keep, c, 0.0)
    nonzero = np.flatnonzero(c)
    if nonzero.size == 0:
        return float("inf")
    if nonzero.size == 1:
        return float("nan")
    low, top = nonzero[0], nonzero[-1]
    body = c[low : top + 1]  # divided by t^low: body[j] multiplies t^j
    roots = []
    for sign in (1.0, -1.0):
        # |c_K| t^K = ±fraction · S(t)  ⇔  |c_K| t^K ∓ fraction · S(t) = 0
        poly = -sign * fraction * body
        poly[-1] += abs(body[-1])
        real = _real_roots(poly)
        roots.extend(real[real > 0])
    return float(min(roots)) if roots else float("inf")


def crossing_step(
    coefficients: Any, threshold: float, lr: float, t_max: float = math.inf
) -> int | None:
    """The smallest SGD step ``k ≥ 1`` with ``Σ_j c_j (lr·k)^j ≥ threshold`` and ``lr·k ≤ t_max``.

    Found exactly from the real roots of ``Σ_j c_j t^j − threshold`` (each
    interval where the polynomial lies above the threshold is entered at its
    first step), not by scanning ``k``. ``None`` when no such step exists.
    ``coefficients``: ``c₀ … c_K`` of ``Δu(t)`` (docs/theory.md §6), float64 on the host.
    """
    c = np.array(coefficients, np.float64)
    threshold, lr = float(threshold), positive_float(lr, "lr")
    c[0] -= threshold

    def above(t: float) -> bool:
        return float(np.polynomial.polynomial.polyval(t, c)) >= 0

    nonzero = np.flatnonzero(c)
    if nonzero.size == 0:  # the forecast equals the threshold everywhere
        return 1 if lr <= t_max else None
    real = np.sort(_real_roots(c[: nonzero[-1] + 1]))
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
    :func:`geomcollapse.series.polynomial_validity_time` applies), ``eps`` of
    ``dtype``, the model's; ``inf`` when no higher coefficient is non-zero
    (docs/theory.md §6: ``c₁ = −∇u(θ*)ᵀg ≠ 0`` off a minimum of ``u``).
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
    real = _real_roots(poly[: np.flatnonzero(poly)[-1] + 1])
    return float(np.min(real[real > 0]))


class Series(NamedTuple):
    """Taylor forecast of ``Δu(t)`` and of the projected loss along gradient flow.

    All coefficient arrays hold ``c₀ … c_K`` (index ``k`` multiplies ``t^k``),
    dtype of the parameters. ``c₀ = 0`` exactly: the series is that of
    ``u(θ* + x(t)) − u(θ*)`` computed from the derivatives, with no subtraction.

    Attributes:
      delta_u: ``(K+1,)`` coefficients of ``Δu(t)``. At a minimum of ``u``
        (docs/theory.md §6): ``c₂ = ½gᵀFg``, ``c₃ = −½gᵀFHg − ⅙∇³u[g,g,g]``,
        ``c₄ = ⅛‖F^{1/2}Hg‖² + ⅙gᵀF(H²g + ∇H[g,g]) + ¼∇³u[g,g,Hg] + (1/24)∇⁴u[g,g,g,g]``.
        Elsewhere ``c₁ = −∇u(θ*)ᵀg ≠ 0``: Δu starts linearly.
      projected: ``(K+1,)`` coefficients of ``½‖F^{1/2}Px(t)‖² = ½Σ_i λ_i ⟨v_i, x(t)⟩²``
        (Thm 6.1's lower bound), or ``None`` without a subspace. With
        ``Pg = 0`` the first non-zero one is ``c₄ = ⅛γ²``, ``γ = ‖F^{1/2}PHg‖``.
      displacement: ``x₁ … x_K``: a pytree like the parameters with a leading
        ``(K,)`` axis (row ``k−1`` is ``x_k``).
      route: the Taylor engine that computed the series, a :class:`TaylorRoute`:
        ``'jet'``, or ``'jvp'`` (nested ``jax.jvp``, ``2^k`` cost) when asked for or
        when ``method='auto'`` fell back with a :class:`TaylorFallbackWarning`;
        ``None`` for a series assembled by hand.
    """

    delta_u: jax.Array
    projected: jax.Array | None
    displacement: PyTree
    route: TaylorRoute | None = None

    @property
    def order(self) -> int:
        """``K``, the highest power kept."""
        return int(self.delta_u.shape[0]) - 1

    def evaluate(self, ts: Any) -> SeriesValues:
        """Both truncated series at times ``ts`` (any shape; jit-able)."""
        ts = jnp.asarray(ts, self.delta_u.dtype)
        projected = None if self.projected is None else _polyval(self.projected, ts)
        return SeriesValues(t=ts, delta_u=_polyval(self.delta_u, ts), projected=projected)

    def displacement_at(self, ts: Any) -> PyTree:
        """The truncated ``x(t) = Σ_k x_k t^k``: the parameters' pytree, leading ``(T,)`` axis."""
        ts = jnp.atleast_1d(jnp.asarray(ts, self.delta_u.dtype))

        def one(xk):
            powers = ts[:, None] ** jnp.arange(1, xk.shape[0] + 1)[None, :]  # (T, K)
            return jnp.tensordot(powers, xk, axes=1)

        return jax.tree_util.tree_map(one, self.displacement)

    @property
    def time_scale(self) -> float:
        """``τ = min_{k≥2} (‖x₁‖/‖x_k‖)^{1/(k−1)}``: the flow's own time unit (≈ ``1/‖H‖``).

        Used only to tell rounding-level coefficients from real ones;
        ``inf`` when every ``x_k``, ``k ≥ 2``, vanishes (a straight-line flow).
        """
        # ‖x_k‖ leaf by leaf: only K numbers come back (a sharded x_k is never gathered)
        norms = np.sqrt(np.asarray(jax.device_get(_squared_norms(self.displacement)), np.float64))
        if norms[0] == 0:
            return float("inf")
        scales = [(norms[0] / norms[k]) ** (1.0 / k) for k in range(1, norms.size) if norms[k] > 0]
        return float(min(scales)) if scales else float("inf")

    @property
    def validity_time(self) -> float:
        """Where the last non-zero term of ``Δu``'s series reaches 10 % of the sum.

        See :func:`polynomial_validity_time` (``nan``: a single non-zero term,
        raise the order; ``inf``: nothing bounds it). Needs concrete arrays.
        """
        return polynomial_validity_time(self.delta_u, time_scale=self.time_scale)

    @property
    def projected_validity_time(self) -> float:
        """As :attr:`validity_time`, for the projected loss (``nan`` without a subspace).

        With ``Pg = 0`` at order 4 only ``c₄`` is non-zero: ``nan``; use order ≥ 5.
        """
        if self.projected is None:
            return float("nan")
        return polynomial_validity_time(self.projected, time_scale=self.time_scale)


@jax.jit
def _squared_norms(stack: PyTree) -> jax.Array:
    """``(K,)`` ``‖x_k‖²`` of a stack of vectors (leaves with a leading ``K`` axis)."""
    squares = [
        jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim)))
        for leaf in jax.tree_util.tree_leaves(stack)
    ]
    return sum(squares[1:], squares[0])


def _subspace_parts(subspace: Any, leaves, treedef) -> tuple[jax.Array, list]:
    """``(λ (d,), basis leaves (d, *leaf shape))`` from a Subspace-like object or a tuple.

    A ``(d, n)`` basis of raveled rows is split into the parameters' leaves; a
    pytree basis is used leaf by leaf as it is (a basis sharded like the
    parameters stays sharded).
    """
    if hasattr(subspace, "values") and hasattr(subspace, "basis"):
        values, basis = subspace.values, subspace.basis
    elif isinstance(subspace, (tuple, list)) and len(subspace) == 2:
        values, basis = subspace
    else:
        raise ValueError(
            "subspace must have .values and .basis attributes or be a (values, basis) "
            f"tuple, got {type(subspace).__name__}"
        )
    values = jnp.asarray(values)
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(f"subspace values must have shape (d,), got {values.shape}")
    finite_leaves(values, "subspace values")
    d = values.shape[0]
    sizes = [int(np.size(leaf)) for leaf in leaves]
    n = sum(sizes)
    if isinstance(basis, (np.ndarray, jax.Array)) and np.shape(basis) == (d, n):
        flat = jnp.asarray(basis)
        finite_leaves(flat, "subspace basis")
        check_orthonormal(flat, "subspace basis")
        offsets = np.cumsum([0, *sizes])
        return values, [
            flat[:, offsets[i] : offsets[i + 1]].reshape(d, *np.shape(leaf))
            for i, leaf in enumerate(leaves)
        ]
    b_leaves, b_def = jax.tree_util.tree_flatten(basis)
    shapes_ok = b_def == treedef and all(
        np.shape(b) == (d, *np.shape(p)) for b, p in zip(b_leaves, leaves, strict=True)
    )
    if not shapes_ok:
        raise ValueError(
            f"subspace basis must be a (d, n) = ({d}, {n}) array of raveled rows or a "
            f"pytree like params with a leading d={d} axis; got "
            f"{jax.tree_util.tree_map(np.shape, basis)}"
        )
    finite_leaves(b_leaves, "subspace basis")
    check_orthonormal(basis, "subspace basis")
    return values, list(b_leaves)


def projected_from_coordinates(values: Any, ys: Any) -> Any:
    """Coefficients ``c₀ … c_K`` of ``½Σ_i λ_i ⟨v_i, x(t)⟩²`` from ``ys[k−1, i] = ⟨v_i, x_k⟩``.

    ``values`` ``(d,)`` (clipped at 0), ``ys`` ``(K, d)``; ``t^m`` collects
    ``y_j y_l`` with ``j + l = m``, ``j, l ≥ 1``, truncated at ``t^K``. Numpy
    inputs give a float64 numpy array (host-side), jax inputs a jax array.
    """
    xp = np if isinstance(ys, np.ndarray) else jnp
    lam = xp.maximum(values, 0.0)
    order = ys.shape[0]
    coeffs = [xp.zeros((), ys.dtype), xp.zeros((), ys.dtype)]
    for m in range(2, order + 1):
        coeffs.append(0.5 * sum(xp.sum(lam * ys[j - 1] * ys[m - j - 1]) for j in range(1, m)))
    return xp.stack(coeffs)


def _projected_coefficients(values, basis, xs) -> jax.Array:
    """Coefficients of ``½Σ_i λ_i ⟨v_i, x(t)⟩²`` up to ``t^K`` from ``x₁ … x_K`` (exact).

    ``basis`` is a list of leaves ``(d, *leaf shape)``; ``⟨v_i, x_k⟩`` is summed
    leaf by leaf, so nothing is raveled.
    """
    ys = jnp.stack([stack_dot(basis, list(x)) for x in xs])  # (K, d)
    return projected_from_coordinates(values, ys)


def delta_u_series(
    skill_loss: Callable[..., jax.Array],
    task_loss: Callable[..., jax.Array],
    params: PyTree,
    order: int = 4,
    *,
    subspace: Any = None,
    skill_args: tuple = (),
    task_args: tuple = (),
    method: str = "auto",
) -> Series:
    """The Taylor forecast ``Δu(t) = Σ_{k≤K} c_k t^k`` of a skill loss along gradient flow.

    ``x(t)`` comes from :func:`flow_taylor`; ``u(θ* + x(t))`` is expanded in
    the same Taylor mode, so ``c_k`` for ``k ≤ K`` is exact (it needs
    ``x₁ … x_k`` only) and ``c₀ = 0`` with no cancellation. The formulas it
    reproduces are those of docs/theory.md §6 (see :class:`Series`); on a quadratic
    landscape ``c₂ = ½cᵀFc``, ``c₃ = −½cᵀFAc``, ``c₄ = ⅛cᵀAFAc + ⅙cᵀFA²c``.
    Jit-able with ``skill_loss``, ``task_loss``, ``order``, ``method`` static.

    Args:
      skill_loss: ``skill_loss(params, *skill_args) -> scalar``, ``u``.
      task_loss: ``task_loss(params, *task_args) -> scalar``, the fine-tuning loss ``L``.
      params: ``θ*``, a pytree of finite floating arrays.
      order: ``K ≥ 1``.
      subspace: the alignment subspace ``M`` (Def. 3.4) for the projected loss:
        an object with ``.values`` ``(d,)`` (eigenvalues ``λ`` of ``F``, clipped
        at 0) and ``.basis`` (orthonormal eigenvectors), or a ``(values, basis)``
        tuple. ``basis`` is ``(d, n)`` with raveled rows
        (``jax.flatten_util.ravel_pytree`` order) or a pytree like ``params``
        with a leading ``d`` axis. ``None``: no projected series.
      skill_args, task_args: extra arguments of the two losses.
      method: Taylor engine, as in :func:`flow_taylor`.

    Returns:
      A :class:`Series`.

    Raises:
      ValueError: non-finite ``params``, ``order < 1``, a malformed ``subspace``.

    Warns (``UserWarning``) when ``task_loss``'s gradient is exactly zero at
    ``θ*`` (e.g. a loss built on ``argmax``): the zero forecast then says the
    loss does not move ``θ``, not that fine-tuning is safe.
    """
    leaves, treedef = _params_leaves(params)
    order = positive_int(order, "order")
    _check_method(method)
    sub = None if subspace is None else _subspace_parts(subspace, leaves, treedef)
    for name, loss, args in (("skill", skill_loss, skill_args), ("task", task_loss, task_args)):
        call = f"{name}_loss(params, *{name}_args)"
        check_data(args, f"{name}_args")
        scalar_loss(loss, params, tuple(args), f"{name}_loss", call, f"{name}_args")

    def run(leaves, sub, skill_args, task_args):
        xs, routes = _displacement_leaves(task_loss, leaves, treedef, order, task_args, method)

        def skill(*ls):
            return (skill_loss(treedef.unflatten(ls), *skill_args),)

        u_coeffs, u_route = _coefficients(skill, leaves, xs, method)
        dtype = jnp.result_type(*leaves)
        delta_u = jnp.stack(
            [jnp.zeros((), dtype)] + [jnp.asarray(c[0], dtype) for c in u_coeffs[1:]]
        )
        projected = None if sub is None else _projected_coefficients(*sub, xs).astype(dtype)
        stacked = treedef.unflatten([jnp.stack([x[i] for x in xs]) for i in range(len(leaves))])
        if layout is not None:  # x₁ … x_K stay sharded like θ*, not replicated
            stacked = jax.lax.with_sharding_constraint(stacked, layout.stacked)
        return Series(delta_u, projected, stacked, _route([*routes, u_route]))

    layout = Layout(params, "params") if is_sharded(params) else None
    out = _compiled(run)(leaves, sub, tuple(skill_args), tuple(task_args))
    check_finite_coefficients([out.delta_u, out.projected], "the Δu series' coefficients")
    _warn_if_flat(out.displacement)
    return out


def check_finite_coefficients(coefficients: list, what: str) -> None:
    """``ValueError`` when concrete coefficients are not finite: a NaN or infinite loss or
    derivative at ``θ*`` would otherwise come back as a NaN forecast, or (a NaN constant
    drops out of every derivative) as a plausible one. ``None`` entries are skipped."""
    arrays = [c for c in coefficients if c is not None and is_concrete(c)]
    if all(np.all(np.isfinite(jax.device_get(c))) for c in arrays):
        return
    raise ValueError(
        f"{what} are not finite at params: the skill or task loss, or one of their "
        "derivatives, is NaN or infinite at θ* (e.g. a log or square root at 0, NaN data)"
    )


def _warn_if_flat(displacement: PyTree) -> None:
    """Warn (:func:`flat_loss`) when ``x₁ = −g(θ*)`` is exactly zero: every ``c_k`` is then 0.

    One compiled reduction and an explicit ``jax.device_get`` of its flag: sharded
    displacements stay where they are (no implicit transfer).
    """
    leaves = jax.tree_util.tree_leaves(displacement)
    if not all(is_concrete(x) for x in leaves):
        return  # traced: nothing to say at trace time
    if not bool(jax.device_get(_moves(leaves))):
        warn_at_caller(flat_loss("task_loss", 0.0), FlatLossWarning)


@jax.jit
def _moves(leaves: list) -> jax.Array:
    """Whether any entry of ``x₁`` (row 0 of each leaf) is non-zero."""
    return jnp.any(jnp.stack([jnp.any(x[0] != 0) for x in leaves]))
