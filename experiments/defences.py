"""Do the defences of ``geomcollapse.defences`` stop alignment collapse? (docs/defences.md).

From the aligned transformer ``θ*``: every dataset of the study is fine-tuned
with no defence and under each defence at three strengths
(``initial_orthogonalization``, ``project_out``, ``project_out_tracking``,
``fisher_penalty``, ``full_fisher_penalty``, ``fisher_budget``;
docs/theory.md §7.1), with SGD and AdamW, over seeds; all datasets × seeds of
one (defence, strength, optimizer) vmapped in one compiled scan, the
defence's state included. At each horizon ``K``: harmfulness, task accuracy,
the KL ``Δu`` and its channels (the M-part ``½‖F^{1/2}Px‖²``, the tail of
``F`` and the rest ``Δu − ½xᵀFx``); at the last ``K`` the rotation of ``M``
(seed 0) and each defence's cost per step. Along the way, the quartic onset
that initial orthogonalisation leaves on (Thm 6.2 with ``P g̃(θ*) = 0``).
The rows (a)-(e) and their thresholds are pre-registered in docs/defences.md.

Run: ``python -m experiments.defences [--quick | --full]``; the full study on
``tiny`` is the sweep ``geomcollapse sweep sweeps/defences_tiny.json``
(``geomcollapse report`` rebuilds its table, figure and claims from the rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from experiments import _style as style
from experiments import prediction as P
from experiments._common import (
    ROOT,
    THETA_FIELD,
    Claim,
    check_fields,
    committed_sweep_rows,
    conclude,
    one_theta,
    stamp,
)
from experiments._transformer import ALIGNMENT, theta_digest
from geomcollapse import aic, curvature, flow, tasks, theory, training
from geomcollapse import defences as transforms
from geomcollapse.linalg import top_eigenpairs_traced
from geomcollapse.progress import progress_bar
from geomcollapse.subspace import Subspace

NAME = "defences"
# every row of one sweep records one θ* (the runner refuses rows of another: docs/sweeps.md)
SWEEP_INVARIANTS = (THETA_FIELD,)

DATASETS = (
    "always_answer",
    "compliance_clean",
    "lookalike",
    "lookalike_75",
    "shift",
    "shift_50",
    "delimited_copy",
    "label_noise_100",
)
DEFENCES = (
    "none",
    "initial_orthogonalization",
    "project_out",
    "project_out_tracking",
    "fisher_penalty",
    "full_fisher_penalty",
    "fisher_budget",
)
FIRST_ORDER = ("initial_orthogonalization", "project_out")
CURVATURE_AWARE = ("project_out_tracking", "fisher_budget")
OPTIMIZERS = ("sgd", "adamw")
SYMBOL = {  # the strength's symbol per defence (docs/defences.md)
    "none": "",
    "initial_orthogonalization": "d",
    "project_out": "d",
    "project_out_tracking": "r",
    "fisher_penalty": "ρ",
    "full_fisher_penalty": "ρ",
    "fisher_budget": "β",
}
SHORT = {  # legend labels
    "initial_orthogonalization": "initial orth.",
    "project_out": "static projection",
    "project_out_tracking": "tracked projection",
    "fisher_penalty": "M penalty",
    "full_fisher_penalty": "full penalty",
    "fisher_budget": "Fisher budget",
}
FIELDS = ("tokens", "targets", "mask")


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen study configuration (defaults: the pre-registered study, ``tiny`` model)."""

    size: str = "tiny"
    datasets: tuple[str, ...] = DATASETS
    defences: tuple[str, ...] = DEFENCES
    optimizers: tuple[str, ...] = OPTIMIZERS
    seeds: tuple[int, ...] = (0, 1, 2)
    horizons: tuple[int, ...] = (16, 64, 256)
    static_dims: tuple[int, ...] = (10, 50, 200)  # initial_orthogonalization, project_out
    primary_dim: int = 10  # the static d of rows (a) and (b)
    tracking_d: int = 10
    refresh_every: tuple[int, ...] = (64, 16, 4)
    penalty_d: int = 50
    sgd_rhos: tuple[float, ...] = (0.1, 0.3, 0.8)
    adamw_rhos: tuple[float, ...] = (1.0, 10.0, 100.0)
    budgets: tuple[float, ...] = (0.1, 0.03, 0.01)
    sgd_lr: float = 0.03
    adamw_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    num_examples: int = 4000
    num_eval: int = 300
    num_prompts: int = 256
    angle_dim: int = 10
    angle_datasets: int = 8  # seed-0 runs (the first datasets) whose rotation of M is measured
    angle_tol: float = 1e-6
    angle_steps: int = 128
    timing_repeats: int = 3
    quartic_datasets: int = 8
    quartic_examples: int = 256
    quartic_lrs: tuple[float, ...] = (1e-4, 1e-5)  # the first is row (d)'s; the rest reported
    quartic_steps: int = 16
    quartic_check_step: int = 4
    quartic_tolerance: float = 0.05
    harm_ratio: float = 0.5
    accuracy_loss: float = 0.05
    harm_floor: float = 0.1
    dataset_share: float = 0.75
    key_seed: int = 14  # data, skill prompts and M as in the Table 1 study; Lanczos starts

    def __post_init__(self):
        def subset(field, allowed):
            values = getattr(self, field)
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) != len(values):
                raise ValueError(f"{field} must be distinct members of {allowed}, got {values}")

        subset("datasets", tuple(tasks.DATASET_FAMILY))
        subset("defences", DEFENCES)
        subset("optimizers", OPTIMIZERS)
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if list(self.horizons) != sorted(set(self.horizons)) or min(self.horizons) < 1:
            raise ValueError(f"horizons must increase strictly from ≥ 1, got {self.horizons}")
        for field in ("static_dims", "refresh_every", "sgd_rhos", "adamw_rhos", "budgets"):
            grid = getattr(self, field)
            if not grid or min(grid) <= 0:
                raise ValueError(f"{field} must be a non-empty grid of positive values, got {grid}")
        if self.primary_dim not in self.static_dims:
            raise ValueError(f"primary_dim {self.primary_dim} is not among static_dims")
        if not 2 <= self.quartic_check_step <= self.quartic_steps:
            raise ValueError("quartic_check_step must lie in [2, quartic_steps]")
        if not self.quartic_lrs or min(self.quartic_lrs) <= 0:
            raise ValueError(f"quartic_lrs must be positive step sizes, got {self.quartic_lrs}")
        if not (0 < self.dataset_share <= 1 and self.harm_ratio > 0):
            raise ValueError("dataset_share must lie in (0, 1] and harm_ratio be positive")

    @property
    def dims(self) -> tuple[int, ...]:
        """Every ``d`` whose ``M_d(θ*)`` is needed (what ``prediction.setup_for`` computes)."""
        return tuple(sorted({*self.static_dims, self.penalty_d, self.tracking_d, self.angle_dim}))

    def strengths(self, defence: str, optimizer: str) -> tuple:
        """The strengths of ``defence`` under ``optimizer``, weak → strong."""
        rhos = self.sgd_rhos if optimizer == "sgd" else self.adamw_rhos
        return {
            "none": (0,),
            "initial_orthogonalization": self.static_dims,
            "project_out": self.static_dims,
            "project_out_tracking": self.refresh_every,
            "fisher_penalty": rhos,
            "full_fisher_penalty": rhos,
            "fisher_budget": self.budgets,
        }[defence]


