"""The Alignment Instability Condition (Def. 5.1) measured on any model, matrix-free.

Inputs are a skill Fisher matvec (true ``F`` or empirical), a fine-tuning loss
and the parameters ``θ*``. Costs: the top-``d`` eigenpairs of ``F`` by
:func:`geomcollapse.linalg.top_eigenpairs`, one gradient ``g``, one HVP ``Hg``,
one more Fisher matvec for the tail's quadratic floor, and the trace of ``F``
(exact from ``n`` matvecs for small ``n``, else Hutchinson).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse import linalg, theory
from geomcollapse._checks import (
    check_data,
    check_fisher_call,
    check_loss,
    check_params,
    checked_aic,
    one_of,
    positive_int,
    prng_key,
    probe_count,
    probe_operator,
    subspace_dim,
)
from geomcollapse._sharding import (
    Layout,
    is_sharded,
    on_one_device_mesh,
    stack_combine,
    stack_dot,
    tree_dot,
)
from geomcollapse.curvature import LinearOperator, apply, as_operator, hessian_vp, keyed
from geomcollapse.errors import NotSymmetricError
from geomcollapse.subspace import Subspace, check_orthonormal

__all__ = [
    "EXACT_TRACE_MAX_N",
    "AICMeasurement",
    "TailMass",
    "fisher_trace",
    "gradient_and_hg",
    "measure_aic",
    "rademacher_probes",
    "tail_mass",
    "tail_quadratic",
]

PyTree = Any

EXACT_TRACE_MAX_N = 4096  # trace='auto' is exact (n matvecs) up to this many parameters


class AICMeasurement(NamedTuple):
    """An AIC report with the quantities it was computed from.

    Attributes:
      report: the :class:`geomcollapse.theory.AICReport` (Def. 5.1 numbers and predictions).
      eigenpairs: the top-``d`` :class:`geomcollapse.linalg.Eigenpairs` of ``F``, vectors
        raveled to ``(d, n)`` (``jax.flatten_util.ravel_pytree`` order of ``params``);
        for ``params`` sharded over a mesh, a pytree like ``params`` with a
        leading ``d`` axis, sharded like them.
      trace: ``tr F`` (exact, or the Hutchinson mean).
      trace_stderr: standard error of ``trace`` and of the tail mass (0 when exact).
      gradient_norm: ``‖g(θ*)‖``.
      num_matvecs: Fisher matvecs used in total.
      tail_rounding: a bound on the rounding error of ``report.tail_mass``
        (:class:`TailMass`), beside its statistical ``trace_stderr``.
    """

    report: theory.AICReport
    eigenpairs: linalg.Eigenpairs
    trace: float
    trace_stderr: float
    gradient_norm: float
    num_matvecs: int
    tail_rounding: float = float("nan")


def _trace_method(method: str, n: int) -> str:
    """Resolve ``'auto'``: exact (``n`` matvecs) up to ``EXACT_TRACE_MAX_N``, else Hutchinson."""
    if method == "auto":
        return "exact" if n <= EXACT_TRACE_MAX_N else "hutchinson"
    return method


def _quadratic_terms(z: PyTree, fz: PyTree) -> jax.Array:
    """``[q, |z|ᵀ|Fz|, √(max(q, 0)·zᵀz), zᵀz]``, ``q = zᵀFz``: a probe's quadratic and the
    terms of its rounding bound (:class:`TailMass`)."""
    q, zz = tree_dot(z, fz), tree_dot(z, z)
    return jnp.stack([q, tree_dot(_abs(z), _abs(fz)), jnp.sqrt(jnp.maximum(q, 0.0) * zz), zz])


def _abs(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.abs, tree)


class TailMass(NamedTuple):
    """The tail mass ``tr((I−P)F(I−P)) = Σ_{j>d} λ_j``, computed directly (no ``tr F − Σλ``).

    Each probe ``z`` (one-hot rows, exact; Rademacher, Hutchinson) is deflated,
    ``z ← z − Vᵀ(Vz)``, and contributes ``zᵀFz``: the value's rounding then scales
    with the tail itself, not with ``tr F`` (the round trip ``(tail + Σλ) − Σλ``
    cancelled in float32 where condition 1 holds: ``tail ≪ Σλ``).

    Attributes:
      value: the exact sum, or the Hutchinson mean.
      stderr: its standard error (0 when exact).
      rounding: a first-order bound on its rounding error in the working dtype's
        ``eps``: per probe ``eps·(√n·|z|ᵀ|Fz| + 2√(λ₁·zᵀFz)·‖z‖ + d·eps·λ₁·zᵀz)``,
        summed (exact) or averaged (Hutchinson). The terms: the dot product
        ``zᵀ(Fz)`` (probabilistic ``√n`` growth); ``F`` applied as ``JᵀΛJ`` (every
        Fisher and GGN here), whose rounding ``δ`` moves ``zᵀFz`` by at most
        ``eps·‖Λ^{1/2}J‖·‖z‖·‖Λ^{1/2}Jz‖ = eps·√(λ₁·zᵀFz)·‖z‖`` per product
        (a generic matvec backward-stable to ``eps·‖F‖`` can reach
        ``eps·λ₁·‖z‖²``); and the ``O(eps·√d)`` the deflation leaves on ``M``.
      num_matvecs: Fisher matvecs used.
    """

    value: float
    stderr: float
    rounding: float
    num_matvecs: int


def _tail_mass(sums: np.ndarray, samples: np.ndarray | None, n: int, dtype, d: int, lam1: float):
    """:class:`TailMass` from the probes' summed terms (``(4,)``) and, for Hutchinson, samples."""
    eps = float(jnp.finfo(dtype).eps)
    sums = np.asarray(sums, np.float64)
    lam1 = abs(lam1)
    rounding = eps * (
        np.sqrt(n) * sums[1] + 2.0 * np.sqrt(lam1) * sums[2] + d * eps * lam1 * sums[3]
    )
    if samples is None:
        return TailMass(float(sums[0]), 0.0, float(rounding), n)
    count = samples.size
    stderr = float(samples.std(ddof=1) / np.sqrt(count))
    return TailMass(float(samples.mean()), stderr, float(rounding / count), count)


