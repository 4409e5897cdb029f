"""One linear-operator type: a symmetric ``v ↦ A v`` on a parameter pytree, as a pytree.

Every curvature factory of :mod:`geomcollapse.curvature` returns a
:class:`VectorProduct` (still called ``fvp(params, v, *args)``), whose
``bind(params, *args)`` is a :class:`LinearOperator`; a user's own function
enters once, through :func:`as_operator`. The operator is a frozen dataclass
registered as a pytree: the function is static (it keys ``jax.jit``'s cache),
the parameters and data are leaves (traced arguments, never constants folded
into the program), and the vectors' structure (shapes, dtypes and, on a device
mesh, shardings) is static too. So ``jax.jit(f)(op, v)`` compiles once per
function and shapes, and no hand-made hash cache is needed.

Why our own type and not lineax's ``FunctionLinearOperator`` or an
``equinox.Module``: measured by ``benchmarks/operator_overhead.py``
(docs/benchmarks.md, "One operator type"): the same dispatch as the raw jitted
function, no retrace when rebuilt at new parameters, and the cheapest to build.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np

from geomcollapse._sharding import one_device, stack_combine, stack_dot, uncommitted

PyTree = Any


class Leaf(NamedTuple):
    """One leaf of a :class:`Space`: shape, dtype and the sharding (``None`` on one device)."""

    shape: tuple
    dtype: np.dtype
    sharding: Any = None


class Space(NamedTuple):
    """The static structure of an operator's vectors: a treedef and one :class:`Leaf` per leaf.

    ``leaves[i].sharding`` is the leaf's ``NamedSharding`` when the example
    vector was spread over several devices, else ``None``. Hashable.
    """

    treedef: Any
    leaves: tuple

    @property
    def n(self) -> int:
        """Total number of scalars."""
        return int(sum(int(np.prod(s.shape, dtype=np.int64)) for s in self.leaves))

    @property
    def dtype(self) -> np.dtype:
        """The common (promoted) dtype of the leaves."""
        return jnp.result_type(*(s.dtype for s in self.leaves))

    @property
    def sharded(self) -> bool:
        """Whether the vectors are laid out over a device mesh."""
        return any(s.sharding is not None for s in self.leaves)

    def shapes(self) -> PyTree:
        """The vectors as a pytree of ``jax.ShapeDtypeStruct`` (for ``jax.eval_shape``)."""
        structs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding) for s in self.leaves]
        return jax.tree_util.tree_unflatten(self.treedef, structs)


def space_of(like: PyTree) -> Space:
    """The :class:`Space` of vectors like ``like`` (arrays, tracers or ``ShapeDtypeStruct``)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out = []
    for leaf in leaves:
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        spread = (
            isinstance(leaf, jax.Array)
            and not isinstance(leaf, jax.core.Tracer)
            and len(leaf.sharding.device_set) > 1
        )
        out.append(Leaf(tuple(np.shape(leaf)), dtype, leaf.sharding if spread else None))
    return Space(treedef, tuple(out))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class LinearOperator:
    """A symmetric linear operator ``v ↦ fn(params, v, *args)`` on vectors of one :class:`Space`.

    Attributes:
      fn: static, hashable; ``fn(params, v, *args) -> A v`` with ``A v`` like ``v``.
      params: pytree leaves: the point at which ``A`` is taken (``None`` for a
        plain ``v ↦ A v``).
      args: tuple of pytree leaves: the data.
      space: static :class:`Space` of ``v`` and ``A v`` (shapes, dtypes, shardings).

    Calling ``op(v)`` applies it (traceable; no jit inside); :func:`apply` is
    the compiled form. On sharded vectors the output is constrained to their
    layout (a reduce-scatter, not a replicated result). docs/library.md "Operators".
    """

    fn: Callable = dataclasses.field(metadata={"static": True})
    params: PyTree
    args: tuple
    space: Space = dataclasses.field(metadata={"static": True})

    def __repr__(self) -> str:  # never the arrays: printing one would fetch it to the host
        return f"LinearOperator({_name(self.fn)}, n={self.n}, dtype={self.dtype})"

    def __call__(self, v: PyTree) -> PyTree:
        out = self.fn(self.params, v, *self.args)
        if self.space.sharded:
            shardings = [s.sharding for s in self.space.leaves]
            out = jax.lax.with_sharding_constraint(
                out, jax.tree_util.tree_unflatten(self.space.treedef, shardings)
            )
        return out

    @property
    def n(self) -> int:
        """The dimension (scalars in one vector)."""
        return self.space.n

    @property
    def dtype(self) -> np.dtype:
        """The vectors' (promoted) dtype."""
        return self.space.dtype

    def at(self, params: PyTree) -> LinearOperator:
        """The same operator (function, data) taken at new ``params`` of the same structure."""
        if self.params is None:
            raise ValueError("params: a plain v ↦ Av operator has no parameters to replace")
        if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(self.params):
            raise ValueError("params must have the structure of the operator's params")
        return dataclasses.replace(self, params=params)

    def raveled(self) -> LinearOperator:
        """The same operator on flat ``(n,)`` vectors (``ravel_pytree`` order and dtype)."""
        bare = self.space.treedef == jax.tree_util.tree_structure(0)  # not {"w": v}
        if bare and len(self.space.leaves[0].shape) == 1:
            return self
        flat = Space(jax.tree_util.tree_structure(0), (Leaf((self.n,), np.dtype(self.dtype)),))
        return LinearOperator(_Raveled(self.fn, self.space), self.params, self.args, flat)


