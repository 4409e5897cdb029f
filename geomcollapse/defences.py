"""Defences against alignment collapse as optax gradient transformations (docs/theory.md §7).

Each factory returns an ``optax.GradientTransformation`` (``…ExtraArgs`` where
it takes a Fisher matvec) over any parameter pytree; states are NamedTuples,
everything jits. ``θ*`` is the ``params`` given to ``init``; transforms that
measure ``x = θ − θ*`` need ``params`` in ``update``.

Where a transform sits in an ``optax.chain`` matters (docs/theory.md §7):

- on the raw gradient, *before* the optimizer —
  ``optax.chain(defence, optax.sgd(lr))``: :func:`initial_orthogonalization`,
  :func:`fisher_penalty`, :func:`full_fisher_penalty` (they change the loss
  the optimizer sees), and :func:`project_out` / :func:`project_out_tracking`
  with SGD or momentum (linear in the gradient);
- on the final step, *after* the optimizer —
  ``optax.chain(optax.adam(lr), defence)``: :func:`fisher_budget` always (it
  bounds where the step lands), and :func:`project_out` with a per-coordinate
  optimizer such as Adam, whose rescaling would put an ``M`` component back.

Symbols follow docs/theory.md: ``M`` the top-``d`` eigenspace of the skill
Fisher ``F``, ``P = VᵀV`` with ``V`` the ``(d, n)`` basis, ``λ_i`` its
eigenvalues, ``g = ∇L``, ``δ`` an update in the chain (``θ ← θ + δ`` for the
final one). A Fisher matvec follows the library's convention
``fisher_vp(params, v, *fisher_args)`` with ``v`` like ``params``;
``fisher_args`` given to the factory can be replaced per call by
``update(..., fisher_args=(batch,))`` (keeps data out of jit's constants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from geomcollapse._checks import (
    finite_leaves,
    positive_float,
    positive_int,
    prng_key,
    subspace_dim,
    tuple_arg,
)
from geomcollapse.subspace import Subspace, fisher_product, subspace_arrays, warm_eigenpairs

__all__ = [
    "FisherBudgetState",
    "FisherPenaltyState",
    "InitialOrthogonalizationState",
    "ProjectOutState",
    "ProjectOutTrackingState",
    "fisher_budget",
    "fisher_penalty",
    "full_fisher_penalty",
    "initial_orthogonalization",
    "project_out",
    "project_out_tracking",
]

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=_HIGHEST)


def _remove(rows: jax.Array, u: jax.Array) -> jax.Array:
    """``(I − P) u`` for ``P = VᵀV``, ``V`` the ``(d, n)`` rows."""
    rows = rows.astype(u.dtype)
    return u - _dot(_dot(rows, u), rows)


def _theta_star(params: PyTree, n: int | None = None) -> jax.Array:
    """``θ*`` raveled, checked finite (and of size ``n`` when given)."""
    finite_leaves(params, "params")
    flat, _ = ravel_pytree(params)
    if n is not None and flat.size != n:
        raise ValueError(f"subspace basis has {n} parameters, params have {flat.size}")
    return flat


def _raveled(tree: PyTree, n: int, name: str) -> tuple[jax.Array, Callable]:
    """``ravel_pytree(tree)``; ``ValueError`` naming ``name`` unless it has the ``n``
    entries of the subspace's rows (else a bare shape error from inside the update)."""
    flat, unravel = ravel_pytree(tree)
    if flat.size != n:
        raise ValueError(f"{name} has {flat.size} entries, the subspace's basis rows have {n}")
    return flat, unravel


def _need_params(params: PyTree, name: str) -> None:
    if params is None:
        raise ValueError(
            f"{name} needs params in update: call update(updates, state, params) "
            "(θ − θ* is measured from them)"
        )


def _store_theta_star(state_type: type) -> Callable[[PyTree], Any]:
    """``init(params)`` of a transform whose state is ``state_type(θ* = params)``."""

    def init(params: PyTree):
        finite_leaves(params, "params")
        return state_type(params)

    return init


