"""Sweeps: rows equal the landscapes' own numbers, bad configs fail clearly, kills resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from geomcollapse import sweep

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "batch_size": 3,
    "times": {"start": 1e-4, "stop": 1.0, "num": 12},
    "grid": {
        "n": [16, 20],
        "d": [2],
        "top": [[2.0, 1.0]],
        "tail_mass": [0.0, 0.05],
        "epsilon": [0.0, 1e-3],
        "coupling": [0.7],
    },
    "seeds": [0, 1],
}


def _write(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = {**BASE, "output": f"{name}.jsonl", **overrides}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _cli(config: Path, env_extra=None, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    cmd = [sys.executable, "-m", "geomcollapse.cli", "sweep", str(config), "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, **kw)


def test_rows_equal_each_landscapes_aic_and_exact_flow(tmp_path):
    config = sweep.load_config(_write(tmp_path, "rows"))
    header, rows = sweep.read_rows(sweep.run_sweep(config, progress=False))
    assert len(rows) == 2 * 2 * 2 * 2 and [r["id"] for r in rows] == list(range(16))
    ts = np.asarray(header["times"])
    for row in rows[::5]:
        L = sweep.landscape_for(row)
        ref = L.aic(row["d"])
        for field, value in row["aic"].items():
            # with no tail, 2(cᵀ(I−P)F(I−P)c)^{1/2}/γ is √rounding ≈ 1e-8 in both
            floor = 1e-7 if field == "tail_crossover_time" else 1e-13
            assert value == pytest.approx(getattr(ref, field), rel=1e-10, abs=floor), field
        np.testing.assert_allclose(row["delta_u"], L.delta_u(ts), rtol=1e-10)
        np.testing.assert_allclose(row["projected_loss"], L.projected_loss(ts), rtol=1e-10)
    # the generator's targets come back out of the batched evaluation
    assert all(r["aic"]["coupling"] == pytest.approx(0.7, rel=1e-10) for r in rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 0.1}, r"unknown key\(s\) \['learning_rate'\] in the sweep config"),
        ({"grid": {**BASE["grid"], "gamma": [1.0]}}, r"unknown key\(s\) \['gamma'\] in grid"),
        ({"grid": {**BASE["grid"], "kappa": [1.0]}}, "exactly one of 'coupling'"),
        ({"times": {"start": 1e-3, "stop": 1.0}}, "times needs"),
        ({"seeds": [-1]}, "seeds must be"),
        ({"grid": {**BASE["grid"], "n": []}}, r"grid\['n'\] must be a non-empty list"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_configs_are_rejected_with_the_offending_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_config(_write(tmp_path, "bad", **overrides))


def test_resume_drops_partial_lines_and_incomplete_batches(tmp_path):
    config = sweep.load_config(_write(tmp_path, "partial"))
    path = sweep.run_sweep(config, progress=False)
    full = path.read_text()
    lines = full.split("\n")
    # cut inside batch 2: its first row stays whole, the second is half written
    cut = "\n".join(lines[:8]) + "\n" + lines[8][:25]
    path.write_text(cut)
    sweep.run_sweep(config, progress=False)
    assert sweep.read_rows(path) == sweep.read_rows(_rewritten(tmp_path, full))
    other = sweep.load_config(_write(tmp_path, "partial", seeds=[5]))
    with pytest.raises(ValueError, match="different config"):
        sweep.run_sweep(other, progress=False)


def _rewritten(tmp_path, text):
    p = tmp_path / "reference.jsonl"
    p.write_text(text)
    return p


def test_sigkilled_sweep_resumes_with_no_lost_or_duplicated_rows(tmp_path):
    grid = {**BASE["grid"], "n": [24], "epsilon": [0.0, 1e-4, 1e-3, 1e-2, 1e-1]}
    many = {"grid": grid, "seeds": list(range(12)), "batch_size": 2}  # 120 runs, 60 batches
    killed_cfg = _write(tmp_path, "killed", **many)
    out = tmp_path / "killed.jsonl"
    proc = _cli(killed_cfg)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1 + 3 * 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = out.read_text().count('"batch_rows"')
    assert 6 <= rows_at_kill < 120
    resumed = _cli(killed_cfg)
    assert resumed.wait(timeout=300) == 0
    fresh = _cli(_write(tmp_path, "fresh", **many))
    assert fresh.wait(timeout=300) == 0
    _, rows = sweep.read_rows(out)
    _, reference = sweep.read_rows(tmp_path / "fresh.jsonl")
    assert [r["id"] for r in rows] == list(range(120))
    assert rows == reference  # bit-for-bit: batches are recomputed whole


def test_batch_axis_shards_over_four_host_devices(tmp_path):
    cfg = _write(tmp_path, "sharded", batch_size=5)  # 5 does not split in 4: padded
    proc = _cli(cfg, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "(4 device(s))" in stdout
    _, rows = sweep.read_rows(tmp_path / "sharded.jsonl")
    one = sweep.load_config(_write(tmp_path, "single", batch_size=5))
    _, reference = sweep.read_rows(sweep.run_sweep(one, progress=False, devices=jax.devices()[:1]))
    assert len(rows) == len(reference) == 16
    for a, b in zip(rows, reference, strict=True):
        np.testing.assert_allclose(a["delta_u"], b["delta_u"], rtol=1e-13)
        assert a["aic"].pop("eigen_residuals") == b["aic"].pop("eigen_residuals") == []
        assert a["aic"] == pytest.approx(b["aic"], rel=1e-13)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    _write(tmp_path, "typo", grid={**BASE["grid"], "epsilonn": [0.0]})
    out = subprocess.run(
        [sys.executable, "-m", "geomcollapse.cli", "sweep", str(tmp_path / "typo.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    assert "unknown key(s) ['epsilonn'] in grid" in out.stderr and "Traceback" not in out.stderr


def test_the_readme_example_config_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "geomcollapse sweep sweeps/example.json" in readme
    config = sweep.load_config(ROOT / "sweeps/example.json")
    assert len(sweep.expand_runs(config)) == 48
    small = sweep.parse_config(
        {**json.loads((ROOT / "sweeps/example.json").read_text()), "output": "ex.jsonl"},
        tmp_path,
    )
    _, rows = sweep.read_rows(sweep.run_sweep(small, progress=False))
    assert len(rows) == 48
    orthogonal = [r for r in rows if r["epsilon"] == 0.0]
    assert all(r["aic"]["orthogonality"] < 1e-12 for r in orthogonal)