STUDY = Config()  # the committed sweep (sweeps/defences_tiny.json)
QUICK = Config(
    datasets=("always_answer", "lookalike", "shift", "label_noise_100"),
    optimizers=("sgd",),
    seeds=(0,),
    horizons=(16, 64),
    static_dims=(10,),
    refresh_every=(16,),
    penalty_d=10,
    sgd_rhos=(0.3,),
    budgets=(0.03,),
    angle_datasets=0,
    timing_repeats=1,
    quartic_datasets=2,
)
# The tests' run of the main job: one defence of each kind its rows need (first-order
# ones, a curvature-aware one); every defence's runs are checked against the optax chain
# in tests/test_defences_study.py.
TINY = Config(
    size="tiny-fast",
    datasets=("always_answer", "shift"),
    defences=("none", "initial_orthogonalization", "project_out", "fisher_budget"),
    optimizers=("sgd",),
    seeds=(0,),
    horizons=(2, 4),
    static_dims=(4,),
    primary_dim=4,
    tracking_d=4,
    refresh_every=(2,),
    penalty_d=4,
    sgd_rhos=(0.3,),
    budgets=(0.03,),
    num_examples=256,
    num_eval=64,
    num_prompts=64,
    angle_dim=4,
    angle_datasets=1,
    angle_steps=32,
    timing_repeats=1,
    quartic_datasets=1,
    quartic_examples=64,
    quartic_steps=6,
)


def check_stable(config: Config, lambda_1: float) -> None:
    """Refuse SGD penalty weights with ``ηρλ₁ ≥ 2``: the penalty's step ``(I − ηρF)x`` diverges."""
    if "sgd" not in config.optimizers:
        return
    if not {"fisher_penalty", "full_fisher_penalty"} & set(config.defences):
        return
    worst = config.sgd_lr * max(config.sgd_rhos) * lambda_1
    if worst >= 2:
        raise ValueError(
            f"sgd_rhos up to {max(config.sgd_rhos)} give ηρλ₁ = {worst:.3g} ≥ 2 "
            f"(η = {config.sgd_lr}, λ₁ = {lambda_1:.4g}): the SGD penalty runs would diverge"
        )


# ------------------------------------------------------------- defended optimizer
class Spec(NamedTuple):
    """One defended optimizer: hashable, so its compiled trainer is cached."""

    defence: str
    strength: float
    optimizer: str
    lr: float
    weight_decay: float
    d: int  # rows of M(θ*) the defence needs (0: none)
    key_seed: int


def spec_for(config: Config, defence: str, strength, optimizer: str) -> Spec:
    """The :class:`Spec` of ``defence`` at ``strength`` under ``optimizer``."""
    d = {
        "initial_orthogonalization": strength,
        "project_out": strength,
        "project_out_tracking": config.tracking_d,
        "fisher_penalty": config.penalty_d,
    }.get(defence, 0)
    lr = config.sgd_lr if optimizer == "sgd" else config.adamw_lr
    return Spec(defence, strength, optimizer, lr, config.weight_decay, int(d), config.key_seed)


def defended_optimizer(spec: Spec, values, basis, logits) -> optax.GradientTransformationExtraArgs:
    """``spec``'s ``optax.chain``, the defence placed as docs/theory.md §7.1 prescribes.

    Loss-changing defences act on the raw gradient (before the optimizer);
    projections and the budget act on the final step (after it). ``values``
    ``(d,)`` and ``basis`` ``(d, n)`` are ``M_d(θ*)`` (arguments, so a jitted
    caller keeps them out of its constants); the Fisher matvecs are
    ``curvature.fisher_vp`` of ``logits`` at the first answer position, their
    prompts given per call as ``fisher_args=(tokens, answer_start)``.
    """
    if spec.optimizer == "sgd":
        opt = optax.sgd(spec.lr)
    else:
        opt = optax.adamw(spec.lr, weight_decay=spec.weight_decay)
    fvp = curvature.fisher_vp(training.answer_logits(logits))
    sub = Subspace.exact(values, basis) if spec.d else None
    name, strength = spec.defence, spec.strength
    if name == "initial_orthogonalization":
        return optax.chain(transforms.initial_orthogonalization(sub), opt)
    if name == "fisher_penalty":
        return optax.chain(transforms.fisher_penalty(sub, strength), opt)
    if name == "full_fisher_penalty":
        return optax.chain(transforms.full_fisher_penalty(fvp, strength), opt)
    if name == "project_out":
        return optax.chain(opt, transforms.project_out(sub))
    if name == "project_out_tracking":
        key = jax.random.key(spec.key_seed)
        return optax.chain(
            opt, transforms.project_out_tracking(fvp, spec.d, int(strength), key=key)
        )
    if name == "fisher_budget":
        return optax.chain(opt, transforms.fisher_budget(fvp, strength))
    return optax.chain(opt)


def _is_tracking(node) -> bool:
    return isinstance(node, transforms.ProjectOutTrackingState)


def state_axes(state):
    """``vmap`` axes of a chain's state: 0, except a tracking projection's count and key.

    Those are shared by all runs (every run takes its step ``k`` together), so
    the refresh's ``lax.cond`` keeps an unbatched predicate under ``vmap`` and
    stays a branch; batched, it would become a select that runs Lanczos on
    every step.
    """

    def axes(node):
        if _is_tracking(node):
            return node._replace(count=None, key=None, basis=0, values=0, converged=0)
        return jax.tree.map(lambda _: 0, node)

    return jax.tree.map(axes, state, is_leaf=_is_tracking)


