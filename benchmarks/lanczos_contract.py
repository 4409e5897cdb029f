"""The Lanczos contract's numerical checks (issue #25, deliverables 2 and 3), one JSON line each.

``python -m benchmarks.lanczos_contract`` prints:

- ``slq_scale``: SLQ of a float32 operator ``A`` (n = 200, spectrum in [1, 10])
  and of ``1e-30·A``: the largest relative error of the scaled run's nodes
  (divided by 1e-30) and of its weights against the unscaled run, and of the
  top node against ``numpy.linalg.eigh``.
- ``gram``: the Gram route in float32 on ``G`` (m = 10, n = 3000) whose
  empirical Fisher has eigenvalues from 1 down to 1.3e-5: how many pairs are
  flagged ``converged`` although their true residual ``‖Fv − λv‖`` (float64)
  exceeds ``100·eps·λ₁``.
- ``sharded_certification``: in a subprocess with 4 host devices, x64 on, the
  residual ``‖Av − λv‖`` of a float32 vector sharded over the mesh as the
  sharded Lanczos route certifies it, against float64 on the host (relative
  to ``|λ|``), and the dtype it was computed in.
- ``tail_mass``: ``measure_aic`` in float32 on a Gauss-Newton Fisher
  ``JᵀJ/m`` (n = 300, d = 5 eigenvalues near 1, the other 295 near 1e-6):
  the relative error of the tail mass against the float64 truth
  ``Σ_{j>d} λ_j`` (exact and Hutchinson traces), and the rounding bound
  reported with it where there is one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from geomcollapse import aic, linalg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _symmetric(spectrum: np.ndarray, seed: int) -> np.ndarray:
    n = spectrum.size
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (Q * spectrum) @ Q.T


def slq_scale() -> dict:
    spectrum = np.linspace(1.0, 10.0, 200)
    A = jnp.asarray(_symmetric(spectrum, 0), jnp.float32)
    runs = {}
    for s in (1.0, 1e-30):
        As = A * jnp.float32(s)
        runs[s] = linalg.spectral_density(
            lambda v, As=As: As @ v,
            jnp.zeros(200, jnp.float32),
            key=jax.random.key(0),
            num_probes=4,
            num_steps=40,
        )
    base, scaled = runs[1.0], runs[1e-30]
    top = float(np.max(base.nodes))
    return {
        "nodes_rel": float(np.max(np.abs(scaled.nodes / 1e-30 - base.nodes)) / top),
        "top_node_rel": abs(float(np.max(scaled.nodes)) / 1e-30 - top) / top,
        "weights_abs": float(np.max(np.abs(scaled.weights - base.weights))),
        "top_node_vs_eigh": abs(float(np.max(scaled.nodes)) / 1e-30 - spectrum[-1]) / spectrum[-1],
    }


def gram() -> dict:
    m, n = 10, 3000
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    W, _ = np.linalg.qr(rng.standard_normal((n, m)))
    s = np.sqrt(m * np.logspace(0, -4.9, m))  # F = GᵀG/m has eigenvalues 1 … 1.3e-5
    G = jnp.asarray((U * s) @ W.T, jnp.float32)
    pairs = linalg.empirical_fisher_eigenpairs(G, m)
    G64 = np.asarray(G, np.float64)
    V = np.asarray(pairs.vectors, np.float64)
    lam = np.asarray(pairs.values, np.float64)
    true = np.linalg.norm(((V @ G64.T) @ G64) / m - lam[:, None] * V, axis=1)
    tol = 100 * float(jnp.finfo(jnp.float32).eps) * lam[0]
    conv = np.asarray(pairs.converged)
    return {
        "converged": int(conv.sum()),
        "converged_but_residual_above_tol": int(np.sum(conv & (true > tol))),
        "max_true_rel_residual": float(np.max(true) / lam[0]),
    }


_SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
from geomcollapse._sharding import Layout
from geomcollapse.linalg import _lanczos
mesh = Mesh(np.asarray(jax.devices()), ("model",))
rng = np.random.default_rng(0)
v = rng.standard_normal(4096).astype(np.float32); v /= np.linalg.norm(v)
lam = 3.0000001234567
Av = (lam * v.astype(np.float64) + 1e-9 * rng.standard_normal(4096)).astype(np.float32)
sh = NamedSharding(mesh, P("model"))
tree = {"w": jax.device_put(v, sh)}
atree = {"w": jax.device_put(Av, sh)}
layout = Layout(tree)
ref = float(np.linalg.norm(Av.astype(np.float64) - lam * v.astype(np.float64)))
if hasattr(_lanczos, "_TreeOps"):
    got = _lanczos._TreeOps(layout).residual(atree, tree, lam)
    dtype = str(jnp.promote_types(jnp.float32, float))
else:
    from geomcollapse.linalg import _contract
    got = float(jax.device_get(_contract.residual_norms(atree, tree, jnp.asarray(lam))))
    dtype = str(_contract.certification_dtype(jnp.float32))
print(json.dumps({"rel_error": abs(got - ref) / lam, "dtype": dtype}))
"""


def sharded_certification() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def tail_mass() -> dict:
    m, n, d = 400, 300, 5
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    W, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = np.r_[np.linspace(1.0, 0.8, d), rng.uniform(0.5e-6, 1.5e-6, n - d)]
    J = jnp.asarray((U * np.sqrt(m * spectrum)) @ W.T, jnp.float32)
    J64 = np.asarray(J, np.float64)
    lam = np.linalg.eigvalsh(J64.T @ J64 / m)[::-1]
    truth = float(np.sum(lam[d:]))

    def fisher_vp(params, v, J):
        return jnp.dot(J.T, jnp.dot(J, v, precision="highest"), precision="highest") / m

    def loss(params, c):
        return 0.5 * jnp.sum((params - c) ** 2)

    params = jnp.asarray(rng.standard_normal(n), jnp.float32)
    c = jnp.asarray(rng.standard_normal(n), jnp.float32)
    out = {"truth": truth, "tail_over_top": truth / float(np.sum(lam[:d]))}
    for trace in ("exact", "hutchinson"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = aic.measure_aic(
                fisher_vp,
                loss,
                params,
                d,
                key=jax.random.key(3),
                fisher_args=(J,),
                loss_args=(c,),
                trace=trace,
                num_probes=256,
            )
        got = float(r.report.tail_mass)
        out[f"{trace}_rel_error"] = abs(got - truth) / truth
        out[f"{trace}_stderr_rel"] = float(r.trace_stderr) / truth
        bound = getattr(r, "tail_rounding", None)
        out[f"{trace}_rounding_bound_rel"] = None if bound is None else float(bound) / truth
    return out


def main() -> None:
    for name, fn in (
        ("slq_scale", slq_scale),
        ("gram", gram),
        ("sharded_certification", sharded_certification),
        ("tail_mass", tail_mass),
    ):
        print(json.dumps({name: fn()}))


if __name__ == "__main__":
    main()
