"""Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Design choices, each measured (docs/benchmarks.md, "The host-driven Lanczos"): our
own Lanczos rather than ARPACK or matfree, the basis stored row-wise in blocks
of 8 rows ``(8, n)`` (read only when filled, one kernel shape per ``n``), and full
rather than partial reorthogonalisation.

Each step is one user matvec, the three-term step and one block Gram-Schmidt
pass (a second only when DGKS asks for it), at ``Precision.HIGHEST`` (no TF32
on GPUs); the iteration stops as soon as every requested Ritz pair has a
Lanczos residual ``|β_m s_{m,i}| ≤ tol · ‖A‖``. Tolerance, reference scale
``‖A‖``, breakdown rule, residuals and ``converged`` are the contract of
:mod:`geomcollapse.linalg._contract`, shared with the traced solver: that
estimate drops below what the working dtype can represent (float32 on the
tiny transformer: 7.9e-9 against a true 3.6e-7), so the returned
``residuals`` are the true ``‖A v − λ v‖``, from one more matvec per
returned pair, and ``converged`` is decided on them.

The operator is run scaled by ``s = max|A q₀|`` (one number from the first
matvec, no extra product): the norms and dot products of the recurrence square
their inputs, which underflows for an operator of scale 1e-19 in float32 or
1e-300 in float64 (λ₁ came back at 26 % of its value there) and overflows for
large ones. Eigenvalues and residuals are scaled back on return.

The driver loop runs on the host (one small ``eigh`` of the tridiagonal ``T``
per step, in float64) so that stopping is decided after every matvec; the
matvec is one compiled operator (:func:`placed_operator`).

One code path serves every layout: the kernels below are written on pytrees
(a vector is a pytree, a block of basis rows the same leaves with a leading
``_CHUNK`` axis) and :class:`Placement` only decides where vectors live. On
one device a vector is the raveled ``(n,)`` array (one leaf: the kernels
are then the plain ``(8, n)`` row-block products); for a ``like`` whose
leaves are sharded over a device mesh it is a pytree sharded like ``like``,
so no vector of size ``n`` is raveled (a ravel of sharded leaves reshuffles
every parameter across devices, or gathers them on one); dot products are
per-device partial sums and an all-reduce of at most 8 numbers. The start
vector is drawn flat and laid out like ``like``, so both placements return
the same pairs to rounding.

Known limit, shared by every single-vector Krylov method (ARPACK included): an
eigenvalue of multiplicity ``r`` is found ``r`` times only once rounding has
seeded its other copies, or after an invariant subspace is exhausted (the
breakdown restart below handles the exact case). With very loose ``tol`` and a
spectrum whose top-k are exact repeats well separated from the rest, a copy can
be missed; tighten ``tol`` in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import (
    positive_int,
    prng_key,
    working_dtype,
)
from geomcollapse._sharding import Layout, is_sharded, stack_combine, stack_dot
from geomcollapse.curvature import host_matvec
from geomcollapse.errors import NotSymmetricError, warn_at_caller
from geomcollapse.linalg._contract import (
    Eigenpairs,
    certifiable_tol,
    certification_dtype,
    converged,
    reference_scale,
    residual_norms,
    zero_level,
)
from geomcollapse.progress import progress_bar

PyTree = Any
_CHUNK = 8  # basis rows per block; one block (8 × n) stays cache-hot across its two reads


class Placement:
    """Where Lanczos vectors live; static data of the compiled kernels, nothing else.

    ``layout=None``: one device, a vector is the raveled ``(n,)`` array (one
    leaf). Else a pytree sharded like the parameters (``_sharding.Layout``):
    :meth:`pin` constrains every kernel output to their shardings and
    :meth:`put` places host numbers on the mesh, replicated, explicitly.
    """

    def __init__(self, n: int, dtype: Any, layout: Layout | None = None):
        self.n, self.dtype, self.layout = n, jnp.dtype(dtype), layout

    def _key(self) -> tuple:
        return (self.n, str(self.dtype), self.layout)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and self._key() == other._key()

    def pin(self, tree: PyTree, kind: str = "vector") -> PyTree:
        """``tree`` constrained to the layout: ``'vector'``, ``'stack'`` or ``'scalar'``."""
        if self.layout is None:
            return tree
        target = {
            "vector": self.layout.shardings,
            "stack": self.layout.stacked,
            "scalar": self.layout.replicated,
        }[kind]
        return jax.lax.with_sharding_constraint(tree, target)

    def put(self, x: Any) -> jax.Array:
        """A host number or small array on the vectors' device(s)."""
        return jnp.asarray(x) if self.layout is None else self.layout.put(x)

    def fetch(self, x: jax.Array) -> np.ndarray:
        """Small device values to the host as float64 (an explicit fetch)."""
        return np.asarray(jax.device_get(x), np.float64)

    def from_flat(self, flat: jax.Array) -> PyTree:
        """``(…, n)`` raveled rows placed as vectors (a stack when there is a leading axis)."""
        if self.layout is None:
            return flat
        return self.pin(self.layout.unravel(flat), "stack" if flat.ndim > 1 else "vector")