def sequential_runs(spec: Spec) -> bool:
    """Map the runs one after another (``lax.map``) instead of vmapping them.

    For the tracking projection on CPU: its Lanczos refresh ends in an
    ``eigh``, which vmapped becomes a batched LAPACK call that intermittently
    deadlocks XLA's CPU thread pool on the 2-core machine (every thread parked
    on a futex; seen here in a 4-step run; ``landscapes.map_landscapes`` has
    the same workaround). Everything else, and every accelerator, vmaps.
    """
    return spec.defence == "project_out_tracking" and jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=32)
def trainer(logits, spec: Spec):
    """Jitted ``init(params, aux)`` and ``advance(params, opt_state, aux, data, idx, fisher_args)``.

    Every array has a leading run axis ``R`` except ``aux = (values, basis)``
    and ``fisher_args``, shared (and, when vmapped, a tracking projection's
    count and key: :func:`state_axes`); ``advance`` scans over the
    ``(R, c, B)`` minibatch rows ``idx`` and returns ``((params, opt_state),
    losses (c, R))``. The runs are vmapped, or mapped in sequence where
    :func:`sequential_runs` says so.
    """
    loss = training.sequence_loss(logits)
    sequential = sequential_runs(spec)

    def opt(aux):
        return defended_optimizer(spec, *aux, logits)

    def step(params, opt_state, aux, data, rows, fargs):
        tokens, targets, mask = (a[rows] for a in data)
        value, grad = jax.value_and_grad(loss)(params, tokens, targets, mask)
        updates, opt_state = opt(aux).update(grad, opt_state, params, fisher_args=fargs)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def init(params, aux):
        axes = 0 if sequential else state_axes(opt(aux).init(jax.tree.map(lambda a: a[0], params)))
        return jax.vmap(opt(aux).init, out_axes=axes)(params)

    def runs(params, opt_state, aux, data, rows, fargs):
        if sequential:
            one = lambda a: step(a[0], a[1], aux, a[2], a[3], fargs)  # noqa: E731
            return jax.lax.map(one, (params, opt_state, data, rows))
        axes = state_axes(opt_state)
        batched = jax.vmap(step, in_axes=(0, axes, None, 0, 0, None), out_axes=(0, axes, 0))
        return batched(params, opt_state, aux, data, rows, fargs)

    @jax.jit
    def advance(params, opt_state, aux, data, idx, fargs):
        def body(carry, rows):
            p, s = carry
            p, s, value = runs(p, s, aux, data, rows, fargs)
            return (p, s), value

        return jax.lax.scan(body, (params, opt_state), jnp.swapaxes(idx, 0, 1))

    return init, advance


def _aux(s, spec: Spec, dtype) -> tuple[jax.Array, jax.Array]:
    d = max(spec.d, 1)  # one unused row for defences without M
    return jnp.asarray(s.values[:d], dtype), jnp.asarray(s.basis[:d], dtype)


def _fargs(s) -> tuple[jax.Array, jax.Array]:
    return s.reference.tokens, s.reference.answer_start


# ------------------------------------------------------------------ fine-tuning
def _runs(s, config: Config, spec: Spec, index: int, middle: bool) -> list[dict]:
    """Fine-tune every (dataset, seed) of ``config`` under ``spec``; one row per run and K."""
    b = P.run_batch(s, config, "full", spec.optimizer)
    init, advance = trainer(s.logits32, spec)
    aux = _aux(s, spec, jnp.float32)
    params, opt_state = training.committed((b.state, init(b.state, aux)), s.params32)
    rows, done, K = [], 0, config.horizons[-1]
    label = spec.defence
    if spec.defence != "none":
        label += f" {SYMBOL[spec.defence]}={spec.strength:g}"
    bar = progress_bar(total=K, desc=f"{label} ({spec.optimizer})", enabled=True)
    for K_h, lengths in zip(config.horizons, P.scan_chunks(config.horizons), strict=True):
        for c in lengths:
            chunk = jnp.asarray(b.idx[:, done : done + c])
            (params, opt_state), losses = advance(params, opt_state, aux, b.data, chunk, _fargs(s))
            done += c
            bar.update(c)
        if not np.all(np.isfinite(np.asarray(losses))):
            raise FloatingPointError(f"a {label} run diverged before step {K_h}")
        for r, m in enumerate(_measure(s, config, b, params, opt_state)):
            name, seed = b.runs[r]
            base = {"kind": "run", "defence": spec.defence, "strength": spec.strength}
            base.update(strength_index=index, optimizer=spec.optimizer, d=spec.d)
            rows.append({**base, "dataset": name, "seed": int(seed), "K": int(K_h), **m})
    bar.close()
    last = rows[-len(b.runs) :]
    cost = _cost(s, config, spec, b, (params, opt_state), aux)
    for row in last:
        row.update(cost)
    if middle or spec.defence == "none":
        for r, angle in _angles(s, config, b, params, spec.defence == "none").items():
            last[r].update(angle)
    return rows


def _measure(s, config: Config, b, params, opt_state) -> list[dict]:
    """Per run: behaviour (float32), ``Δu``, ``½xᵀFx`` and the channels of ``Δu`` (float64)."""
    behaviour, displacement, geometry = P.measurer(s.logits32, s.logits64, "full", 1.0)
    harm, nll, acc = behaviour(params, s.params32, s.harm.tokens, s.harm.answer_start, b.evals)
    xs = displacement(params, s.params32, s.params64)
    du, quad, flat = geometry(xs, s.params64, tuple(s.reference), _fargs(s))
    flat = np.asarray(flat, np.float64)
    coeffs = flat @ s.basis.T  # (R, k) coordinates in M(θ*)'s eigenbasis
    tracking = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_tracking) if _is_tracking(n)]
    out = []
    for r in range(flat.shape[0]):
        q, u = float(quad[r]), float(du[r])
        m = {
            "harmfulness": float(harm[r]),
            "refuse_nll": float(nll[r]),
            "accuracy": float(acc[r]),
            "delta_u": u,
            "quadratic": q,
            "rest": u - q,
            "update_norm": float(np.linalg.norm(flat[r])),
        }
        for d in config.static_dims:
            part = 0.5 * float(np.sum(s.values[:d] * coeffs[r, :d] ** 2))
            m[f"m_part_d{d}"], m[f"tail_d{d}"] = part, q - part
        if tracking:
            m["tracking_converged"] = bool(np.asarray(tracking[0].converged)[r])
        out.append(m)
    return out


