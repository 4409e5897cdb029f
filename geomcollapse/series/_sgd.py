"""Forecast of the alignment loss under minibatch SGD (docs/theory.md §8).

SGD with learning rate ``η`` and ``B`` examples per step,
``θ_{k+1} = θ_k − η ĝ_k``, has ``E[ĝ] = g`` and ``Cov(ĝ) = Σ(θ)/B`` (times
``(N − B)/(N − 1)`` without replacement), ``Σ`` the covariance of the
per-example gradients. To first order in ``η`` at fixed ``t = ηk``::

    E[Δu_k] = Δu_GD(k) + (η/B)·N(ηk) + O(η²),

``Δu_GD`` the deterministic gradient-descent forecast and ``N(t) = Σ_j n_j t^j``
the minibatch-noise series, ``n₁ = ½tr(FΣ)``. With ``C̃``, ``μ̃`` the noise's
covariance and mean shift in units of ``η/B`` (§8)::

    C̃' = Σ(x) − H C̃ − C̃ H,      μ̃' = −H μ̃ − ½∇H[C̃],
    N(t) = ½tr(∇²u(x(t)) C̃(t)) + ∇u(x(t))·μ̃(t),

along the flow ``x(t)``. ``C̃(t) = E_j ∫₀ᵗ Ψ(t)e_j(s) e_j(s)ᵀΨ(t)ᵀ ds`` with
``Ψ`` the flow's Jacobian and ``e_j(s) = Ψ(s)⁻¹(∇ℓ_j − g)(x(s))``: each
``e_j`` and each ``Ψ(t)e`` is a Taylor series of vectors, so the whole series
is Hessian-, third-derivative- and skill-Hessian-vector products pushed
through ``jax.experimental.jet`` along ``x(t)``, one batch per example; no
``n×n`` matrix is formed. ``Δu_GD(k) = Σ_m η^m b_m(k)`` with ``b_m`` a
polynomial of degree ``m`` in ``k``, read off the ``η``-Taylor coefficients of
the first ``K`` GD steps by finite differences.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from geomcollapse._checks import (
    check_example_loss,
    finite_leaves,
    flat_loss,
    positive_float,
    positive_int,
)
from geomcollapse.errors import FlatLossWarning, warn_at_caller
from geomcollapse.series._flow import (
    Series,
    check_finite_coefficients,
    delta_u_series,
    polynomial_validity_time,
)

__all__ = ["SGDForecast", "sgd_delta_u"]

PyTree = Any


# --------------------------------------------------------------------------- Taylor helpers


# What ``jet`` raises where it has no Taylor rule (``sort``) or breaks on
# ``custom_jvp`` functions (``jax.nn.relu``, ``softplus``: jax-ml/jax#30352);
# there the series come from nested ``jvp`` instead, as series.flow_taylor does.
_JET_FAILURES = (KeyError, NotImplementedError, jax.errors.UnexpectedTracerError)


def _taylor(fn: Callable, *series: jax.Array) -> jax.Array:
    """``[t^c] fn(s₁(t), …)`` for ``c = 0 … K``; each ``s_i`` is ``(K+1, …)`` coefficients."""
    order = series[0].shape[0] - 1
    primals = tuple(s[0] for s in series)
    if order == 0:  # jet needs at least one term
        return fn(*primals)[None]
    terms = tuple([math.factorial(c) * s[c] for c in range(1, order + 1)] for s in series)
    try:
        out0, outs = jet.jet(fn, primals, terms)
    except _JET_FAILURES:
        return _taylor_by_jvp(fn, *series)
    return jnp.stack([out0] + [outs[c - 1] / math.factorial(c) for c in range(1, order + 1)])


def _taylor_by_jvp(fn: Callable, *series: jax.Array) -> jax.Array:
    """As :func:`_taylor`, by ``K`` nested ``jax.jvp`` in the scalar ``t`` (``2^K`` passes)."""
    order = series[0].shape[0] - 1

    def curve(t):
        points = []
        for s in series:  # Horner: s₀ + t(s₁ + t(s₂ + …))
            acc = s[order]
            for c in range(order - 1, -1, -1):
                acc = s[c] + t * acc
            points.append(acc)
        return fn(*points)

    def derivatives(level):
        if level == 0:
            return lambda t: (curve(t),)
        inner = derivatives(level - 1)

        def outer(t):
            primal, tangent = jax.jvp(inner, (t,), (jnp.ones_like(t),))
            return (*primal, tangent[-1])

        return outer

    derivs = derivatives(order)(jnp.zeros((), series[0].dtype))
    return jnp.stack([d / math.factorial(k) for k, d in enumerate(derivs)])


def _binomial_basis(order: int, lr: float) -> np.ndarray:
    """``Q[i, p]``: the ``t^p`` coefficient of ``η^i C(k, i) = Π_{j<i}(t − jη)/i!``, ``t = ηk``."""
    q = np.zeros((order + 1, order + 1))
    poly = np.array([1.0])  # highest power first
    for i in range(order + 1):
        q[i, : poly.size] = poly[::-1] / math.factorial(i)
        poly = np.polymul(poly, [1.0, -i * lr])
    return q


def _forward_differences(order: int) -> np.ndarray:
    """``D[i, k] = (−1)^{i−k} C(i, k)``: ``Δ^i f(0) = Σ_k D[i, k] f(k)``."""
    d = np.zeros((order + 1, order + 1))
    for i in range(order + 1):
        for k in range(i + 1):
            d[i, k] = (-1) ** (i - k) * math.comb(i, k)
    return d


class _Problem(NamedTuple):
    """``u``, the per-example gradients, ``g``, ``Hv`` and ``∇H[p, q]`` on raveled parameters."""

    skill: Callable
    example_grads: Callable
    grad: Callable
    hvp: Callable
    third: Callable


@dataclasses.dataclass(frozen=True, eq=False)
class _Opaque:
    """A loss compared by identity: lets an unhashable callable be a static argument."""

    fn: Callable

    def __call__(self, *args):
        return self.fn(*args)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The losses and the parameters' layout: the static part of every compiled stage.

    Hashed by value, so calls with the same losses and shapes (several learning
    rates: ``lr`` enters only afterwards) reuse each stage's compilation.
    """

    skill_loss: Callable
    example_loss: Callable
    treedef: Any
    shapes: tuple

    @classmethod
    def of(cls, skill_loss, example_loss, params) -> _Spec:
        try:
            hash((skill_loss, example_loss))
        except TypeError:
            skill_loss, example_loss = _Opaque(skill_loss), _Opaque(example_loss)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        shapes = tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)
        return cls(skill_loss, example_loss, treedef, shapes)

    def unravel(self, flat: jax.Array) -> PyTree:
        sizes = [math.prod(shape) for shape, _ in self.shapes]
        offsets = np.cumsum([0, *sizes])
        leaves = [
            flat[offsets[i] : offsets[i + 1]].reshape(shape).astype(dtype)
            for i, (shape, dtype) in enumerate(self.shapes)
        ]
        return self.treedef.unflatten(leaves)

    def problem(self, rows: tuple, skill_args: tuple) -> _Problem:
        def skill(th):
            return self.skill_loss(self.unravel(th), *skill_args)

        def example_grads(th):
            def one(*row):
                return jax.grad(lambda p: self.example_loss(self.unravel(p), *row))(th)

            return jax.vmap(one)(*rows)

        def task_loss(th):
            params = self.unravel(th)
            return jnp.mean(jax.vmap(lambda *row: self.example_loss(params, *row))(*rows))

        # the gradient of the mean loss, not the mean of per-example gradients: its
        # Hessian-vector products never hold the ``N × n`` per-example gradients
        grad = jax.grad(task_loss)

        def hvp(th, v):
            return jax.jvp(grad, (th,), (v,))[1]

        def third(th, p, q):
            return jax.jvp(lambda s: hvp(s, p), (th,), (q,))[1]

        return _Problem(skill, example_grads, grad, hvp, third)


