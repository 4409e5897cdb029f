"""The engine on parameters sharded over 4 forced host devices, against one device.

Run as a script by ``tests/test_sharding.py`` (the device count must be set
before JAX starts); prints one JSON object of measured numbers. A 8-32-4 tanh
MLP in float64 (420 parameters) has its kernels and biases sharded over a
4-device mesh (``w1`` by columns, ``b1``, ``w2`` by rows, ``b2`` replicated)
and its 32 examples sharded along the example axis. Every entry point runs
twice, on the sharded pytree and on single-device copies, and the script
reports the largest relative difference, whether outputs stay sharded like
the parameters, and every device-to-host fetch made while the sharded calls
ran:

- ``jax.transfer_guard_device_to_device("disallow")`` and
  ``jax.transfer_guard_device_to_host("disallow")`` are on around the sharded
  calls: no array moves implicitly between devices (an implicit gather onto
  one device raises). On CPU devices JAX never flags device-to-host fetches
  (the host *is* the device: they are zero-copy), so the script also records
  every fetch of a ``jax.Array``'s value (``ArrayImpl._value``, a private JAX
  property, wrapped here only) with its size and whether it was explicit
  (``jax.device_get``): that is what the device-to-host guard would see on a
  GPU or TPU.
- The compiled Lanczos kernels are checked for ``all-gather``: a dot product
  is a per-device partial sum and an all-reduce of ``(8,)`` numbers.
- ``geomcollapse.diagnose`` is compared number by number with the one-device
  run on its Lanczos route, and its own fetches are recorded apart.
"""

from __future__ import annotations

import os

# 4 host devices; XLA's cheaper CPU compile (the problems are tiny, compiling is the cost:
# a third less time, the same numbers to 1e-15)
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import itertools
import json
import sys
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import array as _array
from jax._src.lib import guard_lib
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import geomcollapse  # noqa: E402
from geomcollapse import aic, curvature, flow, linalg, models, series  # noqa: E402
from geomcollapse._sharding import Layout  # noqa: E402
from geomcollapse.linalg import _lanczos  # noqa: E402

FETCHES: list[tuple[int, bool]] = []  # (size, explicit) of each fetch while guarded
_GUARDED = [False]
_value = _array.ArrayImpl._value


def _recording_value(self):
    if _GUARDED[0] and self._npy_value is None:
        FETCHES.append((int(self.size), bool(guard_lib.thread_local_state().explicit_device_get)))
    return _value.fget(self)


_array.ArrayImpl._value = property(_recording_value)


@contextlib.contextmanager
def guarded():
    """The transfer guards on, and every device-to-host fetch recorded."""
    _GUARDED[0] = True
    try:
        with (
            jax.transfer_guard_device_to_device("disallow"),
            jax.transfer_guard_device_to_host("disallow"),
        ):
            yield
    finally:
        _GUARDED[0] = False


def rel(a, b) -> float:
    """Largest ``‖a_leaf − b_leaf‖ / ‖b‖`` over the leaves of two pytrees (float64 on the host)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    scale = max(float(np.linalg.norm(np.asarray(x, np.float64))) for x in lb) or 1.0
    return max(
        float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))) / scale
        for x, y in zip(la, lb, strict=True)
    )


def sharded_like(tree, layout: Layout, stacked: bool = False) -> bool:
    """Every leaf of ``tree`` sharded as the parameters' leaf (with a leading axis if stacked)."""
    target = jax.tree_util.tree_leaves(layout.stacked if stacked else layout.shardings)
    leaves = jax.tree_util.tree_leaves(tree)
    return len(leaves) == len(target) and all(
        isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(leaves, target, strict=True)
    )