def _name(fn: Any) -> str:
    """A short, array-free name for a function (reprs must not fetch arrays to the host)."""
    if isinstance(fn, (VectorProduct, _Raveled, _Traced)):
        return f"{type(fn).__name__}({_name(fn.fn)})"
    return getattr(fn, "__qualname__", type(fn).__name__)


def _unravel(space: Space, x: jax.Array) -> PyTree:
    sizes = [int(np.prod(s.shape, dtype=np.int64)) for s in space.leaves]
    offsets = np.cumsum((0, *sizes))
    leaves = [
        x[offsets[i] : offsets[i + 1]].reshape(s.shape).astype(s.dtype)
        for i, s in enumerate(space.leaves)
    ]
    return jax.tree_util.tree_unflatten(space.treedef, leaves)


def _ravel(tree: PyTree, dtype) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree_util.tree_leaves(tree)])


@dataclasses.dataclass(frozen=True, repr=False)
class _Raveled:
    """``(params, x, *args) ↦ ravel(fn(params, unravel(x), *args))``; equal by ``fn``, ``space``."""

    fn: Callable
    space: Space

    def __call__(self, params: PyTree, x: jax.Array, *args: Any) -> jax.Array:
        return _ravel(self.fn(params, _unravel(self.space, x), *args), x.dtype)


class _Traced:
    """A user's plain ``(v, *args) ↦ A v``, traced once: its program, its captured arrays as data.

    Called as ``(None, v, args, captured)``: the arrays ``fn`` closes over (not
    those of a ``jax.jit`` inside it, which stay its constants) enter ``jax.jit``
    as arguments, not as constants folded into the program (weights closed over
    spent 26 of 41 s of a compile in XLA constant folding on a 1,068,810-parameter
    MLP). Equal by ``fn`` and the shapes it was traced at, like ``jax.jit``'s own
    cache: the same ``fn`` reuses one compiled program.
    """

    def __init__(self, fn: Callable, jaxpr: Any, out_tree: Any, shapes: tuple):
        self.fn, self.jaxpr, self.out_tree = fn, jaxpr, out_tree
        self.key = (keyed(fn), shapes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Traced) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __call__(self, params: None, v: PyTree, args: tuple, captured: tuple) -> PyTree:
        leaves = jax.tree_util.tree_leaves((v, *args))
        out = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(self.jaxpr, list(captured)))(*leaves)
        return jax.tree_util.tree_unflatten(self.out_tree, out)


def _traced_operator(fn: Callable, like: PyTree, args: tuple, name: str) -> LinearOperator:
    """A plain ``fn(v, *args)`` as a :class:`LinearOperator` through :class:`_Traced`."""
    space = space_of(like)
    try:
        closed, out = jax.make_jaxpr(fn, return_shape=True)(space.shapes(), *args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} cannot be applied to a vector like `like`: {err}") from err
    captured = tuple(closed.consts)
    shapes = tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((args, captured)))
    traced = _Traced(fn, closed.jaxpr, jax.tree_util.tree_structure(out), (space, shapes))
    return LinearOperator(traced, None, (tuple(args), captured), space)