def _mean_loss(example_loss: Callable) -> Callable:
    def task_loss(params, *rows):
        return jnp.mean(jax.vmap(lambda *row: example_loss(params, *row))(*rows))

    return task_loss


@eqx.filter_jit
def _stage(spec: _Spec, kind: str, xs: jax.Array, extra: tuple, rows: tuple, skill_args: tuple):
    """One compiled ``jet`` pass along the flow series ``xs`` (``(K+1, n)``).

    A separate compilation per ``kind`` (and shapes), reused across the
    recursions' levels: one program holding every level compiles far slower
    (minutes for a 26-parameter MLP at order 4) than these few small ones.
    The batched kinds (``tangent``, ``skill_hvp``, ``third``) take one chunk of
    tangent series, ``(K+1, chunk, n)`` each, the same shape at every level.
    """
    prob = spec.problem(rows, skill_args)
    if kind == "example_grads":
        return _taylor(prob.example_grads, xs)
    if kind == "tangent":
        return _taylor(jax.vmap(prob.hvp, (None, 0)), xs, *extra)
    if kind == "hvp":
        return _taylor(prob.hvp, xs, *extra)
    if kind == "skill_grad":
        return _taylor(jax.grad(prob.skill), xs)
    if kind == "skill_hvp":

        def skill_hvp(th, v):
            return jax.jvp(jax.grad(prob.skill), (th,), (v,))[1]

        return _taylor(jax.vmap(skill_hvp, (None, 0)), xs, *extra)
    if kind == "third":
        return _taylor(jax.vmap(prob.third, (None, 0, 0)), xs, *extra)
    if kind == "skill":
        return _taylor(prob.skill, xs)
    raise ValueError(f"unknown stage {kind!r}")