def main() -> dict:
    start = time.perf_counter()
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()), ("model",))
    problem = models.mlp_problem(jax.random.key(0), (8, 32, 4), 32, gd_steps=2, dtype=jnp.float64)
    specs = [{"b": P("model"), "w": P(None, "model")}, {"b": P(), "w": P("model", None)}]
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(problem.params, shardings)
    batch = jax.device_put(problem.batch, NamedSharding(mesh, P("model")))  # example axis
    layout = Layout(params)
    ref_params, ref_batch = problem.params, problem.batch
    loss, logits = problem.loss, problem.logits
    out: dict = {"n": layout.n, "leaf_sizes": list(layout.sizes)}

    marks = [("setup", time.process_time())]
    # Curvature operators: pure functions, jitted at the call site.
    v = jax.tree_util.tree_map(lambda p: jnp.cos(p), params)
    ref_v = jax.tree_util.tree_map(lambda p: jnp.cos(p), ref_params)
    for name, op in (
        ("hessian_vp", curvature.hessian_vp(loss)),
        ("fisher_vp", curvature.fisher_vp(logits)),
    ):
        fn = jax.jit(op)
        ref = fn(ref_params, ref_v, ref_batch)
        with guarded():
            got = fn(params, v, batch)
        out[f"{name}_rel"] = rel(got, ref)

    marks.append(("curvature", time.process_time()))
    # measure_aic (top_eigenpairs of the true Fisher inside it), both trace routes.
    fvp = curvature.fisher_vp(logits)
    key = jax.random.key(1)
    for trace in ("hutchinson", "exact"):
        kw = dict(key=key, trace=trace, num_probes=16)
        ref = aic.measure_aic(
            fvp, loss, ref_params, 3, fisher_args=(ref_batch,), loss_args=(ref_batch,), **kw
        )
        with guarded():
            got = aic.measure_aic(
                fvp, loss, params, 3, fisher_args=(batch,), loss_args=(batch,), **kw
            )
        numbers = [f for f, x in ref.report._asdict().items() if isinstance(x, float)]
        out[f"aic_{trace}_rel"] = max(
            abs(getattr(got.report, f) - getattr(ref.report, f)) / abs(getattr(ref.report, f))
            for f in numbers
        )
        out[f"aic_{trace}_trace_rel"] = abs(got.trace - ref.trace) / abs(ref.trace)
        ref_vectors = jax.vmap(ravel_like(ref_params))(ref.eigenpairs.vectors)
        out[f"aic_{trace}_vectors_rel"] = rel(got.eigenpairs.vectors, ref_vectors)
        out[f"aic_{trace}_values_rel"] = rel(got.eigenpairs.values, ref.eigenpairs.values)
        out[f"aic_{trace}_vectors_sharded"] = sharded_like(got.eigenpairs.vectors, layout, True)
        out[f"aic_{trace}_converged"] = bool(got.report.converged and ref.report.converged)

    marks.append(("aic", time.process_time()))
    # top_eigenpairs with a plain jitted matvec (its output comes back replicated:
    # the library reshards it by a compiled identity, never through the host).
    jfvp = jax.jit(fvp)
    ref = linalg.top_eigenpairs(
        lambda u: jfvp(ref_params, u, ref_batch), ref_params, 3, key=key, tol=1e-10
    )
    with guarded():
        got = linalg.top_eigenpairs(lambda u: jfvp(params, u, batch), params, 3, key=key, tol=1e-10)
    out["top_eigenpairs_values_rel"] = rel(got.values, ref.values)
    out["top_eigenpairs_vectors_rel"] = rel(got.vectors, ref.vectors)
    out["top_eigenpairs_vectors_sharded"] = sharded_like(got.vectors, layout, True)
    out["top_eigenpairs_converged"] = bool(np.all(got.converged))

    marks.append(("top_eigenpairs", time.process_time()))
    # The Lanczos kernels contain no all-gather.
    at = _lanczos.Placement(layout.n, layout.dtype, layout)
    block = _lanczos._zeros(at, _lanczos._CHUNK)
    h = _lanczos._zeros_h(at, _lanczos._CHUNK)
    offset = layout.put(np.int32(0))
    texts = [
        _lanczos._block_pass.lower(block, params, h, offset, at).compile().as_text(),
        _lanczos._local_step.lower(params, params, params, at).compile().as_text(),
    ]
    out["lanczos_kernels_all_gather"] = sum(t.count("all-gather") for t in texts)
    out["lanczos_kernels_all_reduce"] = sum(t.count("all-reduce") for t in texts)
    out.update(certification(params))

    marks.append(("hlo", time.process_time()))
    # The Taylor forecast with the sharded basis as subspace.
    skill_batch = jax.tree_util.tree_map(lambda a: a[:16], ref_batch)
    skill_sharded = jax.device_put(skill_batch, NamedSharding(mesh, P("model")))
    s_ref = series.delta_u_series(
        loss,
        loss,
        ref_params,
        3,
        subspace=(ref.values, ref.vectors),
        skill_args=(skill_batch,),
        task_args=(ref_batch,),
    )
    with guarded():
        s_got = series.delta_u_series(
            loss,
            loss,
            params,
            3,
            subspace=(got.values, got.vectors),
            skill_args=(skill_sharded,),
            task_args=(batch,),
        )
        validity = s_got.validity_time
    out["series_delta_u_rel"] = rel(s_got.delta_u, s_ref.delta_u)
    out["series_projected_rel"] = rel(s_got.projected, s_ref.projected)
    out["series_displacement_rel"] = rel(s_got.displacement, s_ref.displacement)
    out["series_displacement_sharded"] = sharded_like(s_got.displacement, layout, True)
    out["series_validity_rel"] = abs(validity - s_ref.validity_time) / s_ref.validity_time

    marks.append(("series", time.process_time()))
    # Gradient flow (diffrax): the state stays sharded like θ*.
    ts = np.array([0.05, 0.2, 0.5])
    kw = dict(solver=diffrax.Euler(), dt=0.05)
    f_ref = flow.ode_flow(loss, ref_params, ts, args=(ref_batch,), **kw)
    with guarded():
        f_got = flow.ode_flow(loss, params, ts, args=(batch,), **kw)
    out["ode_flow_rel"] = rel(f_got.displacement, f_ref.displacement)
    out["ode_flow_sharded"] = sharded_like(f_got.displacement, layout, True)

    marks.append(("ode_flow", time.process_time()))
    # Bad input: a sharded pytree of two dtypes is refused, naming the argument.
    mixed = {"a": params[0]["w"], "b": params[0]["b"].astype(jnp.float32)}
    try:
        linalg.top_eigenpairs(lambda u: u, mixed, 1, key=key)
        out["mixed_dtypes_error"] = ""
    except ValueError as err:
        out["mixed_dtypes_error"] = str(err)

    # geomcollapse.diagnose: the rule for d (capped at max_d = 3: one Lanczos run, as each
    # sharded Lanczos step costs ~30 ms of dispatch here), deflated Hutchinson, the series,
    # the AIC, the overlap and the crossing step on the sharded MLP, against the one-device
    # run on its Lanczos route. The Fisher matvec is measure_aic's: its compiled sharded
    # kernels are reused.
    kw = dict(
        skill_args=(batch,),
        task_args=(skill_sharded,),
        fisher=fvp,
        lr=0.05,
        steps=20,
        threshold=1e-4,
        order=3,
        key=key,
        trace="hutchinson",
        num_probes=16,
        max_d=3,
    )
    ref_kw = {**kw, "skill_args": (ref_batch,), "task_args": (skill_batch,)}
    d_ref = geomcollapse.diagnose(loss, loss, ref_params, spectrum="lanczos", **ref_kw)
    before = len(FETCHES)
    with guarded():
        d_got = geomcollapse.diagnose(loss, loss, params, **kw)
    out.update(compare_diagnoses(d_got, d_ref))
    fetched = FETCHES[before:]
    out["diagnose_implicit_fetches"] = sorted({s for s, explicit in fetched if not explicit})
    out["diagnose_largest_explicit_fetch"] = max((s for s, e in fetched if e), default=0)
    # the largest host array diagnose may need: the (K, k) coordinates or the probes' samples
    out["diagnose_fetch_bound"] = max(d_ref.order * len(d_ref.eigenvalues), 16)
    out["diagnose_spectrum_method"] = d_got.spectrum_method
    out["diagnose_horizon_time"] = d_got.horizon_time  # the overlap of x(t_h) was measured
    try:  # the dense route would form F on the host: refused by name for sharded params
        geomcollapse.diagnose(loss, loss, params, spectrum="dense", **kw)
        out["diagnose_dense_error"] = ""
    except ValueError as err:
        out["diagnose_dense_error"] = str(err)

    marks.append(("diagnose", time.process_time()))
    out["implicit_fetches"] = sorted({s for s, explicit in FETCHES if not explicit})
    out["largest_explicit_fetch"] = max((s for s, explicit in FETCHES if explicit), default=0)
    out["fetches"] = len(FETCHES)
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = {b[0]: round(b[1] - a[1], 2) for a, b in itertools.pairwise(marks)}
    out["cpu_seconds"]["import"] = round(marks[0][1], 2)
    return out