def _matvec_setup(params, theta_star, name: str, default_args: tuple, fisher_args):
    """``(fisher_args, x = θ − θ*)`` for the update of a Fisher-matvec transform ``name``."""
    _need_params(params, name)
    args = default_args if fisher_args is None else tuple_arg(fisher_args, "fisher_args")
    return args, jax.tree_util.tree_map(jnp.subtract, params, theta_star)


# --- 1. initial orthogonalisation -------------------------------------------------------


class InitialOrthogonalizationState(NamedTuple):
    """State of :func:`initial_orthogonalization`.

    Attributes:
      count: ``()`` int32, updates seen.
      correction: ``(n,)`` ``c = P g(θ*)``, the ``M`` part of the first gradient
        (zero before the first update).
    """

    count: jax.Array
    correction: jax.Array


def initial_orthogonalization(subspace: Subspace) -> optax.GradientTransformation:
    """Subtract ``c = P g(θ*)`` from every gradient: the optimizer follows ``L̃``.

    ``c`` is the ``M`` part of the first gradient seen (at count 0, taken at
    ``θ*``); afterwards each gradient becomes ``g(θ) − c = ∇L̃(θ)`` with
    ``L̃(θ) = L(θ) − ⟨P g(θ*), θ⟩``, whose gradient at ``θ*`` is orthogonal to
    ``M`` and whose Hessian is ``L``'s (docs/theory.md §5, §7). The first-order
    premise only: Thm 6.2's drift is left fully on. Place it on the raw gradient,
    ``optax.chain(initial_orthogonalization(s), optax.sgd(lr))``.

    Args:
      subspace: ``M(θ*)`` with a ``(d, n)`` (or pytree) basis.
    """
    _, rows = subspace_arrays(subspace, fisher_values=False)  # the basis alone

    def init(params: PyTree) -> InitialOrthogonalizationState:
        flat = _theta_star(params, rows.shape[1])
        return InitialOrthogonalizationState(jnp.zeros((), jnp.int32), jnp.zeros_like(flat))

    def update(updates: PyTree, state: InitialOrthogonalizationState, params: PyTree = None):
        del params
        g, unravel = _raveled(updates, rows.shape[1], "updates")
        r = rows.astype(g.dtype)
        first = _dot(_dot(r, g), r)
        c = jnp.where(state.count == 0, first, state.correction.astype(g.dtype))
        new_state = InitialOrthogonalizationState(
            optax.safe_int32_increment(state.count), c.astype(state.correction.dtype)
        )
        return unravel(g - c), new_state

    return optax.GradientTransformation(init, update)


# --- 2. static projection -----------------------------------------------------------------


class ProjectOutState(NamedTuple):
    """State of :func:`project_out` (nothing: ``M`` is fixed at construction)."""


def project_out(subspace: Subspace) -> optax.GradientTransformation:
    """Every update ``δ ← (I − P) δ`` with ``M = M(θ*)`` fixed.

    With SGD (or after any optimizer) ``P(θ_k − θ*) = 0`` for all ``k``: the
    projected loss of Thm 6.1 stays 0, while ``Δu`` can still grow through the
    tail of ``F`` and the rotation of ``M(θ)`` (docs/theory.md §7). Put it after
    a per-coordinate optimizer (``optax.chain(optax.adam(lr), project_out(s))``),
    whose rescaling would otherwise reintroduce an ``M`` component.

    Args:
      subspace: ``M(θ*)`` with a ``(d, n)`` (or pytree) basis.
    """
    _, rows = subspace_arrays(subspace, fisher_values=False)  # the basis alone

    def init(params: PyTree) -> ProjectOutState:
        _theta_star(params, rows.shape[1])
        return ProjectOutState()

    def update(updates: PyTree, state: ProjectOutState, params: PyTree = None):
        del params
        u, unravel = _raveled(updates, rows.shape[1], "updates")
        return unravel(_remove(rows, u)), state

    return optax.GradientTransformation(init, update)


# --- 3. projection out of a tracked M(θ) --------------------------------------------------


