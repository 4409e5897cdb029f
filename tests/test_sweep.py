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


@pytest.mark.full
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


def test_resuming_with_another_batch_size_is_refused_and_leaves_the_file(tmp_path):
    config = sweep.load_config(_write(tmp_path, "regroup"))
    path = sweep.run_sweep(config, progress=False)
    lines = path.read_text().split("\n")
    path.write_text("\n".join(lines[:8]) + "\n")  # batches 0, 1 complete; batch 2 has 1 of 3
    cut = path.read_text()
    other = sweep.load_config(_write(tmp_path, "regroup", batch_size=2))
    with pytest.raises(ValueError, match="written with batch_size=3; resume it with that"):
        sweep.run_sweep(other, progress=False)
    assert path.read_text() == cut
    # a file from before the header recorded batch_size: its rows are matched to runs by id
    header = json.loads(lines[0])
    del header["batch_size"]
    path.write_text("\n".join([json.dumps(header), *lines[1:8]]) + "\n")
    with pytest.raises(
        ValueError,
        match=r"batch 0 holds runs \[0, 1, 2\], but this config.s batch 0 is runs \[0, 1\]",
    ):
        sweep.run_sweep(other, progress=False)
    sweep.run_sweep(config, progress=False)  # the same batch_size resumes
    _, rows = sweep.read_rows(path)
    assert [r["id"] for r in rows] == list(range(16))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            '"grid": {"n": [16], "d": [2], "top": [[2.0, 1.0]], "tail_mass": [0.0],'
            ' "epsilon": [0.0, NaN], "coupling": [0.7]}',
            r"grid\.epsilon\[1\] is nan",
        ),
        (
            '"grid": {"n": [16], "d": [2], "top": [[2.0, -Infinity]], "tail_mass": [0.0],'
            ' "epsilon": [0.0], "coupling": [0.7]}',
            r"grid\.top\[0\]\[1\] is -inf",
        ),
        ('"times": {"start": 1e-4, "stop": Infinity, "num": 4}', r"times\.stop is inf"),
        ('"times": [0.1, NaN]', r"times\[1\] is nan"),
        ('"times": [0.1, 1e999]', r"times\[1\] is inf"),
        ('"batch_size": NaN', "batch_size is nan"),
    ],
)
def test_non_finite_numbers_anywhere_in_a_config_name_their_key(tmp_path, text, key):
    cfg = {k: v for k, v in {**BASE, "output": "x.jsonl"}.items() if f'"{k}"' not in text}
    body = json.dumps(cfg)[:-1] + ", " + text + "}"
    (tmp_path / "nan.json").write_text(body)
    with pytest.raises(ValueError, match=key):
        sweep.load_config(tmp_path / "nan.json")


