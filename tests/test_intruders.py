"""Intruder dimensions (Shuttleworth et al. 2024, Def. 1) against dense numpy twins.

Every number is checked against ``np.linalg.svd`` on the same matrices; the
constructed case has its intruder, index and update known in closed form.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import intruders, models
from geomcollapse.curvature import leaf_paths
from geomcollapse.models._lora import DEFAULT_TARGETS
from tests.conftest import rel_err, tol_for

TOL = tol_for(jnp.float64)  # 1e3·eps ≈ 2e-13


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _near_identity_rotation(rng, n, scale):
    """A rotation ``Q`` with ``‖Q − I‖ = O(scale)`` (QR of ``I + scale·G``)."""
    q, r = np.linalg.qr(np.eye(n) + scale * rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def np_max_similarity(w0, w1, k, space="output"):
    """The twin of ``IntruderResult.max_similarity`` (null singular vectors of w0 excluded)."""
    u0, s0, v0t = np.linalg.svd(w0, full_matrices=False)
    u1, _, v1t = np.linalg.svd(w1, full_matrices=False)
    ys, xs = (v1t[:k], v0t) if space == "output" else (u1[:, :k].T, u0.T)
    keep = s0 > max(w0.shape) * np.finfo(w0.dtype).eps * s0[0]
    return np.abs(ys @ xs[keep].T).max(axis=1)


def np_intruder_update(w0, w1, k, threshold, space="output"):
    """The twin of ``intruder_update``: ``Σ_{j intruder} (u_jᵀ ΔW v_j) u_j v_jᵀ``."""
    u1, _, v1t = np.linalg.svd(w1, full_matrices=False)
    delta = w1 - w0
    out = np.zeros_like(w0)
    for j in np.flatnonzero(np_max_similarity(w0, w1, k, space) < threshold):
        out += (u1[:, j] @ delta @ v1t[j]) * np.outer(u1[:, j], v1t[j])
    return out


@pytest.fixture(scope="module")
def constructed():
    """``W₁ = 1.1·W₀ + σ u vᵀ`` with ``u ⟂ range W₀``, ``v ⟂ range W₀ᵀ`` (8 × 12, rank 5).

    ``W₁``'s singular values are 11, 8.8, 7 (the new ``u vᵀ``), 6.6, 4.4, 2.2:
    exactly one intruder, at index 2, in either space.
    """
    rng = np.random.default_rng(0)
    q_in, q_out = _orthogonal(rng, 8), _orthogonal(rng, 12)
    s = np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    w0 = (q_in[:, :5] * s) @ q_out[:, :5].T
    u, v, sigma = q_in[:, 5], q_out[:, 5], 7.0
    w1 = 1.1 * w0 + sigma * np.outer(u, v)
    return w0, w1, sigma * np.outer(u, v)


@pytest.mark.parametrize("space", ["output", "input"])
def test_constructed_case_has_one_intruder_at_index_2(constructed, space):
    w0, w1, _ = constructed
    res = intruders.intruder_dimensions(w0, w1, k=6, space=space)
    assert res.count == 1
    np.testing.assert_array_equal(np.asarray(res.indices), [2])
    np.testing.assert_allclose(res.max_similarity, [1, 1, 0, 1, 1, 1], atol=TOL)
    np.testing.assert_allclose(res.singular_values, [11, 8.8, 7, 6.6, 4.4, 2.2], rtol=TOL)
    assert res.vectors_left.shape == (6, 8) and res.vectors_right.shape == (6, 12)
    assert res.max_similarity.dtype == jnp.float64
    np.testing.assert_allclose(res.max_similarity, np_max_similarity(w0, w1, 6, space), atol=TOL)


@pytest.mark.parametrize("space", ["output", "input"])
def test_constructed_update_is_the_new_rank_one_term(constructed, space):
    w0, w1, new_term = constructed
    update = intruders.intruder_update(w0, w1, k=6, threshold=0.5, space=space)
    assert rel_err(update, new_term) < TOL
    # ΔW also holds 0.1·W₀ along W₀'s own directions, which is not intruder
    assert rel_err(w1 - w0, new_term) > 0.1


def test_unchanged_or_rescaled_matrix_has_no_intruders():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((10, 7))
    for w1 in (w0, 3.0 * w0, -0.5 * w0):
        res = intruders.intruder_dimensions(w0, w1, k=7, threshold=0.99)
        assert res.count == 0 and res.indices.shape == (0,)
        np.testing.assert_allclose(res.max_similarity, np.ones(7), atol=TOL)
        assert np.all(np.asarray(intruders.intruder_update(w0, w1, k=7)) == 0.0)


@pytest.mark.parametrize("space", ["output", "input"])
def test_rotated_matrix_matches_numpy(space):
    """``W₁ = R_in W₀ R_outᵀ`` for rotations near ``I``: similarities spread below 1."""
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((9, 13))
    r_in = _near_identity_rotation(rng, 9, 0.3)
    r_out = _near_identity_rotation(rng, 13, 0.3)
    w1 = r_in @ w0 @ r_out.T
    k = 9
    expected = np_max_similarity(w0, w1, k, space)
    assert expected.min() < 0.9  # the rotation moved vectors: the test has something to match
    res = intruders.intruder_dimensions(w0, w1, k=k, space=space)
    np.testing.assert_allclose(res.max_similarity, expected, rtol=1e-10)
    # a threshold midway between two measured similarities splits them unambiguously
    srt = np.sort(expected)
    threshold = 0.5 * (srt[2] + srt[3])
    res = intruders.intruder_dimensions(w0, w1, k=k, threshold=threshold, space=space)
    np.testing.assert_array_equal(np.asarray(res.indices), np.flatnonzero(expected < threshold))
    assert res.count == 3
    u1, s1, v1t = np.linalg.svd(w1, full_matrices=False)
    np.testing.assert_allclose(res.singular_values, s1[:k], rtol=TOL)
    for j in range(k):  # sign-free: compare the rank-one terms u_j v_jᵀ
        got = np.outer(res.vectors_left[j], res.vectors_right[j])
        assert rel_err(got, np.outer(u1[:, j], v1t[j])) < 1e-10
    update = intruders.intruder_update(w0, w1, k=k, threshold=threshold, space=space)
    assert rel_err(update, np_intruder_update(w0, w1, k, threshold, space)) < 1e-10


def test_update_jits_and_matches_eager(constructed):
    w0, w1, _ = constructed
    fn = jax.jit(partial(intruders.intruder_update, k=6, threshold=0.5))
    np.testing.assert_allclose(fn(w0, w1), intruders.intruder_update(w0, w1, k=6), atol=TOL)


def _replace(params, path, fn):
    """``params`` with the leaf at ``path`` replaced by ``fn(leaf)``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = leaf_paths(params)
    new = [fn(leaf) if p == path else leaf for p, leaf in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.fixture(scope="module")
def tiny_pair():
    """A one-block transformer (width 4) θ₀ and θ₁ = θ₀ + 1e-6 noise + an intruder in fc1."""
    config = models.TransformerConfig(vocab=5, context=3, d_model=4, heads=2, layers=1, mlp_ratio=2)
    _, params0 = models.transformer_init(jax.random.key(0), config, dtype=jnp.float64)
    rng = np.random.default_rng(3)
    paths = leaf_paths(params0)
    leaves = jax.tree_util.tree_leaves(params0)
    new = []
    for path, w in zip(paths, leaves, strict=True):
        w1 = np.asarray(w) + 1e-6 * rng.standard_normal(w.shape)
        if path == "blocks/0/fc1/kernel/value":  # (4, 8): v ⟂ W₀'s row space, far larger σ
            _, s, vt = np.linalg.svd(np.asarray(w))
            u = rng.standard_normal(4)
            w1 = w1 + 20 * s[0] * np.outer(u / np.linalg.norm(u), vt[4])
        new.append(jnp.asarray(w1))
    params1 = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params0), new)
    return params0, params1