# Vector algebra on pytrees. On one leaf of shape (n,) or (8, n) these are the plain
# dot products of the flat layout (same XLA ops, same bits); on sharded leaves a
# per-device partial contraction and one all-reduce of at most 8 numbers.


def _norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(a)))


def _sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _times(s: jax.Array, v: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: s * x, v)


@partial(jax.jit, static_argnums=3)
def _local_step(w: PyTree, q_prev: PyTree, q: PyTree, at: Placement):
    """Three-term step: remove ``w``'s components on ``q_{j-1}`` and ``q_j``.

    Returns ``(w, [c, a, ‖A q_j‖, ‖w_after‖])`` with ``c = ⟨q_{j-1}, w⟩``, ``a = ⟨q_j, w⟩``.
    """
    w_norm = _norm(w)
    c = stack_dot(q_prev, w)  # one vector as the stack: the scalar ⟨q_{j-1}, w⟩
    w = _sub(w, _times(c, q_prev))
    a = stack_dot(q, w)
    w = at.pin(_sub(w, _times(a, q)))
    return w, jnp.stack([c, a, w_norm, _norm(w)])


@partial(jax.jit, static_argnums=4, donate_argnums=2)
def _block_pass(block: PyTree, w: PyTree, h: jax.Array, offset: jax.Array, at: Placement):
    """One Gram-Schmidt pass of ``w`` against a block of ``_CHUNK`` basis rows.

    Accumulates the coefficients into ``h`` at ``offset``. Zero (unused) rows
    contribute nothing.
    """
    coeffs = stack_dot(block, w)
    w = at.pin(_sub(w, stack_combine(coeffs, block)))
    old = jax.lax.dynamic_slice_in_dim(h, offset, _CHUNK)
    return w, jax.lax.dynamic_update_slice_in_dim(h, old + coeffs, offset, 0)


@jax.jit
def _pass_stats(w: PyTree, h: jax.Array, j: jax.Array):
    """``[h_j, h_{j-1}, max_{i<j-1}|h_i|, ‖w‖]`` after a pass."""
    rows = jnp.arange(h.shape[0])
    off = jnp.max(jnp.where(rows < j - 1, jnp.abs(h), 0.0))
    prev = jnp.where(j > 0, h[jnp.maximum(j - 1, 0)], 0.0)
    return jnp.stack([h[j], prev, off, _norm(w)])


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _put_row(block: PyTree, row: jax.Array, q: PyTree, at: Placement) -> PyTree:
    block = jax.tree_util.tree_map(
        lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, row, axis=0), block, q
    )
    return at.pin(block, "stack")


@jax.jit
def _normalize(w: PyTree) -> tuple[PyTree, jax.Array]:
    norm = _norm(w)
    return jax.tree_util.tree_map(lambda x: x / norm, w), norm


@partial(jax.jit, static_argnums=2)
def _first(c: jax.Array, block: PyTree, at: Placement) -> PyTree:
    return at.pin(stack_combine(c, block), "stack")


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _accumulate(out: PyTree, c: jax.Array, block: PyTree, at: Placement) -> PyTree:
    return at.pin(jax.tree_util.tree_map(jnp.add, out, stack_combine(c, block)), "stack")


@partial(jax.jit, static_argnums=(0, 1))
def _zeros(at: Placement, rows: int | None) -> PyTree:
    """A zero vector (``rows=None``) or a zero block of ``rows`` stacked vectors."""
    return at.from_flat(jnp.zeros((() if rows is None else (rows,)) + (at.n,), at.dtype))


@partial(jax.jit, static_argnums=(0, 1))
def _zeros_h(at: Placement, size: int) -> jax.Array:
    return at.pin(jnp.zeros((size,), at.dtype), "scalar")