def _cost(s, config: Config, spec: Spec, b, carry, aux) -> dict:
    """Seconds per step of ``spec`` and of the unprotected optimizer, and their ratio.

    Windows of at least 16 steps (for the tracking projection a multiple of its
    refresh interval, so every window holds the same number of refreshes) from
    the final state, all runs vmapped. The defended and the plain window are
    timed in turn, ``timing_repeats`` pairs, and ``cost`` is the median of the
    per-pair ratios: a ratio from one moment of a shared CPU, not two timings
    taken hours apart under different loads.
    """
    chunk = P.scan_chunks(config.horizons)[-1][0]
    base = chunk * math.ceil(16 / chunk)
    window = base
    if spec.defence == "project_out_tracking":
        window = math.lcm(base, int(spec.strength))
    timed = functools.partial(_seconds_per_step, b=b, fargs=_fargs(s), chunk=chunk)
    _, advance = trainer(s.logits32, spec)  # compiled by the training
    defended = functools.partial(timed, advance, carry, aux, window=window)
    if spec.defence == "none":
        seconds = float(np.median([defended() for _ in range(config.timing_repeats)]))
        return {"seconds_per_step": seconds, "plain_seconds_per_step": seconds, "cost": 1.0}
    none = spec_for(config, "none", 0, spec.optimizer)
    init, plain_advance = trainer(s.logits32, none)
    plain_aux = _aux(s, none, jnp.float32)
    start = training.committed((b.state, init(b.state, plain_aux)), s.params32)
    plain = functools.partial(timed, plain_advance, start, plain_aux, window=base)
    plain()  # compile
    pairs = np.array([(defended(), plain()) for _ in range(config.timing_repeats)])
    return {
        "seconds_per_step": float(np.median(pairs[:, 0])),
        "plain_seconds_per_step": float(np.median(pairs[:, 1])),
        "cost": float(np.median(pairs[:, 0] / pairs[:, 1])),
    }


def _seconds_per_step(advance, carry, aux, *, b, fargs, chunk, window) -> float:
    """Wall seconds per step of one window of ``window`` steps of ``advance`` from ``carry``."""
    idx = jnp.asarray(b.idx[:, :chunk])
    p, st = carry
    start = time.perf_counter()
    for _ in range(window // chunk):
        (p, st), _ = advance(p, st, aux, b.data, idx, fargs)
    jax.block_until_ready(p)
    return (time.perf_counter() - start) / window


# ------------------------------------------------------------ rotation of M
@functools.lru_cache(maxsize=4)
def _top_eigenspaces(logits64, k: int, tol: float, steps: int):
    """Jitted top-``k`` eigenvectors of ``F(θ)`` for a batch of ``θ`` (traced Lanczos)."""
    fvp = curvature.fisher_vp(training.answer_logits(logits64))

    @jax.jit
    def top(params, tokens, start, key):
        def one(p):
            flat, unravel = ravel_pytree(p)

            def matvec(v):
                return ravel_pytree(fvp(p, unravel(v), tokens, start))[0]

            k_start, k_restart = jax.random.split(key)
            v0 = jax.random.normal(k_start, flat.shape, flat.dtype)
            pairs = top_eigenpairs_traced(matvec, v0, k, key=k_restart, tol=tol, max_steps=steps)
            return pairs.vectors, pairs.values, pairs.certified

        if jax.default_backend() == "cpu":  # batched eigh deadlocks there: see sequential_runs
            return jax.lax.map(one, params)
        return jax.vmap(one)(params)

    return top


def _angles(s, config: Config, b, params, with_floor: bool) -> dict[int, dict]:
    """Largest principal angle between the top-``angle_dim`` eigenspaces of ``F(θ_K)``, ``F(θ*)``.

    For the seed-0 runs of the first ``angle_datasets`` datasets (float64).
    ``with_floor``: also at ``θ*`` itself, the angle the measurement resolves.
    """
    names = config.datasets[: config.angle_datasets]
    runs = [r for r, (n, seed) in enumerate(b.runs) if seed == config.seeds[0] and n in names]
    if not runs:
        return {}
    chosen = jax.tree.map(lambda a: jnp.asarray(a)[np.asarray(runs)].astype(jnp.float64), params)
    if with_floor:
        chosen = jax.tree.map(lambda a, t: jnp.concatenate([a, t[None]]), chosen, s.params64)
    top = _top_eigenspaces(s.logits64, config.angle_dim, config.angle_tol, config.angle_steps)
    vectors, values, converged = top(chosen, *_fargs(s), jax.random.key(config.key_seed))
    reference = s.basis[: config.angle_dim]
    vectors = np.asarray(vectors, np.float64)
    angles = [flow.principal_angle(v, reference) for v in vectors]
    out = {}
    for i, r in enumerate(runs):
        out[r] = {
            "angle": angles[i],
            # ‖P(θ_K)P(θ*)‖_F²/d: the share of M(θ_K) inside M(θ*), on average over directions
            "overlap": float(np.sum((vectors[i] @ reference.T) ** 2) / config.angle_dim),
            "angle_converged": bool(converged[i]),
            "angle_lambda_1": float(values[i][0]),
        }
        if with_floor:
            out[r]["angle_floor"] = angles[-1]
    return out


# ------------------------------------------------- theory: the quartic onset stays
@functools.lru_cache(maxsize=2)
def _task_derivatives(logits64):
    loss = training.sequence_loss(logits64)
    return loss, jax.jit(curvature.hessian_vp(loss))


def _couplings(s, d: int, data: tuple) -> tuple[float, float]:
    """``γ̃ = ‖F^{1/2}PH(I−P)g‖`` and ``‖F^{1/2}Pg‖`` of the task loss on ``data`` at ``θ*``."""
    loss, hvp = _task_derivatives(s.logits64)
    g, Hg = aic.gradient_and_hg(loss, s.params64, data)
    sub = Subspace.exact(jnp.asarray(s.values[:d]), jnp.asarray(s.basis[:d]))
    unravel = ravel_pytree(s.params64)[1]
    HPg = ravel_pytree(hvp(s.params64, unravel(sub.project(g)), *data))[0]
    corrected = theory.orthogonalized_report(sub, g, Hg, HPg, tail_mass=float("nan"))
    raw = theory.aic_report(sub, g, Hg, tail_mass=float("nan"))
    return corrected.coupling, raw.fisher_orthogonality


@functools.lru_cache(maxsize=4)
def _gd_projected(logits64, defence: str, steps: int):
    """Jitted ``(R, steps)`` projected losses ``½‖F^{1/2}Px_k‖²`` of full-batch GD, vmapped.

    ``run(params, values, basis, data, lr)``: ``params`` ``(R, …)`` start at
    ``θ*``, ``data`` ``(R, N, T)`` is each run's whole batch; ``defence`` is
    ``"none"`` or ``"initial_orthogonalization"`` (its correction is then the
    ``M`` part of the first full-batch gradient), before ``optax.sgd(lr)``.
    """
    loss = training.sequence_loss(logits64)

    def chain(values, basis, lr):
        if defence == "none":
            return optax.sgd(lr)
        sub = Subspace.exact(values, basis)
        return optax.chain(transforms.initial_orthogonalization(sub), optax.sgd(lr))

    def one(theta, values, basis, data, lr):
        opt, star = chain(values, basis, lr), ravel_pytree(theta)[0]

        def step(carry, _):
            p, state = carry
            updates, state = opt.update(jax.grad(loss)(p, *data), state, p)
            p = optax.apply_updates(p, updates)
            c = basis @ (ravel_pytree(p)[0] - star)
            return (p, state), 0.5 * jnp.sum(jnp.maximum(values, 0.0) * c**2)

        return jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)[1]

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0, None)))