def certification(params) -> dict:
    """The residual ``‖Av − λv‖`` as the sharded route certifies it, float32 vectors, x64 on.

    ``v`` and ``Av = λv + 1e-9·noise`` are float32 pytrees sharded like the
    parameters; the certified norm must equal float64 on the host (relative to
    ``λ``) to 1e-13 (a float32 computation is off by ~eps32·λ: 1.8e-8 before).
    """
    rng = np.random.default_rng(0)
    leaves = jax.tree_util.tree_leaves(params)
    v = [rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    scale = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in v))
    v = [(x / scale).astype(np.float32) for x in v]
    lam = 3.0000001234567
    Av = [(lam * x + 1e-9 * rng.standard_normal(x.shape)).astype(np.float32) for x in v]
    wide = [(a.astype(np.float64), x.astype(np.float64)) for a, x in zip(Av, v, strict=True)]
    ref = np.sqrt(sum(np.sum((a - lam * x) ** 2) for a, x in wide))
    treedef = jax.tree_util.tree_structure(params)

    def place(xs):
        shardings = [x.sharding for x in leaves]
        return treedef.unflatten([jax.device_put(x, s) for x, s in zip(xs, shardings, strict=True)])

    with guarded():
        lam_on_mesh = Layout(params).put(np.float64(lam))
        got = jax.device_get(_lanczos._residual(place(Av), place(v), lam_on_mesh))
    return {
        "certification_rel": abs(float(got) - ref) / lam,
        "certification_dtype": str(got.dtype),
    }


