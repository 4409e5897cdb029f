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

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class Eigenpairs(NamedTuple):
    """Eigenpairs of a symmetric operator.

    Attributes:
      values: ``(k,)`` eigenvalues, descending (by value, or by magnitude for
        ``which='magnitude'``), in the dtype of ``like``.
      vectors: unit eigenvectors stacked on a leading axis of size ``k``:
        ``(k, n)`` for a 1-D ``like``, else a pytree like ``like`` whose leaves
        have a leading ``k`` axis.
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

    @property
    def Q(self) -> jax.Array:
        """The ``m`` basis rows as one ``(m, n)`` array."""
        return jnp.concatenate(self.blocks)[: self.alphas.size]

    def combine(self, coeffs: np.ndarray) -> jax.Array:
        """``coeffsᵀ Q`` for ``coeffs`` of shape ``(m, k)``, block by block: ``(k, n)``."""
        padded = np.zeros((len(self.blocks) * _CHUNK, coeffs.shape[1]))
        padded[: coeffs.shape[0]] = coeffs
        dtype = self.blocks[0].dtype
        out = None
        for b, block in enumerate(self.blocks):
            c = jnp.asarray(padded[b * _CHUNK : (b + 1) * _CHUNK].T, dtype)
            out = _accumulate(out, c, block) if out is not None else _first(c, block)
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

    def __init__(self, n: int, dtype, max_rows: int):
        self.n, self.dtype, self.size = n, dtype, 0
        self.blocks: list[jax.Array] = []
        self.h_size = _CHUNK * -(-max_rows // _CHUNK)

    def append(self, q: jax.Array) -> None:
        row = self.size % _CHUNK
        if row == 0:
            self.blocks.append(jnp.zeros((_CHUNK, self.n), self.dtype))
        self.blocks[-1] = _put_row(self.blocks[-1], row, q)
        self.size += 1

    def orthogonalize(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One block Gram-Schmidt pass; returns ``(w, h)`` with ``h[i] = ⟨q_i, w⟩``."""
        h = jnp.zeros((self.h_size,), self.dtype)
        for b, block in enumerate(self.blocks):
            w, h = _block_pass(block, w, h, b * _CHUNK)
        return w, h


@jax.jit
def _first(c: jax.Array, block: jax.Array) -> jax.Array:
    return jnp.dot(c, block, precision=_HIGHEST)


@partial(jax.jit, donate_argnums=0)
def _accumulate(out: jax.Array, c: jax.Array, block: jax.Array) -> jax.Array:
    return out + jnp.dot(c, block, precision=_HIGHEST)


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


def _random_unit(key: jax.Array, n: int, dtype) -> jax.Array:
    q = jax.random.normal(key, (n,), dtype)
    return q / jnp.linalg.norm(q)


def min_certifiable_tol(dtype) -> float:
    """``8·eps``: the smallest relative residual tolerance ``dtype`` can certify.

    A residual ``‖Av − λv‖`` computed in ``dtype`` carries a rounding error of a
    few ``eps·|λ₁|``; a tolerance below this cannot be told apart from it.
    """
    return 8.0 * float(jnp.finfo(dtype).eps)


def _run_lanczos(
    flat_matvec: Callable[[jax.Array], jax.Array],
    q0: jax.Array,
    max_steps: int,
    *,
    stop: Callable[[np.ndarray, np.ndarray, float, float], bool],
    restart_key: jax.Array | None,
    bar: Any = None,
    first_product: jax.Array | None = None,
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
    ``first_product`` is ``A q0`` when the caller already has it.
    """
    n = q0.shape[0]
    dtype = q0.dtype
    eps = float(jnp.finfo(dtype).eps)
    sym_tol = 10.0 * np.sqrt(eps)
    basis = _BlockBasis(n, dtype, max_steps + 1)
    basis.append(q0)
    q_prev, q = jnp.zeros_like(q0), q0
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    last_beta = 0.0
    restarted_at = -1
    null_complement = False
    for j in range(max_steps):
        w = first_product if j == 0 and first_product is not None else flat_matvec(q)
        w, local = _local_step(w, q_prev, q)
        w, h = basis.orthogonalize(w)
        h_j, h_prev, off, beta = np.asarray(_pass_stats(w, h, j), np.float64)
        c, a, w_norm, local_norm = np.asarray(local, np.float64)
        if beta < 0.7071 * local_norm:  # DGKS: one more pass
            w, h2 = basis.orthogonalize(w)
            h2_j, h2_prev, _, beta = np.asarray(_pass_stats(w, h2, j), np.float64)
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
                raise ValueError(
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
            q_prev, (q, _) = q, _normalize(w)
            basis.append(q)
            betas.append(beta)
            continue
        # Breakdown: span of the basis is invariant.
        last_beta = 0.0
        if restart_key is None:
            break
        r, _ = _normalize(jax.random.normal(jax.random.fold_in(restart_key, m), (n,), dtype))
        for _ in range(2):
            r, _ = basis.orthogonalize(r)
        r, r_norm = _normalize(r)
        if float(r_norm) <= 0.5:  # space numerically exhausted
            break
        q_prev, q = jnp.zeros_like(q0), r
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
      matvec: ``v -> A v`` for a symmetric ``A``; ``v`` and ``A v`` are like
        ``like``. Jit it (with its data as arguments, not closures) for speed.
      like: an example vector: a 1-D array ``(n,)`` or a pytree of floating
        arrays. Its dtype is the working and output dtype.
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
    flat_matvec, flat_like, unravel = flat_operator(matvec, like)
    n = flat_like.size
    dtype = flat_like.dtype
    k = positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} exceeds the operator dimension n={n}")
    tol = positive_float(tol, "tol")
    if tol < min_certifiable_tol(dtype):
        raise ValueError(
            f"tol={tol:g} is below what {jnp.dtype(dtype).name} can certify "
            f"(min_certifiable_tol = 8·eps = {min_certifiable_tol(dtype):.2g}): "
            "raise tol or work in float64 (jax_enable_x64)"
        )
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
    q0 = _random_unit(init_key, n, dtype)
    first = flat_matvec(q0)
    op_scale = float(jnp.max(jnp.abs(first)))
    if not np.isfinite(op_scale):
        raise ValueError("matvec returned non-finite values (at matvec 1)")
    if op_scale == 0.0:  # A q₀ = 0 (a zero operator; XLA flushes subnormal outputs to 0 too)
        op_scale = 1.0
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
            first_product=first * inv_scale,
        )
    m = basis.alphas.size
    theta, S, res = _ritz(basis.alphas, basis.betas, basis.last_beta)
    extra = k if basis.null_complement else 0
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
    return Eigenpairs(
        values=jnp.asarray(values * op_scale, dtype),
        vectors=jax.vmap(unravel)(flat_vectors),
        residuals=jnp.asarray(residuals * op_scale, dtype),
        converged=jnp.asarray(converged),
        found=jnp.asarray(found),
        num_matvecs=m + int(basis.null_complement) + int(np.sum(found)),
    )