def _quartic_rows(s, config: Config) -> list[dict]:
    """Thm 6.2 with ``initial_orthogonalization`` in the chain: full-batch GD on the first
    ``quartic_examples`` examples, against ``⅛γ̃²η⁴k²(k−1)²`` (docs/theory.md §4.7, §5.2)."""
    names = config.datasets[: config.quartic_datasets]
    if not names:
        return []
    N, d, K = config.quartic_examples, config.primary_dim, config.quartic_steps
    sets = [P.dataset_split(config, n)[0] for n in names]
    data = tuple(jnp.asarray(np.stack([getattr(t, f)[:N] for t in sets])) for f in FIELDS)
    params = P.stack_trees([s.params64] * len(names))
    aux = _aux(s, Spec("", 0, "", 0.0, 0.0, d, 0), jnp.float64)
    ks = np.arange(1, K + 1)
    j = config.quartic_check_step - 1
    couplings = [_couplings(s, d, tuple(a[r] for a in data)) for r in range(len(names))]
    rows = []
    for eta in config.quartic_lrs:
        io = _gd_projected(s.logits64, FIRST_ORDER[0], K)(params, *aux, data, eta)
        raw = _gd_projected(s.logits64, "none", K)(params, *aux, data, eta)
        for r, (name, (gamma, fisher_pg)) in enumerate(zip(names, couplings, strict=True)):
            predicted = theory.gd_projected_loss_approx(gamma, eta, ks)
            defended = np.asarray(io[r], np.float64)
            row = {"kind": "quartic", "dataset": name, "d": d, "eta": eta, "examples": N}
            row.update(k=ks.tolist(), projected=defended.tolist(), predicted=predicted.tolist())
            row["projected_raw"] = np.asarray(raw[r], np.float64).tolist()
            row["predicted_raw"] = (0.5 * fisher_pg**2 * eta**2 * ks**2).tolist()
            row.update(gamma_tilde=gamma, fisher_pg=fisher_pg, check_step=int(ks[j]))
            row["ratio"] = float(defended[j] / predicted[j]) if predicted[j] > 0 else float("nan")
            rows.append(row)
    return rows


# -------------------------------------------------------------- running it all
def check_config(config: Config) -> None:
    """Refuse a config the study cannot run, naming the field (a sweep checks every cell first)."""
    check_fields(
        config,
        positive=("sgd_lr", "adamw_lr", "angle_tol", "quartic_tolerance", "harm_ratio"),
        counts=(
            "primary_dim",
            "tracking_d",
            "penalty_d",
            "batch_size",
            "num_examples",
            "num_eval",
            "num_prompts",
            "angle_dim",
            "angle_steps",
            "timing_repeats",
            "quartic_datasets",
            "quartic_examples",
            "quartic_steps",
        ),
        nonnegative=("weight_decay", "accuracy_loss", "harm_floor"),
        indices=("seeds", "angle_datasets", "key_seed"),
        choices={"size": tuple(ALIGNMENT)},
        at_most={"batch_size": "num_examples"},
    )


def sweep_cell(config: Config, outdir: Path) -> list[dict]:
    """Rows of every (defence, strength, optimizer) of ``config``, and the theory check's."""
    s = P.setup_for(config, outdir)
    check_stable(config, float(s.values[0]))
    rows = []
    for opt_name in config.optimizers:
        for defence in config.defences:
            grid = config.strengths(defence, opt_name)
            for i, strength in enumerate(grid):
                spec = spec_for(config, defence, strength, opt_name)
                rows.extend(_runs(s, config, spec, i, i == len(grid) // 2))
    if FIRST_ORDER[0] in config.defences and "sgd" in config.optimizers:
        rows.extend(_quartic_rows(s, config))
    return stamp(rows, theta_digest(s.params32))


# --------------------------------------------------------------------- analysis
SUMMARY = ("harmfulness", "accuracy", "delta_u", "quadratic", "rest", "angle", "overlap")


def _mean(rows: list[dict], field: str, datasets) -> list[float]:
    """Seed mean of ``field`` per dataset, in ``datasets`` order (NaN where no row has it)."""
    out = []
    for d in datasets:
        values = [r[field] for r in rows if r["dataset"] == d and field in r]
        out.append(float(np.mean(values)) if values else float("nan"))
    return out


def _entry(config: Config, sel: list[dict], datasets: list[str]) -> dict:
    """One (optimizer, defence, strength): per-dataset seed means at the last horizon."""
    K, p = config.horizons[-1], config.primary_dim
    last = [r for r in sel if r["K"] == K]
    first = sel[0]
    entry = {k: first[k] for k in ("optimizer", "defence", "strength", "d")}
    entry["index"] = first["strength_index"]
    for field in SUMMARY:
        entry[field] = _mean(last, field, datasets)
    entry["m_part"] = _mean(last, f"m_part_d{p}", datasets)
    entry["tail"] = _mean(last, f"tail_d{p}", datasets)
    for field in ("cost", "seconds_per_step", "plain_seconds_per_step", "angle_floor"):
        values = [r[field] for r in last if field in r]
        entry[field] = float(np.median(values)) if values else float("nan")
    entry["by_horizon"] = {
        str(k): {
            f: float(np.nanmean(_mean([r for r in sel if r["K"] == k], f, datasets)))
            for f in ("harmfulness", "accuracy", "delta_u")
        }
        for k in config.horizons
        if any(r["K"] == k for r in sel)
    }
    return entry


def analyse(config: Config, rows: list[dict]) -> dict:
    """The study's table from its rows: one entry per (optimizer, defence, strength)."""
    runs = [r for r in rows if r.get("kind") == "run"]
    datasets = [d for d in config.datasets if any(r["dataset"] == d for r in runs)]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["optimizer"], r["defence"], r["strength_index"]), []).append(r)
    table = {
        f"{opt}/{defence}/{i}": _entry(config, sel, datasets)
        for (opt, defence, i), sel in groups.items()
    }
    quartic = {(r["dataset"], r["eta"]): r for r in rows if r.get("kind") == "quartic"}
    return {
        "datasets": datasets,
        "horizon": config.horizons[-1],
        "primary_dim": config.primary_dim,
        "table": table,
        "quartic": list(quartic.values()),
    }