def _random_unit(key: jax.Array, n: int, dtype) -> jax.Array:
    q = jax.random.normal(key, (n,), dtype)
    return q / jnp.linalg.norm(q)


@partial(jax.jit, static_argnums=1)
def _placed_random_unit(key: jax.Array, at: Placement) -> PyTree:
    # Drawn flat, then laid out: every placement starts from the same vector.
    return at.from_flat(_random_unit(key, at.n, at.dtype))


@jax.jit
def _scale(v: PyTree, s: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x * s.astype(x.dtype), v)


@jax.jit
def _abs_max(v: PyTree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(v)]))


@partial(jax.jit, static_argnums=2)
def _row(stack: PyTree, i: jax.Array, at: Placement) -> PyTree:
    row = jax.tree_util.tree_map(lambda s: jax.lax.dynamic_index_in_dim(s, i, 0, False), stack)
    return at.pin(row)


@jax.jit
def _residual(Av: PyTree, v: PyTree, lam: jax.Array) -> jax.Array:
    """``‖Av − λv‖`` on the vectors' devices, in the certification dtype (float64 with x64)."""
    return residual_norms(Av, v, lam)


class _BlockBasis:
    """Orthonormal rows kept as a list of blocks of ``_CHUNK`` stacked vectors.

    Only filled blocks are read, and every kernel has one shape per ``n``, so a
    growing basis never triggers a compile.
    """

    def __init__(self, at: Placement, max_rows: int):
        self.at, self.size = at, 0
        self.blocks: list = []
        self.h_size = _CHUNK * -(-max_rows // _CHUNK)

    def append(self, q: PyTree) -> None:
        row = self.size % _CHUNK
        if row == 0:
            self.blocks.append(_zeros(self.at, _CHUNK))
        self.blocks[-1] = _put_row(self.blocks[-1], self.at.put(np.int32(row)), q, self.at)
        self.size += 1

    def orthogonalize(self, w: PyTree) -> tuple[PyTree, jax.Array]:
        """One block Gram-Schmidt pass; returns ``(w, h)`` with ``h[i] = ⟨q_i, w⟩``."""
        h = _zeros_h(self.at, self.h_size)
        for b, block in enumerate(self.blocks):
            w, h = _block_pass(block, w, h, self.at.put(np.int32(b * _CHUNK)), self.at)
        return w, h


class _Basis(NamedTuple):
    """A finished Lanczos run: basis blocks, tridiagonal ``T`` and ``β_m``."""

    blocks: list
    alphas: np.ndarray
    betas: np.ndarray  # (m-1,), zero at restart boundaries
    last_beta: float
    scale: float  # max_j ‖A q_j‖ (of the operator as run)
    null_complement: bool  # the operator vanishes outside the basis' span
    at: Placement

    @property
    def Q(self) -> PyTree:
        """The ``m`` basis rows stacked (``(m, n)`` on one device)."""
        m = self.alphas.size
        return jax.tree_util.tree_map(lambda *b: jnp.concatenate(b)[:m], *self.blocks)

    def combine(self, coeffs: np.ndarray) -> PyTree:
        """``coeffsᵀ Q`` for ``coeffs`` of shape ``(m, k)``, block by block: a stack of ``k``."""
        padded = np.zeros((len(self.blocks) * _CHUNK, coeffs.shape[1]))
        padded[: coeffs.shape[0]] = coeffs
        out = None
        for b, block in enumerate(self.blocks):
            c = self.at.put(np.asarray(padded[b * _CHUNK : (b + 1) * _CHUNK].T, self.at.dtype))
            out = _first(c, block, self.at) if out is None else _accumulate(out, c, block, self.at)
        return out


class _Step(NamedTuple):
    """The numbers one Lanczos step brings back to the host."""

    alpha: float
    coupling: float  # ⟨q_{j−1}, A q_j⟩, equal to β_{j−1} for a symmetric A
    beta: float
    w_norm: float  # ‖A q_j‖
    off: float  # largest coefficient on the older rows (zero for a symmetric A)


def _step(w, q_prev, q, basis: _BlockBasis, j: int, at: Placement):
    """One step from ``w = A q_j``: three-term recurrence, then DGKS-gated block passes."""
    w, local = _local_step(w, q_prev, q, at)
    w, h = basis.orthogonalize(w)
    # Explicit fetches of 4 numbers each (allowed under jax.transfer_guard("disallow")).
    h_j, h_prev, off, beta = at.fetch(_pass_stats(w, h, at.put(np.int32(j))))
    c, a, w_norm, local_norm = at.fetch(local)
    if beta < 0.7071 * local_norm:  # DGKS: one more pass
        w, h2 = basis.orthogonalize(w)
        h2_j, h2_prev, _, beta = at.fetch(_pass_stats(w, h2, at.put(np.int32(j))))
        h_j, h_prev = h_j + h2_j, h_prev + h2_prev
    numbers = _Step(float(a + h_j), float(c + h_prev), float(beta), float(w_norm), float(off))
    if not np.all(np.isfinite(numbers)):
        raise ValueError(f"matvec returned non-finite values (at matvec {j + 1})")
    return w, numbers


def _check_symmetric(step: _Step, previous_beta: float, scale: float, eps: float, j: int):
    asym = max(abs(step.coupling - previous_beta), step.off)
    if asym > 10.0 * np.sqrt(eps) * scale:
        raise NotSymmetricError(
            "matvec is not symmetric: <q_i, A q_j> differs from <A q_i, q_j> "
            f"by {asym:.3g} (relative {asym / scale:.3g}) at matvec {j + 1}"
        )


def _restart(basis: _BlockBasis, key: jax.Array, m: int, at: Placement, eps: float):
    """A unit vector orthogonal to the basis, or ``None`` when the space is numerically spanned.

    What is left of a random unit vector after two passes is rounding
    (~eps·√m) once the basis spans the space. Not a fixed fraction: a free
    direction keeps about √((n−m)/n), below ½ once m > 3n/4 (an identity of
    size 12 stopped at 7 of its 8 requested pairs that way).
    """
    r = _random_vector(jax.random.fold_in(key, m), at, start=False)
    for _ in range(2):
        r, _ = basis.orthogonalize(r)
    r, r_norm = _normalize(r)
    return None if float(jax.device_get(r_norm)) <= np.sqrt(eps) else r


def _random_vector(key: jax.Array, at: Placement, *, start: bool) -> PyTree:
    """A random unit vector placed like the vectors: the start vector or a restart.

    Drawn flat (every placement starts from the same vector). On one device
    the start vector is normalised eagerly and a restart by the compiled
    :func:`_normalize`, as the single-device driver always did (same bits).
    """
    if at.layout is not None:
        return _placed_random_unit(jax.device_put(key, at.layout.replicated), at)
    if start:
        return _random_unit(key, at.n, at.dtype)
    return _normalize(jax.random.normal(key, (at.n,), at.dtype))[0]


def key_home(at: Placement):
    return jax.devices()[0] if at.layout is None else at.layout.replicated


def run_lanczos(
    matvec: Callable[[PyTree], PyTree],
    q0: PyTree,
    max_steps: int,
    *,
    stop: Callable[[np.ndarray, np.ndarray, float, float], bool],
    restart_key: jax.Array | None,
    bar: Any = None,
    first_product: PyTree | None = None,
    at: Placement | None = None,
) -> _Basis:
    """Lanczos with full reorthogonalisation from unit ``q0``.

    Each step: the three-term recurrence, then one block Gram-Schmidt pass
    against every stored row, and a second pass only when the first removed
    more than 1/√2 of the norm (DGKS, "twice is enough").
    ``stop(alphas, betas, last_beta, scale)`` is asked after every matvec. On
    breakdown (``β ≤ zero_level``: an invariant subspace) the run restarts
    from a random vector orthogonal to the basis when ``restart_key`` is given
    (``T`` stays block-diagonal), else it ends. It also ends when a restart
    vector is mapped to ~0 (the operator vanishes on the rest of the space).
    ``first_product`` is ``A q0`` when the caller already has it; ``at`` the
    vectors' placement (default: ``q0`` a flat ``(n,)`` array on one device).
    """
    at = Placement(q0.shape[0], q0.dtype) if at is None else at
    eps = float(jnp.finfo(at.dtype).eps)
    basis = _BlockBasis(at, max_steps + 1)
    basis.append(q0)
    q_prev, q = _zeros(at, None), q0
    alphas: list[float] = []
    betas: list[float] = []
    scale, last_beta, restarted_at, null_complement = 0.0, 0.0, -1, False
    for j in range(max_steps):
        w = first_product if j == 0 and first_product is not None else matvec(q)
        w, step = _step(w, q_prev, q, basis, j, at)
        scale = max(scale, step.w_norm)
        level = zero_level(at.dtype, max(scale, 1e-300), j + 1)
        if j == restarted_at and step.w_norm <= level:
            # A random vector orthogonal to an invariant subspace is mapped to
            # ~0: with probability 1 the operator vanishes on the complement.
            null_complement = True
            break
        if j >= 1:
            _check_symmetric(step, betas[j - 1], scale, eps, j)
        alphas.append(step.alpha)
        last_beta = step.beta
        if bar is not None:
            bar.update(1)
        m = j + 1
        if m == at.n or m == max_steps or stop(np.array(alphas), np.array(betas), last_beta, scale):
            break
        if step.beta > level:
            q_prev, (q, _) = q, _normalize(w)
            basis.append(q)
            betas.append(step.beta)
            continue
        last_beta = 0.0  # breakdown: the span of the basis is invariant
        r = None if restart_key is None else _restart(basis, restart_key, m, at, eps)
        if r is None:
            break
        q_prev, q = _zeros(at, None), r
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
        at=at,
    )


