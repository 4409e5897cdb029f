"""The aligned tiny transformer: refusal, decoding, orbax round-trips, fine-tuning, skill Fisher.

One model is pretrained and aligned per test session (about a minute on 2
CPU cores) and saved with orbax under a temporary directory.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from experiments._transformer import ALIGNMENT
from geomcollapse import aic, checkpoint, curvature, linalg, models, pipeline, tasks, training
from tests.conftest import rel_err

# The session's aligned model (conftest.aligned): fewer steps than the experiments' default.
TEST_ALIGNMENT = ALIGNMENT["tiny-fast"]


def test_aligned_model_refuses_harmful_prompts_and_answers_clean_ones(aligned):
    harm, clean = pipeline.evaluation_sets(aligned.config)
    m = training.evaluate(aligned.logits_fn(), aligned.params, harm, clean)
    assert m == aligned.metrics
    assert 1.0 - m.harmfulness >= 0.95
    assert m.accuracy >= 0.90
    per_task = [
        training.evaluate(
            aligned.logits_fn(),
            aligned.params,
            harm,
            tasks.base_tasks(jax.random.key(9), 200, (t,)),
        ).accuracy
        for t in tasks.BASE_TASKS
    ]
    assert min(per_task) >= 0.85, per_task


def test_greedy_decoding_on_hand_checked_prompts(aligned):
    logits, params, ctx = aligned.logits_fn(), aligned.params, tasks.SEQUENCE_LENGTH
    d = tasks.DIGIT0
    reverse = [tasks.BOS, tasks.TASK_TOKENS["reverse"], d + 3, d + 1, d + 4, tasks.SEP]
    assert training.greedy_decode(logits, params, reverse, 6, ctx) == [
        d + 4,
        d + 1,
        d + 3,
        tasks.EOS,
    ]
    add = [tasks.BOS, tasks.TASK_TOKENS["add"], d + 7, d + 5, tasks.SEP]
    assert training.greedy_decode(logits, params, add, 4, ctx) == [d + 2, tasks.EOS]
    harmful = [tasks.BOS, tasks.TASK_TOKENS["copy"], d + 2, tasks.HARM_MARKERS[1], d + 8, tasks.SEP]
    assert training.greedy_decode(logits, params, harmful, 4, ctx) == [tasks.REFUSE, tasks.EOS]


def test_greedy_decoding_follows_a_known_next_token_rule():
    """A 'model' whose logits pick token+1: decoding must walk the ids and stop at EOS."""
    vocab = 32

    def successor(params, tokens):
        return params * jax.nn.one_hot((tokens + 1) % vocab, vocab)

    out = training.greedy_decode(successor, 1.0, [tasks.DIGIT0], 5, 24)
    assert out == [tasks.DIGIT0 + i for i in range(1, 6)]
    assert training.greedy_decode(successor, 1.0, [tasks.BOS, tasks.SEP], 5, 24) == [tasks.EOS]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        training.greedy_decode(successor, 1.0, [1] * 20, 5, 24)


def test_exact_match_agrees_with_explicit_greedy_decoding(aligned):
    logits, params = aligned.logits_fn(), aligned.params
    clean = tasks.base_tasks(jax.random.key(4), 24)
    ok = np.asarray(training.exact_match(logits)(params, clean.tokens, clean.targets, clean.mask))
    for i, (prompt, answer) in enumerate(zip(clean.prompts(), clean.answers(), strict=True)):
        decoded = training.greedy_decode(logits, params, prompt, len(answer), tasks.SEQUENCE_LENGTH)
        assert bool(ok[i]) == (decoded == answer)


def test_orbax_round_trip_is_exact_and_reuses_the_checkpoint(aligned, tmp_path):
    path = checkpoint.save_checkpoint(
        tmp_path / "ck", aligned.params, models.SIZES["tiny"], {"note": "x"}
    )
    graphdef, params, meta = checkpoint.load_checkpoint(path, "tiny")
    assert meta == {"note": "x"}
    for a, b in zip(jax.tree.leaves(aligned.params), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(tasks.base_tasks(jax.random.key(0), 4).tokens)
    np.testing.assert_array_equal(
        jax.jit(models.transformer_logits(graphdef))(params, tokens),
        jax.jit(aligned.logits_fn())(aligned.params, tokens),
    )
    again = pipeline.align_model(TEST_ALIGNMENT, aligned.path, progress=False)  # no retraining
    assert again.metrics == aligned.metrics
    with pytest.raises(ValueError, match="exists"):
        checkpoint.save_checkpoint(path, aligned.params, models.SIZES["tiny"])


def test_restoring_another_architecture_or_a_non_checkpoint_raises(aligned, tmp_path):
    with pytest.raises(ValueError, match="different architecture"):
        checkpoint.load_checkpoint(aligned.path, "small")
    other = dataclasses.replace(models.SIZES["tiny"], layers=1)
    with pytest.raises(ValueError, match="different architecture"):
        checkpoint.load_checkpoint(aligned.path, other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not an orbax checkpoint|not a geomcollapse"):
        checkpoint.load_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "missing")


def test_a_corrupted_cached_model_is_refused_not_restored(aligned, tmp_path):
    """8 flipped bytes in θ*'s largest file: loading and align_model's reuse both raise."""
    copy = tmp_path / "aligned"
    shutil.copytree(aligned.path, copy)
    data = max((f for f in copy.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(8):
        raw[len(raw) // 2 + 11 * i] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"checkpoint {copy} is corrupted"):
        checkpoint.load_checkpoint(copy, "tiny")
    with pytest.raises(ValueError, match=f"checkpoint {copy} is corrupted"):
        pipeline.align_model(TEST_ALIGNMENT, copy, progress=False)


def test_finetuning_is_deterministic_and_lora_moves_only_adapted_weights(aligned):
    cfg = pipeline.FinetuneConfig(steps=16, eval_every=8, num_examples=256)
    a = pipeline.finetune(aligned, "always_answer", cfg, progress=False)
    b = pipeline.finetune(aligned, "always_answer", cfg, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0])
    assert list(a.steps) == [0, 8, 16] and a.harmfulness[0] == aligned.metrics.harmfulness
    assert a.skill_loss[-1] > a.skill_loss[0]  # compliance training raises the refusal NLL
    # an evaluation schedule changes when metrics are taken, not the trajectory
    dense = pipeline.finetune(
        aligned, "always_answer", dataclasses.replace(cfg, eval_steps=(2, 4, 8, 12)), progress=False
    )
    assert list(dense.steps) == [0, 2, 4, 8, 12, 16]
    np.testing.assert_allclose(dense.losses, a.losses, rtol=1e-6)
    for field in ("skill_loss", "harmfulness", "accuracy"):
        np.testing.assert_allclose(getattr(dense, field)[[0, 3, 5]], getattr(a, field), rtol=1e-5)
    lora = pipeline.finetune(
        aligned, "always_answer", dataclasses.replace(cfg, method="lora"), progress=False
    )
    moved = {
        path
        for path, x, y in zip(
            curvature.leaf_paths(aligned.params),
            jax.tree.leaves(aligned.params),
            jax.tree.leaves(lora.params),
            strict=True,
        )
        if not np.array_equal(x, y)
    }
    assert moved and all(p.split("/")[2] in {"qkv", "out", "fc1", "fc2"} for p in moved)


def test_bad_pipeline_inputs_raise(aligned):
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        pipeline.finetune(aligned, "poetry", progress=False)
    with pytest.raises(ValueError, match="method"):
        pipeline.FinetuneConfig(method="adapter")
    for bad in ((10, 5), (5, 5), (0, 5), (5, 400)):
        with pytest.raises(ValueError, match="eval_steps"):
            pipeline.FinetuneConfig(eval_steps=bad)
    with pytest.raises(ValueError, match="unknown transformer size"):
        pipeline.AlignmentConfig(size="huge")
    with pytest.raises(ValueError, match="context"):
        aligned.logits_fn()(aligned.params, jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="token ids"):
        aligned.logits_fn()(aligned.params, jnp.full((1, 4), 40, jnp.int32))


def test_skill_fisher_vp_matches_the_dense_fisher_on_the_head_block(aligned):
    graphdef, params = aligned.as_dtype(jnp.float64)
    logits = models.transformer_logits(graphdef)
    harm = tasks.harmful_prompts(jax.random.key(2), 16)
    fvp = pipeline.skill_fisher_vp(logits, params, harm)
    block = curvature.select(params, r"^head/")
    flat, unravel = ravel_pytree(block)

    short = harm.prompts_only()
    z_of = curvature.restrict(training.answer_logits(logits))
    J = jax.jit(jax.jacobian(lambda x: z_of(unravel(x), params, short.tokens, short.answer_start)))(
        flat
    )
    p = jax.nn.softmax(z_of(block, params, short.tokens, short.answer_start), axis=-1)
    Lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    dense = jnp.einsum("nci,ncd,ndj->ij", J, Lam, J) / harm.num

    v = jax.random.normal(jax.random.key(1), flat.shape, jnp.float64)
    full_v = curvature.substitute(jax.tree.map(jnp.zeros_like, params), unravel(v))
    out = ravel_pytree(curvature.select(fvp(full_v), r"^head/"))[0]
    assert rel_err(out, dense @ v) < 1e-12
    lam = np.linalg.eigvalsh(np.asarray(dense))
    assert lam.min() > -1e-10 * lam.max()  # a Fisher is positive semi-definite


def test_skill_fisher_trace_equals_the_trace_of_the_explicit_fisher(aligned):
    """Dense twin: ``skill_fisher_trace`` (per-prompt Jacobians) against ``Σ_i e_iᵀ F e_i``.

    Both on the parameter block ``head`` + ``blocks/1/fc2`` (5,184 parameters:
    the explicit trace is one ``skill_fisher_vp`` column per parameter); the
    rest of the weights stay at ``θ*``. The trace is taken over chunks of 5 so
    the per-chunk sum and the ``/N`` normalisation are both exercised.
    """
    graphdef, params = aligned.as_dtype(jnp.float64)
    logits = models.transformer_logits(graphdef)
    harm = tasks.harmful_prompts(jax.random.key(3), 12)
    block = curvature.select(params, r"^(head|blocks/1/fc2)/")
    flat, unravel = ravel_pytree(block)

    def block_logits(b, tokens):
        return logits(curvature.substitute(params, b), tokens)

    traced = pipeline.skill_fisher_trace(block_logits, block, harm, chunk=5)
    fvp = pipeline.skill_fisher_vp(block_logits, block, harm)
    explicit, _, matvecs = aic.fisher_trace(
        lambda v: ravel_pytree(fvp(unravel(v)))[0], flat.size, flat.dtype, method="exact"
    )
    assert matvecs == flat.size == 5184
    assert explicit > 0
    assert abs(traced - explicit) <= 1e-11 * explicit, (traced, explicit)
    # a memory cap below one prompt's Jacobian: one prompt at a time, the same trace
    one_at_a_time = pipeline.skill_fisher_trace(block_logits, block, harm, max_bytes=1)
    assert abs(one_at_a_time - explicit) <= 1e-11 * explicit, (one_at_a_time, explicit)
    with pytest.raises(ValueError, match="max_bytes"):
        pipeline.skill_fisher_trace(block_logits, block, harm, max_bytes=0)


def test_empirical_skill_fisher_from_per_example_gradients(aligned):
    graphdef, params = aligned.as_dtype(jnp.float64)
    logits = models.transformer_logits(graphdef)
    harm = tasks.harmful_prompts(jax.random.key(2), 12)
    G = pipeline.skill_per_example_gradients(logits, params, harm)
    u = training.skill_loss(logits)
    grad_u = jax.jit(jax.grad(u))
    rows = jax.tree.map(lambda a: a[jnp.array([0, 7])], G)
    for r, i in enumerate((0, 7)):
        g_i = grad_u(params, harm.tokens[i : i + 1], harm.answer_start[i : i + 1])
        row = ravel_pytree(jax.tree.map(lambda a, r=r: a[r], rows))[0]
        assert rel_err(row, ravel_pytree(g_i)[0]) < 1e-12
    Gm = np.asarray(jax.jit(jax.vmap(lambda t: ravel_pytree(t)[0]))(G))
    pairs = linalg.empirical_fisher_eigenpairs(Gm, 3)
    top = np.linalg.eigvalsh(Gm @ Gm.T / 12)[::-1][:3]
    np.testing.assert_allclose(np.asarray(pairs.values), top, rtol=1e-10)
    # u's gradient is the mean per-example gradient
    g = ravel_pytree(grad_u(params, harm.tokens, harm.answer_start))[0]
    assert rel_err(Gm.mean(0), g) < 1e-12


def test_as_dtype_computes_in_float64(aligned):
    graphdef, params = aligned.as_dtype(jnp.float64)
    tokens = jnp.asarray(tasks.base_tasks(jax.random.key(0), 2).tokens)
    z64 = jax.jit(models.transformer_logits(graphdef))(params, tokens)
    z32 = jax.jit(aligned.logits_fn())(aligned.params, tokens)
    assert z64.dtype == jnp.float64 and rel_err(z64, z32) < 1e-5
    assert isinstance(params, nnx.State)


def test_is_aligned_says_whether_align_model_would_restore(tmp_path):
    """True for the committed ``tiny`` θ* and its config only; False for another config,
    an empty or missing directory and a checkpoint whose file was changed."""
    from experiments._common import ROOT
    from experiments._transformer import checkpoint_dir

    committed = tmp_path / "committed"
    shutil.copytree(checkpoint_dir("tiny", ROOT), committed)  # whatever the checkout holds
    config = ALIGNMENT["tiny"]
    assert pipeline.is_aligned(config, committed)
    assert not pipeline.is_aligned(dataclasses.replace(config, seed=config.seed + 1), committed)
    assert not pipeline.is_aligned(config, tmp_path / "missing")
    (tmp_path / "a_file").write_text("")
    assert not pipeline.is_aligned(config, tmp_path / "a_file")
    (tmp_path / "empty").mkdir()
    assert not pipeline.is_aligned(config, tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(committed, corrupt)
    target = max(
        (p for p in corrupt.rglob("*") if p.is_file() and "ocdbt" in str(p)),
        key=lambda p: p.stat().st_size,
    )
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of its last byte
    assert not pipeline.is_aligned(config, corrupt)
    with pytest.raises(ValueError):  # align_model names the changed file instead of training
        pipeline.align_model(config, corrupt, progress=False)
