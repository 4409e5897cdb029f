"""Input validation shared by the library: clear ``ValueError``s, never deep traces.

The boundary of every public entry point that takes a loss or an operator
(:func:`geomcollapse.aic.measure_aic`, :func:`geomcollapse.diagnose`,
:func:`geomcollapse.series.delta_u_series`, :func:`geomcollapse.series.sgd_delta_u`,
:func:`geomcollapse.monitor.monitor`, :func:`geomcollapse.linalg.top_eigenpairs`)
is made of the checks here, in this order: :func:`check_params` (finite, one
floating dtype, not bfloat16/float16), :func:`check_data` (a tuple of non-empty,
finite data), :func:`scalar_loss` (the loss, traced once abstractly: a floating
scalar; a failing call names the data's leading axes when they differ),
:func:`probe_operator` (matvecs on probes: finite, ``vᵀAv ≥ 0`` where ``A``
must be positive semidefinite, ``uᵀAv = vᵀAu`` where it must be symmetric) and,
on what the measurement computed anyway, :func:`finite_derivatives`, :func:`not_psd`
and :func:`flat_loss`. They run eagerly at the boundary; tracers pass through.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse.errors import (
    BroadcastDataWarning,
    FlatLossWarning,
    NotSymmetricError,
    warn_at_caller,
)


def floating_leaves(tree: Any, name: str) -> list:
    """Return the leaves of ``tree``; raise if any is not a floating-point array."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must hold floating-point arrays, got a leaf of dtype {dtype}")
    return leaves


@jax.jit
def _count_non_finite(leaves: list) -> list:
    return [jnp.sum(~jnp.isfinite(x)) for x in leaves]


def finite_leaves(tree: Any, name: str) -> list:
    """Return the floating leaves of ``tree``; raise if any holds NaN or ±inf.

    Only concrete arrays are checked (tracers pass through), so jitted callers
    keep working; the check runs at the library's eager entry points.
    """
    leaves = floating_leaves(tree, name)
    spread = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and len(leaf.sharding.device_set) > 1
    ]
    # Leaves spread over several devices are counted where they live, in one
    # compiled call: one integer per leaf comes back, never the leaf itself.
    counts = jax.device_get(_count_non_finite([leaves[i] for i in spread])) if spread else []
    on_mesh = dict(zip(spread, counts, strict=True))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.core.Tracer):
            continue
        if i in on_mesh:
            bad = int(on_mesh[i])
        else:
            arr = np.asarray(leaf)
            bad = 0 if np.all(np.isfinite(arr)) else int(np.sum(~np.isfinite(arr)))
        if bad:
            where = f" (leaf {i})" if len(leaves) > 1 else ""
            raise ValueError(f"{name} has {bad} non-finite (NaN or inf) entries{where}")
    return leaves


def finite_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def same_structure(
    reference: Any, other: Any, ref_name: str, name: str, *, same_dtype: bool = True
) -> None:
    """Raise unless ``other`` has the tree structure, shapes and dtypes of ``reference``.

    ``same_dtype=False``: any floating dtype (the caller casts).
    """
    ref_def = jax.tree_util.tree_structure(reference)
    other_def = jax.tree_util.tree_structure(other)
    if ref_def != other_def:
        raise ValueError(
            f"{name} does not have the pytree structure of {ref_name}: {other_def} vs {ref_def}"
        )
    ref_leaves = floating_leaves(reference, ref_name)
    for i, (a, b) in enumerate(zip(ref_leaves, jax.tree_util.tree_leaves(other), strict=True)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name} leaf {i} has shape {np.shape(b)}, {ref_name} has {np.shape(a)}"
            )
        dtype = getattr(b, "dtype", None)
        if not same_dtype:
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} leaf {i} has dtype {dtype}, not a floating-point one")
            continue
        if dtype != a.dtype:
            raise ValueError(
                f"{name} leaf {i} has dtype {getattr(b, 'dtype', type(b))}, "
                f"{ref_name} has {a.dtype}"
            )


