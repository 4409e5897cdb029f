"""Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Why our own Lanczos and not a library's (measured, see ``benchmarks/``):
``scipy.sparse.linalg.eigsh`` (ARPACK, implicit restarts with ``ncv = 2k+1``)
spends more matvecs and host round trips than a plain full-reorthogonalisation
Lanczos on the Hessians we care about (top-10 at 1e-3 over five start vectors:
38-42 against 35-36 HVPs on the benchmark MLP, 35-36 against 31-34 on the
benchmark transformer), and ``matfree`` runs a fixed depth with no
residual-based stopping and stores the basis as ``(n, k)`` columns (≈ 2.5× its
matvec time).

Here the basis is stored row-wise in blocks of 8 rows ``(8, n)``: the
reorthogonalisation is memory-bound, and a single preallocated ``(capacity, n)``
buffer read its idle zero rows every step (2-4 HVPs of overhead per step on the
benchmark) and recompiled for every capacity (≈ 0.4 s each). Blocks are read
only when filled, each stays cache-hot between its two reads, and every kernel
has one shape per ``n``. Two single-kernel-per-step variants over one
``(capacity, n)`` buffer were measured slower on CPU (36 steps at n = 269,322
with a diagonal matvec, best of 8): blocks taken by ``dynamic_slice`` in a
``fori_loop`` 200 ms (XLA copies each sliced block before its dot), one dot
over a doubling buffer 174 ms, against 144-146 ms here.

Each step is one user matvec, the three-term step and one block Gram-Schmidt
pass (a second only when DGKS asks for it), at ``Precision.HIGHEST`` (no TF32
on GPUs); the iteration stops as soon as every requested Ritz pair has a
Lanczos residual ``|β_m s_{m,i}| ≤ tol · |θ₁|``. That estimate drops below
what the working dtype can represent (float32 on the tiny transformer: 7.9e-9
against a true 3.6e-7), so the returned ``residuals`` are the true
``‖A v − λ v‖``, from one more matvec per returned pair, and ``converged`` is
decided on them. A ``tol`` below ``min_certifiable_tol(dtype) = 8·eps`` is
refused: there the residual's own rounding is as large as the tolerance.

The operator is run scaled by ``s = max|A q₀|`` (one number from the first
matvec, no extra product): the norms and dot products of the recurrence square
their inputs, which underflows for an operator of scale 1e-19 in float32 or
1e-300 in float64 (λ₁ came back at 26 % of its value there) and overflows for
large ones. Eigenvalues and residuals are scaled back on return.

Why full and not partial reorthogonalisation (Simon 1984; measured on the
2-core CPU, float32, n = 1,068,810, top-10 at ``tol = 100·eps``): partial
reorthogonalisation tracks the ω-recurrence estimate of ``⟨q_{j+1}, q_k⟩`` and
reorthogonalises only when it exceeds ``√eps`` (3.5e-4 in float32). But a
float32 dot product of length 10⁶ is itself only accurate to ~``eps·√n``:
after two full passes the rows are orthogonal to 150-800·eps (2e-5 to 1e-4,
measured in float64), so the ω model's rounding level (``eps·√n`` = 1.2e-4)
crosses ``√eps`` one step after every reset, and 24 of 25 steps still took the
full pass on the benchmark MLP's Fisher (25 of 25 before): no gain. Modelling
the rounding level at 30·eps (below what was measured, so unsafe) cut the
passes to 6 of 25 and Lanczos from 1.49 s to 1.21 s (best of 3, load 2.6), but
the returned vectors' orthogonality fell from 1.5e-7 to 1.5e-5 and a diagonal
test operator certified at 1.04e-5 against ``tol`` 1.19e-5. In float64, or at
n ≈ 200, the sound model does pay (120 steps: 23-28 passes on clustered or
repeated top eigenvalues, 84-86 on a 0.8ⁱ decay, instead of 120); it would
need a more accurate reduction (smaller ``eps·√n``) before it helps the
float32 runs that dominate here.

The driver loop runs on the host (one small ``eigh`` of the tridiagonal ``T``
per step, in float64) so that stopping is decided after every matvec; the
user's matvec is called as given and should be jitted by the caller.

For a ``like`` whose leaves are sharded over a device mesh the same driver runs
on another layout (:class:`_TreeOps`): every vector is a pytree sharded like
``like`` and a block is its leaves with a leading ``_CHUNK`` axis, so no
vector of size ``n`` is raveled (a ravel of sharded leaves reshuffles every
parameter across devices, or gathers them on one); dot products are
per-device partial sums and an all-reduce of at most 8 numbers. The start
vector is the flat path's, laid out like ``like``, so both layouts return the
same pairs to rounding.

Known limit, shared by every single-vector Krylov method (ARPACK included): an
eigenvalue of multiplicity ``r`` is found ``r`` times only once rounding has
seeded its other copies, or after an invariant subspace is exhausted (the
breakdown restart below handles the exact case). With very loose ``tol`` and a
spectrum whose top-k are exact repeats well separated from the rest, a copy can
be missed; tighten ``tol`` in that case.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import (
    floating_leaves,
    positive_float,
    positive_int,
    prng_key,
    same_structure,
)
from geomcollapse._progress import progress_bar
from geomcollapse._sharding import (
    Layout,
    axpy,
    is_sharded,
    stack_combine,
    stack_dot,
    tree_dot,
    tree_norm,
)
from geomcollapse.curvature import host_matvec
from geomcollapse.errors import NotSymmetricError

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class Eigenpairs(NamedTuple):
    """Eigenpairs of a symmetric operator.

    Attributes:
      values: ``(k,)`` eigenvalues, descending (by value, or by magnitude for
        ``which='magnitude'``), in the dtype of ``like``.
      vectors: unit eigenvectors stacked on a leading axis of size ``k``:
        ``(k, n)`` for a 1-D ``like``, else a pytree like ``like`` whose leaves
        have a leading ``k`` axis. For a ``like`` sharded over several devices
        each leaf keeps its sharding (the ``k`` axis unsharded).
      residuals: ``(k,)`` true residual norms ``‖A v_i − λ_i v_i‖``, each from
        one more matvec (not the Lanczos estimate).
      converged: ``(k,)`` bool, ``found & (residuals ≤ tol·|λ₁|)``.
      found: ``(k,)`` bool; ``False`` where the operator has no non-zero
        eigenvalue left to return (rank < k): value, vector and residual are
        zero-filled there.
      num_matvecs: operator applications used, certification included.
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array
    converged: jax.Array
    found: jax.Array
    num_matvecs: int