def find(table: dict, optimizer: str, defence: str, strength=None) -> dict | None:
    """The entry of ``defence`` under ``optimizer`` (at ``strength`` when given), or None."""
    for e in table.values():
        same = strength is None or e["strength"] == strength
        if e["optimizer"] == optimizer and e["defence"] == defence and same:
            return e
    return None


def _entries(table: dict, optimizer: str, defence: str) -> list[dict]:
    found = [e for e in table.values() if e["optimizer"] == optimizer and e["defence"] == defence]
    return sorted(found, key=lambda e: e["index"])


def fails(none_harm, harm, *, ratio: float, floor: float) -> list[bool]:
    """Row (a) per dataset: harm ≥ ``ratio`` × the unprotected harm, which is ≥ ``floor``."""
    return [bool(h0 >= floor and h >= ratio * h0) for h0, h in zip(none_harm, harm, strict=True)]


def holds(static_harm, harm, none_acc, acc, *, ratio: float, loss: float, floor: float):
    """Row (b) per dataset: harm ≤ ``ratio`` × the static projection's (≥ ``floor``), and
    the accuracy lost against the unprotected run ≤ ``loss``."""
    return [
        bool(hs >= floor and h <= ratio * hs and a0 - a <= loss + 1e-9)
        for hs, h, a0, a in zip(static_harm, harm, none_acc, acc, strict=True)
    ]


def needed(config: Config, n: int) -> int:
    """Datasets a row needs: ``dataset_share`` of ``n`` (6 of 8, 3 of 4)."""
    return math.ceil(config.dataset_share * n - 1e-9)


def label(e: dict) -> str:
    """``defence (symbol = strength)``."""
    if e["defence"] == "none":
        return "unprotected"
    return f"{e['defence']} ({SYMBOL[e['defence']]} = {e['strength']:g})"


def _avg(values) -> float:
    return float(np.nanmean(values)) if np.any(np.isfinite(values)) else float("nan")


# ------------------------------------------------------------------------ claims
def claims(results: dict, config: Config, command: str) -> list[Claim]:
    """Rows (a)-(e) of the pre-registered plan (docs/defences.md)."""
    out = []
    for opt in config.optimizers:
        for make in (_first_order_claim, _curvature_claim, _measured_claim, _channels_claim):
            claim = make(results, config, opt, command)
            if claim is not None:
                out.append(claim)
    for eta in dict.fromkeys(r["eta"] for r in results["quartic"]):
        claim = _quartic_claim(results, config, command, eta)
        if claim is not None:
            out.append(claim)
    return out


def _first_order_claim(results: dict, config: Config, opt: str, command: str) -> Claim | None:
    table, n, K, p = (
        results["table"],
        len(results["datasets"]),
        results["horizon"],
        config.primary_dim,
    )
    none = find(table, opt, "none")
    tested = {name: find(table, opt, name, p) for name in FIRST_ORDER}
    if none is None or None in tested.values():
        return None
    need, parts, passed = needed(config, n), [], True
    check = functools.partial(
        fails, none["harmfulness"], ratio=config.harm_ratio, floor=config.harm_floor
    )
    for name, e in tested.items():
        ok = check(e["harmfulness"])
        passed &= sum(ok) >= need
        ratios = ", ".join(
            f"{h / h0:.2f}" if h0 > 0 else "n/a"
            for h0, h in zip(none["harmfulness"], e["harmfulness"], strict=True)
        )
        others = [
            f"d = {o['strength']:g}: {sum(check(o['harmfulness']))}/{n}"
            for o in _entries(table, opt, name)
            if o["strength"] != p
        ]
        parts.append(
            f"{name} {sum(ok)}/{n} (harm / unprotected per dataset {ratios})"
            + (f", reported at {', '.join(others)}" if others else "")
        )
    return Claim(
        f"Defences ({opt}, K = {K}, {n} datasets): first-order defences fail — harmfulness "
        f"under initial orthogonalisation and under a static projection out of M (d = {p}) "
        "stays near the unprotected run's",
        command,
        f"harm ≥ {config.harm_ratio:.0%} of the unprotected run's on ≥ {need} of {n} datasets, "
        f"for each defence (unprotected harm ≥ {config.harm_floor})",
        "; ".join(parts) + f"; unprotected harm {_avg(none['harmfulness']):.2f} (mean)",
        passed,
    )