class _Batch(NamedTuple):
    """Tangent series ``source[:, which[i // N], i % N]`` for ``i < len(which)·N``.

    ``source`` is ``(K+1, A, N, n)``; a batch is gathered chunk by chunk, never whole.
    """

    source: np.ndarray
    which: np.ndarray

    @property
    def size(self) -> int:
        return self.which.size * self.source.shape[2]

    def chunk(self, index: np.ndarray, keep: int) -> np.ndarray:
        count = self.source.shape[2]
        return self.source[:keep, self.which[index // count], index % count]


# --------------------------------------------------------------------------- the noise series


def _propagated_deviations(stage: Callable, xs: jax.Array) -> jax.Array:
    """``psi[c, a, j] = [t^c] Ψ(t) e_{j,a}``, ``(K+1, K, N, n)``; valid where ``a + c < K``.

    ``e_j(s) = Σ_a e_{j,a} s^a = Ψ(s)⁻¹ d_j(s)``, ``d_j = ∇ℓ_j − g`` along the
    flow, solved order by order from ``Ψ(s) e_j(s) = d_j(s)``:
    ``e_a = d_a − Σ_{c≥1} [Ψ e_{a−c}]_c``; ``Ψ(t)e`` is the tangent flow
    ``ψ' = −H(x(t))ψ``, ``ψ_{c+1} = −[H(x(t))ψ(t)]_c/(c+1)``. Level ``a + c``
    needs only lower levels, so one batched ``jet`` per level serves every ``a``;
    level ``L`` needs the tangents ``a < L`` to ``t^{L−1}`` only.
    """
    order = xs.shape[0] - 1
    dev = stage("example_grads", xs, keep=order)  # (K+1, N, n)
    dev -= np.mean(dev, axis=1, keepdims=True)
    psi = np.zeros((order + 1, order, *dev.shape[1:]), dev.dtype)
    for level in range(order):
        if level:
            prod = stage("tangent", xs, _Batch(psi, np.arange(level)), keep=level)
            for a in range(level):
                psi[level - a, a] = -prod[level - a - 1, a] / (level - a)
        psi[0, level] = dev[level] - sum(psi[level - a, a] for a in range(level))
    return psi


def _trace_weights(order: int) -> np.ndarray:
    """``W[a, b, i, j, c] = [a+b+1+i+j = c]/(a+b+1)``: ``∫₀ᵗ s^{a+b} ds`` times ``t^{i+j}``."""
    w = np.zeros((order, order, order + 1, order + 1, order + 1))
    for a, b, i, j in np.ndindex(order, order, order + 1, order + 1):
        c = a + b + 1 + i + j
        if c <= order:
            w[a, b, i, j, c] = 1.0 / (a + b + 1)
    return w


def _trace_series(stage: Callable, xs: jax.Array, psi: jax.Array) -> jax.Array:
    """``[t^c] tr(∇²u(x(t)) C̃(t))``, ``C̃ = E_j Σ_{a,b} t^{a+b+1}/(a+b+1) Ψe_a (Ψe_b)ᵀ``."""
    h = stage("skill_hvp", xs, _Batch(psi, np.arange(psi.shape[1])), keep=xs.shape[0] - 1)
    dots = np.einsum("ianx,jbnx->abij", psi, h) / psi.shape[2]
    return np.einsum("abij,abijc->c", dots, _trace_weights(xs.shape[0] - 1))


def _source_weights(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``a ≤ b`` with ``a + b ≤ K − 2`` and ``W[p, i, c]`` (×2 off the diagonal)."""
    pairs = [(a, b) for a in range(order) for b in range(a, order) if a + b <= order - 2]
    w = np.zeros((len(pairs), order + 1, order + 1))
    for p, (a, b) in enumerate(pairs):
        for i in range(order + 1):
            c = a + b + 1 + i
            if c <= order:
                w[p, i, c] = (1.0 if a == b else 2.0) / (a + b + 1)
    pa = np.array([a for a, _ in pairs], int)
    pb = np.array([b for _, b in pairs], int)
    return pa, pb, w


def _mean_shift_series(stage: Callable, xs: jax.Array, psi: jax.Array) -> jax.Array:
    """``[t^c] ∇u(x(t))·μ̃(t)`` with ``μ̃' = −Hμ̃ − ½∇H[C̃]``, ``μ̃(0) = 0``.

    ``∇H[C̃] = E_j Σ_{a,b} t^{a+b+1}/(a+b+1) ∇³L[Ψe_a, Ψe_b]``: third-derivative
    products along the flow, one batched ``jet`` over (pair, example) per
    ``a + b``: ``μ̃`` to ``t^K`` needs pair ``(a, b)`` to ``t^{K−2−a−b}`` only.
    """
    order = xs.shape[0] - 1
    source = np.zeros_like(xs)
    if order >= 2:
        pa, pb, w = _source_weights(order)
        r = np.zeros((order + 1, pa.size, xs.shape[1]), xs.dtype)
        for total in np.unique(pa + pb):
            sel = np.flatnonzero(pa + pb == total)
            pairs = (_Batch(psi, pa[sel]), _Batch(psi, pb[sel]))
            r[:, sel] = np.mean(stage("third", xs, *pairs, keep=order - 1 - total), axis=2)
        source = 0.5 * np.einsum("ipx,pic->cx", r, w)
    mu = np.zeros_like(xs)
    for c in range(order):
        hm = stage("hvp", xs, mu, keep=order)
        mu[c + 1] = -(hm[c] + source[c]) / (c + 1)
    prods = np.einsum("ix,jx->ij", stage("skill_grad", xs, keep=max(order - 1, 1)), mu)
    return np.array([np.trace(prods[::-1], offset=c - order) for c in range(order + 1)])


def _gd_values(stage: Callable, theta: jax.Array, order: int) -> jax.Array:
    """``V[m, k] = [η^m] (u(x_k(η)) − u(θ*))`` for GD ``x_{k+1} = x_k − ηg(x_k)``, ``k ≤ K``.

    ``x_k(η)`` as an ``η``-series: ``[x_{k+1}]_m = [x_k]_m − [g(x_k(η))]_{m−1}``,
    one ``jet`` of ``g`` and one of ``u`` per step (each compiled once).
    """
    x = np.zeros((order + 1, theta.size), theta.dtype)
    x[0] = theta
    values = [np.zeros((order + 1,), theta.dtype)]
    for _ in range(order):
        x[1:] -= np.mean(stage("example_grads", x, keep=order), axis=1)[:-1]
        values.append(stage("skill", x))
        values[-1][0] = 0.0
    return np.stack(values, axis=1)


def _chunked(run: Callable, batches: tuple, keep: int, chunk: int) -> np.ndarray:
    """``run`` over the :class:`_Batch` es ``chunk`` tangents at a time: ``(keep, A, N, n)``.

    Every chunk has the same shape (the last one zero-padded), so ``run``
    compiles once; peak memory is one chunk's pass, not the whole batch's.
    """
    total, size = batches[0].size, min(chunk, batches[0].size)
    parts = []
    for start in range(0, total, size):
        index = np.arange(start, start + size)
        valid = index < total
        index = np.where(valid, index, 0)
        tangents = tuple(np.where(valid[:, None], b.chunk(index, keep), 0.0) for b in batches)
        parts.append(np.asarray(run(tangents))[:, valid])
    source = batches[0].source
    return np.concatenate(parts, axis=1).reshape(keep, batches[0].which.size, source.shape[2], -1)


def _coefficients(skill_loss, example_loss, params, order, rows, skill_args, chunk):
    """The flow :class:`Series`, the noise series ``n₀ … n_K`` and the GD values ``V[m, k]``."""
    with warnings.catch_warnings():  # said below, naming this function's argument
        warnings.simplefilter("ignore", FlatLossWarning)
        flow = delta_u_series(
            skill_loss,
            _mean_loss(example_loss),
            params,
            order,
            skill_args=skill_args,
            task_args=rows,
        )
    first = [np.asarray(x)[0] for x in jax.tree_util.tree_leaves(flow.displacement)]
    if not any(np.any(x != 0) for x in first):  # x₁ = −g(θ*) = 0: the mean loss is flat
        warn_at_caller(flat_loss("example_loss", 0.0), FlatLossWarning)
    spec = _Spec.of(skill_loss, example_loss, params)
    # the glue between compiled stages runs on the host in numpy: small arrays,
    # and eager jax ops would compile one program per operation and shape
    flat = np.concatenate([np.ravel(x) for x in jax.device_get(jax.tree_util.tree_leaves(params))])
    disp = jax.device_get(jax.tree_util.tree_leaves(flow.displacement))
    xs = np.concatenate([flat[None], np.concatenate([np.reshape(x, (order, -1)) for x in disp], 1)])

    def stage(kind, xs, *extra, keep=order + 1):
        """A compiled ``jet`` pass on the first ``keep`` coefficients, zero-padded to ``K+1``.

        Each use needs only the low coefficients (e.g. ``∇H[C̃]`` to ``t^{K−2}``),
        and a ``jet`` of fewer terms compiles much faster. :class:`_Batch` es of
        tangent series go through in chunks of ``chunk``.
        """
        if extra and isinstance(extra[0], _Batch):

            def run(tangents):
                return _stage(spec, kind, xs[:keep], tangents, rows, skill_args)

            out = _chunked(run, extra, keep, chunk)
        else:
            out = np.array(
                _stage(spec, kind, xs[:keep], tuple(e[:keep] for e in extra), rows, skill_args)
            )
        return np.concatenate([out, np.zeros((order + 1 - keep, *out.shape[1:]), out.dtype)])

    psi = _propagated_deviations(stage, xs)
    noise = 0.5 * _trace_series(stage, xs, psi) + _mean_shift_series(stage, xs, psi)
    return flow, noise, _gd_values(stage, flat, order)


# --------------------------------------------------------------------------- the forecast


class SGDForecast(NamedTuple):
    """``E[Δu]`` under minibatch SGD after each of ``steps`` (docs/theory.md §8).

    ``mean = deterministic + noise``, exact to first order in ``lr`` at fixed
    ``t = lr·k`` inside the window (truncated at ``t^K``).

    Attributes:
      mean: ``(S,)`` ``E[Δu_k]``.
      deterministic: ``(S,)`` ``Δu_GD(k) = Σ_{m≤K} lr^m b_m(k)``, the full-batch
        gradient-descent forecast (``b_m`` a degree-``m`` polynomial in ``k``;
        its leading terms are the flow series ``c_m t^m``).
      noise: ``(S,)`` ``(lr/B)·N(lr·k)``.
      steps: ``(S,)`` the step counts ``k``; t: ``(S,)`` ``lr·k``.
      noise_coefficients: ``(K+1,)`` ``n₀ … n_K`` of ``N(t)`` (``n₀ = 0``,
        ``n₁ = ½tr(∇²u Σ)``), the finite-population factor ``(N−B)/(N−1)``
        included when sampling without replacement.
      noise_rate: ``½(lr/B)·tr(∇²u Σ)`` (× the same factor): ``dE[Δu]/dt`` at ``t = 0``
        from the noise alone.
      deterministic_coefficients: ``(K+1,)`` ``Δu_GD`` as a polynomial in ``t`` at this ``lr``.
      mean_coefficients: ``(K+1,)`` ``deterministic_coefficients + (lr/B)·noise_coefficients``.
      flow: the gradient-flow :class:`~geomcollapse.series.Series` (``lr → 0``).
      lr, batch_size: as given.
    """

    mean: jax.Array
    deterministic: jax.Array
    noise: jax.Array
    steps: jax.Array
    t: jax.Array
    noise_coefficients: jax.Array
    noise_rate: jax.Array
    deterministic_coefficients: jax.Array
    mean_coefficients: jax.Array
    flow: Series
    lr: float
    batch_size: int

    @property
    def order(self) -> int:
        """``K``, the highest power of ``t`` kept."""
        return int(self.noise_coefficients.shape[0]) - 1

    @property
    def noise_validity_time(self) -> float:
        """Where the last term of ``N(t)`` reaches 10 % of it (``inf``: no noise)."""
        return polynomial_validity_time(self.noise_coefficients, time_scale=self.flow.time_scale)

    @property
    def validity_time(self) -> float:
        """The window: the smaller of the flow series' and the noise series' windows.

        ``nan`` where either series has a single non-zero term (raise the order),
        as :attr:`Series.validity_time <geomcollapse.series.Series.validity_time>`.
        """
        times = (self.flow.validity_time, self.noise_validity_time)
        return float("nan") if any(np.isnan(times)) else float(min(times))

    @property
    def validity_step(self) -> float:
        """:attr:`validity_time` in steps, ``validity_time / lr``."""
        return self.validity_time / self.lr

    @property
    def in_window(self) -> np.ndarray:
        """``(S,)`` bool: ``t ≤ validity_time`` (all ``False`` when the window is ``nan``)."""
        return np.asarray(self.t) <= self.validity_time


def _checked_rows(task_data: Any, batch_size: int, replacement: bool) -> tuple:
    """``task_data`` as a tuple of arrays sharing a leading axis ``N ≥ 2`` (``B ≤ N`` without)."""
    if not isinstance(task_data, (tuple, list)) or not task_data:
        raise ValueError(
            "task_data must be a non-empty tuple of arrays with a leading example axis"
        )
    rows = tuple(jnp.asarray(a) for a in task_data)
    sizes = {a.shape[0] if a.ndim else None for a in rows}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"task_data arrays must share a leading axis, got {[a.shape for a in rows]}"
        )
    count = sizes.pop()
    if count < 2:
        raise ValueError(f"task_data must hold at least 2 examples, got {count}")
    floating = [a for a in rows if jnp.issubdtype(a.dtype, jnp.floating)]
    if floating:
        finite_leaves(floating, "task_data")
    if not replacement and batch_size > count:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {count} examples (replacement=False)"
        )
    return rows


def _checked_steps(steps: Any) -> np.ndarray:
    arr = np.asarray(steps)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"steps must be a non-empty 1-D sequence of integers, got {steps!r}")
    if np.any(arr < 0):
        raise ValueError(f"steps must be >= 0, got {arr.min()}")
    return arr


def _deterministic_coefficients(values: np.ndarray, lr: float) -> np.ndarray:
    """``Δu_GD`` as a polynomial in ``t``: ``b_m(k) = Σ_{i≤m} Δ^i b_m(0) C(k, i)``."""
    order = values.shape[0] - 1
    diffs = values @ _forward_differences(order).T  # [m, i] = Δ^i b_m(0)
    power = np.arange(order + 1)[:, None] - np.arange(order + 1)[None, :]  # m − i
    # b_m has degree m: differences of order i > m are rounding, dropped
    scaled = np.where(power >= 0, diffs * lr ** np.maximum(power, 0), 0.0)
    return np.einsum("mi,ip->p", scaled, _binomial_basis(order, lr))


def sgd_delta_u(
    skill_loss: Callable[..., jax.Array],
    example_loss: Callable[..., jax.Array],
    params: PyTree,
    task_data: Sequence[Any],
    *,
    lr: float,
    batch_size: int,
    steps: Sequence[int],
    order: int = 4,
    skill_args: tuple = (),
    replacement: bool = True,
    chunk_size: int = 16,
) -> SGDForecast:
    """Forecast ``E[Δu_k]`` under minibatch SGD from ``θ*`` (docs/theory.md §8).

    ``E[Δu_k] = Δu_GD(k) + (lr/B)·N(lr·k) + O(lr²)`` at fixed ``t = lr·k``:
    ``Δu_GD`` the full-batch GD forecast to ``lr^K``, ``N(t) = Σ_{j≤K} n_j t^j``
    the minibatch-noise series: ``n₁ = ½tr(FΣ)`` and, at a minimum of ``u``,
    ``n₂ = ¼tr(F(Σ̇ − HΣ − ΣH)) − ½tr(∇³u[g]Σ)`` (``Σ̇``: ``Σ``'s change along
    the flow); beyond quadratics ``∇H`` acting on the covariance shifts the mean.
    Matrix-free: ``K`` batched ``jet`` passes (nested ``jvp`` where ``jet`` has
    no rule) of Hessian-vector products of the task loss over the ``N``
    per-example gradient deviations (``K·N`` tangent series), one of
    skill-Hessian- and one of third-derivative-vector products.

    Memory: ``O(K²·N·n)`` numbers on the host (the tangent series, ``n``
    parameters) plus one chunk's compiled pass, ``O(chunk_size·K·(N·a + n))``
    (``a`` the activations of one example: each product is a forward and
    backward pass of the mean task loss), whatever ``K·N``. Not jit-able as a
    whole (numpy glue); each pass but the flow series' compiles once per losses
    and shapes, so other ``lr``, ``batch_size`` and ``steps`` reuse it.

    Args:
      skill_loss: ``skill_loss(params, *skill_args) -> scalar``, ``u``.
      example_loss: ``example_loss(params, *row) -> scalar``, one example's task
        loss; the task loss ``L`` is its mean over ``task_data``.
      params: ``θ*``, a pytree of finite floating arrays.
      task_data: a tuple of arrays whose leading axis (``N ≥ 2``) indexes examples.
      lr, batch_size: the learning rate ``η > 0``; ``B ≥ 1`` examples per step.
      steps: step counts ``k ≥ 0`` at which to forecast.
      order: ``K ≥ 1``, the power of ``t`` (and of ``lr``) kept.
      skill_args: extra arguments of ``skill_loss``.
      replacement: draw with replacement (``Cov(ĝ) = Σ/B``) or without
        (``× (N − B)/(N − 1)``, needs ``B ≤ N``); either way each step's batch is
        drawn independently of the others. Epoch shuffling (``training.train``, a
        shuffled data loader) is not this model: its noise matches only while
        ``k·B ≪ N`` and cancels at each epoch's end (docs/theory.md §8).
      chunk_size: tangent series per compiled batched pass (``≥ 1``): bounds
        the peak memory, not the result.

    Returns:
      An :class:`SGDForecast`.

    Raises:
      ValueError, naming the argument: non-finite ``params`` or ``task_data``,
        ragged ``task_data``, ``lr ≤ 0``, ``batch_size < 1`` (or ``> N`` without
        replacement), negative or non-integer ``steps``, ``order < 1``,
        ``chunk_size < 1``.
    """
    lr = positive_float(lr, "lr")
    batch_size = positive_int(batch_size, "batch_size")
    order = positive_int(order, "order")
    chunk_size = positive_int(chunk_size, "chunk_size")
    if not isinstance(replacement, (bool, np.bool_)):
        raise ValueError(f"replacement must be True or False, got {replacement!r}")
    rows = _checked_rows(task_data, batch_size, bool(replacement))
    steps = _checked_steps(steps)
    skill_args = tuple(skill_args)
    check_example_loss(example_loss, params, rows)  # params, and a scalar on one example
    flow, noise, values = _coefficients(
        skill_loss, example_loss, params, order, rows, skill_args, chunk_size
    )
    check_finite_coefficients([noise, values], "the SGD noise series' coefficients")
    count = rows[0].shape[0]
    factor = 1.0 if replacement else (count - batch_size) / (count - 1)
    return _forecast(flow, noise * factor, values, steps, lr, batch_size)


def _forecast(flow: Series, noise, values, steps, lr: float, batch_size: int) -> SGDForecast:
    """The :class:`SGDForecast` from the coefficients, at ``steps``."""
    dtype = flow.delta_u.dtype
    noise = np.asarray(noise).astype(dtype)
    det = _deterministic_coefficients(np.asarray(values, np.float64), lr).astype(dtype)
    ts = (lr * steps.astype(np.float64)).astype(dtype)
    kappa = lr / batch_size
    det_k = np.polyval(det[::-1], ts)
    noise_k = kappa * np.polyval(noise[::-1], ts)
    out = {
        "mean": det_k + noise_k,
        "deterministic": det_k,
        "noise": noise_k,
        "steps": steps,
        "t": ts,
        "noise_coefficients": noise,
        "noise_rate": kappa * noise[1],
        "deterministic_coefficients": det,
        "mean_coefficients": det + kappa * noise,
    }
    arrays = {k: jnp.asarray(v, dtype if k != "steps" else None) for k, v in out.items()}
    return SGDForecast(**arrays, flow=flow, lr=lr, batch_size=batch_size)