class _Basis(NamedTuple):
    """A finished Lanczos run: basis blocks, tridiagonal ``T`` and ``β_m``."""

    blocks: list
    alphas: np.ndarray
    betas: np.ndarray  # (m-1,), zero at restart boundaries
    last_beta: float
    scale: float
    null_complement: bool  # the operator vanishes outside the basis' span
    ops: Any = None  # the vector layout's kernels (flat rows by default)

    @property
    def Q(self) -> jax.Array:
        """The ``m`` basis rows as one ``(m, n)`` array (flat layout only)."""
        return jnp.concatenate(self.blocks)[: self.alphas.size]

    def combine(self, coeffs: np.ndarray) -> PyTree:
        """``coeffsᵀ Q`` for ``coeffs`` of shape ``(m, k)``, block by block.

        ``(k, n)`` in the flat layout; a stack of ``k`` parameter-shaped
        vectors (sharded like them) in the sharded one.
        """
        ops = _FlatOps(0, self.blocks[0].dtype) if self.ops is None else self.ops
        padded = np.zeros((len(self.blocks) * _CHUNK, coeffs.shape[1]))
        padded[: coeffs.shape[0]] = coeffs
        out = None
        for b, block in enumerate(self.blocks):
            c = ops.coefficients(padded[b * _CHUNK : (b + 1) * _CHUNK].T)
            out = ops.accumulate(out, c, block) if out is not None else ops.first(c, block)
        return out


_CHUNK = 8  # basis rows per block; one block (8 × n) stays cache-hot across its two reads


@jax.jit
def _local_step(w: jax.Array, q_prev: jax.Array, q: jax.Array):
    """Three-term step: remove ``w``'s components on ``q_{j-1}`` and ``q_j``.

    Returns ``(w, [c, a, ‖A q_j‖, ‖w_after‖])`` with ``c = ⟨q_{j-1}, w⟩``, ``a = ⟨q_j, w⟩``.
    """
    dot = partial(jnp.dot, precision=_HIGHEST)
    w_norm = jnp.linalg.norm(w)
    c = dot(q_prev, w)
    w = w - c * q_prev
    a = dot(q, w)
    w = w - a * q
    return w, jnp.stack([c, a, w_norm, jnp.linalg.norm(w)])