class _ByIdentity:
    """A static stand-in for an unhashable callable (a module holding arrays): equal to itself."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def keyed(fn: Callable) -> Callable:
    """``fn`` usable as a static ``jax.jit`` argument: itself if hashable, else wrapped by identity.

    An unhashable ``fn`` then compiles once per call of ``keyed`` (its arrays
    are constants of that program); make it hashable to share compilations.
    """
    try:
        hash(fn)
    except TypeError:
        return _ByIdentity(fn)
    return fn


def linear_operator(fn: Callable[..., PyTree], params: PyTree, *args: Any, like: PyTree = None):
    """The :class:`LinearOperator` ``v ↦ fn(params, v, *args)`` on vectors like ``like``.

    ``like`` defaults to ``params``.

    Trusted constructor (no probe): used by :meth:`VectorProduct.bind`; a
    user's function goes through :func:`as_operator`. Works on tracers (inside jit).
    """
    space = space_of(params if like is None else like)
    return LinearOperator(keyed(fn), params, tuple(args), space)


def apply(op: LinearOperator, v: PyTree) -> PyTree:
    """``op(v)``, compiled once per operator function and shapes (new params and data reuse it).

    A ``v`` that is not committed (built from numpy, drawn at random) is committed
    where ``op``'s arrays are, when they are on one device: it and the next ones
    (outputs, committed) would otherwise compile the same program twice.
    """
    if uncommitted(v):
        placed = one_device(op)
        v = v if placed is None else jax.device_put(v, placed)
    return _apply(op, v)


@jax.jit
def _apply(op: LinearOperator, v: PyTree) -> PyTree:
    return op(v)


def host_matvec(matvec: Any, like: PyTree) -> Callable[[PyTree], PyTree]:
    """For host-driven solvers: ``matvec`` as a compiled ``v ↦ A v`` on vectors like ``like``.

    A plain ``v ↦ A v`` is wrapped once here (:func:`as_operator`, its output
    checked on a probe); a :class:`LinearOperator` on a pytree is raveled
    against a 1-D ``like``. Its vectors must be like ``like`` (structure,
    shapes, dtypes), else ``ValueError`` naming ``matvec``.
    """
    op = matvec
    if isinstance(op, LinearOperator) and isinstance(like, (jax.Array, np.ndarray)):
        op = op.raveled() if np.ndim(like) == 1 else op
    op = as_operator(op, like, name="matvec")
    return lambda v: apply(op, v)  # v committed where op's arrays are (apply)


def flat_matvec(matvec: Any) -> Callable[[jax.Array], jax.Array]:
    """For traced solvers on ``(n,)`` vectors: a :class:`LinearOperator` raveled, else as given."""
    if isinstance(matvec, LinearOperator):
        return matvec.raveled()
    return matvec


@dataclasses.dataclass(frozen=True, repr=False)
class VectorProduct:
    """A curvature matvec ``fvp(params, v, *args) -> A v`` binding into a :class:`LinearOperator`.

    What every factory returns (:func:`hessian_vp`, :func:`ggn_vp`,
    :func:`fisher_vp`, :func:`empirical_fisher_vp`, :func:`block_diagonal`):
    called as before, or ``fvp.bind(params, *args)`` for the operator at
    ``params``. Equal and hashed by ``key`` (the factory and its inputs, e.g.
    ``('fisher_vp', logits_fn)``; default the function itself), so two calls
    of a factory on the same function are one program to ``jax.jit``.
    """

    fn: Callable[..., PyTree] = dataclasses.field(compare=False)
    key: Any = None

    def __post_init__(self):
        try:
            hash(self.key)
        except TypeError:  # inputs that cannot be hashed: equal only to itself
            object.__setattr__(self, "key", None)
        if self.key is None:  # equal only to a product of the same function
            object.__setattr__(self, "key", self.fn)

    def __repr__(self) -> str:  # jax.jit(fvp) calls str(fvp): never print the key's arrays
        return f"VectorProduct({_name(self.fn)})"

    def __call__(self, params: PyTree, v: PyTree, *args: Any) -> PyTree:
        return self.fn(params, v, *args)

    def bind(self, params: PyTree, *args: Any) -> LinearOperator:
        """The operator ``v ↦ self(params, v, *args)`` on vectors like ``params``."""
        return linear_operator(self, params, *args)


def _signature(space: Space) -> tuple:
    return space.treedef, tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in space.leaves)


def _call(op: LinearOperator, v: PyTree) -> PyTree:
    return op(v)


def _check_output(op: LinearOperator, name: str) -> None:
    """Probe ``op`` once by ``jax.eval_shape``: its output must be like its input."""
    try:
        out = jax.eval_shape(_call, op, op.space.shapes())  # cached per function and shapes
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} cannot be applied to a vector like `like`: {err}") from err
    leaves, treedef = jax.tree_util.tree_flatten(out)
    expected = [(s.shape, jnp.dtype(s.dtype)) for s in op.space.leaves]
    got = [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]
    if treedef != op.space.treedef or got != expected:
        raise ValueError(
            f"{name} must return a vector like its input (structure, shapes, dtypes): "
            f"expected {expected} in {op.space.treedef}, got {got} in {treedef}"
        )


def as_operator(
    fn: Any,
    like: PyTree = None,
    *,
    params: PyTree = None,
    args: tuple = (),
    name: str = "fn",
) -> LinearOperator:
    """A user's matvec as a :class:`LinearOperator`, checked once here (the library's boundary).

    Args:
      fn: a :class:`LinearOperator` (returned as is, after the structure
        check against ``like``); with ``params``: ``fn(params, v, *args) -> A v``
        (the factories' form); without: a plain ``fn(v, *args) -> A v``.
      like: example vector (arrays or ``jax.ShapeDtypeStruct``), default ``params``.
      params: the point at which ``A`` is taken (leaves of the operator).
      args: data (leaves of the operator).
      name: the argument's name in error messages.

    Returns:
      The operator; its output structure was checked on a probe by ``jax.eval_shape``.

    Raises:
      ValueError: naming ``name``: not callable, no ``like`` for a plain matvec,
        an output unlike the input (structure, shapes, dtypes), or a call that fails.
    """
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"args must be a tuple, got {type(args).__name__}")
    if isinstance(fn, LinearOperator):
        if like is not None and _signature(space_of(like)) != _signature(fn.space):
            raise ValueError(f"{name} acts on vectors unlike `like` (structure, shapes, dtypes)")
        return fn
    if not callable(fn):
        raise ValueError(f"{name} must be callable or a LinearOperator, got {type(fn).__name__}")
    if params is None and like is None:
        raise ValueError(f"like is required to wrap a plain matvec {name}(v)")
    if params is None:
        op = _traced_operator(fn, like, tuple(args), name)
    else:
        op = linear_operator(fn, params, *args, like=like)
    _check_output(op, name)
    return op


def _deflated_mv(parts: tuple, v: PyTree) -> PyTree:
    op, basis = parts
    flat = isinstance(basis, jax.Array) and basis.ndim == 2 and isinstance(v, jax.Array)

    def project_out(x):
        if flat:
            return x - (basis @ x) @ basis
        return jax.tree_util.tree_map(jnp.subtract, x, stack_combine(stack_dot(basis, x), basis))

    return project_out(op(project_out(v)))


def deflated(op: LinearOperator, basis: PyTree) -> LinearOperator:
    """``(I − P) A (I − P)``, ``P`` the projector on orthonormal ``basis`` rows (a leaf).

    ``basis``: ``(d, n)`` for flat vectors, else a pytree like the vectors with a
    leading ``d`` axis. Same space as ``op``; its trace is the tail mass
    ``tr A − Σ_{i≤d} λ_i`` when ``basis`` holds ``A``'s top eigenvectors
    (docs/theory.md §5).
    """
    if not isinstance(op, LinearOperator):
        raise ValueError(f"op must be a LinearOperator, got {type(op).__name__}")
    return LinearOperator(_deflated_mv, (op, basis), (), op.space)