def lanczos_basis(matvec: Callable[[PyTree], PyTree], like: PyTree, steps: int, *, key) -> list:
    """The basis rows of ``steps`` Lanczos steps, stored as :func:`top_eigenpairs` stores them.

    The same driver, blocks and placement as :func:`top_eigenpairs`, from a random
    unit start drawn with ``key`` itself (``top_eigenpairs`` draws its start from a
    split of its key), with no convergence test: ``m = steps`` rows unless the
    Krylov space becomes invariant first (a breakdown ends it) or ``m = n``.
    Returns ``⌈m/8⌉`` blocks of 8 rows each, rows past ``m`` zero: ``(8, n)`` arrays
    on one device, on a mesh pytrees like ``like`` with a leading axis of 8,
    sharded like it. For measuring where the basis lives and what it costs
    (``benchmarks/sharded_scaling.py``).
    """
    steps = positive_int(steps, "steps")
    apply, at, _ = placed_operator(matvec, like)
    q0 = _random_vector(prng_key(key), at, start=True)
    return run_lanczos(apply, q0, steps, stop=lambda *_: False, restart_key=None, at=at).blocks


def tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def _ritz(alphas: np.ndarray, betas: np.ndarray, last_beta: float):
    """Ritz values, vectors of ``T`` and Lanczos residuals ``|β_m s_{m,i}|``."""
    theta, S = np.linalg.eigh(tridiagonal(alphas, betas))
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


