"""tensor_norm: matrix-free derivative contractions and SS-HOPM against explicit tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import tensor_norm


def _symmetric(key, n: int, order: int) -> np.ndarray:
    """A random symmetric tensor of ``order`` on ``R^n`` (mean over index permutations)."""
    import itertools

    t = np.asarray(jax.random.normal(key, (n,) * order))
    perms = list(itertools.permutations(range(order)))
    return sum(np.transpose(t, p) for p in perms) / len(perms)


def _cubic_function(t: np.ndarray, key):
    """``f(θ) = T[θ³]/6 + θᵀAθ + bᵀθ``: its third derivative is ``T`` everywhere."""
    n = t.shape[0]
    a, b = jax.random.normal(key, (n, n)), jax.random.normal(jax.random.fold_in(key, 1), (n,))
    t = jnp.asarray(t)
    return lambda th: jnp.einsum("ijk,i,j,k", t, th, th, th) / 6 + th @ a @ th + b @ th


def _form(t, v):
    out = jnp.asarray(t)
    for _ in range(t.ndim):
        out = out @ v
    return out


def test_contraction_matches_the_explicit_derivative_tensor_on_a_pytree():
    """``∇ᵐf[v^{m−1},·]`` and ``∇ᵐf[vᵐ]`` against ``jax.jacfwd`` applied ``m`` times (m = 3, 4)."""
    k = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k[0], (5, 4))

    def f(p):  # non-polynomial: the derivatives depend on the point
        return jnp.sum(jnp.tanh(w @ p["a"] + p["b"]) ** 2) + jnp.sum(jnp.sin(p["b"]) * p["a"][:1])

    params = {"a": jax.random.normal(k[1], (4,)), "b": jax.random.normal(k[2], (5,))}
    v = {"a": jax.random.normal(k[3], (4,)), "b": jax.random.normal(k[0], (5,))}
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    vf = jax.flatten_util.ravel_pytree(v)[0]

    def g(x):
        return f(unravel(x))

    for order in (3, 4):
        dense = g
        for _ in range(order):
            dense = jax.jacfwd(dense)
        t = dense(flat)
        assert np.allclose(t, np.swapaxes(t, 0, 1), atol=1e-12)
        contract = tensor_norm.derivative_contraction(f, order)(params, v)
        want = t
        for _ in range(order - 1):
            want = want @ vf
        got = jax.flatten_util.ravel_pytree(contract)[0]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        form = tensor_norm.derivative_form(f, order)(params, v)
        np.testing.assert_allclose(form, want @ vf, rtol=1e-10)


def _odeco(n: int, lams, order: int, key) -> np.ndarray:
    """``Σ λᵢ qᵢ^{⊗m}`` with orthonormal ``qᵢ``: ``max |T[vᵐ]| = max |λᵢ|`` (at ``±q_i``)."""
    q = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n))))[0]
    t = 0
    for lam, qi in zip(lams, q.T, strict=False):
        outer = qi
        for _ in range(order - 1):
            outer = np.multiply.outer(outer, qi)
        t = t + lam * outer
    return t


@pytest.mark.parametrize(
    "order,lams,best,signed", [(3, [3.0, -5.0, 2.0, 1.0], 5.0, 5.0), (4, [2, -4, 1], 4, -4)]
)
def test_sshopm_finds_the_known_maximum_of_an_orthogonally_decomposable_tensor(
    order, lams, best, signed
):
    """Odd order: ``λ = 5`` at ``−q₂``; even order: only the run on ``−T`` reaches ``λ = −4``."""
    n = 6
    t = _odeco(n, lams, order, jax.random.key(1))
    if order == 3:
        f = _cubic_function(t, jax.random.key(2))
    else:

        def f(th):
            return _form(t, th) / 24 + jnp.sum(th**2)

    theta = jax.random.normal(jax.random.key(3), (n,))
    contract = jax.jit(lambda v: tensor_norm.derivative_contraction(f, order)(theta, v))
    starts = jax.random.normal(jax.random.key(4), (16, n))
    found = tensor_norm.sshopm(contract, starts, order=order, max_iterations=200, tol=1e-12)
    assert float(found.value) == pytest.approx(best, rel=1e-9)
    assert float(found.eigenvalue) == pytest.approx(signed, rel=1e-9)
    assert float(jnp.linalg.norm(found.vector)) == pytest.approx(1, abs=1e-12)
    assert float(_form(t, found.vector)) == pytest.approx(float(found.eigenvalue), rel=1e-10)
    assert bool(jnp.all(found.converged))
    # never above the true maximum, from any start
    assert float(jnp.max(jnp.abs(found.screened))) <= best * (1 + 1e-12)


def _sphere_max(t: np.ndarray, points: int) -> tuple[float, float]:
    """``max |T[v³]|`` on the unit sphere of ``R²`` or ``R³`` by a dense grid, and its slack.

    Along a great circle ``T[v³]`` is a trigonometric polynomial of degree 3, so
    its second derivative is at most ``9·max|T[v³]|`` (Bernstein): the true
    maximum is within ``½·9·max·δ²`` of the grid's, ``δ`` the largest angular
    distance from a point of the sphere to the grid.
    """
    if t.shape[0] == 2:
        phi = np.linspace(0, 2 * np.pi, points)
        v = np.stack([np.cos(phi), np.sin(phi)], 1)
        delta = np.pi / (points - 1)
    else:
        th, ph = np.meshgrid(np.linspace(0, np.pi, points), np.linspace(0, 2 * np.pi, 2 * points))
        v = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1)
        v = v.reshape(-1, 3)
        delta = np.hypot(np.pi / (points - 1), np.pi / (2 * points - 1))
    best = float(np.max(np.abs(np.einsum("ijk,ni,nj,nk->n", t, v, v, v))))
    return best, 4.5 * best * delta**2


@pytest.mark.parametrize("n,seed", [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1)])
def test_sshopm_on_random_cubic_functions_is_at_most_and_at_the_true_maximum(n, seed):
    """Random symmetric ``T`` (the third derivative of a cubic): within the grid's bracket."""
    key = jax.random.key(10 + seed)
    t = _symmetric(key, n, 3)
    grid, slack = _sphere_max(t, 200_001 if n == 2 else 1500)
    f = _cubic_function(t, jax.random.fold_in(key, 1))
    theta = jax.random.normal(jax.random.fold_in(key, 2), (n,))
    contract = jax.jit(lambda v: tensor_norm.derivative_contraction(f, 3)(theta, v))
    starts = jax.random.normal(jax.random.fold_in(key, 3), (8, n))
    found = tensor_norm.sshopm(contract, starts, order=3, max_iterations=500, tol=1e-13)
    value = float(found.value)
    assert value <= grid + slack + 1e-13  # never above the true maximum
    assert value >= grid * (1 - 1e-12)  # and at it (the grid's maximum is below the true one)
    assert slack <= (2e-9 if n == 2 else 5e-5) * grid
    # λ never decreases along a run: the refined λ are at least the screened ones they start from
    assert float(jnp.min(found.refined)) >= float(jnp.sort(found.screened)[-4]) - 1e-12