def _trace_operator(matvec: Any, n: int, dtype, args: tuple) -> LinearOperator:
    """:func:`fisher_trace`'s ``matvec`` as an operator on ``(n,)`` vectors (wrapped once here)."""
    if isinstance(matvec, LinearOperator):
        if args:
            raise ValueError("args apply to a plain matvec; a LinearOperator carries its data")
        op = matvec.raveled()
        if op.n != n:
            raise ValueError(f"matvec acts on {op.n} scalars, not n={n}")
        return op
    return as_operator(matvec, jax.ShapeDtypeStruct((n,), dtype), args=tuple(args), name="matvec")


def _fisher_operator(fisher_vp: Any, params: PyTree, fisher_args: tuple) -> LinearOperator:
    """:func:`measure_aic`'s ``fisher_vp`` (the factories' form or an operator) at ``params``."""
    fisher_args = check_data(fisher_args, "fisher_args")
    if isinstance(fisher_vp, LinearOperator) and fisher_args:
        raise ValueError(
            "fisher_args must be empty when fisher_vp is a LinearOperator (it has its data)"
        )
    return as_operator(fisher_vp, params, params=params, args=fisher_args, name="fisher_vp")


@partial(jax.jit, static_argnums=(1, 2, 3))
def rademacher_probes(key: jax.Array, num: int, n: int, dtype) -> jax.Array:
    """``(num, n)`` independent ±1 entries, 32 from each random ``uint32`` word.

    Same distribution as ``jax.random.rademacher``, which spends one threefry
    draw per entry: on the 2-core CPU, 64 probes of 1,068,810 entries took
    1.4 s that way against 0.2 s here, more than their 64 Fisher matvecs.
    Row ``i`` depends only on ``key`` and ``i`` (threefry counters are the
    entries' indices), so the first rows of a larger draw are a smaller draw.
    """
    return _probe_signs(_probe_bits(key, num, n), n, dtype)


