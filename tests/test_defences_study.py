"""The defence study's machinery: vmapped defended training against single runs, verdicts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from experiments import _style
from experiments import defences as D
from experiments import prediction as P
from geomcollapse import curvature, models, tasks, training
from geomcollapse import defences as transforms
from geomcollapse.subspace import Subspace

DIM = 3


@pytest.fixture(scope="module")
def small_model():
    """A random one-block transformer (float64, 1,352 parameters), skill prompts and an ``M``."""
    config = models.TransformerConfig(
        vocab=32, context=tasks.SEQUENCE_LENGTH, d_model=8, heads=2, layers=1, mlp_ratio=2
    )
    graphdef, theta = models.transformer_init(jax.random.key(0), config, dtype=jnp.float64)
    n = ravel_pytree(theta)[0].size
    rows = np.linalg.qr(np.random.default_rng(0).standard_normal((n, DIM)))[0].T
    skill = tasks.harmful_prompts(jax.random.key(5), 16).prompts_only()
    fargs = (jnp.asarray(skill.tokens), jnp.asarray(skill.answer_start))
    aux = (jnp.asarray([3.0, 2.0, 1.0]), jnp.asarray(rows))
    return models.transformer_logits(graphdef), theta, aux, fargs


def _expected_chain(spec: D.Spec, aux, logits):
    """The chain written out by hand, the defence where docs/theory.md §7.1 places it."""
    opt = optax.sgd(spec.lr) if spec.optimizer == "sgd" else optax.adamw(spec.lr, weight_decay=0.01)
    sub = Subspace.exact(*aux)
    fvp = curvature.fisher_vp(training.answer_logits(logits))
    return {
        "initial_orthogonalization": lambda: optax.chain(
            transforms.initial_orthogonalization(sub), opt
        ),
        "project_out_tracking": lambda: optax.chain(
            opt, transforms.project_out_tracking(fvp, DIM, 2, key=jax.random.key(14))
        ),
        "fisher_budget": lambda: optax.chain(opt, transforms.fisher_budget(fvp, 1e-4)),
    }[spec.defence]()


@pytest.mark.parametrize(
    "defence, strength, opt_name",
    [
        ("initial_orthogonalization", DIM, "adamw"),  # per-run state before the optimizer
        ("project_out_tracking", 2, "sgd"),  # shared count and key, Lanczos refreshes
        ("fisher_budget", 1e-4, "adamw"),  # θ* in the state, Fisher matvecs, after the optimizer
    ],
)
def test_vmapped_defended_runs_equal_single_runs_of_the_chain(
    small_model, defence, strength, opt_name
):
    """Two datasets advanced together in one scan = each run alone through ``optax.chain``."""
    logits, theta, aux, fargs = small_model
    lr = 0.05 if opt_name == "sgd" else 1e-2
    spec = D.Spec(defence, strength, opt_name, lr, 0.01, DIM, 14)
    datas = [P.dataset_split(D.TINY, n)[0] for n in ("shift", "always_answer")]
    data = tuple(jnp.asarray(np.stack([getattr(b, f)[:64] for b in datas])) for f in D.FIELDS)
    idx = np.stack([P.minibatch_order(jax.random.key(i), 64, 6, 8) for i in range(2)])
    init, advance = D.trainer(logits, spec)
    start = P.stack_trees([theta, theta])
    (got, state), _ = advance(start, init(start, aux), aux, data, jnp.asarray(idx), fargs)
    if defence == "project_out_tracking":  # vmapped, one shared count: the refresh stays a branch
        count = np.asarray(state[1].count)
        assert count.shape == ((2,) if D.sequential_runs(spec) else ()) and np.all(count == 6)
    loss = training.sequence_loss(logits)
    opt = _expected_chain(spec, aux, logits)

    @jax.jit
    def step(p, s, batch):
        u, s = opt.update(jax.grad(loss)(p, *batch), s, p, fisher_args=fargs)
        return optax.apply_updates(p, u), s

    star = ravel_pytree(theta)[0]
    for r in range(2):
        p, s = theta, opt.init(theta)
        for k in range(6):
            p, s = step(p, s, tuple(a[r][idx[r, k]] for a in data))
        alone = ravel_pytree(p)[0]
        vmapped = ravel_pytree(jax.tree.map(lambda a, r=r: a[r], got))[0]
        scale = float(jnp.max(jnp.abs(alone - star)))  # the update's size
        assert scale > 1e-4
        np.testing.assert_allclose(vmapped, alone, rtol=0, atol=1e-7 * scale)


def test_only_the_tracking_counter_and_key_are_shared_across_runs():
    flat = jnp.zeros(5)
    tracking = transforms.ProjectOutTrackingState(
        jnp.int32(0), jnp.zeros((2, 5)), jnp.zeros(2), jnp.bool_(True), jax.random.key(0)
    )
    state = (optax.ScaleByAdamState(jnp.int32(0), flat, flat), tracking)
    axes = D.state_axes(state)
    assert axes[0] == optax.ScaleByAdamState(0, 0, 0)
    assert axes[1] == transforms.ProjectOutTrackingState(None, 0, 0, 0, None)


# ------------------------------------------------------------------ verdicts
CONFIG = dataclasses.replace(D.STUDY, optimizers=("sgd",), seeds=(0,))


def _rows(defence: str, strength, index: int, harm, acc, du=1.0) -> list[dict]:
    """One seed's rows at K = 256 for every dataset of ``CONFIG``."""
    out = []
    for i, name in enumerate(CONFIG.datasets):
        h, a = np.broadcast_to(harm, 8)[i], np.broadcast_to(acc, 8)[i]
        row = {"kind": "run", "defence": defence, "strength": strength, "strength_index": index}
        row.update(optimizer="sgd", d=10, dataset=name, seed=0, K=256, harmfulness=float(h))
        row.update(accuracy=float(a), delta_u=du, quadratic=0.2, rest=du - 0.2, cost=2.0)
        row.update(m_part_d10=0.0, tail_d10=0.2, angle=0.1, overlap=0.9, angle_floor=1e-6)
        out.append(row)
    return out