def test_non_finite_numbers_in_a_toml_config_name_their_key(tmp_path):
    toml = """output = "t.jsonl"
seeds = [0]
times = [0.1, 1.0]
[grid]
n = [16]
d = [2]
top = [[2.0, 1.0]]
tail_mass = [0.0]
epsilon = [nan]
coupling = [0.7]
"""
    (tmp_path / "t.toml").write_text(toml)
    with pytest.raises(ValueError, match=r"grid\.epsilon\[0\] is nan"):
        sweep.load_config(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text(toml.replace("nan", "0.0"))
    assert sweep.load_config(tmp_path / "t.toml").grid["epsilon"] == (0.0,)


def _bad_cli_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Name → (config path, text the error must contain) for each input or file-system fault."""
    good = _write(tmp_path, "good")
    cases = {}
    (tmp_path / "broken.json").write_text('{"output": "x.jsonl", "seeds": [0,')
    cases["malformed JSON"] = (tmp_path / "broken.json", "broken.json' is not valid JSON")
    (tmp_path / "broken.toml").write_text('output = "x.jsonl"\nseeds = [0,\n')
    cases["malformed TOML"] = (tmp_path / "broken.toml", "broken.toml' is not valid TOML")
    cases["missing file"] = (tmp_path / "absent.json", "absent.json' does not exist")
    (tmp_path / "folder.json").mkdir()
    cases["directory as config"] = (tmp_path / "folder.json", "folder.json' is a directory")
    (tmp_path / "undecodable.json").write_bytes(b"\xff\xfe{")
    cases["undecodable"] = (tmp_path / "undecodable.json", "cannot read config file")
    (tmp_path / "outdir.jsonl").mkdir()
    cases["output is a directory"] = (
        _write(tmp_path, "outdir"),
        "outdir.jsonl is a directory; 'output' must name a file",
    )
    (tmp_path / "plainfile").write_text("")
    cases["output under a file"] = (
        _write(tmp_path, "under", output="plainfile/out.jsonl"),
        "cannot write the sweep output",
    )
    nan_text = good.read_text().replace('"epsilon": [0.0, 0.001]', '"epsilon": [0.0, NaN]')
    (tmp_path / "nan.json").write_text(nan_text)
    cases["NaN"] = (tmp_path / "nan.json", "grid.epsilon[1] is nan")
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    cases["garbage output"] = (_write(tmp_path, "garbage"), "garbage.jsonl is not a sweep output")
    return cases


def test_cli_gives_a_clean_error_for_each_bad_input_or_file(tmp_path, capsys):
    from geomcollapse import cli

    for name, (config, message) in _bad_cli_cases(tmp_path).items():
        assert cli.main(["sweep", str(config), "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("geomcollapse sweep: error: "), (name, err)
        assert message in err and "Traceback" not in err, (name, err)


def test_cli_reports_an_unwritable_output_directory(tmp_path, capsys):
    from geomcollapse import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        output = locked / "out.jsonl"
    elif Path("/sys").is_dir():  # root ignores file modes, but nobody creates files in sysfs
        output = Path("/sys/geomcollapse-sweep-test.jsonl")
    else:
        pytest.skip("root, and no sysfs to stand in for an unwritable directory")
    config = _write(tmp_path, "locked", output=str(output))
    locked.chmod(0o500)
    try:
        assert cli.main(["sweep", str(config), "--no-progress"]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert f"cannot write the sweep output {output} ('output')" in err, err
    assert "Traceback" not in err and not output.exists()


def test_every_committed_sweep_config_parses():
    """The configs under ``sweeps/`` (run across sessions, some only on a GPU) load as they
    are committed: a field an experiment's ``Config`` does not have would stop them cold."""
    from experiments._common import ROOT

    paths = sorted((ROOT / "sweeps").glob("*.json"))
    assert len(paths) >= 6
    for path in paths:
        assert sweep.load_config(path).name == path.stem, path.name


def test_every_committed_experiment_sweep_resumes_with_nothing_left_to_run(tmp_path):
    """Each committed sweep's rows have the cell ids this checkout plans (a changed
    ``Config`` default would make ``geomcollapse sweep`` refuse the file): run on a
    copy, every complete sweep finds nothing to compute and leaves its rows as they are."""
    import shutil

    from experiments._common import ROOT
    from geomcollapse import _experiment_sweep

    checked = 0
    for path in sorted((ROOT / "sweeps").glob("*.json")):
        config = sweep.load_config(path)
        if not isinstance(config, _experiment_sweep.ExperimentSweepConfig):
            continue
        output = ROOT / "sweeps" / json.loads(path.read_text())["output"]
        if not output.exists():
            continue
        shutil.copy(path, tmp_path / path.name)
        shutil.copy(output, tmp_path / output.name)
        before = (tmp_path / output.name).read_bytes()
        copied = sweep.load_config(tmp_path / path.name)
        cells = _experiment_sweep.expand_cells(copied)
        _, rows = sweep.read_rows(tmp_path / output.name)
        assert {r["cell"] for r in rows} == {c.index for c in cells}, path.name
        ids = {c.index: c.id for c in cells}
        assert all(r["cell_id"] == ids[r["cell"]] for r in rows), path.name
        out = sweep.run_sweep(copied, progress=False, outdir=tmp_path)
        assert out.read_bytes() == before, path.name
        checked += 1
    assert checked >= 5