@partial(jax.jit, donate_argnums=2)
def _block_pass(block: jax.Array, w: jax.Array, h: jax.Array, offset: jax.Array):
    """One Gram-Schmidt pass of ``w`` against a ``(_CHUNK, n)`` block of basis rows.

    Accumulates the coefficients into ``h`` at ``offset``. Zero (unused) rows
    contribute nothing.
    """
    dot = partial(jnp.dot, precision=_HIGHEST)
    coeffs = dot(block, w)
    w = w - dot(coeffs, block)
    old = jax.lax.dynamic_slice_in_dim(h, offset, _CHUNK)
    return w, jax.lax.dynamic_update_slice_in_dim(h, old + coeffs, offset, 0)


@jax.jit
def _pass_stats(w: jax.Array, h: jax.Array, j: jax.Array):
    """``[h_j, h_{j-1}, max_{i<j-1}|h_i|, ‖w‖]`` after a pass."""
    rows = jnp.arange(h.shape[0])
    off = jnp.max(jnp.where(rows < j - 1, jnp.abs(h), 0.0))
    prev = jnp.where(j > 0, h[jnp.maximum(j - 1, 0)], 0.0)
    return jnp.stack([h[j], prev, off, jnp.linalg.norm(w)])


@partial(jax.jit, donate_argnums=0)
def _put_row(block: jax.Array, row: jax.Array, q: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(block, q, row, axis=0)


@jax.jit
def _normalize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = jnp.linalg.norm(w)
    return w / norm, norm


class _BlockBasis:
    """Orthonormal rows kept as a list of ``(_CHUNK, n)`` blocks.

    Only filled blocks are read, and every kernel has one shape per ``n``, so a
    growing basis never triggers a compile.
    """

    def __init__(self, ops: Any, max_rows: int):
        self.ops, self.size = ops, 0
        self.blocks: list = []
        self.h_size = _CHUNK * -(-max_rows // _CHUNK)

    def append(self, q: PyTree) -> None:
        row = self.size % _CHUNK
        if row == 0:
            self.blocks.append(self.ops.new_block())
        self.blocks[-1] = self.ops.put_row(self.blocks[-1], row, q)
        self.size += 1

    def orthogonalize(self, w: PyTree) -> tuple[PyTree, jax.Array]:
        """One block Gram-Schmidt pass; returns ``(w, h)`` with ``h[i] = ⟨q_i, w⟩``."""
        h = self.ops.new_h(self.h_size)
        for b, block in enumerate(self.blocks):
            w, h = self.ops.block_pass(block, w, h, b * _CHUNK)
        return w, h


@jax.jit
def _first(c: jax.Array, block: jax.Array) -> jax.Array:
    return jnp.dot(c, block, precision=_HIGHEST)


@partial(jax.jit, donate_argnums=0)
def _accumulate(out: jax.Array, c: jax.Array, block: jax.Array) -> jax.Array:
    return out + jnp.dot(c, block, precision=_HIGHEST)


class _FlatOps:
    """Kernels of the flat layout: vectors ``(n,)``, blocks ``(_CHUNK, n)`` on one device."""

    def __init__(self, n: int = 0, dtype: Any = None):
        self.n, self.dtype = n, dtype

    local_step = staticmethod(_local_step)
    block_pass = staticmethod(_block_pass)
    pass_stats = staticmethod(_pass_stats)
    put_row = staticmethod(_put_row)
    normalize = staticmethod(_normalize)
    first = staticmethod(_first)
    accumulate = staticmethod(_accumulate)

    def new_block(self) -> jax.Array:
        return jnp.zeros((_CHUNK, self.n), self.dtype)

    def new_h(self, size: int) -> jax.Array:
        return jnp.zeros((size,), self.dtype)

    def zeros_like(self, q: jax.Array) -> jax.Array:
        return jnp.zeros_like(q)

    def random_unit(self, key: jax.Array) -> jax.Array:
        return _normalize(jax.random.normal(key, (self.n,), self.dtype))[0]

    def coefficients(self, c: np.ndarray) -> jax.Array:
        return jnp.asarray(c, self.dtype)


# Kernels of the sharded layout: a vector is a pytree like the parameters, a
# block the same leaves with a leading ``_CHUNK`` axis (see geomcollapse._sharding).
# ``layout`` is static; outputs are pinned to the parameters' shardings.


@partial(jax.jit, static_argnums=3)
def _tree_local_step(w: PyTree, q_prev: PyTree, q: PyTree, layout: Layout):
    w_norm = tree_norm(w)
    c = tree_dot(q_prev, w)
    w = axpy(-c, q_prev, w)
    a = tree_dot(q, w)
    w = axpy(-a, q, w)
    w = jax.lax.with_sharding_constraint(w, layout.shardings)
    return w, jnp.stack([c, a, w_norm, tree_norm(w)])


@partial(jax.jit, static_argnums=4, donate_argnums=2)
def _tree_block_pass(block: PyTree, w: PyTree, h: jax.Array, offset: jax.Array, layout: Layout):
    coeffs = stack_dot(block, w)
    w = jax.tree_util.tree_map(jnp.subtract, w, stack_combine(coeffs, block))
    w = jax.lax.with_sharding_constraint(w, layout.shardings)
    old = jax.lax.dynamic_slice_in_dim(h, offset, _CHUNK)
    return w, jax.lax.dynamic_update_slice_in_dim(h, old + coeffs, offset, 0)


@jax.jit
def _tree_pass_stats(w: PyTree, h: jax.Array, j: jax.Array):
    rows = jnp.arange(h.shape[0])
    off = jnp.max(jnp.where(rows < j - 1, jnp.abs(h), 0.0))
    prev = jnp.where(j > 0, h[jnp.maximum(j - 1, 0)], 0.0)
    return jnp.stack([h[j], prev, off, tree_norm(w)])


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _tree_put_row(block: PyTree, row: jax.Array, q: PyTree, layout: Layout) -> PyTree:
    block = jax.tree_util.tree_map(
        lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, row, axis=0), block, q
    )
    return jax.lax.with_sharding_constraint(block, layout.stacked)


@jax.jit
def _tree_normalize(w: PyTree) -> tuple[PyTree, jax.Array]:
    norm = tree_norm(w)
    return jax.tree_util.tree_map(lambda x: x / norm, w), norm


@partial(jax.jit, static_argnums=2)
def _tree_first(c: jax.Array, block: PyTree, layout: Layout) -> PyTree:
    return jax.lax.with_sharding_constraint(stack_combine(c, block), layout.stacked)


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _tree_accumulate(out: PyTree, c: jax.Array, block: PyTree, layout: Layout) -> PyTree:
    out = jax.tree_util.tree_map(jnp.add, out, stack_combine(c, block))
    return jax.lax.with_sharding_constraint(out, layout.stacked)


@partial(jax.jit, static_argnums=(0, 1))
def _tree_zeros(layout: Layout, rows: int | None) -> PyTree:
    lead = () if rows is None else (rows,)
    zeros = layout.unravel(jnp.zeros((*lead, layout.n), layout.dtype))
    return jax.lax.with_sharding_constraint(
        zeros, layout.shardings if rows is None else layout.stacked
    )


@partial(jax.jit, static_argnums=(0, 1))
def _tree_zeros_h(layout: Layout, size: int) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.zeros((size,), layout.dtype), layout.replicated)


