"""The KL skill loss (docs/theory.md §5.3): exact minimum at θ*, Hessian = true Fisher, stable Δu.

All on the tiny transformer (28,320 parameters) at a random float64 ``θ*``:
the identities hold at any ``θ*``, so no trained model is needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from geomcollapse import curvature, models, pipeline, tasks, training
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def kl_setup():
    graphdef, params = models.transformer_init(jax.random.key(0), "tiny", dtype=jnp.float64)
    logits = models.transformer_logits(graphdef)
    harm = tasks.harmful_prompts(jax.random.key(5), 6)
    ref = pipeline.skill_reference(logits, params, harm)
    return params, logits, harm, ref, pipeline.skill_fisher_vp(logits, params, harm)


@pytest.fixture(scope="module")
def kl_hvp(kl_setup):
    """``∇²u v`` (forward-over-reverse), compiled once for the module."""
    return jax.jit(curvature.hessian_vp(training.kl_skill_loss(kl_setup[1])))


def _direct_kl(z_ref, z):
    """The textbook ``Σ p (log p − log q)``: cancels ``O(1)`` terms at small ``z − z_ref``."""
    lp, lq = jax.nn.log_softmax(z_ref, axis=-1), jax.nn.log_softmax(z, axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def test_kl_from_logit_change_is_the_kl_divergence():
    z = jax.random.normal(jax.random.key(0), (5, 7), jnp.float64) * 2
    d = jax.random.normal(jax.random.key(1), (5, 7), jnp.float64)
    for scale in (0.3, 3.0, 30.0):
        out = training.kl_from_logit_change(z, scale * d)
        np.testing.assert_allclose(out, _direct_kl(z, z + scale * d), rtol=1e-12)
    # a class-constant shift leaves the distribution, so the divergence is exactly 0
    assert float(jnp.max(training.kl_from_logit_change(z, jnp.ones_like(z) * 3.7))) < 1e-30
    with pytest.raises(ValueError, match="same shape"):
        training.kl_from_logit_change(z, d[:, :3])


def test_kl_skill_loss_has_an_exact_minimum_at_theta_star(kl_setup):
    params, logits, _, ref, _ = kl_setup
    u = training.kl_skill_loss(logits)
    assert float(jax.jit(u)(params, *ref)) == 0.0
    nll = training.skill_loss(logits)
    first = training.answer_logits(logits)

    @jax.jit
    def norms(p):
        kl = jax.grad(u)(p, *ref)
        # the textbook KL form has the same minimum, up to rounding
        direct = jax.grad(lambda q: jnp.mean(_direct_kl(ref.logits, first(q, *ref[:2]))))(p)
        # scale: the gradient of the hard-target skill loss (NLL of REFUSE) at the same θ*
        hard = jax.grad(nll)(p, *ref[:2])
        return [jnp.linalg.norm(ravel_pytree(t)[0]) for t in (kl, direct, hard)]

    kl, direct, scale = (float(a) for a in norms(params))
    assert scale > 1e-3
    assert kl <= 1e-13 * scale, (kl, scale)
    assert direct <= 1e-13 * scale, (direct, scale)


def test_kl_skill_hessian_equals_the_dense_true_fisher_on_an_inner_block(kl_setup, kl_hvp):
    """Dense twin: the ``∇²u`` block (HVP columns) vs ``JᵀΛJ/N`` on 96 inner parameters.

    The block (first LayerNorm + last MLP bias) enters the logits non-linearly,
    so ``∇²z ≠ 0`` and the Hessian's residual term is really cancelled by
    ``E_{y∼p_{θ*}}`` (on ``head`` alone any loss of the logits has Hessian = GGN).
    """
    params, logits, harm, ref, fvp = kl_setup
    where = r"^(blocks/0/ln1|blocks/1/fc2/bias)"
    block = curvature.select(params, where)
    flat, unravel = ravel_pytree(block)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def column(i):
        e_i = curvature.substitute(zeros, unravel(jnp.zeros_like(flat).at[i].set(1.0)))
        return ravel_pytree(curvature.select(kl_hvp(params, e_i, *ref), where))[0]

    hess = jnp.stack([column(i) for i in range(flat.size)], axis=1)

    z_of = curvature.restrict(training.answer_logits(logits))
    J = jax.jit(jax.jacrev(lambda w: z_of(unravel(w), params, ref.tokens, ref.answer_start)))(flat)
    p = jax.nn.softmax(ref.logits, axis=-1)
    Lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    fisher = jnp.einsum("nci,ncd,ndj->ij", J, Lam, J) / harm.num
    assert rel_err(hess, fisher) < 1e-10
    # and the library's Fisher-VP agrees with the same dense block
    for k in range(2):
        v = jax.random.normal(jax.random.key(10 + k), flat.shape, jnp.float64)
        out = fvp(curvature.substitute(zeros, unravel(v)))
        assert rel_err(ravel_pytree(curvature.select(out, where))[0], hess @ v) < 1e-10


def test_kl_skill_hvp_equals_the_fisher_vp_on_the_whole_model(kl_setup, kl_hvp):
    params, _, _, ref, fvp = kl_setup
    hvp = kl_hvp
    flat, unravel = ravel_pytree(params)
    for k in range(2):
        v = unravel(jax.random.normal(jax.random.key(20 + k), flat.shape, jnp.float64))
        assert rel_err(ravel_pytree(hvp(params, v, *ref))[0], ravel_pytree(fvp(v))[0]) < 1e-12


def test_kl_skill_change_is_cancellation_free(kl_setup):
    params, logits, _, ref, fvp = kl_setup
    u = training.kl_skill_loss(logits)
    du = jax.jit(training.kl_skill_change(logits))
    first = training.answer_logits(logits)

    def direct(p):
        return jnp.mean(_direct_kl(ref.logits, first(p, ref.tokens, ref.answer_start)))

    flat, unravel = ravel_pytree(params)
    e = jax.random.normal(jax.random.key(7), flat.shape, jnp.float64)
    e = e / jnp.linalg.norm(e)
    add = jax.jit(lambda x: jax.tree.map(jnp.add, params, x))
    quad = float(e @ ravel_pytree(fvp(unravel(e)))[0]) / 2  # Δu = quad·s² + O(s³)

    s = 0.5  # moderate: every route agrees
    x = unravel(s * e)
    moderate = float(du(params, x, *ref))
    assert moderate > 0
    assert abs(moderate - float(jax.jit(direct)(add(x)))) <= 1e-10 * moderate
    assert abs(moderate - float(jax.jit(u)(add(x), *ref))) <= 1e-10 * moderate
    cubic = abs(moderate / (quad * s**2) - 1) / s  # relative cubic term per unit ‖x‖

    s = 1e-7  # tiny: Δu ≈ 1e-16, at the rounding of the direct form
    x = unravel(s * e)
    small = float(du(params, x, *ref))
    expected = quad * s**2
    # what is left is the rounding of z(θ) − z(θ*), relative eps·|z|/|δ| ≈ 1e-8 here
    assert abs(small - expected) <= (1e-7 + 10 * cubic * s) * expected, (small, expected)
    direct_small = float(jax.jit(direct)(add(x)))
    assert abs(direct_small - expected) > 1e-3 * expected  # the direct difference has lost it
