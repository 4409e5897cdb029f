"""The engine on parameters sharded over 4 host devices equals the one-device run to 1e-10.

One subprocess (``tests/sharded_check.py``: the device count must be set
before JAX starts) runs every entry point on a sharded MLP and on one device,
with the device-to-device and device-to-host transfer guards on and every
fetch of a value to the host recorded; this test reads its numbers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-10  # float64 results, single-device against sharded


@pytest.fixture(scope="module")
def measured() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_check.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "entry",
    [
        "hessian_vp",
        "fisher_vp",
        "aic_hutchinson",
        "aic_exact",
        "top_eigenpairs",
        "series",
        "ode_flow",
        "diagnose",
    ],
)
def test_sharded_results_equal_the_single_device_run(measured, entry):
    errors = {k: v for k, v in measured.items() if k.startswith(entry) and k.endswith("_rel")}
    assert errors, f"no numbers for {entry}"
    assert all(v <= TOL for v in errors.values()), errors
    for flag in ("converged", "sharded"):
        flags = {k: v for k, v in measured.items() if k.startswith(entry) and k.endswith(flag)}
        assert all(flags.values()), flags


def test_vectors_stay_sharded_and_only_scalars_reach_the_host(measured):
    # eigenvectors, the series' x_k and the flow's x(t): sharded like the parameters
    for key in ("aic_hutchinson", "aic_exact", "top_eigenpairs"):
        assert measured[f"{key}_vectors_sharded"], key
    assert measured["series_displacement_sharded"] and measured["ode_flow_sharded"]
    # No implicit fetch but of single compile-time constants (diffrax's, while lowering),
    # and no explicit one larger than the 16 Hutchinson samples, against n = 420
    # parameters in leaves of 32, 256, 4 and 128.
    assert measured["n"] == 420 and min(measured["leaf_sizes"]) == 4
    assert set(measured["implicit_fetches"]) <= {1}, measured["implicit_fetches"]
    assert measured["largest_explicit_fetch"] <= 16
    # a Lanczos step reduces (8,) coefficients across devices; it gathers nothing
    assert measured["lanczos_kernels_all_gather"] == 0
    assert measured["lanczos_kernels_all_reduce"] > 0


def test_sharded_certification_is_float64_with_x64(measured):
    """float32 vectors sharded over the mesh: ``‖Av − λv‖`` certified in float64 (x64 on),
    equal to the host's float64 norm to 1e-13·λ (it was float32: off by 1.8e-8·λ)."""
    assert measured["certification_dtype"] == "float64"
    assert measured["certification_rel"] <= 1e-13


def test_a_sharded_pytree_of_two_dtypes_is_refused_by_name(measured):
    assert measured["mixed_dtypes_error"].startswith("like mixes dtypes")


def test_diagnose_keeps_sharded_vectors_on_the_devices(measured):
    """``diagnose`` on the sharded MLP: every number equal to one device (above), the same
    text, integers and warnings, Lanczos (the dense route would gather ``F``), and no fetch
    but explicit ones of at most ``K·k`` coordinates or the probes' samples (n = 420)."""
    assert measured["diagnose_same_text_and_integers"]
    assert measured["diagnose_spectrum_method"] == "lanczos"
    assert measured["diagnose_horizon_time"] is not None
    assert measured["diagnose_implicit_fetches"] == []
    assert 0 < measured["diagnose_largest_explicit_fetch"] <= measured["diagnose_fetch_bound"]
    assert measured["diagnose_fetch_bound"] < measured["n"] // 4
    assert measured["diagnose_dense_error"].startswith("spectrum='dense'")