@partial(jax.jit, static_argnums=1)
def _tree_random_unit(key: jax.Array, layout: Layout) -> PyTree:
    # Drawn as the flat path draws it, so both layouts start from the same vector.
    q = layout.unravel(_random_unit(key, layout.n, layout.dtype))
    return jax.lax.with_sharding_constraint(q, layout.shardings)


@jax.jit
def _tree_scale(v: PyTree, s: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x * s.astype(x.dtype), v)


@jax.jit
def _tree_abs_max(v: PyTree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(v)]))


@jax.jit
def _tree_residual(Av: PyTree, v: PyTree, lam: jax.Array) -> jax.Array:
    """``‖Av − λv‖``, in float64 when x64 is on (as the flat path's host computation)."""
    wide = jnp.promote_types(jax.tree_util.tree_leaves(v)[0].dtype, float)
    r = jax.tree_util.tree_map(
        lambda a, x: a.astype(wide) - lam.astype(wide) * x.astype(wide), Av, v
    )
    return tree_norm(r)


@partial(jax.jit, static_argnums=2)
def _tree_row(stack: PyTree, i: jax.Array, layout: Layout) -> PyTree:
    row = jax.tree_util.tree_map(lambda s: jax.lax.dynamic_index_in_dim(s, i, 0, False), stack)
    return jax.lax.with_sharding_constraint(row, layout.shardings)