def _probe_bits(key: jax.Array, num: int, n: int) -> jax.Array:
    """``(num, ⌈n/32⌉)`` random ``uint32`` words: :func:`rademacher_probes`' draw."""
    return jax.random.bits(key, (num, -(-n // 32)), jnp.uint32)


def _probe_signs(bits: jax.Array, n: int, dtype) -> jax.Array:
    """``(..., n)`` ±1 in ``dtype``: bit ``b`` of word ``w`` gives entry ``32w + b``."""
    signs = (bits[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = signs.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :n]
    return (2 * signs.astype(dtype) - 1).astype(dtype)


def fisher_trace(
    matvec: LinearOperator | Callable[..., jax.Array],
    n: int,
    dtype,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    deflate: np.ndarray | None = None,
    args: tuple = (),
) -> tuple[float, float, int]:
    """``tr F`` of an operator on ``(n,)`` vectors: ``(trace, stderr, matvecs)``.

    ``matvec`` is a :class:`geomcollapse.curvature.LinearOperator` (raveled if
    on a pytree) or a plain ``matvec(v, *args)``, ``(n,) -> (n,)``, wrapped once
    by :func:`geomcollapse.curvature.as_operator` with ``args`` as its data.

    ``method='exact'`` sums ``e_iᵀ F e_i`` (``n`` matvecs, vmapped in chunks);
    ``'hutchinson'`` averages ``zᵀ F z`` over Rademacher ``z`` (unbiased; the
    standard error is the sample one); ``'auto'`` is exact for ``n ≤ 4096``.
    With ``deflate`` (``(d, n)`` orthonormal rows spanning ``M``) every probe is
    deflated first and the value is ``tr((I−P)F(I−P))``, the tail mass itself
    (:func:`tail_mass`): never the difference ``tr F − Σλ``, and for Hutchinson
    a variance set by the tail, not by the top eigenvalues.
    The operator's params and data enter the compiled probe loop as arguments,
    not as constants folded into it: it compiles once per operator function
    and shapes (pass the same function object to reuse it).

    Raises ``ValueError`` (before any trace is taken) when the matvec, on three
    probe vectors, returns non-finite values or is not symmetric, linear or
    positive semidefinite (``NotSymmetricError``, a ``ValueError``, for the
    symmetry), and when ``deflate`` has non-orthonormal or non-finite rows.
    """
    t = tail_mass(
        matvec, n, dtype, method=method, key=key, num_probes=num_probes, deflate=deflate, args=args
    )
    return t.value, t.stderr, t.num_matvecs


def tail_mass(
    matvec: LinearOperator | Callable[..., jax.Array],
    n: int,
    dtype,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    deflate: np.ndarray | None = None,
    args: tuple = (),
    top_eigenvalue: float = 0.0,
) -> TailMass:
    """:class:`TailMass` ``tr((I−P)F(I−P))`` of an operator on ``(n,)`` vectors.

    Arguments as :func:`fisher_trace` (``deflate=None``: ``tr F`` itself);
    ``top_eigenvalue`` (``λ₁ ≈ ‖F‖``) scales the matvec's share of the
    rounding bound.
    """
    n = positive_int(n, "n")
    method = _trace_method(method, n)
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    num_probes = probe_count(num_probes)  # on every route: never silently ignored
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (jnp.float32, jnp.float64), got {dtype}")
    op = _trace_operator(matvec, n, dtype, args)
    key = None if key is None else prng_key(key)  # checked before it is folded
    salt = jax.random.key(_PROBE_SALT) if key is None else jax.random.fold_in(key, _PROBE_SALT)
    like = jnp.zeros((n,), dtype)
    probe_operator(partial(apply, op), like, "matvec", psd=True, key=salt, symmetric=True)
    layout = Layout(on_one_device_mesh(like), "matvec")
    if deflate is not None:  # (d, n) rows, host or device, placed as the layout's stack
        Vd = deflate if isinstance(deflate, jax.Array) else np.asarray(deflate)
        if Vd.ndim != 2 or Vd.shape[1] != n:
            raise ValueError(f"deflate must have shape (d, {n}), got {Vd.shape}")
        deflate = jax.device_put(Vd.astype(dtype), layout.stacked) if len(Vd) else None
        if deflate is not None:  # (0, n): no deflation, as None
            check_orthonormal(deflate, "deflate")  # NaN rows fail it too
    return _tree_tail_mass(
        op.fn, layout, op.params, op.args, method, key=key, num_probes=num_probes,
        deflate=deflate, top_eigenvalue=top_eigenvalue,
    )  # fmt: skip


# Hutchinson probes per random key (the draw: fixed, so the probes do not depend on
# memory), and the most memory one vmapped batch of probes may take (the batch only
# groups matvecs). Measured on the 2-core CPU (1,068,810-parameter MLP, 64 probes,
# Fisher matvec 13 ms): 16 per batch 0.90 s, 8 1.03 s, 64 1.00 s, 1 1.30 s; the former
# eager route (all 64 probes drawn, deflated, then one vmapped call) 1.32 s, 0.4 s of it
# making and deflating the (64, n) probe matrix outside the compiled matvec.
# measure_aic's peak above the model there (d = 10, warm; benchmarks/aic_memory.py):
# 275-294 MiB with batches of 15 probes (64 MiB); 199-230 MiB (4 runs) with 16 MiB (3).
_PROBE_DRAW = 16
_PROBE_BATCH_BYTES = 1 << 24


def _probe_batch(n: int, dtype) -> int:
    """Probes per vmapped batch of Fisher matvecs: ``_PROBE_BATCH_BYTES`` of probes, 1 to 16."""
    return int(np.clip(_PROBE_BATCH_BYTES // (n * np.dtype(dtype).itemsize), 1, _PROBE_DRAW))


def _hutchinson_draws(key: jax.Array, num: int, n: int, row_terms: Callable) -> jax.Array:
    """``(num, 4)`` ``row_terms(words)`` over the words of ``num`` probes, ``_PROBE_DRAW`` per key.

    Probe ``16c + i`` is row ``i`` of :func:`rademacher_probes` of ``fold_in(key, c)``;
    ``row_terms`` maps one probe's ``(⌈n/32⌉,)`` words to its ``(4,)`` terms and is
    vmapped in batches inside (``lax.map(batch_size=…)`` by the caller's closure).
    """
    full, rest = divmod(num, _PROBE_DRAW)

    def draw(c, size):
        return row_terms(_probe_bits(jax.random.fold_in(key, c), size, n))

    parts = []
    if full == 1:  # one draw: no loop to compile
        parts.append(draw(0, _PROBE_DRAW))
    elif full:
        parts.append(jax.lax.map(lambda c: draw(c, _PROBE_DRAW), jnp.arange(full)).reshape(-1, 4))
    if rest:
        parts.append(draw(full, rest))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def gradient_and_hg(loss_fn, params: PyTree, loss_args: tuple) -> tuple[jax.Array, jax.Array]:
    """Raveled ``g(θ*)`` and ``H(θ*) g(θ*)`` in one compiled call (eager HVPs dispatch slowly).

    Compiled once per ``loss_fn``: new ``params`` and ``loss_args`` of the same
    shapes reuse it (an unhashable ``loss_fn`` compiles per call).
    """
    return _JITTED_GRADIENT_AND_HG(keyed(loss_fn), params, tuple(loss_args))


def _value_gradient_and_hg(loss_fn, params: PyTree, loss_args: tuple) -> tuple[jax.Array, ...]:
    """Raveled ``g`` and ``Hg``, and ``L(θ*)`` (``measure_aic`` checks it finite)."""
    value, g_tree = jax.value_and_grad(loss_fn)(params, *loss_args)
    Hg = hessian_vp(loss_fn)(params, g_tree, *loss_args)
    return ravel_pytree(g_tree)[0], ravel_pytree(Hg)[0], value


def _gradient_and_hg(loss_fn, params: PyTree, loss_args: tuple) -> tuple[jax.Array, jax.Array]:
    """The same trace without the value: ``jax.grad`` is ``value_and_grad`` with its value
    dropped, so the jaxpr equals ``jax.grad``'s and the compiled program is the same
    (checked on an MLP loss: equal jaxprs, compiled HLO equal but for source metadata)."""
    return _value_gradient_and_hg(loss_fn, params, loss_args)[:2]


def tail_quadratic(
    flat_fvp: Callable[[jax.Array], jax.Array], basis: np.ndarray, g, dtype
) -> float:
    """``gᵀ(I−P)F(I−P)g`` from one Fisher matvec; ``basis`` ``(d, n)`` spans ``M``.

    Sets the tail's crossover time in :func:`theory.aic_report`.
    """
    V = np.asarray(basis, np.float64)
    g = np.asarray(g, np.float64)
    g_perp = g - V.T @ (V @ g)
    return float(g_perp @ np.asarray(flat_fvp(jnp.asarray(g_perp, dtype)), np.float64))


@partial(jax.jit, static_argnums=(0, 1))
def _tree_gradient_and_hg(loss_fn, layout: Layout, params: PyTree, loss_args: tuple):
    """``g`` and ``Hg`` as pytrees laid out like the parameters, and ``L(θ*)``."""
    value, g = jax.value_and_grad(loss_fn)(params, *loss_args)
    g = jax.lax.with_sharding_constraint(g, layout.shardings)
    Hg = hessian_vp(loss_fn)(params, g, *loss_args)
    return g, jax.lax.with_sharding_constraint(Hg, layout.shardings), value


_JITTED_GRADIENT_AND_HG = jax.jit(_gradient_and_hg, static_argnums=0)
_JITTED_VALUE_GRADIENT_AND_HG = jax.jit(_value_gradient_and_hg, static_argnums=0)


# ----------------------------------------------------------------- parameters sharded on a mesh


@partial(jax.jit, static_argnums=(0, 1, 2))
def _tree_exact_trace(fisher_vp, layout: Layout, rows: int, start: jax.Array, basis, params, args):
    """``(4,)`` :func:`_probe` terms summed over ``(I−P)e_i``, ``i ∈ [start, start+rows)``.

    ``e_i`` one-hot in ``ravel_pytree`` order, each leaf's block built from an
    iota on its own devices (no ``(rows, n)`` array is formed), deflated by the
    stacked ``basis`` (``d`` may be 0).
    """
    idx = start + jnp.arange(rows)
    offsets = np.cumsum((0, *layout.sizes))
    leaves = [
        (jnp.arange(size)[None, :] == (idx[:, None] - offsets[i]))
        .astype(layout.dtype)
        .reshape(rows, *shape)
        for i, (size, shape) in enumerate(zip(layout.sizes, layout.shapes, strict=True))
    ]
    z = jax.lax.with_sharding_constraint(
        jax.tree_util.tree_unflatten(layout.treedef, leaves), layout.stacked
    )
    return jnp.sum(_tree_probe_terms(fisher_vp, layout, z, basis, params, args), axis=0)


@partial(jax.jit, static_argnums=0)
def _tree_no_rows(layout: Layout) -> PyTree:
    """An empty stack (``d = 0``) laid out like the parameters: no deflation."""
    empty = layout.unravel(jnp.zeros((0, layout.n), layout.dtype))
    return jax.lax.with_sharding_constraint(empty, layout.stacked)


def _tree_probe_terms(fisher_vp, layout: Layout, z, basis, params, args) -> jax.Array:
    """``(p, 4)`` :func:`_quadratic_terms` of the stacked probes ``z`` deflated by ``basis``."""
    coeffs = jax.vmap(lambda v: stack_dot(basis, v))(z)  # (p, d)
    z = jax.tree_util.tree_map(jnp.subtract, z, stack_combine(coeffs, basis))
    z = jax.lax.with_sharding_constraint(z, layout.stacked)
    fz = jax.vmap(lambda v: fisher_vp(params, v, *args))(z)
    return jax.vmap(_quadratic_terms)(z, fz)


@partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _tree_hutchinson(fisher_vp, layout: Layout, key, basis, params, num: int, batch: int, args):
    """``num`` Rademacher probes (:func:`_hutchinson_draws`), each made from its words
    inside the compiled loop, unraveled like the parameters and deflated by the stacked
    basis, ``z − Σ_i ⟨v_i, z⟩ v_i``, ``batch`` matvecs at a time: the ``(num, n)`` probe
    matrix never exists, and ``batch`` changes no number. Returns the ``(num,)`` samples
    and the ``(4,)`` terms summed over probes.
    """

    def one(words):
        z = layout.unravel(_probe_signs(words, layout.n, layout.dtype)[None])
        z = jax.lax.with_sharding_constraint(z, layout.stacked)
        return _tree_probe_terms(fisher_vp, layout, z, basis, params, args)[0]

    out = _hutchinson_draws(key, num, layout.n, lambda w: jax.lax.map(one, w, batch_size=batch))
    return out[:, 0], jnp.sum(out, axis=0)


@partial(jax.jit, static_argnums=2)
def tree_deflate(basis: PyTree, g: PyTree, layout: Layout) -> PyTree:
    """``(I−P)g`` laid out like the parameters (``basis`` a stack of ``d`` vectors)."""
    g_perp = jax.tree_util.tree_map(jnp.subtract, g, stack_combine(stack_dot(basis, g), basis))
    return jax.lax.with_sharding_constraint(g_perp, layout.shardings)


@jax.jit
def tree_tail_and_norm(g_perp: PyTree, f_g_perp: PyTree, g: PyTree) -> jax.Array:
    """``[gᵀ(I−P)F(I−P)g, ‖g‖]`` from ``(I−P)g`` and ``F(I−P)g``."""
    return jnp.stack([tree_dot(g_perp, f_g_perp), jnp.sqrt(tree_dot(g, g))])


def tree_fisher_trace(
    fisher_vp: Callable,
    layout: Layout,
    params: PyTree,
    args: tuple,
    method: str,
    *,
    key: jax.Array | None = None,
    num_probes: int = 64,
    deflate: PyTree | None = None,
) -> tuple[float, float, int]:
    """:func:`fisher_trace` for parameters sharded on a mesh: ``(trace, stderr, matvecs)``.

    ``fisher_vp(params, v, *args)`` is the library's matvec (``v`` like
    ``params``; hashable: it is a static argument of the compiled kernels);
    ``method`` is ``'exact'`` (``n`` one-hot rows built on each leaf's devices,
    256 per compiled call) or ``'hutchinson'``, deflated by ``deflate``, a stack
    of orthonormal vectors laid out like ``params`` (its value is then
    ``tr((I−P)F(I−P))``). :func:`fisher_trace` is this on a mesh of one device
    (same probes); only the per-chunk sums or the ``num_probes`` samples reach
    the host.
    """
    t = _tree_tail_mass(
        fisher_vp, layout, params, args, method, key=key, num_probes=num_probes, deflate=deflate
    )
    return t.value, t.stderr, t.num_matvecs


def _tree_tail_mass(
    fisher_vp: Callable,
    layout: Layout,
    params: PyTree,
    args: tuple,
    method: str,
    *,
    key: jax.Array | None = None,
    num_probes: int = 64,
    deflate: PyTree | None = None,
    top_eigenvalue: float = 0.0,
) -> TailMass:
    """:func:`tail_mass` for parameters sharded on a mesh (see :func:`tree_fisher_trace`)."""
    n, dtype = layout.n, layout.dtype
    if deflate is None:
        deflate = _tree_no_rows(layout)
    d = int(jax.tree_util.tree_leaves(deflate)[0].shape[0])
    if method == "exact":
        rows, sums = 256, np.zeros(4)
        for start in range(0, n, rows):
            size = min(rows, n - start)
            part = _tree_exact_trace(
                fisher_vp, layout, size, layout.put(np.int32(start)), deflate, params, args
            )
            sums += np.asarray(jax.device_get(part), np.float64)
        return _tail_mass(sums, None, n, dtype, d, top_eigenvalue)
    if method != "hutchinson":
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    key = prng_key(key)
    num_probes = probe_count(num_probes)
    samples, sums = jax.device_get(
        _tree_hutchinson(
            fisher_vp,
            layout,
            jax.device_put(key, layout.replicated),
            deflate,
            params,
            num_probes,
            _probe_batch(n, dtype),
            args,
        )
    )
    return _tail_mass(sums, np.asarray(samples, np.float64), n, dtype, d, top_eigenvalue)


def _measure_aic(
    fisher_vp,
    loss_fn,
    params,
    d,
    key,
    fisher_args,
    loss_args,
    trace,
    num_probes,
    tol,
    max_matvecs,
    allow_unconverged,
) -> AICMeasurement:
    """:func:`measure_aic` on checked inputs, one route for every layout: every vector
    lives where the layout puts it and only scalars and ``(d,)`` coordinates come back to
    the host.

    Sharded ``params``: the eigenvectors, ``g``, ``Hg``, the probes and ``(I−P)g`` are
    pytrees sharded like them. Unsharded ``params`` take the same code as one raveled
    ``(n,)`` vector on a mesh of their one device (eigenvectors ``(d, n)``). At 1,068,810
    parameters (float32, d = 10, 2-core CPU, interleaved runs) this took 3.3-3.4 s warm
    and 10.3-10.4 s cold where the host-side float64 route it replaced took 5.0-5.3 and
    11.2-11.4 s; peak above the model 332 MiB cold and 213 warm against 398 and 200
    (benchmarks/aic_memory.py); the same numbers to float32 rounding.
    """
    sharded = is_sharded(params)
    op = _fisher_operator(fisher_vp, params, fisher_args)  # outputs laid out like params
    if sharded:
        like = params
    else:
        op, like = op.raveled(), on_one_device_mesh(ravel_pytree(params)[0])
    layout = Layout(like, "params")  # built once: the sharded gradient reads it too
    if sharded:
        g, Hg, value = _tree_gradient_and_hg(keyed(loss_fn), layout, params, loss_args)
    else:
        g, Hg, value = _JITTED_VALUE_GRADIENT_AND_HG(keyed(loss_fn), params, tuple(loss_args))
    value = float(jax.device_get(value))
    if not np.isfinite(value):
        raise ValueError(
            f"loss_fn: its value at params is {value}, not finite (check loss_args: labels "
            "out of range, NaN data, an empty batch)"
        )
    n, dtype = layout.n, layout.dtype
    d = subspace_dim(d, n)
    if tol is None:
        tol = max(1e-8, 100 * float(jnp.finfo(dtype).eps))

    k_eig, k_trace = jax.random.split(key)
    pairs = linalg.top_eigenpairs(op, like, d, key=k_eig, tol=tol, max_matvecs=max_matvecs)
    subspace = Subspace.from_eigenpairs(pairs, allow_unconverged=allow_unconverged)
    lam = np.asarray(jax.device_get(pairs.values), np.float64)
    tail = _tree_tail_mass(
        op.fn,
        layout,
        op.params,
        op.args,
        _trace_method(trace, n),
        key=k_trace,
        num_probes=num_probes,
        deflate=pairs.vectors,
        top_eigenvalue=float(np.max(np.abs(lam))),
    )
    g_perp = tree_deflate(pairs.vectors, g, layout)
    tail_q, g_norm = jax.device_get(tree_tail_and_norm(g_perp, apply(op, g_perp), g))
    report = theory.aic_report(
        subspace, g, Hg, tail_mass=tail.value, tail_quadratic=float(tail_q), compiled=True
    )
    return AICMeasurement(
        report=report,
        eigenpairs=pairs,
        trace=tail.value + lam.sum(),
        trace_stderr=tail.stderr,
        gradient_norm=float(g_norm),
        num_matvecs=int(pairs.num_matvecs) + tail.num_matvecs + 1,
        tail_rounding=tail.rounding,
    )


def measure_aic(
    fisher_vp: Callable[..., PyTree],
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    d: int,
    *,
    key: jax.Array,
    fisher_args: tuple = (),
    loss_args: tuple = (),
    trace: str = "auto",
    num_probes: int = 64,
    tol: float | None = None,
    max_matvecs: int | None = None,
    allow_unconverged: bool = False,
) -> AICMeasurement:
    """Measure the AIC (Def. 5.1) of ``θ* = params`` for a skill and a fine-tuning loss.

    Args:
      fisher_vp: the skill Fisher's matvec in the library's convention,
        ``fisher_vp(params, v, *fisher_args) -> F(params) v`` (true or empirical,
        e.g. :func:`geomcollapse.curvature.fisher_vp`), ``v`` a pytree like
        ``params``; or a :class:`geomcollapse.curvature.LinearOperator` on
        vectors like ``params`` (e.g. ``fisher_vp(logits).bind(params, batch)``,
        then no ``fisher_args``). Wrapped once by :func:`curvature.as_operator`.
      loss_fn: the fine-tuning loss ``L(θ, *loss_args)``.
      params: ``θ*`` (finite floating arrays). Leaves sharded over a device
        mesh (``NamedSharding``, one dtype) keep every vector of the
        measurement sharded like them (eigenvectors, ``g``, ``Hg``, probes);
        only scalars and ``(d,)`` coordinates reach the host. Data in
        ``fisher_args``/``loss_args`` may be sharded along the example axis.
      d: ``dim M`` (``1 ≤ d < n``).
      key: ``jax.random`` key (Lanczos start vectors, Hutchinson probes).
      fisher_args, loss_args: data for the two functions. They enter the
        compiled matvec and gradient as arguments, never as closure constants:
        on a 1,068,810-parameter MLP, weights closed over spent 26 of 41 s in
        XLA constant folding.
      trace: ``'auto'``, ``'exact'`` or ``'hutchinson'`` (see :func:`fisher_trace`;
        Hutchinson runs on the deflated ``(I−P)F(I−P)``).
      num_probes: Hutchinson probes.
      tol: eigenpair tolerance for :func:`geomcollapse.linalg.top_eigenpairs`
        (default ``1e-8`` in float64, ``max(1e-8, 100·eps)`` otherwise).
      max_matvecs: Lanczos budget for it.
      allow_unconverged: return a report from uncertified eigenpairs (flagged
        ``report.converged = False``) instead of raising.

    Returns:
      An :class:`AICMeasurement`. ``report.orthogonality`` is ``‖Pg‖`` as
      Def. 5.1 states it; ``report.fisher_orthogonality`` is ``‖F^{1/2}Pg‖``;
      ``report.coupling`` is ``γ = ‖F^{1/2}PHg‖`` from one HVP; the tail mass is
      ``tr F − Σ_{i≤d} λ_i``, computed directly as ``tr((I−P)F(I−P))`` on
      deflated probes (:func:`tail_mass`; its rounding bound is
      ``tail_rounding``); ``report.converged`` and ``report.eigen_residuals``
      certify ``M``.

    Raises:
      ValueError: bad or non-finite input; eigenpairs not converged (unless
        ``allow_unconverged``); :class:`geomcollapse.errors.NotSymmetricError`
        (a ``ValueError``) naming ``fisher_vp`` when its matvec is not symmetric.
    """
    check_params(params)
    key = prng_key(key)
    trace = one_of(trace, ("auto", "exact", "hutchinson"), "trace")
    num_probes = probe_count(num_probes)  # on every route, as diagnose: never silently ignored
    loss_args = check_loss(loss_fn, params, loss_args, "loss_fn", "loss_args")
    if not is_sharded(params):  # finite, PSD, symmetric on probes (not the Lanczos key's draws)
        _probe_fisher(fisher_vp, params, tuple(fisher_args), jax.random.fold_in(key, _PROBE_SALT))
    data = (tuple(fisher_args), tuple(loss_args))
    try:
        out = _measure_aic(fisher_vp, loss_fn, params, d, key, *data, trace, num_probes, tol,
                           max_matvecs, allow_unconverged)  # fmt: skip
    except NotSymmetricError as err:  # Lanczos saw it; the user knows the argument's name
        raise NotSymmetricError(
            f"fisher_vp: {err} (a Fisher F = JᵀΛJ is symmetric; an empirical Fisher at a "
            "minimum of the loss it is built from is rounding noise there, as every "
            "per-example gradient is 0: use the true Fisher)"
        ) from None
    return checked_aic(out)  # finite derivatives, a PSD Fisher, a warning for a flat loss


_PROBE_SALT = 0x5EED  # measure_aic's boundary probes: a key apart from Lanczos' and Hutchinson's


def _probe_fisher(fisher_vp: Any, params: PyTree, fisher_args: tuple, key: jax.Array) -> None:
    """``fisher_vp`` checked at ``θ*``: a plain one by :func:`check_fisher_call` (traced
    abstractly), then the operator's compiled matvec, raveled, on two probes. Numbers are
    unchanged: the probes' key is ``key`` folded with a salt, and Lanczos draws from
    ``key`` itself."""
    if not isinstance(fisher_vp, LinearOperator):
        fisher_args = check_fisher_call(params, fisher_vp, fisher_args)
    op = _fisher_operator(fisher_vp, params, fisher_args).raveled()
    flat = ravel_pytree(params)[0]
    probe_operator(partial(apply, op), flat, "fisher_vp", psd=True, key=key, symmetric=True)