def float_vector(x: Any, name: str) -> None:
    """Raise unless ``x`` is a 1-D floating-point array (concrete entries also finite)."""
    if np.ndim(x) != 1:
        raise ValueError(f"{name} must be a 1-D array (n,), got shape {np.shape(x)}")
    finite_leaves(x, name)


def positive_float_or_traced(value: Any, name: str) -> Any:
    """``positive_float(value)`` for a concrete number; a tracer passes through unchanged."""
    return value if isinstance(value, jax.core.Tracer) else positive_float(value, name)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, raising unless it is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


_NOT_NUMBERS = (str, bytes, bool, np.bool_)  # float() reads them, but they are no numbers


def is_number(value: Any) -> bool:
    """An int or float (NumPy's too); a bool or a string such as ``"0.1"`` is not one."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def probe_count(value: Any, name: str = "num_probes") -> int:
    """Return ``value`` as an int, raising unless it is an integer ≥ 2 (a standard error)."""
    count = positive_int(value, name)
    if count < 2:
        raise ValueError(f"{name} must be ≥ 2 for a standard error")
    return count


def positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite number > 0 (not a string)."""
    if isinstance(value, _NOT_NUMBERS):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def open_unit_float(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a number in ``(0, 1)``.

    Python and numpy numbers (``np.float32(0.9)``) alike; strings, bytes and
    bools are refused.
    """
    try:
        out = positive_float(value, name)
    except ValueError:
        out = math.inf
    if not out < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return out


def subspace_dim(value: Any, n: int) -> int:
    """``d = value`` as an int, raising unless ``1 ≤ d < n`` (``M`` must be a proper subspace)."""
    d = positive_int(value, "d")
    if d >= n:
        raise ValueError(f"d={d} must be smaller than n={n}, the number of parameters")
    return d


def prng_key(key: Any, name: str = "key") -> jax.Array:
    """Raise unless ``key`` is one JAX PRNG key: typed of shape ``()``, or raw uint32[2].

    A batch of keys (``jax.random.split(key, 2)``) is refused: every consumer
    splits or folds one key.
    """
    if key is None:
        raise ValueError(f"{name} is required: pass a jax.random key")
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if np.shape(key) != ():
            raise ValueError(
                f"{name} must be a single jax.random key (shape ()), got a batch of keys of "
                f"shape {np.shape(key)}"
            )
        return key
    if dtype == jnp.uint32 and np.shape(key) == (2,):
        return key
    if dtype == jnp.uint32 and np.shape(key)[-1:] == (2,):
        raise ValueError(
            f"{name} must be a single jax.random key (raw: uint32[2]), got a batch of raw keys "
            f"of shape {np.shape(key)}"
        )
    raise ValueError(f"{name} must be a jax.random key, got {type(key).__name__}")


def tuple_arg(value: Any, name: str) -> tuple:
    """``value`` as a tuple of extra arguments (data); ``ValueError`` unless a tuple or list."""
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple, got {type(value).__name__}")
    return tuple(value)


def is_concrete(x: Any) -> bool:
    """A real array (not a tracer, nor a placeholder JAX puts in while unflattening)."""
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


# bfloat16 keeps 8 bits of mantissa, float16 11: a Fisher eigenvalue or a series
# coefficient 1e-3 of the largest rounds to zero, so the numbers would be wrong silently.
LOW_PRECISION = ("bfloat16", "float16")


def working_dtype(tree: Any, name: str) -> np.dtype:
    """The one floating dtype of ``tree``'s leaves; ``ValueError`` naming ``name`` for a
    leaf in bfloat16/float16 or for leaves of several floating dtypes."""
    leaves = floating_leaves(tree, name)
    names = [jnp.dtype(leaf.dtype).name for leaf in leaves]
    low = next((i for i, n in enumerate(names) if n in LOW_PRECISION), None)
    if low is not None:
        raise ValueError(
            f"{name} has a {names[low]} leaf (leaf {low}): geomcollapse measures in float32 or "
            f"float64 ({names[low]} rounds small eigenvalues and high-order terms to zero); "
            f"cast first: jax.tree.map(lambda a: a.astype(jnp.float32), {name})"
        )
    if len(set(names)) > 1:
        first = next(i for i, n in enumerate(names) if n != names[0])
        widest = max(names, key=lambda n: jnp.dtype(n).itemsize)
        raise ValueError(
            f"{name} mixes floating dtypes (leaf 0 is {names[0]}, leaf {first} is "
            f"{names[first]}): a vector of R^n has one dtype, and the narrower leaves would "
            f"round the whole measurement; cast to one: "
            f"jax.tree.map(lambda a: a.astype(jnp.{widest}), {name})"
        )
    return jnp.dtype(names[0])


def check_params(params: Any, name: str = "params") -> np.dtype:
    """The boundary check of ``θ*``: finite floating leaves (concrete ones) of one dtype,
    float32 or float64. Returns that dtype."""
    finite_leaves(params, name)
    return working_dtype(params, name)


def check_data(args: Any, name: str) -> tuple:
    """The boundary check of a loss's data: a tuple whose array leaves are non-empty and,
    where floating and concrete, finite; a warning when one leaf's leading (example) axis
    is 1 while another's is longer (JAX would broadcast it silently; a length that does
    not broadcast fails the loss's trace with a hint). Returns it as a tuple."""
    if not isinstance(args, (tuple, list)):
        raise ValueError(
            f"{name} must be a tuple of the function's extra arguments, got "
            f"{type(args).__name__} (wrap a single array as (array,))"
        )
    leaves = jax.tree_util.tree_leaves(tuple(args))
    for i, leaf in enumerate(leaves):
        if hasattr(leaf, "shape") and np.size(leaf) == 0:
            raise ValueError(
                f"{name} leaf {i} is empty (shape {tuple(np.shape(leaf))}): a mean over no "
                "examples is nan or 0 and measures nothing"
            )
    floating = [
        leaf
        for leaf in leaves
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    if floating:
        finite_leaves(floating, name)
    sizes = leading_axes(tuple(args))
    if 1 in sizes and max(sizes) > 1:  # the one shape mismatch that JAX broadcasts silently
        # one place and one registry: said once per message, however many layers check it
        warnings.warn_explicit(
            f"{name}: leaf {sizes.index(1)} has a leading axis of 1 while others have "
            f"{max(sizes)}: it broadcasts over the examples. If it should hold one entry per "
            "example, its length is wrong (an extra argument that is not per-example data "
            "is fine: filter geomcollapse.errors.BroadcastDataWarning)",
            BroadcastDataWarning,
            __file__,
            _CHECK_DATA_LINE,
            module=__name__,
            registry=_BROADCAST_SAID,
        )
    return tuple(args)


_CHECK_DATA_LINE = check_data.__code__.co_firstlineno
_BROADCAST_SAID: dict = {}  # warnings.warn_explicit's registry for check_data


def leading_axes(args: tuple) -> list[int]:
    """The leading sizes of ``args``' array leaves of rank ≥ 1 (their example axes)."""
    return [np.shape(a)[0] for a in jax.tree_util.tree_leaves(args) if np.ndim(a) >= 1]


def evaluate_abstractly(
    fn: Callable, args: tuple, name: str, call: str, data: tuple[str, tuple] | None = None
) -> Any:
    """``jax.eval_shape(fn, *args)``: the user's function traced once, nothing computed.

    Whatever it raises (a wrong feature size in the data, too few arguments, a
    missing key in ``params``) becomes one ``ValueError`` line naming ``name``
    and the ``call`` that failed, instead of a JAX traceback from deep inside
    the library; ``data = (data_name, data_args)``: the message also says when
    the data's leading (example) axes differ. The original is chained.
    """
    try:
        return jax.eval_shape(fn, *args)
    except Exception as err:  # any failure of a user function is reported in one line
        hint = ""
        if data is not None and len(set(leading_axes(data[1]))) > 1:
            hint = f" (the leading, example, axes of {data[0]} differ: {leading_axes(data[1])})"
        raise ValueError(
            f"{name}: calling {call} failed{hint}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}"
        ) from err


def scalar_loss(
    fn: Any, params: Any, args: tuple, name: str, call: str, data_name: str | None = None
) -> None:
    """Raise unless ``fn(params, *args)`` (``call`` in messages) runs and returns a
    floating scalar (traced once by ``jax.eval_shape``: nothing compiled or computed)."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
    data = None if data_name is None else (data_name, args)
    out = evaluate_abstractly(fn, (params, *args), name, call, data)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"{name} must return a floating scalar (e.g. the mean over the examples), got "
            f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}".rstrip()
        )


def not_psd(name: str, detail: str) -> str:
    """The message refusing an operator ``name`` that must be positive semidefinite."""
    return (
        f"{name} is not positive semidefinite at params ({detail}); a Fisher Jᵀ Λ J has "
        "no negative eigenvalue: check that it computes F v"
    )


def probe_operator(
    matvec: Callable, like: Any, name: str, *, psd: bool, key: jax.Array, symmetric: bool = False
) -> None:
    """Matvecs ``w = A v`` on Rademacher probes ``v`` shaped like ``like`` (drawn from ``key``):
    ``w`` finite and, with ``psd``, ``vᵀw ≥ −√eps·‖v‖‖w‖`` (for a diagonal ``A``
    ``vᵀAv = tr A``); with ``symmetric``, a second probe ``u`` and
    ``|uᵀAv − vᵀAu| ≤ 10√eps·(‖u‖‖Av‖ + ‖v‖‖Au‖)`` (an operator that is not symmetric
    gives Lanczos pairs that mean nothing) and homogeneity ``A(2v) = 2Av``
    (:func:`_check_linear`). Skipped when ``like`` or the output is traced."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if not all(is_concrete(x) for x in leaves):
        return
    draws = [_probe_vector(k, leaves) for k in jax.random.split(key, 2 if symmetric else 1)]
    outs = [jax.tree_util.tree_leaves(matvec(treedef.unflatten(v))) for v in draws]
    if not all(is_concrete(x) for w in outs for x in w):
        return
    v64 = [[np.asarray(x, np.float64) for x in v] for v in draws]
    w64 = [[np.asarray(x, np.float64) for x in w] for w in outs]
    if not all(np.all(np.isfinite(x)) for w in w64 for x in w):
        raise ValueError(
            f"{name} returned non-finite values (NaN or inf) on a probe vector at params"
        )
    # the coarser of the vectors' and the products' precision (float32 params, float64 F v)
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in [*draws[0], *outs[0]])
    if psd:
        q = _dot(v64[0], w64[0])
        if q < -math.sqrt(eps) * math.sqrt(_dot(v64[0], v64[0]) * _dot(w64[0], w64[0])):
            raise ValueError(not_psd(name, f"vᵀAv = {q:.3g} < 0 on a probe vector v"))
    if symmetric:
        (v, u), (av, au) = v64, w64
        gap = abs(_dot(u, av) - _dot(v, au))
        scale = math.sqrt(_dot(u, u) * _dot(av, av)) + math.sqrt(_dot(v, v) * _dot(au, au))
        if gap > 10 * math.sqrt(eps) * scale:
            raise NotSymmetricError(
                f"{name} is not symmetric at params: uᵀAv − vᵀAu = {gap:.3g} on two probe "
                f"vectors, against a scale {scale:.3g} (‖u‖‖Av‖ + ‖v‖‖Au‖); a Fisher or "
                "Hessian is symmetric: check that it computes A v"
            )
        _check_linear(matvec, treedef, draws, w64, name, eps)


def _check_linear(matvec: Callable, treedef: Any, draws: list, w64: list, name: str, eps: float):
    """Raise unless ``A(2v) = 2Av`` to ``10·eps·‖Av‖``: an affine ``v ↦ Av + c`` (a damping
    written ``+ λ`` for ``+ λv``) or a nonlinear map is refused (it can pass the symmetry
    test: ``F + c1ᵀ`` is symmetric when ``c`` is constant). Doubling is exact in floating
    point, so a linear program's rounding cancels here (a sum ``A(v − 2u)`` against
    ``Av − 2Au`` would not: a confident classifier's float32 Fisher rounds to 0.4 %)."""
    v, av = draws[0], w64[0]
    doubled = treedef.unflatten([2 * x for x in v])
    got = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(matvec(doubled))]
    gap = math.sqrt(sum(float(np.sum((g - 2 * w) ** 2)) for g, w in zip(got, av, strict=True)))
    scale = 2 * math.sqrt(_dot(av, av))
    if not gap <= 10 * eps * scale:
        raise ValueError(
            f"{name} is not linear at params: ‖A(2v) − 2Av‖ = {gap:.3g} on a probe vector, "
            f"against ‖2Av‖ = {scale:.3g}; it must compute A v (a damping is λ·v, not λ)"
        )