class _TreeOps:
    """Kernels of the sharded layout: vectors and blocks keep the parameters' shardings.

    Small host values enter as explicitly replicated device arrays
    (:meth:`Layout.put`), so no implicit transfer happens in the loop.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.n, self.dtype = layout.n, layout.dtype

    def local_step(self, w, q_prev, q):
        return _tree_local_step(w, q_prev, q, self.layout)

    def block_pass(self, block, w, h, offset):
        return _tree_block_pass(block, w, h, self.layout.put(np.int32(offset)), self.layout)

    def pass_stats(self, w, h, j):
        return _tree_pass_stats(w, h, self.layout.put(np.int32(j)))

    def put_row(self, block, row, q):
        return _tree_put_row(block, self.layout.put(np.int32(row)), q, self.layout)

    normalize = staticmethod(_tree_normalize)

    def first(self, c, block):
        return _tree_first(c, block, self.layout)

    def accumulate(self, out, c, block):
        return _tree_accumulate(out, c, block, self.layout)

    def new_block(self):
        return _tree_zeros(self.layout, _CHUNK)

    def new_h(self, size: int):
        return _tree_zeros_h(self.layout, size)

    def zeros_like(self, q):
        return _tree_zeros(self.layout, None)

    def random_unit(self, key):
        return _tree_random_unit(jax.device_put(key, self.layout.replicated), self.layout)

    def coefficients(self, c: np.ndarray) -> jax.Array:
        return self.layout.put(np.asarray(c, self.dtype))

    def scale(self, v, s: float):
        return _tree_scale(v, self.layout.put(np.asarray(s, self.dtype)))

    def abs_max(self, v) -> float:
        return float(jax.device_get(_tree_abs_max(v)))

    def residual(self, Av, v, lam: float) -> float:
        return float(jax.device_get(_tree_residual(Av, v, self.layout.put(np.float64(lam)))))

    def row(self, stack, i: int):
        return _tree_row(stack, self.layout.put(np.int32(i)), self.layout)


def _tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def flat_operator(
    matvec: Callable[[PyTree], PyTree], like: PyTree
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable]:
    """Wrap a pytree matvec as ``flat (n,) -> flat (n,)``; validate ``like``.

    Returns ``(flat_matvec, flat_like, unravel)``. The first call checks that the
    output has the structure, shapes and dtypes of ``like``. A 1-D array
    ``like`` is used as is (no ravel/unravel copies).
    """
    if isinstance(like, (jax.Array, np.ndarray)) and np.ndim(like) != 1:
        raise ValueError(
            f"like must be a 1-D array or a pytree, got an array of shape {np.shape(like)}"
        )
    floating_leaves(like, "like")
    flat_like, unravel = ravel_pytree(like)
    is_vector = isinstance(like, (jax.Array, np.ndarray))
    checked = []

    def flat_matvec(x: jax.Array) -> jax.Array:
        # Eager ravel/unravel: measured faster than jitted ones (which copy).
        out = matvec(x if is_vector else unravel(x))
        if not checked:
            same_structure(like, out, "like", "matvec output")
            checked.append(True)
        return out if is_vector else ravel_pytree(out)[0]

    return flat_matvec, flat_like, unravel


def sharded_operator(
    matvec: Callable[[PyTree], PyTree], like: PyTree, layout: Layout
) -> Callable[[PyTree], PyTree]:
    """``matvec`` on pytrees sharded like ``like``, checked once against ``like``.

    The first output is checked for ``like``'s structure, shapes and dtypes; if
    its leaves are not sharded like ``like``'s (a jitted matvec without
    ``out_shardings`` often returns replicated leaves), every output is
    resharded there by a compiled identity, so the Lanczos basis keeps the
    parameters' layout whatever the matvec returns. Constrain the matvec's
    output (``jax.lax.with_sharding_constraint``) to spare that copy.
    """
    state: list[bool] = []

    def tree_matvec(v: PyTree) -> PyTree:
        out = matvec(v)
        if not state:
            same_structure(like, out, "like", "matvec output")
            state.append(
                all(
                    isinstance(o, jax.Array) and o.sharding.is_equivalent_to(s, o.ndim)
                    for o, s in zip(
                        jax.tree_util.tree_leaves(out),
                        jax.tree_util.tree_leaves(layout.shardings),
                        strict=True,
                    )
                )
            )
        return out if state[0] else _tree_reshard(out, layout)

    return tree_matvec


@partial(jax.jit, static_argnums=1)
def _tree_reshard(v: PyTree, layout: Layout) -> PyTree:
    """``v`` laid out like the parameters by a compiled reshard (never through the host)."""
    return jax.lax.with_sharding_constraint(v, layout.shardings)


def _random_unit(key: jax.Array, n: int, dtype) -> jax.Array:
    q = jax.random.normal(key, (n,), dtype)
    return q / jnp.linalg.norm(q)


def min_certifiable_tol(dtype) -> float:
    """``8·eps``: the smallest relative residual tolerance ``dtype`` can certify.

    A residual ``‖Av − λv‖`` computed in ``dtype`` carries a rounding error of a
    few ``eps·|λ₁|``; a tolerance below this cannot be told apart from it.
    """
    return 8.0 * float(jnp.finfo(dtype).eps)


def certifiable_tol(tol: Any, dtype) -> float:
    """``tol`` as a float, raising unless it is a number ``≥ min_certifiable_tol(dtype)``."""
    tol = positive_float(tol, "tol")
    if tol < min_certifiable_tol(dtype):
        raise ValueError(
            f"tol={tol:g} is below what {jnp.dtype(dtype).name} can certify "
            f"(min_certifiable_tol = 8·eps = {min_certifiable_tol(dtype):.2g}): "
            "raise tol or work in float64 (jax_enable_x64)"
        )
    return tol


def _run_lanczos(
    flat_matvec: Callable[[jax.Array], jax.Array],
    q0: jax.Array,
    max_steps: int,
    *,
    stop: Callable[[np.ndarray, np.ndarray, float, float], bool],
    restart_key: jax.Array | None,
    bar: Any = None,
    first_product: jax.Array | None = None,
    ops: Any = None,
) -> _Basis:
    """Lanczos with full reorthogonalisation from unit ``q0``.

    Each step: the three-term recurrence, then one block Gram-Schmidt pass
    against every stored row, and a second pass only when the first removed
    more than 1/√2 of the norm (DGKS, "twice is enough").
    ``stop(alphas, betas, last_beta, scale)`` is asked after every matvec. On
    breakdown (``β`` at rounding level: an invariant subspace) the run restarts
    from a random vector orthogonal to the basis when ``restart_key`` is given
    (``T`` stays block-diagonal), else it ends. It also ends when a restart
    vector is mapped to ~0 (the operator vanishes on the rest of the space).
    ``first_product`` is ``A q0`` when the caller already has it. ``ops`` are
    the kernels of the vector layout: flat ``(n,)`` rows (default) or
    :class:`_TreeOps` for vectors sharded like the parameters.
    """
    if ops is None:
        ops = _FlatOps(q0.shape[0], q0.dtype)
    n = ops.n
    dtype = ops.dtype
    eps = float(jnp.finfo(dtype).eps)
    sym_tol = 10.0 * np.sqrt(eps)
    basis = _BlockBasis(ops, max_steps + 1)
    basis.append(q0)
    q_prev, q = ops.zeros_like(q0), q0
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    last_beta = 0.0
    restarted_at = -1
    null_complement = False
    for j in range(max_steps):
        w = first_product if j == 0 and first_product is not None else flat_matvec(q)
        w, local = ops.local_step(w, q_prev, q)
        w, h = basis.orthogonalize(w)
        # Explicit fetches of 4 numbers each (allowed under jax.transfer_guard("disallow")).
        h_j, h_prev, off, beta = np.asarray(jax.device_get(ops.pass_stats(w, h, j)), np.float64)
        c, a, w_norm, local_norm = np.asarray(jax.device_get(local), np.float64)
        if beta < 0.7071 * local_norm:  # DGKS: one more pass
            w, h2 = basis.orthogonalize(w)
            stats = jax.device_get(ops.pass_stats(w, h2, j))
            h2_j, h2_prev, _, beta = np.asarray(stats, np.float64)
            h_j, h_prev = h_j + h2_j, h_prev + h2_prev
        alpha, coupling = float(a + h_j), float(c + h_prev)
        beta, w_norm, off = float(beta), float(w_norm), float(off)
        if not np.all(np.isfinite([alpha, coupling, off, beta, w_norm])):
            raise ValueError(f"matvec returned non-finite values (at matvec {j + 1})")
        scale = max(scale, w_norm)
        thresh = 10.0 * eps * max(scale, 1e-300) * np.sqrt(j + 1)
        if j == restarted_at and w_norm <= thresh:
            # A random vector orthogonal to an invariant subspace is mapped to
            # ~0: with probability 1 the operator vanishes on the complement.
            null_complement = True
            break
        if j >= 1:
            asym = max(abs(coupling - betas[j - 1]), off)
            if asym > sym_tol * scale:
                raise NotSymmetricError(
                    "matvec is not symmetric: <q_i, A q_j> differs from <A q_i, q_j> "
                    f"by {asym:.3g} (relative {asym / scale:.3g}) at matvec {j + 1}"
                )
        alphas.append(alpha)
        last_beta = beta
        if bar is not None:
            bar.update(1)
        m = j + 1
        if m == n or m == max_steps or stop(np.array(alphas), np.array(betas), beta, scale):
            break
        if beta > thresh:
            q_prev, (q, _) = q, ops.normalize(w)
            basis.append(q)
            betas.append(beta)
            continue
        # Breakdown: span of the basis is invariant.
        last_beta = 0.0
        if restart_key is None:
            break
        r = ops.random_unit(jax.random.fold_in(restart_key, m))
        for _ in range(2):
            r, _ = basis.orthogonalize(r)
        r, r_norm = ops.normalize(r)
        # Space numerically exhausted: what is left of a random unit vector after two
        # passes is rounding (~eps·√m). Not a fixed fraction: a free direction keeps
        # about √((n−m)/n), below ½ once m > 3n/4 (an identity of size 12 stopped at
        # 7 of its 8 requested pairs that way).
        if float(jax.device_get(r_norm)) <= np.sqrt(eps):
            break
        q_prev, q = ops.zeros_like(q0), r
        basis.append(q)
        betas.append(0.0)
        restarted_at = m
    m = len(alphas)
    return _Basis(
        blocks=basis.blocks[: -(-m // _CHUNK)],
        alphas=np.array(alphas),
        betas=np.array(betas[: m - 1]),
        last_beta=last_beta,
        scale=scale,
        null_complement=null_complement,
        ops=ops,
    )


def _ritz(alphas: np.ndarray, betas: np.ndarray, last_beta: float):
    """Ritz values, vectors of ``T`` and Lanczos residuals ``|β_m s_{m,i}|``."""
    theta, S = np.linalg.eigh(_tridiagonal(alphas, betas))
    return theta, S, np.abs(last_beta * S[-1, :])


def _select(theta: np.ndarray, k: int, which: str, extra_zeros: int) -> np.ndarray:
    """Indices of the top-``k`` among ``theta`` and ``extra_zeros`` virtual zeros.

    Virtual zeros get index ``-1``.
    """
    candidates = np.concatenate([theta, np.zeros(extra_zeros)])
    index = np.concatenate([np.arange(theta.size), -np.ones(extra_zeros, int)])
    key = -np.abs(candidates) if which == "magnitude" else -candidates
    order = np.argsort(key, kind="stable")[:k]
    return index[order]


def top_eigenpairs(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    k: int,
    *,
    key: jax.Array,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    which: str = "largest",
    progress: bool = False,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of a symmetric operator, stopped on Ritz residuals.

    Args:
      matvec: a :class:`geomcollapse.curvature.LinearOperator` (applied
        compiled), or ``v -> A v`` for a symmetric ``A``, called as given;
        ``v`` and ``A v`` are like ``like``. Jit a plain one (with its data as
        arguments, not closures) for speed.
      like: an example vector: a 1-D array ``(n,)`` or a pytree of floating
        arrays. Its dtype is the working and output dtype. If its leaves are
        sharded over a mesh (``NamedSharding``, one dtype), every Lanczos
        vector is a pytree sharded like them: no vector of size ``n`` is
        gathered to one device or the host, only scalars come back per step.
      k: number of eigenpairs, ``1 ≤ k ≤ n``.
      key: ``jax.random`` key for the start (and restart) vectors.
      tol: stop when every returned pair has ``‖A v − λ v‖ ≤ tol · |λ₁|``.
      max_matvecs: budget of Lanczos steps (default ``min(n, max(300, 30k))``);
        pairs not converged within it are flagged. Certification adds one
        matvec per returned pair.
      which: ``'largest'`` (algebraic) or ``'magnitude'``.
      progress: show a progress bar.

    Returns:
      :class:`Eigenpairs`. Where the operator has fewer than ``k`` non-zero
      eigenvalues, the rest are zero-filled with ``found = False``; never NaN.

    Raises:
      ValueError: bad ``k``, ``tol``, ``max_matvecs``, ``which``, ``key`` or
        ``like``; a matvec output that does not match ``like``, is non-finite or
        is detected as non-symmetric.
    """
    key = prng_key(key)
    matvec = host_matvec(matvec, like)  # a LinearOperator runs compiled; a plain matvec as given
    sharded = is_sharded(like)
    if sharded:  # vectors stay pytrees sharded like `like` (geomcollapse._sharding)
        ops = _TreeOps(Layout(like, "like"))
        flat_matvec = sharded_operator(matvec, like, ops.layout)
        n, dtype = ops.n, ops.dtype
    else:
        ops = None
        flat_matvec, flat_like, unravel = flat_operator(matvec, like)
        n = flat_like.size
        dtype = flat_like.dtype
    k = positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} exceeds the operator dimension n={n}")
    tol = certifiable_tol(tol, dtype)
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    if max_matvecs is None:
        max_matvecs = min(n, max(300, 30 * k))
    max_matvecs = min(positive_int(max_matvecs, "max_matvecs"), n)
    if max_matvecs < k:
        raise ValueError(f"max_matvecs={max_matvecs} is smaller than k={k}")

    def stop(alphas, betas, last_beta, scale):
        if alphas.size < k:
            return False
        theta, _, res = _ritz(alphas, betas, last_beta)
        idx = _select(theta, k, which, 0)
        top = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
        ratio = float(np.max(res[idx])) / top
        if bar is not None:
            bar.set_postfix(max_rel_residual=f"{ratio:.2e}", refresh=False)
        return ratio <= tol

    init_key, restart_key = jax.random.split(key)
    if sharded:
        q0 = ops.random_unit(init_key)
        first = flat_matvec(q0)
        op_scale = ops.abs_max(first)
    else:
        q0 = _random_unit(init_key, n, dtype)
        first = flat_matvec(q0)
        op_scale = float(jnp.max(jnp.abs(first)))
    if not np.isfinite(op_scale):
        raise ValueError("matvec returned non-finite values (at matvec 1)")
    if op_scale == 0.0:  # A q₀ = 0 (a zero operator; XLA flushes subnormal outputs to 0 too)
        op_scale = 1.0
    if sharded:

        def scaled_matvec(v: PyTree) -> PyTree:
            return ops.scale(flat_matvec(v), 1.0 / op_scale)

    else:
        inv_scale = jnp.asarray(1.0 / op_scale, dtype)

        def scaled_matvec(v: jax.Array) -> jax.Array:
            return flat_matvec(v) * inv_scale

    with progress_bar(total=max_matvecs, desc="lanczos", enabled=progress) as bar:
        basis = _run_lanczos(
            scaled_matvec,
            q0,
            max_matvecs,
            stop=stop,
            restart_key=restart_key,
            bar=bar,
            first_product=ops.scale(first, 1.0 / op_scale) if sharded else first * inv_scale,
            ops=ops,
        )
    m = basis.alphas.size
    theta, S, res = _ritz(basis.alphas, basis.betas, basis.last_beta)
    # virtual zeros (found = False) stand in for pairs the run could not reach
    extra = k if basis.null_complement else max(0, k - theta.size)
    idx = _select(theta, k, which, extra)
    eps = float(jnp.finfo(dtype).eps)
    zero_level = 10.0 * eps * max(basis.scale, np.finfo(np.float64).tiny) * np.sqrt(m)
    safe = np.where(idx >= 0, idx, 0)
    found = (idx >= 0) & (np.abs(theta[safe]) > zero_level)
    values = np.where(found, theta[safe], 0.0)
    coeffs = np.where(found[None, :], S[:, safe], 0.0)  # (m, k)
    top = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
    flat_vectors = basis.combine(coeffs)
    # Certify: the true residuals ‖Av − λv‖, one matvec per found pair.
    residuals = np.zeros(k)
    for i in np.flatnonzero(found):
        if sharded:  # on the devices: only the norm comes back
            v = ops.row(flat_vectors, int(i))
            residuals[i] = ops.residual(scaled_matvec(v), v, float(values[i]))
            continue
        Av = np.asarray(scaled_matvec(flat_vectors[i]), np.float64)
        v = np.asarray(flat_vectors[i], np.float64)
        residuals[i] = np.linalg.norm(Av - values[i] * v)
    converged = found & (residuals <= tol * top)
    if not np.all(converged[found]):
        estimated = found & (res[safe] <= tol * top)
        why = (
            "their true residuals exceed tol although the Lanczos estimates meet it "
            "(rounding in the working dtype: use a looser tol or float64)"
            if np.all(estimated[found])
            else f"they did not converge within max_matvecs={max_matvecs}"
        )
        warnings.warn(
            f"top_eigenpairs: {int(np.sum(~converged[found]))} of {k} pairs did not "
            f"reach tol={tol:g}: {why}",
            RuntimeWarning,
            stacklevel=2,
        )
    num_matvecs = m + int(basis.null_complement) + int(np.sum(found))
    if sharded:
        put = ops.layout.put
        return Eigenpairs(
            values=put(np.asarray(values * op_scale, dtype)),
            vectors=flat_vectors,
            residuals=put(np.asarray(residuals * op_scale, dtype)),
            converged=put(converged),
            found=put(found),
            num_matvecs=num_matvecs,
        )
    return Eigenpairs(
        values=jnp.asarray(values * op_scale, dtype),
        vectors=jax.vmap(unravel)(flat_vectors),
        residuals=jnp.asarray(residuals * op_scale, dtype),
        converged=jnp.asarray(converged),
        found=jnp.asarray(found),
        num_matvecs=num_matvecs,
    )
