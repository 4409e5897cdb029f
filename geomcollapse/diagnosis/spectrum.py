"""The top of the skill Fisher's spectrum, its trace and ``d = dim M`` (docs/theory.md §2, §5).

Two routes: ``F`` formed densely from its ``n`` columns and diagonalised by
``numpy.linalg.eigh`` (small unsharded models), or Lanczos
(:func:`geomcollapse.linalg.top_eigenpairs`) with the trace of
:func:`geomcollapse.aic.tree_fisher_trace`, one route for every layout: every vector a
pytree laid out like sharded params, or a raveled ``(n,)`` vector on a mesh of one device.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse import aic, curvature, linalg
from geomcollapse._checks import probe_operator
from geomcollapse._sharding import Layout, on_one_device_mesh, tree_dot
from geomcollapse.diagnosis.fisher import bad_fisher, refuse_rounding_noise
from geomcollapse.diagnosis.plan import FIRST_K, ONE_SHOT, Request
from geomcollapse.errors import NotSymmetricError

__all__ = ["Spectrum", "dense_spectrum", "krylov_spectrum", "measure_spectrum"]


class Spectrum(NamedTuple):
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


def _columns(op: curvature.LinearOperator, n: int) -> jax.Array:
    """``(n, n)``: ``F e_i`` for every ``i`` (``op`` on raveled vectors), batched."""
    eye = jnp.eye(n, dtype=op.dtype)
    return jax.lax.map(op, eye, batch_size=min(n, 256))


_JITTED_COLUMNS = jax.jit(_columns, static_argnums=1, compiler_options=ONE_SHOT)


def _dense_fisher(op, n, fisher_name) -> tuple[np.ndarray, float, float]:
    """``(F, tr F, eps)``: ``F`` from its ``n`` columns ``F e_i`` (one compiled, batched
    call), symmetrised once shown symmetric to ``√eps`` (``eps`` of the model's dtype)."""
    flat_op = op.raveled()
    if fisher_name == "custom":  # the columns of an affine or nonlinear map look like a matrix
        like = jnp.zeros((n,), flat_op.dtype)
        probe = partial(curvature.apply, flat_op)
        probe_operator(probe, like, "fisher", psd=False, key=jax.random.key(0x5EED), symmetric=True)
    cols = _JITTED_COLUMNS(flat_op, n)
    C = np.asarray(cols, np.float64)
    if not np.all(np.isfinite(C)):
        raise ValueError("fisher: the skill Fisher's matvec returned non-finite values at params")
    tr = float(np.trace(C))
    if not tr > 0:
        raise ValueError(bad_fisher(fisher_name, tr))
    asym = float(np.max(np.abs(C - C.T)))
    scale = float(np.max(np.abs(C)))
    eps = float(np.finfo(cols.dtype).eps)
    if asym > np.sqrt(eps) * scale:  # rounding noise (an empirical F at a minimum) is asymmetric
        detail = f"max |F − Fᵀ| / max |F| = {asym / scale:.2g}"
        raise ValueError(bad_fisher(fisher_name, tr, asymmetry=detail))
    return 0.5 * (C + C.T), tr, eps


def dense_spectrum(op, n, fisher_name, share, max_d, d) -> Spectrum:
    """``F`` formed from its ``n`` columns ``F e_i`` (one compiled, batched call) and ``eigh``.

    Exact spectrum and trace; cheaper than Lanczos plus a trace for small ``n``
    (the one-block test transformer, n = 249: one compile instead of three).
    ``op``: ``F`` as a :class:`geomcollapse.curvature.LinearOperator`; returns
    ``k = min(n−1, max(2d, 16))`` pairs.
    """
    F, tr, eps = _dense_fisher(op, n, fisher_name)
    lam, U = np.linalg.eigh(F)
    lam, U = lam[::-1], U[:, ::-1]
    if lam[-1] < -np.sqrt(eps) * lam[0]:  # beyond rounding: an indefinite "Fisher"
        raise ValueError(bad_fisher(fisher_name, tr, min_eigenvalue=float(lam[-1])))
    if d is None:
        found = _rule(lam, tr, share, max_d)
        d, rule = (max_d if found is None else found), _rule_text(max_d, share, "dense eigh")
    else:
        rule = "given"
    k = min(n - 1, max(2 * d, 2 * FIRST_K))
    V = U[:, :k].T
    residuals = np.linalg.norm(V @ F - lam[:k, None] * V, axis=1)
    return Spectrum(
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


def _top_pairs(op, like, k: int, key, req: Request, exact_trace) -> linalg.Eigenpairs:
    """:func:`geomcollapse.linalg.top_eigenpairs`; a matvec of pure rounding noise is caught
    as non-symmetric (:class:`geomcollapse.errors.NotSymmetricError`) and refused."""
    try:
        return linalg.top_eigenpairs(
            op,
            like,
            k,
            key=jax.random.fold_in(key, k),
            tol=req.tol,
            max_matvecs=req.max_matvecs,
            progress=req.progress,
        )
    except NotSymmetricError as err:
        raise ValueError(bad_fisher(req.fisher_name, exact_trace, asymmetry=str(err))) from None


def krylov_spectrum(
    op: curvature.LinearOperator, like, trace_of, req: Request, host_vectors: bool
) -> Spectrum:
    """Top eigenpairs by Lanczos (``k = 8, 16, …`` until the rule is met) and ``tr F``.

    The trace is exact (``n`` matvecs) or Hutchinson on ``(I−P)F(I−P)`` deflated by
    the ``k`` pairs found, plus their eigenvalues: ``trace_of(method, key, deflate)``
    returns ``(value, stderr, matvecs)`` as :func:`geomcollapse.aic.fisher_trace`.
    ``op`` (``F``) maps vectors like ``like`` (``(n,)``, or a pytree sharded like the
    parameters); with ``host_vectors`` the eigenvectors come back as ``(k, n)``
    float64 rows, else they stay a stack on the devices. Eigenvalues and
    residuals are ``(k,)`` host arrays either way.
    """
    k_eig, k_trace = jax.random.split(req.key)
    trace_matvecs = lanczos_matvecs = 0
    exact_trace = None
    if req.trace == "exact":
        exact_trace, _, trace_matvecs = trace_of("exact", None, None)
        if not exact_trace > 0:
            raise ValueError(bad_fisher(req.fisher_name, exact_trace))
    d, max_d = req.d, req.max_d
    k = d if d is not None else min(FIRST_K, max_d)
    while True:
        pairs = _top_pairs(op, like, k, k_eig, req, exact_trace)
        lanczos_matvecs += int(pairs.num_matvecs)
        lam = np.asarray(jax.device_get(pairs.values), np.float64)
        V = np.asarray(pairs.vectors, np.float64) if host_vectors else pairs.vectors
        if exact_trace is not None:
            tr, tr_se, tail = exact_trace, 0.0, exact_trace - lam.sum()
        else:
            key = jax.random.fold_in(k_trace, k)
            tail, tr_se, used = trace_of("hutchinson", key, pairs.vectors)
            trace_matvecs += used
            tr = tail + lam.sum()
            if not tr > 0:
                raise ValueError(bad_fisher(req.fisher_name, tr))
        found = None if d is not None else _rule(lam, tr, req.share, max_d)
        if d is not None or found is not None or k == max_d:
            break
        k = min(2 * k, max_d)
    rule = "given" if d is not None else _rule_text(max_d, req.share, f"{req.trace} trace")
    return Spectrum(
        values=lam,
        vectors=V,
        residuals=np.asarray(jax.device_get(pairs.residuals), np.float64),
        converged=np.asarray(jax.device_get(pairs.converged), bool),
        trace=float(tr),
        trace_stderr=float(tr_se),
        tail=float(tail),
        d=d if d is not None else (max_d if found is None else found),
        d_rule=rule,
        method="lanczos",
        trace_method=req.trace,
        num_matvecs=trace_matvecs + lanczos_matvecs,
        matvec=partial(curvature.apply, op),
    )


def _route(req: Request) -> tuple[curvature.LinearOperator, Any, Callable]:
    """``(operator, like, trace_of)``: one route for every layout. Unsharded params are
    one raveled ``(n,)`` vector on a mesh of their device (eigenvectors ``(k, n)``)."""
    op, like, layout = req.op, req.params, req.layout
    if layout is None:
        op, like = op.raveled(), on_one_device_mesh(req.flat)
        layout = Layout(like, "params")

    def trace_of(method, k, deflate):
        return aic.tree_fisher_trace(
            op.fn,
            layout,
            op.params,
            op.args,
            method,
            key=k,
            num_probes=req.num_probes,
            deflate=deflate,
        )

    return op, like, trace_of


def _along_top(req: Request, sp: Spectrum) -> Callable:
    """``θ ↦ ⟨v₁, F(θ) v₁⟩`` along the top eigenvector found, a host float."""
    if req.layout is None:
        v1 = jnp.asarray(sp.vectors[0], req.dtype)
        return lambda theta: float(jnp.vdot(v1, curvature.apply(req.op.at(theta).raveled(), v1)))
    v1 = jax.tree_util.tree_map(lambda a: a[0], sp.vectors)

    def along_v1(theta):
        fv = curvature.apply(req.op.at(theta), v1)
        return float(jax.device_get(tree_dot(v1, fv)))

    return along_v1


def measure_spectrum(req: Request) -> Spectrum:
    """The top of ``F``'s spectrum, ``tr F`` and ``d`` on the route ``req`` chose: dense,
    Lanczos on ``(n,)`` vectors, or Lanczos on pytrees sharded like the params. An
    empirical Fisher that is rounding noise is refused (:func:`refuse_rounding_noise`)."""
    if req.dense:
        sp = dense_spectrum(req.op, req.n, req.fisher_name, req.share, req.max_d, req.d)
    else:
        op, like, trace_of = _route(req)
        sp = krylov_spectrum(op, like, trace_of, req, host_vectors=req.layout is None)
    if req.fisher_name == "empirical":
        key = jax.random.fold_in(req.key, 7)
        refuse_rounding_noise(_along_top(req, sp), req.params, sp.trace, key)
    return sp