def test_sshopm_counts_its_contractions_and_screens_every_start():
    """One contraction per step of each run in a batch; ``screened`` has one ``λ`` per start."""
    t = _symmetric(jax.random.key(5), 4, 3)
    calls = []

    def contract(v):
        calls.append(1)  # once when sshopm checks its output shape, once in the compiled step
        return jnp.einsum("ijk,j,k->i", jnp.asarray(t), v, v)

    starts = jax.random.normal(jax.random.key(7), (5, 4))
    found = tensor_norm.sshopm(contract, starts, order=3, refine=2, screen_iterations=3)
    assert len(calls) == 2  # screening chunks and refinement share one compiled step
    assert found.screened.shape == (5,) and found.refined.shape == (2,)
    lam = [float(_form(t, x / jnp.linalg.norm(x))) for x in starts]
    assert np.all(np.asarray(found.screened) >= np.abs(lam) - 1e-12)  # λ never decreases
    # 3 chunks of 2 (the last padded), 1 + 3 steps at most each, then the refined steps
    assert int(found.contractions) <= 3 * 2 * 4 + 2 * int(np.max(found.iterations))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"order": 1}, "order"),
        ({"order": True}, "order"),
        ({"order": 3.0}, "order"),
        ({"order": 3, "tol": 0.0}, "tol"),
        ({"order": 3, "tol": float("nan")}, "tol"),
        ({"order": 3, "refine": 0}, "refine"),
        ({"order": 3, "screen_iterations": -1}, "screen_iterations"),
        ({"order": 3, "max_iterations": 2.5}, "max_iterations"),
    ],
)
def test_sshopm_refuses_bad_arguments(kwargs, match):
    starts = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=match):
        tensor_norm.sshopm(lambda v: v, starts, **kwargs)


@pytest.mark.parametrize(
    "starts,contract,match",
    [
        (jnp.zeros((0, 3)), lambda v: v, "starts"),
        (jnp.asarray([[1.0, 0, 0], [0, 0, 0]]), lambda v: v, "starts"),
        (jnp.asarray([[1.0, jnp.nan, 0]]), lambda v: v, "starts"),
        (jnp.ones((2, 3), jnp.int32), lambda v: v, "starts"),
        (jnp.ones((2, 3)), lambda v: v[:2], "contract"),
        (jnp.ones((2, 3)), lambda v: jnp.sum(v), "contract"),
    ],
)
def test_sshopm_refuses_bad_starts_and_contractions(starts, contract, match):
    with pytest.raises(ValueError, match=match):
        tensor_norm.sshopm(contract, starts, order=3)


def test_derivative_factories_refuse_bad_orders():
    with pytest.raises(ValueError, match="order"):
        tensor_norm.derivative_contraction(jnp.sum, 1)
    with pytest.raises(ValueError, match="order"):
        tensor_norm.derivative_form(jnp.sum, 0)