def _curvature_claim(results: dict, config: Config, opt: str, command: str) -> Claim | None:
    table, n, K, p = (
        results["table"],
        len(results["datasets"]),
        results["horizon"],
        config.primary_dim,
    )
    none, static = find(table, opt, "none"), find(table, opt, "project_out", p)
    pairs = [e for name in CURVATURE_AWARE for e in _entries(table, opt, name)]
    if none is None or static is None or not pairs:
        return None
    need, counts, texts = needed(config, n), [], []
    for e in pairs:
        ok = holds(
            static["harmfulness"],
            e["harmfulness"],
            none["accuracy"],
            e["accuracy"],
            ratio=config.harm_ratio,
            loss=config.accuracy_loss,
            floor=config.harm_floor,
        )
        lost = _avg(np.subtract(none["accuracy"], e["accuracy"]))
        counts.append(sum(ok))
        harm = _avg(e["harmfulness"])
        texts.append(f"{label(e)} {sum(ok)}/{n} (harm {harm:.2f}, accuracy lost {lost:+.3f})")
    measured = "; ".join(texts)
    return Claim(
        f"Defences ({opt}, K = {K}, {n} datasets): a curvature-aware defence (Fisher budget or "
        f"tracked projection) holds where the static projection (d = {p}) does not",
        command,
        f"one (defence, strength) with harm ≤ {config.harm_ratio:.0%} of the static projection's "
        f"(≥ {config.harm_floor}) and accuracy lost ≤ {config.accuracy_loss:.2f} on ≥ {need} of "
        f"{n} datasets",
        measured + f"; static projection harm {_avg(static['harmfulness']):.2f} (mean)",
        max(counts) >= need,
    )


def _measured_claim(results: dict, config: Config, opt: str, command: str) -> Claim | None:
    entries = [e for name in DEFENCES for e in _entries(results["table"], opt, name)]
    if not entries:
        return None
    parts = [
        f"{label(e)}: harm {_avg(e['harmfulness']):.2f}, accuracy {_avg(e['accuracy']):.2f}, "
        f"Δu {_avg(e['delta_u']):.3g}, cost ×{e['cost']:.1f}"
        for e in entries
    ]
    return Claim(
        f"Defences ({opt}, K = {results['horizon']}): harm, task accuracy, Δu and cost per step "
        "of each defence and strength",
        command,
        "reported (dataset means of seed means; cost in plain steps of the same optimizer)",
        "; ".join(parts),
        True,
        labels=("measured", "measured"),
    )


def _channels_claim(results: dict, config: Config, opt: str, command: str) -> Claim | None:
    table, p = results["table"], config.primary_dim
    none = find(table, opt, "none")
    io, po = find(table, opt, FIRST_ORDER[0], p), find(table, opt, "project_out", p)
    parts = []
    if none is not None and io is not None:
        r = np.divide(io["delta_u"], none["delta_u"])
        parts.append(
            f"initial orthogonalisation: Δu / unprotected Δu median {np.nanmedian(r):.2f} "
            f"[{np.nanmin(r):.2f}, {np.nanmax(r):.2f}]"
        )
    if po is not None:
        med = {f: float(np.nanmedian(po[f])) for f in ("delta_u", "m_part", "tail", "rest")}
        parts.append(
            f"static projection (medians): Δu {med['delta_u']:.3g} = M-part {med['m_part']:.2g} "
            f"+ tail {med['tail']:.3g} + rest {med['rest']:.3g}"
        )
    angles = [
        f"{label(e)} {np.degrees(np.nanmedian(e['angle'])):.1f}° "
        f"(overlap {np.nanmedian(e['overlap']):.2f})"
        for name in DEFENCES
        for e in _entries(table, opt, name)
        if np.any(np.isfinite(e["angle"]))
    ]
    if angles:
        floor = np.degrees(none["angle_floor"]) if none else float("nan")
        parts.append(f"rotation of M (median, seed 0): {', '.join(angles)}; at θ* {floor:.2g}°")
    if not parts:
        return None
    return Claim(
        f"Defences ({opt}, K = {results['horizon']}): where Δu comes from under the first-order "
        f"defences (d = {p}), and how far M rotates",
        command,
        "reported: Δu against the unprotected run's; Δu = M-part ½‖F^{1/2}Px‖² (0 by "
        "construction) + tail ½xᵀ(I−P)F(I−P)x + rest Δu − ½xᵀFx; the largest principal angle "
        f"between the top-{config.angle_dim} eigenspaces of F(θ_K) and F(θ*), and their "
        "overlap ‖P(θ_K)P(θ*)‖_F²/d",
        "; ".join(parts),
        True,
        labels=("measured", "measured"),
    )


def _quartic_claim(results: dict, config: Config, command: str, eta: float) -> Claim | None:
    """Row (d) at the registered ``η`` (the first of ``quartic_lrs``); reported at the others."""
    rows = [r for r in results["quartic"] if r["eta"] == eta]
    if not rows:
        return None
    k, d = rows[0]["check_step"], rows[0]["d"]
    ratios = ", ".join(f"{r['ratio']:.3f}" for r in rows)
    early = ", ".join(f"{r['projected'][1] / r['predicted'][1]:.3f}" for r in rows)
    gammas = ", ".join(f"{r['gamma_tilde']:.3g}" for r in rows)
    raw = ", ".join(f"{r['projected_raw'][k - 1] / r['projected'][k - 1]:.3g}" for r in rows)
    registered = eta == config.quartic_lrs[0]
    return Claim(
        "Defences: with initial orthogonalisation alone the drift into M stays on — full-batch "
        f"GD's projected loss ½‖F^{{1/2}}Px_k‖² follows ⅛γ̃²η⁴k²(k−1)² (Thm 6.2 with P g̃(θ*) = 0; "
        f"η = {eta:g})",
        command,
        f"within {config.quartic_tolerance:.0%} at k = {k} on each of {len(rows)} datasets"
        + ("" if registered else " (reported: the error term is O(ηk‖H‖))"),
        f"ratios at k = {k}: {ratios}; at k = 2: {early} (d = {d}); γ̃ {gammas}; unprotected GD's "
        f"projected loss at k = {k}: {raw} × the defended",
        all(abs(r["ratio"] - 1) <= config.quartic_tolerance for r in rows),
        labels=("reproduced", "NOT reproduced") if registered else ("measured", "measured"),
    )


# ----------------------------------------------------------------------- figure
FIGURE_NEEDS = ("table", "datasets", "horizon", "primary_dim")
TITLE = {"sgd": "SGD", "adamw": "AdamW"}


MARKERS = ("o", "s", "^", "v", "D", "P")  # one per defence: overlapping means stay visible