class ProjectOutTrackingState(NamedTuple):
    """State of :func:`project_out_tracking`.

    Attributes:
      count: ``()`` int32, updates seen.
      basis: ``(d, n)`` raveled rows of the current ``M(θ)`` (zero before the first refresh).
      values: ``(d,)`` its eigenvalues ``λ_1 ≥ … ≥ λ_d``.
      converged: ``()`` bool, the last refresh was certified by Lanczos.
      key: the PRNG key of the next refresh.
    """

    count: jax.Array
    basis: jax.Array
    values: jax.Array
    converged: jax.Array
    key: jax.Array


def project_out_tracking(
    fisher_vp: Callable[..., PyTree],
    d: int,
    refresh_every: int,
    *,
    key: jax.Array,
    fisher_args: tuple = (),
    tol: float | None = None,
    max_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Project every update out of ``M(θ)``, re-estimated every ``refresh_every`` steps.

    At counts ``0, r, 2r, …`` the top-``d`` eigenpairs of ``F(θ)`` at the
    current ``params`` are found by Lanczos inside ``jit``
    (:func:`geomcollapse.linalg.top_eigenpairs_traced`), started from
    ``Σ_i v_i`` of the previous basis plus a random unit vector (so a direction
    rotating into ``M`` is not missed); then ``δ ← (I − P(θ)) δ``. Follows the
    rotation of ``M`` that a static projection ignores (docs/theory.md §7); the
    tail and the part of ``M(θ)``'s motion between refreshes remain.

    Args:
      fisher_vp: ``fisher_vp(params, v, *fisher_args) -> F(params) v``.
      d: ``dim M`` (``1 ≤ d < n``).
      refresh_every: steps between re-estimates (``≥ 1``).
      key: PRNG key of the start vectors and Lanczos restarts.
      fisher_args: default extra arguments of ``fisher_vp`` (replace per call with
        ``update(..., fisher_args=...)``).
      tol, max_steps: passed to ``top_eigenpairs_traced`` (defaults: ``100·eps``,
        ``min(n, max(4d, 64))`` matvecs per refresh). ``state.converged`` says
        whether the last refresh met ``tol``.
    """
    fisher_vp = fisher_product(fisher_vp)
    d = positive_int(d, "d")
    refresh_every = positive_int(refresh_every, "refresh_every")
    key = prng_key(key)
    default_args = tuple_arg(fisher_args, "fisher_args")
    tol = None if tol is None else positive_float(tol, "tol")
    max_steps = None if max_steps is None else positive_int(max_steps, "max_steps")

    def init(params: PyTree) -> ProjectOutTrackingState:
        flat = _theta_star(params)
        subspace_dim(d, flat.size)
        return ProjectOutTrackingState(
            count=jnp.zeros((), jnp.int32),
            basis=jnp.zeros((d, flat.size), flat.dtype),
            values=jnp.zeros((d,), flat.dtype),
            converged=jnp.bool_(False),
            key=key,
        )

    def update(
        updates: PyTree,
        state: ProjectOutTrackingState,
        params: PyTree = None,
        *,
        fisher_args: tuple | None = None,
        **extra_args: Any,
    ):
        del extra_args
        _need_params(params, "project_out_tracking")
        args = default_args if fisher_args is None else tuple_arg(fisher_args, "fisher_args")
        u, unravel = ravel_pytree(updates)
        next_key, k_start, k_restart = jax.random.split(state.key, 3)

        def refresh():
            pairs = warm_eigenpairs(
                fisher_vp, params, args, state.basis, d, (k_start, k_restart), tol, max_steps
            )
            return pairs.vectors, pairs.values, pairs.certified

        def keep():
            return state.basis, state.values, state.converged

        basis, values, converged = jax.lax.cond(state.count % refresh_every == 0, refresh, keep)
        new_state = ProjectOutTrackingState(
            optax.safe_int32_increment(state.count), basis, values, converged, next_key
        )
        return unravel(_remove(basis, u)), new_state

    return optax.GradientTransformationExtraArgs(init, update)


# --- 4-5. Fisher penalties ---------------------------------------------------------------


class FisherPenaltyState(NamedTuple):
    """State of :func:`fisher_penalty` and :func:`full_fisher_penalty`.

    Attributes:
      theta_star: ``θ*``, the params given to ``init`` (``(n,)`` raveled for
        :func:`fisher_penalty`, the pytree for :func:`full_fisher_penalty`).
    """

    theta_star: PyTree


def fisher_penalty(subspace: Subspace, rho: float) -> optax.GradientTransformation:
    """Add the gradient of ``½ρ‖F^{1/2}P(θ − θ*)‖²``: ``g ← g + ρ Σ_i λ_i v_i⟨v_i, θ − θ*⟩``.

    That gradient is ``ρPFP(θ − θ*)`` (``P`` commutes with ``F``): two
    ``(d, n)`` products, no Fisher matvec (docs/theory.md §7); ``λ_i`` clipped
    at 0 as in :meth:`Subspace.projected_loss`. Place it on the raw gradient,
    ``optax.chain(fisher_penalty(s, rho), optax.sgd(lr))``.

    Args:
      subspace: ``M(θ*)``: ``(d,)`` values and a ``(d, n)`` (or pytree) basis.
      rho: penalty weight ``ρ > 0``.
    """
    values, rows = subspace_arrays(subspace)
    rho = positive_float(rho, "rho")
    weights = jnp.maximum(values, 0.0)

    def init(params: PyTree) -> FisherPenaltyState:
        return FisherPenaltyState(_theta_star(params, rows.shape[1]))

    def update(updates: PyTree, state: FisherPenaltyState, params: PyTree = None):
        _need_params(params, "fisher_penalty")
        g, unravel = _raveled(updates, state.theta_star.size, "updates")
        x = _raveled(params, state.theta_star.size, "params")[0] - state.theta_star
        r = rows.astype(g.dtype)
        pull = _dot(weights.astype(g.dtype) * _dot(r, x.astype(g.dtype)), r)
        return unravel(g + rho * pull), state

    return optax.GradientTransformation(init, update)


def full_fisher_penalty(
    fisher_vp: Callable[..., PyTree], rho: float, *, fisher_args: tuple = ()
) -> optax.GradientTransformationExtraArgs:
    """Add the gradient of ``½ρ(θ − θ*)ᵀF(θ*)(θ − θ*)``: ``g ← g + ρF(θ*)(θ − θ*)``.

    EWC-style: the whole Fisher at ``θ*`` (``M`` and its tail), one matvec per
    step. Place it on the raw gradient, ``optax.chain(full_fisher_penalty(…), optax.sgd(lr))``.

    Args:
      fisher_vp: ``fisher_vp(params, v, *fisher_args) -> F(params) v``; evaluated at ``θ*``.
      rho: penalty weight ``ρ > 0``.
      fisher_args: default extra arguments of ``fisher_vp`` (replace per call with
        ``update(..., fisher_args=...)``).
    """
    fisher_vp = fisher_product(fisher_vp)
    rho = positive_float(rho, "rho")
    default_args = tuple_arg(fisher_args, "fisher_args")

    init = _store_theta_star(FisherPenaltyState)

    def update(
        updates: PyTree,
        state: FisherPenaltyState,
        params: PyTree = None,
        *,
        fisher_args: tuple | None = None,
        **extra_args: Any,
    ):
        del extra_args
        args, x = _matvec_setup(
            params, state.theta_star, "full_fisher_penalty", default_args, fisher_args
        )
        fx = fisher_vp(state.theta_star, x, *args)
        out = jax.tree_util.tree_map(lambda g, f: g + rho * f.astype(g.dtype), updates, fx)
        return out, state

    return optax.GradientTransformationExtraArgs(init, update)


# --- 6. Fisher budget ----------------------------------------------------------------------


class FisherBudgetState(NamedTuple):
    """State of :func:`fisher_budget`.

    Attributes:
      theta_star: ``θ*``, the params given to ``init`` (a pytree).
    """

    theta_star: PyTree


def fisher_budget(
    fisher_vp: Callable[..., PyTree], budget: float, *, fisher_args: tuple = ()
) -> optax.GradientTransformationExtraArgs:
    """Keep the local model of ``Δu``, ``q(x) = ½xᵀF(θ*)x``, within ``budget`` (x = θ − θ*).

    A trust region of the skill's quadratic model (Thm 6.1 with the whole
    Fisher, tail included; docs/theory.md §7). Acts on the *final* step ``δ``
    (``θ ← θ + δ``), so place it last: ``optax.chain(optax.sgd(lr), fisher_budget(…))``.
    With ``w = F x``, the normal of the level set of ``q`` through ``x``:

    1. if ``q(x + δ) ≤ budget``, ``δ`` passes unchanged;
    2. else the endpoint moves along the normal onto the boundary,
       ``δ ← δ − a w`` with ``a`` the root nearest 0 of ``q(x + δ − a w) = budget``;
    3. if that line misses the ellipsoid ``q ≤ budget`` (a step large against
       the budget), the step's outward part is removed first,
       ``v = δ − max(0, ⟨w, δ⟩)/‖w‖² · w``, and ``v`` is shortened to ``s v``,
       ``s ∈ (0, 1]`` the largest (by bisection) for which rule 1 or 2 applies to it;
    4. started outside the budget with no such ``s``: ``x + δ`` is pulled back
       along the ray from ``θ*`` onto ``q = budget``.

    On the boundary the step never increases ``q`` to first order, directions
    ``F`` does not see are never shrunk (rules 1-2), and for steps small against
    the budget rule 3 never fires. ``q(θ_{k+1} − θ*) ≤ budget`` after every
    step to rounding. Three Fisher matvecs at ``θ*`` per step (``F x``, ``F δ``,
    ``F w``); ``q`` is a quadratic in the step on ``span{x, δ, w}``, so rules 2-3
    are scalar algebra.

    Args:
      fisher_vp: ``fisher_vp(params, v, *fisher_args) -> F(params) v``; evaluated at ``θ*``.
      budget: the allowed ``q``, ``> 0`` (in ``Δu``'s units).
      fisher_args: default extra arguments of ``fisher_vp`` (replace per call with
        ``update(..., fisher_args=...)``).
    """
    fisher_vp = fisher_product(fisher_vp)
    budget = positive_float(budget, "budget")
    default_args = tuple_arg(fisher_args, "fisher_args")

    init = _store_theta_star(FisherBudgetState)

    def update(
        updates: PyTree,
        state: FisherBudgetState,
        params: PyTree = None,
        *,
        fisher_args: tuple | None = None,
        **extra_args: Any,
    ):
        del extra_args
        theta_star = state.theta_star
        args, x_tree = _matvec_setup(params, theta_star, "fisher_budget", default_args, fisher_args)
        x, unravel_x = ravel_pytree(x_tree)
        u0, unravel = ravel_pytree(updates)
        u = u0.astype(x.dtype)

        def fisher(v: jax.Array) -> jax.Array:
            out = ravel_pytree(fisher_vp(theta_star, unravel_x(v), *args))[0]
            if out.shape != v.shape:
                raise ValueError(
                    f"fisher_vp returned {out.size} entries for a vector of {v.size} (F v has "
                    "the shape of v: a pytree like params)"
                )
            return out

        return unravel(_budget_step(x, u, fisher, budget).astype(u0.dtype)), state

    return optax.GradientTransformationExtraArgs(init, update)


def _budget_step(
    x: jax.Array, u: jax.Array, fisher: Callable[[jax.Array], jax.Array], budget: float
) -> jax.Array:
    """:func:`fisher_budget`'s rules 1-4 on the step ``u`` from ``x = θ − θ*`` (raveled)."""
    w, fu = fisher(x), fisher(u)
    fw = fisher(w)
    q, ww, e = 0.5 * _dot(x, w), _dot(w, w), _dot(w, fw)
    landing = _BudgetLanding(q - budget, ww, e)

    # rule 1-2 on u; rule 3 on the cut step v
    coef_u = landing.coefficients(x, u, fu, w)
    outward = jnp.maximum(_dot(w, u), 0.0) / jnp.where(ww > 0, ww, 1.0)
    v, fv = u - outward * w, fu - outward * fw
    coef_v = landing.coefficients(x, v, fv, w)
    s = landing.longest(coef_v)
    use_u = landing.feasible(coef_u, 1.0)
    use_v = landing.feasible(coef_v, s)
    step_u = u - landing.retraction(coef_u, 1.0) * w
    step_v = s * v - landing.retraction(coef_v, s) * w
    excess_u = landing.excess(coef_u, 1.0)
    ray = jnp.sqrt(budget / jnp.where(excess_u > 0, excess_u + budget, 1.0))
    step = jnp.where(use_u, step_u, jnp.where(use_v, step_v, ray * (x + u) - x))
    # a non-finite Fisher product makes every rule False and the ray a finite pull
    # towards θ*: propagate it instead, so a NaN Fisher shows as NaN parameters (read off
    # scalars the rules computed anyway: NaN in w, Fu or Fw reaches each of them)
    finite = jnp.isfinite(q + ww + e + coef_u[0] + coef_u[1] + coef_u[2])
    return jnp.where(finite, step, jnp.nan)


class _BudgetLanding(NamedTuple):
    """``q`` on ``x + s v − a w`` as scalars, for :func:`fisher_budget`.

    With ``c₀ = q(x) − budget``, ``‖w‖²`` and ``E = ⟨w, Fw⟩``, a candidate step
    ``v`` enters through ``(⟨x, Fv⟩, ⟨v, Fv⟩, ⟨w, Fv⟩)``:
    ``q(x + s v) − budget = c₀ + s⟨x, Fv⟩ + ½s²⟨v, Fv⟩`` (the excess) and
    ``q(x + s v − a w) − budget = excess − a b + ½a² E``, ``b = ‖w‖² + s⟨w, Fv⟩``.
    """

    excess0: jax.Array
    ww: jax.Array
    e: jax.Array

    def coefficients(self, x, v, fv, w) -> tuple[jax.Array, jax.Array, jax.Array]:
        return _dot(x, fv), _dot(v, fv), _dot(w, fv)

    def excess(self, coef, s):
        xfv, vfv, _ = coef
        return self.excess0 + s * xfv + 0.5 * s * s * vfv

    def _b_disc(self, coef, s):
        b = self.ww + s * coef[2]
        return b, b * b - 2.0 * self.e * self.excess(coef, s)

    def feasible(self, coef, s):
        """``x + s v`` is within budget, or the normal line through it meets the boundary."""
        _, disc = self._b_disc(coef, s)
        return (self.excess(coef, s) <= 0) | ((self.e > 0) & (disc >= 0))

    def retraction(self, coef, s):
        """``a``, the root nearest 0 of ``excess − a b + ½a²E = 0`` (0 when within budget)."""
        excess = self.excess(coef, s)
        b, disc = self._b_disc(coef, s)
        move = (excess > 0) & (self.e > 0) & (disc >= 0)
        # cancellation-free 2c / (b + sign(b)√(b² − 2cE)); b ≠ 0 whenever disc ≥ 0 and c > 0
        root = jnp.sqrt(jnp.where(move, disc, 0.0))
        denom = b + jnp.where(b >= 0, root, -root)
        return jnp.where(move, 2.0 * excess / jnp.where(move, denom, 1.0), 0.0)

    def longest(self, coef, iterations: int = 60):
        """The largest ``s ∈ [0, 1]`` found by bisection with ``feasible(s)`` (1 if feasible)."""

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            ok = self.feasible(coef, mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        zero = jnp.zeros((), self.excess0.dtype)
        lo, _ = jax.lax.fori_loop(0, iterations, halve, (zero, zero + 1.0))
        return jnp.where(self.feasible(coef, 1.0), 1.0, lo)