def test_pytree_counts_and_zeros_outside_matched_leaves(tiny_pair):
    params0, params1 = tiny_pair
    counts, update = intruders.intruder_pytree(params0, params1, k=2, threshold=0.5)
    matched = {p for p in leaf_paths(params0) if re.search(DEFAULT_TARGETS, p)}
    assert (
        set(counts)
        == matched
        == {f"blocks/0/{name}/kernel/value" for name in ("qkv", "out", "fc1", "fc2")}
    )
    assert jax.tree_util.tree_structure(update) == jax.tree_util.tree_structure(params0)
    d0 = dict(zip(leaf_paths(params0), jax.tree_util.tree_leaves(params0), strict=True))
    d1 = dict(zip(leaf_paths(params1), jax.tree_util.tree_leaves(params1), strict=True))
    for path, leaf in zip(leaf_paths(update), jax.tree_util.tree_leaves(update), strict=True):
        assert leaf.shape == d0[path].shape and leaf.dtype == d0[path].dtype
        if path not in matched:
            assert np.all(np.asarray(leaf) == 0.0), path
            continue
        w0, w1 = np.asarray(d0[path]), np.asarray(d1[path])
        n_np = int(np.sum(np_max_similarity(w0, w1, 2) < 0.5))
        assert counts[path] == n_np, path
        expected = np_intruder_update(w0, w1, 2, 0.5)
        np.testing.assert_allclose(leaf, expected, atol=TOL * max(1.0, np.abs(w1).max()))
    assert counts["blocks/0/fc1/kernel/value"] == 1
    assert sum(counts.values()) == 1
    fc1 = dict(zip(leaf_paths(update), jax.tree_util.tree_leaves(update), strict=True))
    assert np.abs(np.asarray(fc1["blocks/0/fc1/kernel/value"])).max() > 1.0