def _probe_vector(key: jax.Array, leaves: list) -> list:
    keys = jax.random.split(key, len(leaves))
    return [jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]


def _dot(a: list, b: list) -> float:
    return sum(float(np.vdot(x, y)) for x, y in zip(a, b, strict=True))


def finite_derivatives(name: str, **values: float) -> None:
    """Raise, naming the loss ``name``, unless every derivative in ``values`` is finite."""
    bad = [f"{k} = {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"{name} has non-finite derivatives at params ({', '.join(bad)}): check its "
            "data for NaN/inf and its value at params"
        )


def flat_loss(name: str, gradient_norm: float) -> str | None:
    """The warning for a loss whose gradient (hence ``Hg``) is exactly zero at ``θ*``, or
    ``None``: a zero ``γ`` and zero coefficients then say the loss is flat, not safe."""
    if gradient_norm != 0.0:
        return None
    return (
        f"{name}: its gradient and Hg are exactly zero at params, so γ = 0 and the forecast "
        "vanishes because the loss does not move θ, not because fine-tuning is safe; a loss "
        "built on argmax, a comparison or rounding has a zero gradient everywhere: use a "
        "differentiable one (e.g. cross-entropy)"
    )


def writable_directory(path: Any, name: str) -> Path:
    """``path`` as a ``Path`` to a directory that exists or can be created, and is writable.

    Checked by creating (and removing) a file there, before any work is done;
    nothing is left behind (a directory created for the check is removed).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: {path} cannot be created: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"{name}: {existing} is not writable ({err.strerror or err}); nothing was written"
        ) from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: {existing} is not writable; nothing was written")
    return path


def psd_spectrum(name: str, eigenvalues: Any, tail: float, margin: float) -> None:
    """Raise unless an operator's top ``eigenvalues`` and its tail mass ``tr A − Σλ_i``
    (known to within ``margin``: rounding plus standard errors, widened by ``√eps·Σ|λ_i|``)
    are those of a positive semidefinite ``A``; computed by the measurement anyway, so the
    check is free."""
    eps = float(jnp.finfo(jnp.result_type(eigenvalues)).eps)
    lam = np.asarray(jax.device_get(eigenvalues), np.float64)  # (d,), fetched explicitly
    top = float(np.max(np.abs(lam))) if lam.size else 0.0
    if lam.size and float(lam.min()) < -math.sqrt(eps) * top:
        raise ValueError(not_psd(name, f"eigenvalue {float(lam.min()):.3g} < 0"))
    margin = margin + math.sqrt(eps) * float(np.abs(lam).sum())  # a zero tail's rounding
    if tail < -margin:
        raise ValueError(
            not_psd(name, f"tail mass tr A − Σλ_i = {tail:.3g} < 0 beyond its error {margin:.2g}")
        )


def one_of(value: Any, choices: tuple, name: str) -> Any:
    """``value`` if it is one of ``choices``; ``ValueError`` naming ``name`` else."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def check_loss(fn: Any, params: Any, args: Any, name: str, data_name: str) -> tuple:
    """The boundary check of a loss and its data: :func:`check_data` on ``args``, then
    :func:`scalar_loss` of ``fn(params, *args)``. Returns ``args`` as a tuple."""
    args = check_data(args, data_name)
    scalar_loss(fn, params, args, name, f"{name}(params, *{data_name})", data_name)
    return args