def compare_diagnoses(got, ref) -> dict:
    """Every number of two :class:`geomcollapse.Diagnosis`, field by field, and the rest equal.

    A float field (or tuple) is compared relative to its largest magnitude in
    ``ref``; eigenpair residuals (rounding-level numbers themselves) relative to
    ``λ₁``, the scale their tolerance is stated in. Text, integers and ``None``
    must match exactly.
    """
    a, b = got.to_dict(), ref.to_dict()
    a.update({f"aic.{k}": v for k, v in a.pop("aic").items()})
    b.update({f"aic.{k}": v for k, v in b.pop("aic").items()})
    lam1 = abs(ref.eigenvalues[0])
    worst, worst_field, worst_res, same = 0.0, "", 0.0, True
    for name, x in b.items():
        y = a[name]
        xs = x if isinstance(x, list) else [x]
        ys = y if isinstance(y, list) else [y]
        numeric = all(isinstance(v, float) for v in xs) and not isinstance(x, bool)
        if not numeric or name in ("n", "d", "steps", "order", "num_matvecs", "crossing_step"):
            same = same and x == y
            continue
        if len(xs) != len(ys):
            same = False
            continue
        diff = max((abs(u - v) for u, v in zip(ys, xs, strict=True)), default=0.0)
        if name.endswith("eigen_residuals"):
            worst_res = max(worst_res, diff / lam1)
            continue
        scale = max((abs(v) for v in xs), default=0.0) or 1.0
        if diff / scale > worst:
            worst, worst_field = diff / scale, name
    return {
        "diagnose_rel": worst,
        "diagnose_worst_field": worst_field,
        "diagnose_residuals_rel": worst_res,
        "diagnose_same_text_and_integers": bool(same),
        "diagnose_converged": bool(got.aic.converged and ref.aic.converged),
    }


def ravel_like(params):
    """``(n,) → pytree like params`` (the reference eigenvectors are raveled rows)."""
    return jax.flatten_util.ravel_pytree(params)[1]


if __name__ == "__main__":
    import jax.flatten_util

    json.dump(main(), sys.stdout)