def placed_operator(
    matvec: Callable[[PyTree], PyTree], like: PyTree
) -> tuple[Callable[[PyTree], PyTree], Placement, Callable[[PyTree], PyTree]]:
    """``matvec`` on placed vectors, checked once against ``like``: ``(apply, placement, to_like)``.

    ``matvec`` (a :class:`geomcollapse.curvature.LinearOperator` or a plain
    ``v ↦ A v``, wrapped once by :func:`geomcollapse.curvature.host_matvec`)
    runs compiled. On one device ``apply`` maps raveled ``(n,)`` vectors (a
    1-D ``like`` is used as is, no ravel/unravel copies) and ``to_like`` turns
    a ``(k, n)`` stack back into ``like``'s structure. For ``like`` sharded over
    a mesh ``apply`` maps pytrees sharded like it; an output sharded otherwise
    is resharded there by a compiled identity.
    """
    if isinstance(like, (jax.Array, np.ndarray)) and np.ndim(like) != 1:
        raise ValueError(
            f"like must be a 1-D array or a pytree, got an array of shape {np.shape(like)}"
        )
    if sum(np.size(x) for x in jax.tree_util.tree_leaves(like)) == 0:
        raise ValueError("like has no elements: it fixes the operator's vectors (n ≥ 1)")
    if is_sharded(like):
        layout = Layout(like, "like")
        at = Placement(layout.n, layout.dtype, layout)
        return _resharded(host_matvec(matvec, like), at), at, lambda s: s
    working_dtype(like, "like")  # one dtype, float32 or float64: a mixture rounds as its narrowest
    apply = host_matvec(matvec, like)
    flat_like, unravel = ravel_pytree(like)
    at = Placement(flat_like.size, flat_like.dtype)
    if isinstance(like, (jax.Array, np.ndarray)):
        return apply, at, lambda s: s
    # Eager ravel/unravel: measured faster than jitted ones (which copy).
    return (lambda v: ravel_pytree(apply(unravel(v)))[0]), at, jax.vmap(unravel)