def check_example_loss(fn: Any, params: Any, rows: tuple, name: str = "example_loss") -> None:
    """:func:`check_params`, then :func:`scalar_loss` of a per-example loss on one example
    (row 0 of every array of ``rows``)."""
    check_params(params)
    row = tuple(a[0] for a in rows)
    scalar_loss(fn, params, row, name, f"{name}(params, *row)")


def checked_aic(out: Any, fisher: str = "fisher_vp", loss: str = "loss_fn") -> Any:
    """An :class:`geomcollapse.aic.AICMeasurement`, checked on what it holds: finite
    derivatives of ``loss``, a positive semidefinite ``fisher`` (:func:`psd_spectrum`,
    within the tail's rounding and 4 standard errors), and a warning for a flat ``loss``."""
    finite_derivatives(loss, gradient=out.gradient_norm, coupling=out.report.coupling)
    top = np.asarray(jax.device_get(out.eigenpairs.values), np.float64)
    if not np.any(top != 0) and out.report.tail_mass == 0:
        raise ValueError(
            f"{fisher}: the skill Fisher vanishes at params (every eigenvalue found and the "
            "tail mass are 0): a zero matvec, or an empirical Fisher at a minimum of the loss "
            "it is built from (every per-example gradient is 0 there); use the true Fisher"
        )
    margin = out.tail_rounding + 4.0 * out.trace_stderr
    psd_spectrum(fisher, out.eigenpairs.values, out.report.tail_mass, margin)
    flat = flat_loss(loss, out.gradient_norm)
    if flat:
        warn_at_caller(flat, FlatLossWarning)
    return out


