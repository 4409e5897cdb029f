"""Shared test set-up: float64 enabled once, dtype-scaled tolerances, small models."""

import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread beside XLA's pool
# One XLA compilation cache per test run, shared by the xdist workers and the
# subprocesses they start: the same programs (the aligned transformer's training,
# the fine-tuning scans, the Fisher matvecs) are compiled by several test files,
# and compilation is about half of the suite's time. Results do not depend on it.
_OWN_CACHE = os.path.join(tempfile.gettempdir(), f"geomcollapse-xla-{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _OWN_CACHE)  # workers inherit the controller's
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The run's aligned tiny transformer, trained by the first worker that needs it; named
# by the controller's pid (workers inherit it), so no run reuses another's.
_RUN = os.environ.setdefault("GEOMCOLLAPSE_TEST_RUN", str(os.getpid()))
_SHARED_ALIGNED = os.path.join(tempfile.gettempdir(), f"geomcollapse-aligned-{_RUN}")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from geomcollapse import models  # noqa: E402


def rel_err(actual, expected) -> float:
    """``‖actual − expected‖ / max(‖expected‖, tiny)`` in float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def run_optimizer(opt, params, grad, steps: int, *args):
    """``steps`` jitted steps of the optax ``opt`` on ``grad(params, *args)``.

    Returns the iterates ``θ_0 … θ_K``, the updates and the states; asserts one
    compile (no recompilation after the first step).
    """
    import optax

    @jax.jit
    def step(p, s):
        u, s = opt.update(grad(p, *args), s, p)
        return optax.apply_updates(p, u), s, u

    state, thetas, updates, states = opt.init(params), [params], [], []
    for _ in range(steps):
        params, state, u = step(params, state)
        thetas.append(params)
        updates.append(u)
        states.append(state)
    assert step._cache_size() == 1  # no recompilation after the first call
    return thetas, updates, states


def flat(tree) -> np.ndarray:
    """A pytree raveled into one ``(n,)`` numpy array."""
    return np.asarray(ravel_pytree(tree)[0])


def eigensolver_spectra(n: int) -> dict[str, np.ndarray]:
    """Eigenvalue sets of size ``n`` the eigensolvers must handle (clustered, repeated, ...)."""
    return {
        "clustered": np.r_[
            10 + 1e-4 * np.arange(4), 6 + 1e-4 * np.arange(4), np.linspace(3, 0.1, n - 8)
        ],
        "repeated": np.r_[[10.0] * 3, [7.0] * 2, np.linspace(5, 0.1, n - 5)],
        "decaying": 0.8 ** np.arange(n),
        "rank_deficient": np.r_[np.linspace(9, 1, 6), np.zeros(n - 6)],
    }


def symmetric_with_spectrum(spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(spectrum) Uᵀ`` with a seeded random orthogonal ``U``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((spectrum.size, spectrum.size)))
    return (U * spectrum) @ U.T


def tol_for(dtype, factor: float = 1e3) -> float:
    """Tolerance ``factor · eps(dtype)``."""
    return factor * float(jnp.finfo(dtype).eps)


class Problem:
    """A model as pure functions of a parameter pytree, with jitted dense references."""

    def __init__(self, params, logits_fn, batch):
        self.params = params
        self.logits = logits_fn
        self.batch = batch
        flat, unravel = ravel_pytree(params)
        self.flat = flat

        def flat_loss(x):
            return self.loss(unravel(x), batch)

        def flat_logits(x):
            z = logits_fn(unravel(x), batch)
            return z.reshape(-1, z.shape[-1])

        self.dense_hessian = jax.jit(jax.hessian(flat_loss))(flat)
        self.dense_gradient = jax.jit(jax.grad(flat_loss))(flat)
        self.dense_jacobian = jax.jit(jax.jacfwd(flat_logits))(flat)  # (N, C, n)
        self.dense_logits = jax.jit(flat_logits)(flat)  # (N, C)

    def loss(self, params, batch):
        return models.softmax_cross_entropy(self.logits(params, batch), batch.y)

    def example_loss(self, params, example):
        ex = jax.tree_util.tree_map(lambda a: a[None], example)
        return self.loss(params, ex)


@pytest.fixture(scope="session")
def mlp64():
    """A 6-12-4 tanh MLP (136 parameters) on 24 mixture points, float64."""
    p = models.mlp_problem(jax.random.key(3), (6, 12, 4), 24, gd_steps=2, dtype=jnp.float64)
    return Problem(p.params, p.logits, p.batch)


@pytest.fixture(scope="session")
def transformer64():
    """The library transformer, one causal block (vocab 5, width 4, 2 heads; 237 parameters)."""
    config = models.TransformerConfig(vocab=5, context=3, d_model=4, heads=2, layers=1, mlp_ratio=2)
    graphdef, params = models.transformer_init(jax.random.key(0), config, dtype=jnp.float64)
    k_tok, k_lab = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(k_tok, (6, 3), 0, 5)
    batch = models.Batch(x=tokens, y=jax.random.randint(k_lab, (6, 3), 0, 5))
    transformer_logits = models.transformer_logits(graphdef)

    def logits(params, batch):
        return transformer_logits(params, batch.x)

    return Problem(params, logits, batch)


@pytest.fixture(params=["mlp64", "transformer64"])
def problem(request):
    """Every curvature test runs on both the MLP and the transformer block."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def aligned_root(tmp_path_factory):
    """A directory holding the session's aligned tiny transformer at its experiments' cache path.

    Pretrained and aligned once per session (about a minute on 2 CPU cores)
    with ``ALIGNMENT['tiny-fast']``; experiments run with ``outdir`` = this root
    (or a copy) restore it instead of training.
    """
    import fcntl
    from pathlib import Path

    from experiments._transformer import aligned_model

    # Trained once per test run, not once per xdist worker: the first worker to get
    # here trains into a directory beside the run's compilation cache (under a file
    # lock); the others restore it from there (seconds instead of half a minute).
    shared = Path(_SHARED_ALIGNED)
    shared.mkdir(exist_ok=True)
    with open(shared.parent / f"{shared.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        aligned_model("tiny-fast", shared, progress=False)
    root = tmp_path_factory.mktemp("aligned_root")
    shutil.copytree(shared, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="session")
def aligned(aligned_root):
    """The aligned tiny transformer ``θ*`` (``pipeline.AlignedModel``) from its checkpoint."""
    from experiments._transformer import aligned_model

    return aligned_model("tiny-fast", aligned_root, progress=False)


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the run's compilation cache and model."""
    if not hasattr(session.config, "workerinput"):  # only the cache this file created
        if os.environ["JAX_COMPILATION_CACHE_DIR"] == _OWN_CACHE:
            shutil.rmtree(_OWN_CACHE, ignore_errors=True)
        if _RUN == str(os.getpid()):
            shutil.rmtree(_SHARED_ALIGNED, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(_SHARED_ALIGNED + ".lock")


# --------------------------------------------------------------------------- two tiers
# The default run (``make test``, CI) is every test but those marked ``full``: end-to-end
# runs of the experiments, process and SIGKILL robustness, the benchmarks' own runs,
# redraws of committed figures, and the costlier extra cases of an identity that a
# cheaper case checks in the default run. ``pytest --full`` (``make test-full``, or
# GEOMCOLLAPSE_FULL_TESTS=1) runs them too; the skip reason names the command.
FULL_REASON = "full tier: run with `make test-full` (pytest --full)"


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked `full` (end-to-end runs, robustness, benchmarks)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", f"full: in the full tier only ({FULL_REASON})")


def full_tier_on(config) -> bool:
    """Whether this run includes the ``full`` tier (``--full`` or GEOMCOLLAPSE_FULL_TESTS=1)."""
    flag = os.environ.get("GEOMCOLLAPSE_FULL_TESTS", "").strip().lower()
    return bool(config.getoption("--full")) or flag in {"1", "true", "yes", "on"}


def pytest_collection_modifyitems(config, items):
    if full_tier_on(config):
        return
    skip = pytest.mark.skip(reason=FULL_REASON)
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)