def _resharded(apply: Callable[[PyTree], PyTree], at: Placement) -> Callable[[PyTree], PyTree]:
    """``apply`` whose outputs are resharded like the parameters unless the first already is."""
    state: list[bool] = []

    def resharded(v: PyTree) -> PyTree:
        out = apply(v)
        if not state:
            state.append(_sharded_like(out, at.layout))
        return out if state[0] else _reshard(out, at)

    return resharded


def _sharded_like(out: PyTree, layout: Layout) -> bool:
    return all(
        isinstance(o, jax.Array) and o.sharding.is_equivalent_to(s, o.ndim)
        for o, s in zip(
            jax.tree_util.tree_leaves(out),
            jax.tree_util.tree_leaves(layout.shardings),
            strict=True,
        )
    )


@partial(jax.jit, static_argnums=1)
def _reshard(v: PyTree, at: Placement) -> PyTree:
    """``v`` laid out like the parameters by a compiled reshard (never through the host)."""
    return at.pin(v)


def operator_scale(first_product: PyTree) -> float:
    """``s = max|A q₀|``, the factor a host-driven run divides the operator by (``1`` for ``0``).

    The norms and dot products of the recurrence square their inputs: run on
    ``A / s`` they neither underflow (an operator of scale 1e-19 in float32,
    1e-300 in float64) nor overflow; eigenvalues (SLQ nodes) and residuals are
    multiplied by ``s`` on return. Raises on a non-finite product.
    """
    s = float(jax.device_get(_abs_max(first_product)))
    if not np.isfinite(s):
        raise ValueError("matvec returned non-finite values (at matvec 1)")
    return s if s > 0.0 else 1.0  # A q₀ = 0 (XLA flushes subnormal outputs to 0 too)


def scaled_operator(apply: Callable, first: PyTree, at: Placement):
    """``(v ↦ A v / s, A q₀ / s, s)`` with ``s`` from :func:`operator_scale` of ``first = A q₀``."""
    s = operator_scale(first)
    inv = at.put(np.asarray(1.0 / s, at.dtype))
    return (lambda v: _scale(apply(v), inv)), _scale(first, inv), s