# --- bad input --------------------------------------------------------------

_W = np.random.default_rng(4).standard_normal((5, 6))


def _with(value, i=0):
    w = _W.copy()
    w.flat[i] = value
    return w


BAD_MATRIX_CALLS = {
    "w0 not 2-D": (dict(w0=_W[0], w1=_W), "w0"),
    "w1 3-D": (dict(w0=_W, w1=_W[None]), "w1"),
    "shape mismatch": (dict(w0=_W, w1=_W[:, :5]), "w1 has shape"),
    "integer w0": (dict(w0=np.ones((5, 6), int), w1=_W), "w0"),
    "nan in w0": (dict(w0=_with(np.nan), w1=_W), "w0"),
    "inf in w1": (dict(w0=_W, w1=_with(np.inf, 7)), "w1"),
    "k = 0": (dict(w0=_W, w1=_W, k=0), "k"),
    "k > min dim": (dict(w0=_W, w1=_W, k=6), "k=6"),
    "k not an int": (dict(w0=_W, w1=_W, k=2.0), "k"),
    "threshold 0": (dict(w0=_W, w1=_W, threshold=0.0), "threshold"),
    "threshold > 1": (dict(w0=_W, w1=_W, threshold=1.5), "threshold"),
    "threshold nan": (dict(w0=_W, w1=_W, threshold=float("nan")), "threshold"),
    "unknown space": (dict(w0=_W, w1=_W, space="rows"), "space"),
}


@pytest.mark.parametrize("fn", [intruders.intruder_dimensions, intruders.intruder_update])
@pytest.mark.parametrize("case", list(BAD_MATRIX_CALLS))
def test_bad_matrix_input_names_the_argument(fn, case):
    kwargs, name = BAD_MATRIX_CALLS[case]
    kwargs = {"k": 3, **kwargs}
    w0, w1 = kwargs.pop("w0"), kwargs.pop("w1")
    with pytest.raises(ValueError, match=name):
        fn(w0, w1, **kwargs)


def test_bad_pytree_input_names_the_argument(tiny_pair):
    params0, params1 = tiny_pair
    with pytest.raises(ValueError, match="k=10 exceeds"):  # the default k on width-4 matrices
        intruders.intruder_pytree(params0, params1)
    with pytest.raises(ValueError, match="params1"):
        intruders.intruder_pytree(params0, {"a": jnp.zeros(3)}, k=2)
    with pytest.raises(ValueError, match="not a matrix"):
        intruders.intruder_pytree(params0, params1, where="ln1/scale", k=1)
    with pytest.raises(ValueError, match="selects no parameter"):
        intruders.intruder_pytree(params0, params1, where="nothing_here", k=1)
    with pytest.raises(ValueError, match="threshold"):
        intruders.intruder_pytree(params0, params1, k=2, threshold=2.0)
    bad = _replace(params1, "blocks/0/qkv/kernel/value", lambda w: w.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"params1\['blocks/0/qkv/kernel/value'\]"):
        intruders.intruder_pytree(params0, bad, k=2)