def _claims(rows):
    results = D.analyse(CONFIG, rows)
    return {c.claim: c for c in D.claims(results, CONFIG, "cmd")}, results


def _verdicts(io_harm, po_harm, budget_harm, budget_acc, none_harm=0.9):
    rows = _rows("none", 0, 0, none_harm, 0.8)
    rows += _rows("initial_orthogonalization", 10, 0, io_harm, 0.8)
    rows += _rows("project_out", 10, 0, po_harm, 0.8)
    rows += _rows("project_out", 50, 1, 0.0, 0.8)  # another strength: reported, not tested
    rows += _rows("fisher_budget", 0.1, 0, budget_harm, budget_acc)
    rows += _rows("project_out_tracking", 4, 0, po_harm, 0.8)
    claims, results = _claims(rows)
    a = next(c for k, c in claims.items() if "first-order defences fail" in k)
    b = next(c for k, c in claims.items() if "curvature-aware" in k)
    return a, b, results


def test_first_order_and_curvature_verdicts_follow_the_numbers():
    a, b, results = _verdicts(io_harm=0.8, po_harm=0.7, budget_harm=0.3, budget_acc=0.78)
    assert results["table"]["sgd/none/0"]["harmfulness"] == [0.9] * 8
    assert (
        a.passed and "initial_orthogonalization 8/8" in a.measured and "d = 50: 0/8" in a.measured
    )
    assert b.passed and "fisher_budget (β = 0.1) 8/8" in b.measured
    assert "project_out_tracking (r = 4) 0/8" in b.measured
    # the static projection halves harm on 3 of 8 datasets: 5 < 6, the row fails
    po = [0.7] * 5 + [0.4] * 3
    a, b, _ = _verdicts(io_harm=0.8, po_harm=po, budget_harm=0.3, budget_acc=0.78)
    assert not a.passed and "project_out 5/8" in a.measured
    # a defence that costs 6 points of accuracy does not hold, however low its harm
    a, b, _ = _verdicts(io_harm=0.8, po_harm=0.7, budget_harm=0.0, budget_acc=0.74)
    assert a.passed and not b.passed
    # exactly at the thresholds: harm = 50 % and 5 points lost still count
    a, b, _ = _verdicts(io_harm=0.45, po_harm=0.45, budget_harm=0.225, budget_acc=0.75)
    assert a.passed and b.passed
    # unprotected harm under the floor on 3 datasets: they count against row (a)
    low = [0.9] * 5 + [0.05] * 3
    a, _, _ = _verdicts(io_harm=0.8, po_harm=0.7, budget_harm=0.3, budget_acc=0.78, none_harm=low)
    assert not a.passed and "initial_orthogonalization 5/8" in a.measured