def top_eigenpairs(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    k: int,
    *,
    key: jax.Array,
    tol: float | None = None,
    max_matvecs: int | None = None,
    which: str = "largest",
    progress: bool = False,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of a symmetric operator, stopped on Ritz residuals.

    Args:
      matvec: a :class:`geomcollapse.curvature.LinearOperator` (applied
        compiled), or ``v -> A v`` for a symmetric ``A``, wrapped once into one
        (:func:`geomcollapse.curvature.as_operator`: traced once, the arrays it
        closes over passed to the compiled program as data, never folded into
        it); ``v`` and ``A v`` are like ``like``, and it must be traceable.
      like: an example vector: a 1-D array ``(n,)`` or a pytree of floating
        arrays. Its dtype is the working and output dtype. If its leaves are
        sharded over a mesh (``NamedSharding``, one dtype), every Lanczos
        vector is a pytree sharded like them: no vector of size ``n`` is
        gathered to one device or the host, only scalars come back per step.
      k: number of eigenpairs, ``1 ≤ k ≤ n``.
      key: ``jax.random`` key for the start (and restart) vectors.
      tol: stop when every returned pair has ``‖A v − λ v‖ ≤ tol · ‖A‖``
        (``‖A‖``: the largest ``|θ|`` of the run; default ``100·eps``; see
        :mod:`geomcollapse.linalg._contract`).
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
    apply, at, to_like = placed_operator(matvec, like)  # compiled, a plain matvec wrapped once
    n, dtype = at.n, at.dtype
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
    init_key, restart_key = jax.random.split(key)
    q0 = _random_vector(init_key, at, start=True)
    scaled, first, op_scale = scaled_operator(apply, apply(q0), at)
    with progress_bar(total=max_matvecs, desc="lanczos", enabled=progress) as bar:
        stop = partial(_estimates_converged, k=k, which=which, tol=tol, bar=bar)
        basis = run_lanczos(
            scaled, q0, max_matvecs, stop=stop, restart_key=restart_key, bar=bar,
            first_product=first, at=at,
        )  # fmt: skip
    pairs = _extract(basis, k, which, tol, scaled, max_matvecs)
    return pairs._replace(
        values=at.put(np.asarray(pairs.values * op_scale, dtype)),
        vectors=to_like(pairs.vectors),
        residuals=at.put(np.asarray(pairs.residuals * op_scale, dtype)),
    )


def _estimates_converged(alphas, betas, last_beta, scale, *, k, which, tol, bar) -> bool:
    """The stopping rule: every top-``k`` Lanczos estimate ``|β_m s_{m,i}| ≤ tol·‖A‖``."""
    if alphas.size < k:
        return False
    theta, _, res = _ritz(alphas, betas, last_beta)
    ratio = float(np.max(res[_select(theta, k, which, 0)])) / reference_scale(theta)
    bar.set_postfix(max_rel_residual=f"{ratio:.2e}", refresh=False)
    return ratio <= tol


def _extract(basis: _Basis, k: int, which: str, tol: float, apply, max_matvecs: int):
    """Ritz pairs of a finished run, certified by their true residuals (host values)."""
    at, m = basis.at, basis.alphas.size
    theta, S, estimates = _ritz(basis.alphas, basis.betas, basis.last_beta)
    # virtual zeros (found = False) stand in for pairs the run could not reach
    extra = k if basis.null_complement else max(0, k - theta.size)
    idx = _select(theta, k, which, extra)
    safe = np.where(idx >= 0, idx, 0)
    level = zero_level(at.dtype, max(basis.scale, np.finfo(np.float64).tiny), m)
    found = (idx >= 0) & (np.abs(theta[safe]) > level)
    values = np.where(found, theta[safe], 0.0)
    vectors = basis.combine(np.where(found[None, :], S[:, safe], 0.0))  # (m, k) coefficients
    basis.blocks.clear()  # spent: free the m basis rows before the k certifying matvecs
    residuals = _certify(apply, vectors, values, found, at)
    ref = reference_scale(theta)
    ok = converged(residuals, found, tol, ref)
    if not np.all(ok[found]):
        estimated = np.all(converged(estimates[safe], found, tol, ref)[found])
        why = (
            "their true residuals exceed tol although the Lanczos estimates meet it "
            "(rounding in the working dtype: use a looser tol or float64)"
            if estimated
            else f"they did not converge within max_matvecs={max_matvecs}"
        )
        warn_at_caller(
            f"top_eigenpairs: {int(np.sum(~ok[found]))} of {k} pairs did not "
            f"reach tol={tol:g}: {why}",
            RuntimeWarning,
        )
    return Eigenpairs(
        values=values,
        vectors=vectors,
        residuals=residuals,
        converged=at.put(ok),
        found=at.put(found),
        num_matvecs=m + int(basis.null_complement) + int(np.sum(found)),
    )


def _host_residual(Av: np.ndarray, v: np.ndarray, lam: float, chunk: int = 1 << 16) -> float:
    """:func:`residual_norms` of one flat pair on the host in float64, ``chunk`` entries at a
    time (whole float64 copies of ``Av`` and ``v`` were 4 temporaries of ``8n`` bytes)."""
    total = 0.0
    for s in range(0, v.size, chunk):
        r = residual_norms(Av[s : s + chunk], v[s : s + chunk], np.float64(lam))
        total += float(r) ** 2
    return float(np.sqrt(total))


def _certify(apply, vectors: PyTree, values: np.ndarray, found, at: Placement) -> np.ndarray:
    """True residuals ``‖A v_i − θ_i v_i‖`` of the found pairs, one matvec each.

    On the vectors' devices in :func:`certification_dtype` (float64 with x64,
    whatever the layout; only the norm comes back). Without x64 on one device
    the two vectors come to the host and the norm is float64 there.
    """
    residuals = np.zeros(values.size)
    for i in np.flatnonzero(found):
        v = _row(vectors, at.put(np.int32(i)), at)
        Av = apply(v)
        if at.layout is None and not jax.config.jax_enable_x64:
            residuals[i] = _host_residual(np.asarray(Av), np.asarray(v), float(values[i]))
        else:
            lam = at.put(np.asarray(values[i], certification_dtype(at.dtype)))
            residuals[i] = float(jax.device_get(_residual(Av, v, lam)))
    return residuals