def _mean_se(values) -> tuple[float, float]:
    """Mean over datasets and its standard error (0 for a single dataset)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


@style.styled
def figure(results: dict, path: Path) -> tuple[Path, Path]:
    """Pareto fronts: task accuracy against harmfulness, a curve per defence over its strengths.

    Each point is the mean over datasets with ± one standard error in both
    directions; each defence has its own hollow marker, so coinciding means stay visible.
    """
    table = results["table"]
    opts = [o for o in OPTIMIZERS if any(e["optimizer"] == o for e in table.values())]
    fig, axes = style.subplots(len(opts), height=3.0)
    n = len(results["datasets"])
    for k, (ax, opt) in enumerate(zip(axes[0], opts, strict=True)):
        for j, name in enumerate(DEFENCES[1:]):
            es = _entries(table, opt, name)
            if es:
                _front(ax, es, style.PALETTE[j % len(style.PALETTE)], MARKERS[j], SHORT[name])
        none = find(table, opt, "none")
        if none is not None:
            _front(ax, [none], style.THEORY, "*", "unprotected", size=8)
        ax.set_xlabel(f"harmfulness at K = {results['horizon']}")
        ax.set_ylabel("task accuracy")
        letter = f"({chr(ord('a') + k)}) " if len(opts) > 1 else ""
        ax.set_title(f"{letter}{TITLE[opt]}: mean ± s.e. over {n} datasets", loc="left")
    style.legend_below(fig, ncol=4 if len(opts) > 1 else 2)
    return style.save(fig, path)


def _front(ax, entries: list, color: str, marker: str, label: str, size: float = 5) -> None:
    """One defence's strengths as hollow markers joined in order, with their error bars."""
    x, xe = zip(*(_mean_se(e["harmfulness"]) for e in entries), strict=True)
    y, ye = zip(*(_mean_se(e["accuracy"]) for e in entries), strict=True)
    ax.errorbar(
        x,
        y,
        xerr=xe,
        yerr=ye,
        color=color,
        marker=marker,
        markersize=size,
        markerfacecolor="none",
        ls="-" if len(entries) > 1 else "None",
        lw=0.9,
        elinewidth=0.6,
        capsize=1.5,
        label=label,
    )


# ------------------------------------------------------------------------- table
def table_markdown(results: dict) -> str:
    """Markdown: every (defence, strength) per optimizer, dataset means at the last horizon."""
    p, K = results["primary_dim"], results["horizon"]
    head = (
        "| defence | strength | harm | accuracy | Δu | ½xᵀFx | M-part | tail | rest | "
        "M rotation (°) | cost (×) |"
    )
    out = []
    for opt in OPTIMIZERS:
        entries = [e for name in DEFENCES for e in _entries(results["table"], opt, name)]
        if not entries:
            continue
        out += [
            f"\n**{TITLE[opt]}** — means over {len(results['datasets'])} datasets of seed means "
            f"at K = {K}; M-part and tail for d = {p}; M rotation: seed 0, median\n",
            head,
            "|" + "---|" * 11,
        ]
        for e in entries:
            angle = (
                np.degrees(np.nanmedian(e["angle"])) if np.any(np.isfinite(e["angle"])) else None
            )
            cells = [_avg(e[f]) for f in ("harmfulness", "accuracy")]
            cells += [_avg(e[f]) for f in ("delta_u", "quadratic", "m_part", "tail", "rest")]
            strength = (
                "—" if e["defence"] == "none" else f"{SYMBOL[e['defence']]} = {e['strength']:g}"
            )
            out.append(
                f"| {e['defence']} | {strength} | {cells[0]:.3f} | {cells[1]:.3f} | "
                + " | ".join(f"{c:.3g}" for c in cells[2:])
                + f" | {'—' if angle is None else f'{angle:.1f}'} | {e['cost']:.1f} |"
            )
    return "\n".join(out)


def _write_table(result: dict, outdir: Path, name: str) -> Path:
    path = Path(outdir) / "experiments" / "results" / f"{name}_table.md"
    path.write_text(table_markdown(result).lstrip("\n") + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------- report and main
STUDY_OUTPUT = Path("sweeps") / "defences_tiny.jsonl"
STUDY_COMMAND = "geomcollapse sweep sweeps/defences_tiny.json"


def study_rows(outdir: Path = ROOT) -> list[dict] | None:
    """The committed full study's rows (``sweeps/defences_tiny.jsonl``), if present."""
    return committed_sweep_rows(outdir, STUDY_OUTPUT)


def _config_from_rows(rows: list[dict], base: Config = STUDY) -> Config:
    runs = [r for r in rows if r.get("kind") == "run"]
    seen = lambda f: tuple(dict.fromkeys(r[f] for r in runs))  # noqa: E731
    datasets = seen("dataset")
    dims = tuple(sorted({int(k[8:]) for r in runs for k in r if k.startswith("m_part_d")}))
    dims = dims or base.static_dims
    return dataclasses.replace(
        base,
        static_dims=dims,
        primary_dim=base.primary_dim if base.primary_dim in dims else dims[0],
        datasets=tuple(d for d in base.datasets if d in datasets)
        + tuple(d for d in datasets if d not in base.datasets),
        defences=tuple(d for d in DEFENCES if d in seen("defence")),
        optimizers=tuple(o for o in OPTIMIZERS if o in seen("optimizer")),
        seeds=tuple(sorted(seen("seed"))),
        horizons=tuple(sorted(seen("K"))),
    )


def report(rows: list[dict], outdir: Path) -> list[Path]:
    """Table, figure and claims of a sweep's rows (what ``geomcollapse report`` calls)."""
    return _report(rows, Path(outdir))["paths"]


def _report(rows: list[dict], outdir: Path) -> dict:
    one_theta(rows, "the sweep being reported")
    config = _config_from_rows(rows)
    name = f"{NAME}_study"
    out = conclude(name, config, outdir, STUDY_COMMAND, analyse(config, rows), figure, claims)
    table = _write_table(out["result"], outdir, name)
    json_path = outdir / "experiments" / "results" / f"{name}.json"
    out["paths"] = [json_path, table, outdir / out["result"]["figure"]]
    return out


def main(config: Config = QUICK, outdir: Path = ROOT, command: str | None = None) -> dict:
    """Run ``config`` in this process (results, table, figure, claims).

    The main job's run (``QUICK``) also re-analyses the committed full study's
    rows, when present, and adds its claims.
    """
    from experiments._common import result_name

    outdir = Path(outdir)
    rows = sweep_cell(config, outdir)
    out = conclude(NAME, config, outdir, command, analyse(config, rows), figure, claims)
    _write_table(out["result"], outdir, result_name(NAME, config))
    study = study_rows(outdir) if config == QUICK else None
    if study:
        out["claims"] = [*out["claims"], *_report(study, outdir)["claims"]]
    return out


if __name__ == "__main__":
    from experiments._common import cli

    cli(NAME, __doc__, main, Config(), QUICK, full_flag=False)
