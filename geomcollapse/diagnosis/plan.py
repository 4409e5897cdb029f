"""The checks of :func:`geomcollapse.diagnose`'s arguments, made once at the boundary.

:func:`check_plan` needs no array (``diagnose_checkpoint`` calls it from the
architecture, before loading weights); :func:`check_request` checks every
argument of a diagnosis, evaluates the user's functions once abstractly and
returns a :class:`Request` that the measurements trust (docs/theory.md §2-§6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from geomcollapse import aic, linalg
from geomcollapse._checks import (
    check_data,
    check_params,
    open_unit_float,
    positive_float,
    positive_int,
    prng_key,
    probe_count,
    scalar_loss,
    subspace_dim,
)
from geomcollapse._sharding import Layout, is_sharded
from geomcollapse.curvature import LinearOperator
from geomcollapse.diagnosis.fisher import fisher_operator

__all__ = [
    "DEFAULT_MAX_D",
    "DEFAULT_ORDER",
    "DEFAULT_SHARE",
    "DENSE_MAX_N",
    "FIRST_K",
    "MAX_ORDER",
    "ONE_SHOT",
    "Request",
    "check_plan",
    "check_request",
    "one_shot_options",
]

PyTree = Any

DEFAULT_SHARE = 0.9  # d=None: the top-d eigenvalues must hold this share of tr F
MAX_ORDER = 12  # the highest series order accepted (its cost grows as 2^order)
DEFAULT_ORDER = 4  # diagnose's series order unless told
DEFAULT_MAX_D = 64  # d=None: the largest d the rule may pick
DENSE_MAX_N = 2048  # spectrum='auto': F formed densely (n matvecs, eigh) up to this n
FIRST_K = 8  # d=None: eigenpairs computed first (then doubled until the share is reached)
# The series and the dense F are computed once per diagnosis, so for a small model their
# compile time is what counts: XLA's backend at optimisation level 0 compiled the order-4
# series of a one-block transformer in 7 s of CPU instead of 12 s (2-core CPU), equal to
# rounding. Used only on the CPU and up to DENSE_MAX_N parameters: for a large model the
# run time of unoptimised code would cost more than the compile time saved.
ONE_SHOT = {"xla_backend_optimization_level": 0}


class Request(NamedTuple):
    """A diagnosis's arguments, checked: what the measurements read (host values only).

    ``op`` is the skill Fisher at ``params`` (a
    :class:`geomcollapse.curvature.LinearOperator` on vectors like them, ``skill_args``
    its data) and ``fisher_name`` its label; ``layout`` the params' mesh layout (``None``
    unsharded, then ``flat`` holds them raveled); ``dense`` whether ``F`` is
    formed densely; ``trace`` the Lanczos route's trace method, resolved.
    """

    skill_loss: Callable
    task_loss: Callable
    params: PyTree
    skill_args: tuple
    task_args: tuple
    op: LinearOperator
    fisher_name: str
    d: int | None
    lr: float | None
    steps: int | None
    threshold: float | None
    order: int
    share: float
    max_d: int
    key: jax.Array
    tol: float
    max_matvecs: int | None
    num_probes: int
    trace: str
    dense: bool
    layout: Layout | None
    flat: jax.Array | None
    n: int
    dtype: Any
    progress: bool


def one_shot_options(n: int) -> dict:
    """Compiler options for a once-per-diagnosis program on ``n`` parameters."""
    return ONE_SHOT if n <= DENSE_MAX_N and jax.default_backend() == "cpu" else {}


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


def args_tuple(args: Any, name: str) -> tuple:
    """``args`` as a tuple of a loss's extra arguments; ``ValueError`` naming ``name`` else."""
    if not isinstance(args, (tuple, list)):
        raise ValueError(
            f"{name} must be a tuple of the loss's extra arguments, got {type(args).__name__} "
            f"(wrap a single array as ({name[:-5]}_array,))"
        )
    return tuple(args)


def dense_route(spectrum: Any, trace: Any, n: int, sharded: bool) -> bool:
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


def lanczos_options(
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


def _size(params: PyTree) -> tuple[Layout | None, jax.Array | None, int, Any]:
    """``(layout, flat, n, dtype)``: a mesh layout for sharded params, else the raveled ones."""
    # Parameters sharded over a mesh: every vector of R^n stays a pytree laid out like them
    # (geomcollapse._sharding); only scalars and d- or K-sized arrays reach the host.
    if is_sharded(params):
        layout = Layout(params, "params")
        return layout, None, layout.n, layout.dtype
    flat, _ = ravel_pytree(params)
    return None, flat, int(flat.size), flat.dtype


def check_request(skill_loss, task_loss, params, **kw: Any) -> Request:
    """Every argument of :func:`geomcollapse.diagnose` (``kw``: its keywords), checked in
    the order its errors are documented; the user's functions are traced once abstractly."""
    check_params(params)
    key = prng_key(kw["key"])
    skill_args = check_data(args_tuple(kw["skill_args"], "skill_args"), "skill_args")
    task_args = check_data(args_tuple(kw["task_args"], "task_args"), "task_args")
    layout, flat, n, dtype = _size(params)
    if n < 2:
        raise ValueError(
            f"params must hold at least 2 numbers (M must be a proper subspace), got {n}"
        )
    plan = {k: kw[k] for k in ("d", "lr", "steps", "threshold", "order")}
    d, lr, steps, threshold, order = check_plan(n, **plan)
    max_d = min(positive_int(kw["max_d"], "max_d"), n - 1)
    share = open_unit_float(kw["share"], "share")
    dense = dense_route(kw["spectrum"], kw["trace"], n, layout is not None)
    first_k = d if d is not None else min(FIRST_K, max_d)
    tol, max_matvecs, num_probes = lanczos_options(
        kw["tol"], kw["max_matvecs"], kw["num_probes"], dtype, n, first_k
    )
    # the Fisher first: fisher='empirical' names mismatched example axes before skill_loss
    # trips over them
    op, fisher_name = fisher_operator(
        kw["fisher"], skill_loss, kw["skill_logits"], params, skill_args
    )
    for name, loss, args in (("skill", skill_loss, skill_args), ("task", task_loss, task_args)):
        call = f"{name}_loss(params, *{name}_args)"
        scalar_loss(loss, params, args, f"{name}_loss", call, f"{name}_args")
    trace = kw["trace"]
    exact = trace == "exact" or (trace == "auto" and n <= aic.EXACT_TRACE_MAX_N)
    return Request(
        skill_loss=skill_loss,
        task_loss=task_loss,
        params=params,
        skill_args=skill_args,
        task_args=task_args,
        op=op,
        fisher_name=fisher_name,
        d=d,
        lr=lr,
        steps=steps,
        threshold=threshold,
        order=order,
        share=share,
        max_d=max_d,
        key=key,
        tol=tol,
        max_matvecs=max_matvecs,
        num_probes=num_probes,
        trace="exact" if exact else "hutchinson",
        dense=dense,
        layout=layout,
        flat=flat,
        n=n,
        dtype=dtype,
        progress=bool(kw["progress"]),
    )
