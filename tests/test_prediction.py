"""The Table 1 study's machinery: vmapped fine-tuning against single runs, analysis and verdicts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import prediction as P
from geomcollapse import models, stats, tasks, training
from geomcollapse.models import lora_init, lora_merge


@pytest.fixture(scope="module")
def small_model():
    """A random one-block transformer on the task vocabulary (float64: Adam's division by
    ``√v`` would turn float32 reduction-order differences of near-zero gradients into O(1))."""
    config = models.TransformerConfig(
        vocab=32, context=tasks.SEQUENCE_LENGTH, d_model=16, heads=2, layers=1, mlp_ratio=2
    )
    graphdef, params = models.transformer_init(jax.random.key(0), config, dtype=jnp.float64)
    return models.transformer_logits(graphdef), params


@pytest.mark.parametrize(
    "method, opt_name",
    [pytest.param("full", "adamw", marks=pytest.mark.full), ("lora2", "sgd")],  # full: 20 s
)
def test_vmapped_runs_equal_single_runs_of_the_training_loop(small_model, method, opt_name):
    """Two datasets advanced together in one scan = each trained alone by ``training.train``."""
    logits, theta = small_model
    config = dataclasses.replace(P.TINY, num_examples=128, batch_size=16, horizons=(1, 4, 8))
    opt, _ = P._optimizer(config, opt_name)
    names = ("shift", "always_answer")
    loss = training.sequence_loss(logits)
    keys = [jax.random.key(i) for i in range(2)]
    datas = [P.dataset_split(config, n)[0] for n in names]
    idx = np.stack([P.minibatch_order(k, 128, 8, 16) for k in keys])
    if method == "full":
        state = P.stack_trees([theta, theta])
    else:
        starts = [lora_init(jax.random.fold_in(k, 2), theta, 2) for k in keys]
        state = P.stack_trees(starts)
    data = tuple(
        jnp.asarray(np.stack([getattr(b, f) for b in datas])) for f in ("tokens", "targets", "mask")
    )
    advance = P._trainer(logits, method, config.lora_alpha, opt)
    (st, _), _ = advance(state, jax.vmap(opt.init)(state), theta, data, jnp.asarray(idx))
    for r in range(2):
        if method == "full":
            fn, start = loss, theta
        else:

            def fn(a, *batch):
                return loss(lora_merge(theta, a, config.lora_alpha), *batch)

            start = starts[r]
        alone, _ = training.train(
            fn, start, datas[r], opt, num_steps=8, batch_size=16, key=keys[r], progress=False
        )
        got = jax.tree.map(lambda a, r=r: a[r], st)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)  # entries ~1e-2


@pytest.mark.parametrize("horizons", [(1, 4, 16, 64, 256), (1, 4, 8), (3, 10, 50, 51), (5,)])
def test_scan_chunks_cover_every_gap_with_at_most_two_lengths(horizons):
    chunks = P.scan_chunks(horizons)
    assert [sum(c) for c in chunks] == np.diff((0, *horizons)).tolist()
    assert len({n for c in chunks for n in c}) <= 2


def _synthetic_rows(config, harm_of_score, seed=0):
    """Rows whose harmfulness is ``harm_of_score(overlap score)`` (plus noise-free controls)."""
    rng = np.random.default_rng(seed)
    rows = []
    names = config.datasets
    scores = rng.uniform(0.05, 0.5, len(names))
    for method in config.methods:
        for i, name in enumerate(names):
            for seed_ in config.seeds:
                for K in config.horizons:
                    row = {
                        "dataset": name,
                        "method": method,
                        "optimizer": "sgd",
                        "seed": seed_,
                        "K": K,
                        "harmfulness": float(harm_of_score(scores[i])),
                        "delta_u": float(scores[i] * K),
                        "accuracy": 0.5,
                        "locality": 0.1,
                        "intruder_count": 1,
                        "update_intruder_p_ratio": 0.0,
                        "update_intruder_fisher_half": 0.0,
                        "eta_K": 0.03 * K,
                        "forecast_validity_time": 1.0,
                        "forecast": float(scores[i] * K * 1.2),
                    }
                    for p in P._predictor_names(config, False):
                        row[p] = float(rng.uniform())
                    for d in config.dims:
                        row[f"update_p_ratio_d{d}"] = float(scores[i])
                    rows.append(row)
    return rows


def test_verdicts_follow_the_ranking_and_the_forecast_ratios():
    config = dataclasses.replace(
        P.QUICK,
        datasets=tuple(tasks.DATASET_FAMILY)[:10],
        horizons=(1, 4),
        primary_horizon=4,
        num_resamples=300,
    )
    up = P._results(config, _synthetic_rows(config, lambda s: s**2))
    claims = {c.claim: c for c in P.claims(up, config, "cmd")}
    table = up["table"]["sgd/full/4"]["correlations"]["update_p_ratio_d10"]
    assert table["rho"] == pytest.approx(1.0) and table["tau"] == pytest.approx(1.0)
    (a,) = [c for k, c in claims.items() if "ranks datasets" in k]
    assert a.passed
    # LoRA rows are identical here: ρ(LoRA) = ρ(full) is not "less well"
    (b,) = [c for k, c in claims.items() if "predicted less" in k]
    assert not b.passed
    # every forecast is 1.2 × realised and inside its window: within the factor 1.5
    (d,) = [c for k, c in claims.items() if "Taylor forecast" in k]
    assert d.passed and "20 of 20" in d.measured
    text = P.study_tables(dict(up, config=dataclasses.asdict(config)))
    assert text.count("| full | ") == 2 and "| 1.00 [1.00, 1.00] |" in text
    assert text.count(" | 1.2 |") == 20  # the forecast ratio of every (in-window) cell
    down = P._results(config, _synthetic_rows(config, lambda s: -s))
    (a,) = [c for c in P.claims(down, config, "cmd") if "ranks datasets" in c.claim]
    assert not a.passed and "ρ = -1.00" in a.measured
    # the recorded ρ is stats.spearman of the per-dataset seed means
    rows = _synthetic_rows(config, lambda s: np.sin(7 * s))
    res = P._results(config, rows)
    x = P._per_dataset(
        [r for r in rows if r["method"] == "full" and r["K"] == 4], "at_grad_norm", config.datasets
    )
    y = P._per_dataset(
        [r for r in rows if r["method"] == "full" and r["K"] == 4], "harmfulness", config.datasets
    )
    got = res["table"]["sgd/full/4"]["correlations"]["at_grad_norm"]["rho"]
    assert got == pytest.approx(stats.spearman(x, y), abs=1e-12)


def test_the_dataset_table_lists_every_member_and_the_splits_are_disjoint():
    table = P.dataset_table()
    assert all(f"`{name}`" in table for name in tasks.DATASET_FAMILY)
    assert not set(P.SUBSET) & set(P.HELD_OUT)
    names = sorted(tasks.DATASET_FAMILY)
    perm = np.asarray(jax.random.permutation(jax.random.key(14), len(names)))
    assert P.HELD_OUT == tuple(names[i] for i in perm[:8])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"datasets": ("shift", "poetry", "add_only")}, "poetry"),
        ({"methods": ("full", "lora3")}, "methods"),
        ({"optimizers": ()}, "optimizers"),
        ({"horizons": (4, 1)}, "horizons"),
        ({"primary_horizon": 7}, "primary_horizon"),
    ],
)
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(P.QUICK, **change)


def test_the_docs_dataset_table_is_current():
    page = (P.ROOT / "docs" / "prediction.md").read_text(encoding="utf-8")
    block = page.split("<!-- dataset-table:start -->")[1].split("<!-- dataset-table:end -->")[0]
    assert block.strip() == P.dataset_table().strip(), (
        "run python -m experiments.prediction --table"
    )


def test_the_skill_subspace_is_cached_on_disk_and_keyed_by_theta(tmp_path):
    """``M`` computed once equals ``numpy.linalg.eigh``'s top pairs; a second call reads
    it back bit for bit without a matvec; another ``θ*`` misses the cache."""
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    a = (q * np.geomspace(1.0, 1e-3, 12)) @ q.T
    theta = {"w": jnp.arange(12.0)}
    fvp = lambda v: {"w": jnp.asarray(a) @ v["w"]}  # noqa: E731
    tag = {"size": "toy", "num_prompts": 1, "k": 3, "seed": 0, "dtype": "float64"}
    values, basis = P._skill_subspace(fvp, theta, 3, jax.random.key(1), tag, tmp_path)
    w, v = np.linalg.eigh(a)
    np.testing.assert_allclose(values, w[::-1][:3], rtol=1e-10)
    np.testing.assert_allclose(np.abs(basis @ v[:, ::-1][:, :3]), np.eye(3), atol=1e-8)

    def refuse(v):
        raise AssertionError("the cached M was recomputed")

    again = P._skill_subspace(refuse, theta, 3, jax.random.key(1), tag, tmp_path)
    np.testing.assert_array_equal(again[0], values)
    np.testing.assert_array_equal(again[1], basis)
    moved = {"w": theta["w"] + 1.0}
    with pytest.raises(Exception, match="recomputed"):
        P._skill_subspace(refuse, moved, 3, jax.random.key(1), tag, tmp_path)


def test_rows_swept_without_predictors_at_theta_are_refused_by_the_table_1_report(tmp_path):
    """``predictors_at_theta=false`` rows (the small sweep's) carry no ``at_*`` columns:
    the report says where they are analysed instead of failing on a missing key."""
    row = {"dataset": "shift", "method": "full", "optimizer": "sgd", "seed": 0, "K": 1}
    with pytest.raises(ValueError, match=r"experiments\.early_warning"):
        P.report([row], tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_the_predictors_at_theta_are_keyed_by_theta_star(tmp_path, monkeypatch):
    """Another θ* under the same outdir and config: another key and file (no stale reuse)."""
    from experiments import _transformer
    from experiments._common import ROOT

    config = P.QUICK
    here = P._predictor_key(config, tmp_path)  # the committed tiny θ*, copied
    assert here == P._predictor_key(config, ROOT)
    real = _transformer.aligned_model

    def moved(size, outdir, progress=True):
        model = real(size, outdir, progress=progress)
        params = jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(1e-6), model.params)
        return model._replace(params=params)

    monkeypatch.setattr(P, "aligned_model", moved)
    there = P._predictor_key(config, tmp_path)
    assert there["theta"] != here["theta"]
    path = _transformer.at_theta_path(P.PREDICTORS, there, tmp_path)
    assert path.name != _transformer.at_theta_path(P.PREDICTORS, here, tmp_path).name