def check_fisher_at(params: Any, fisher_vp: Any, fisher_args: Any, key: jax.Array) -> None:
    """:func:`check_params` of ``θ*`` and, for a ``fisher_vp(params, v, *fisher_args)``
    (``None``: none), :func:`check_fisher_call` and probes at ``θ*``: finite, PSD, symmetric."""
    check_params(params)
    if fisher_vp is not None:
        fargs = check_fisher_call(params, fisher_vp, fisher_args)
        matvec = functools.partial(fisher_vp, params)
        probe_operator(
            lambda v: matvec(v, *fargs), params, "fisher_vp", psd=True, key=key, symmetric=True
        )


def check_fisher_call(params: Any, fisher_vp: Any, fisher_args: Any) -> tuple:
    """``fisher_vp`` callable, :func:`check_data` of ``fisher_args`` and ``fisher_vp(params,
    v, *fisher_args)`` traced once (nothing computed) to a pytree shaped like ``params``;
    one ``ValueError`` naming what to fix. Returns ``fisher_args`` as a tuple."""
    if not callable(fisher_vp):
        raise ValueError(f"fisher_vp must be callable, got {type(fisher_vp).__name__}")
    fargs = check_data(fisher_args, "fisher_args")
    call = "fisher_vp(params, v, *fisher_args)"
    out = evaluate_abstractly(
        fisher_vp, (params, params, *fargs), "fisher_vp", call, ("fisher_args", fargs)
    )
    same_structure(params, out, "params", "fisher_vp's output F v", same_dtype=False)
    return fargs
