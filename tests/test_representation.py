"""Representation gradients: ∂ℓ/∂W = Σ_p h_pᵀ δ_p on the tiny transformer, and their spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import curvature, models, pipeline, representation, tasks
from tests.conftest import rel_err

LAYERS = ("blocks/0/qkv", "blocks/0/out", "blocks/0/fc1", "blocks/1/fc2", "head")


@pytest.fixture(scope="module")
def rep_setup():
    graphdef, params = models.transformer_init(jax.random.key(0), "tiny", dtype=jnp.float64)
    harm = tasks.harmful_prompts(jax.random.key(5), 3).prompts_only()
    return graphdef, params, harm


def test_weight_gradient_factorises_over_positions(rep_setup):
    """``Σ_t h_tᵀ δ_t`` of each dense layer is ``jax.grad`` of ``⟨c_k, logits⟩`` wrt its kernel."""
    graphdef, params, harm = rep_setup
    logits = models.transformer_logits(graphdef)
    tokens = jnp.asarray(harm.tokens)
    shape = jax.eval_shape(logits, params, tokens).shape
    cot = jax.random.normal(jax.random.key(1), (2, *shape), jnp.float64)
    factors = jax.jit(representation.dense_factors(graphdef))(params, tokens, cot)
    assert set(factors) >= set(LAYERS) and len(factors) == 9  # 4 per block + head

    def scores(p):
        return jnp.einsum("kntv,ntv->k", cot, logits(p, tokens))

    grads = jax.jit(jax.jacrev(scores))(params)  # leaves (K, ...)
    for name in LAYERS:
        f = factors[name]
        kernel = curvature.select(grads, f"^{name}/kernel")
        expected = next(iter(kernel.values()))
        got = jnp.einsum("nti,nktj->kij", f.inputs, f.output_grads)
        assert rel_err(got, expected) < 1e-12, name
        assert rel_err(f.weight_gradients().sum(0), expected) < 1e-12, name
    only = representation.dense_factors(graphdef, where=r"^head$")(params, tokens, cot)
    assert list(only) == ["head"]
    with pytest.raises(ValueError, match="matches no dense layer"):
        representation.dense_factors(graphdef, where="nothing")(params, tokens, cot)
    with pytest.raises(ValueError, match="cotangents must have shape"):
        representation.dense_factors(graphdef)(params, tokens, cot[:, :1])


def test_skill_fisher_factors_rebuild_the_fisher_kernel_block(rep_setup):
    """``Σ_{n,c} vec G_nc (vec G_nc · v)`` equals ``F v`` on a kernel, then the output-side checks.

    A top eigenvector of that block is a combination of the ``G_nc``, so its
    output side lies in the span of the ``δ``: fraction 1 at full rank.
    """
    graphdef, params, harm = rep_setup
    logits = models.transformer_logits(graphdef)
    name = "blocks/1/fc2"
    factors = jax.jit(representation.skill_fisher_factors(graphdef, where=name))(
        params, jnp.asarray(harm.tokens), jnp.asarray(harm.answer_start)
    )[name]
    G = np.asarray(factors.weight_gradients())  # (N, V, in, out)
    n_in, n_out = G.shape[-2:]
    G = G.reshape(-1, n_in * n_out)
    fvp = pipeline.skill_fisher_vp(logits, params, harm)
    zeros = jax.tree.map(jnp.zeros_like, params)
    path = f"{name}/kernel/value"
    v = jax.random.normal(jax.random.key(2), (n_in, n_out), jnp.float64)
    out = curvature.select(fvp(curvature.substitute(zeros, {path: v})), f"^{path}$")[path]
    assert rel_err(np.asarray(out).ravel(), G.T @ (G @ np.asarray(v).ravel())) < 1e-12

    spectrum = representation.output_spectrum(factors.output_grads)
    rows = np.asarray(factors.output_grads).reshape(-1, n_out)
    s = np.linalg.svd(rows, compute_uv=False)
    np.testing.assert_allclose(spectrum.singular_values, s, rtol=1e-12, atol=1e-14 * s[0])
    rank = int(np.sum(s > 1e-10 * s[0]))
    assert spectrum.energy_fraction(n_out) == pytest.approx(1.0)
    assert spectrum.energy_fraction(3) == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s**2))

    # the same spectrum from the Gram matrix δᵀδ (what chunks of prompts sum to)
    from_gram = representation.gram_spectrum(rows.T @ rows)
    np.testing.assert_allclose(from_gram.singular_values, s, rtol=1e-8, atol=1e-7 * s[0])
    for r in (1, 3, rank):
        assert from_gram.energy_fraction(r) == pytest.approx(spectrum.energy_fraction(r), rel=1e-12)
    for r in (1, 3):  # leading directions agree as projectors (simple singular values)
        Qg, Qs = from_gram.basis(r), spectrum.basis(r)
        assert np.linalg.norm(Qg @ Qg.T - Qs @ Qs.T) < 1e-8
    with pytest.raises(ValueError, match="square"):
        representation.gram_spectrum(rows)

    # top eigenvector of the kernel block GᵀG of F (4,096 × 4,096), from the SVD of G
    top = np.linalg.svd(G, full_matrices=False)[2][0].reshape(n_in, n_out)
    assert representation.output_fraction(top, spectrum.basis(rank)) == pytest.approx(1, abs=1e-10)
    # dense twin of the fraction: ‖BΠ‖²/‖B‖² with Π from numpy's SVD
    r = 2
    Vt = np.linalg.svd(rows, full_matrices=False)[2]
    Pi = Vt[:r].T @ Vt[:r]
    dense = np.sum((top @ Pi) ** 2) / np.sum(top**2)
    assert representation.output_fraction(top, spectrum.basis(r)) == pytest.approx(dense, rel=1e-10)


def test_output_fraction_random_baseline_and_bad_shapes():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((16, 4)))
    fractions = [
        representation.output_fraction(rng.standard_normal((8, 16)), Q) for _ in range(400)
    ]
    assert np.mean(fractions) == pytest.approx(4 / 16, abs=0.02)
    inside = rng.standard_normal((8, 4)) @ Q.T  # rows in span Q
    assert representation.output_fraction(inside, Q) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="disagree"):
        representation.output_fraction(np.ones((8, 15)), Q)