def test_fails_and_holds_per_dataset():
    assert D.fails([0.9, 0.9, 0.05, np.nan], [0.45, 0.44, 0.05, 0.9], ratio=0.5, floor=0.1) == [
        True,
        False,
        False,
        False,
    ]
    got = D.holds(
        [0.8, 0.8, 0.05, 0.8], [0.4, 0.41, 0.0, 0.1], [0.9] * 4, [0.85, 0.9, 0.9, 0.84],
        ratio=0.5, loss=0.05, floor=0.1,
    )  # fmt: skip
    assert got == [True, False, False, False]
    assert D.needed(CONFIG, 8) == 6 and D.needed(CONFIG, 4) == 3


def test_report_writes_the_table_figure_and_claims(tmp_path, monkeypatch):
    from tests.test_experiments import _check_style

    rows = _rows("none", 0, 0, 0.9, 0.8)
    for i, beta in enumerate(CONFIG.budgets):
        rows += _rows("fisher_budget", beta, i, 0.3 - 0.1 * i, 0.8 - 0.05 * i)
    for i, d in enumerate(CONFIG.static_dims):
        rows += _rows("project_out", d, i, 0.7, 0.8)
        rows += _rows("initial_orthogonalization", d, i, 0.8, 0.8)
    save = _style.save
    monkeypatch.setattr(_style, "save", lambda fig, path: (_check_style(fig), save(fig, path))[1])
    paths = D.report(rows, tmp_path)
    assert [p.name for p in paths] == [
        "defences_study.json",
        "defences_study_table.md",
        "defences_study.png",
    ]
    assert all(p.is_file() for p in paths)
    table = paths[1].read_text()
    assert table.count("| fisher_budget | β = ") == 3 and "| none | — | 0.900 | 0.800 |" in table


@pytest.mark.parametrize(
    "change, match",
    [
        ({"datasets": ("shift", "poetry")}, "datasets"),
        ({"defences": ("none", "prayer")}, "defences"),
        ({"optimizers": ()}, "optimizers"),
        ({"horizons": (64, 16)}, "horizons"),
        ({"budgets": (0.1, -1.0)}, "budgets"),
        ({"primary_dim": 7}, "primary_dim"),
        ({"quartic_check_step": 1}, "quartic_check_step"),
    ],
)
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(D.QUICK, **change)


def test_unstable_sgd_penalties_are_refused():
    D.check_stable(D.STUDY, 62.2)  # the pre-registered grid: ηρλ₁ ≤ 1.49
    with pytest.raises(ValueError, match="diverge"):
        D.check_stable(dataclasses.replace(D.STUDY, sgd_rhos=(1.0, 10.0, 100.0)), 62.2)
    D.check_stable(dataclasses.replace(D.STUDY, sgd_rhos=(100.0,), optimizers=("adamw",)), 62.2)


def test_initial_orthogonalization_leaves_the_quartic_drift_on(small_model):
    """Full-batch GD with the defence: ``½‖F^{1/2}Px_k‖² → ⅛γ̃²η⁴k²(k−1)²`` (Thm 6.2, §4.7)."""
    from types import SimpleNamespace

    logits, theta, (values, rows), _ = small_model
    data = P.dataset_split(D.TINY, "shift")[0]
    batch = tuple(jnp.asarray(getattr(data, f)[:32]) for f in D.FIELDS)
    s = SimpleNamespace(
        logits64=logits, params64=theta, values=np.asarray(values), basis=np.asarray(rows)
    )
    gamma, fisher_pg = D._couplings(s, DIM, batch)
    eta, ks = 1e-4, np.arange(1, 7)
    stacked = tuple(a[None] for a in batch)
    args = (P.stack_trees([theta]), values, rows, stacked, eta)
    defended = np.asarray(D._gd_projected(logits, "initial_orthogonalization", 6)(*args))[0]
    raw = np.asarray(D._gd_projected(logits, "none", 6)(*args))[0]
    assert defended[0] <= 1e-24 < raw[0]  # the first step leaves M exactly: P g̃(θ*) = 0
    predicted = 0.125 * gamma**2 * eta**4 * ks**2 * (ks - 1) ** 2
    np.testing.assert_allclose(defended[1:], predicted[1:], rtol=1e-3)
    np.testing.assert_allclose(raw, 0.5 * fisher_pg**2 * eta**2 * ks**2, rtol=1e-2)
