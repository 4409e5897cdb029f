"""Experiment sweeps: rows equal the toy's closed form, kills resume by whole cells, bad
configs name their key, and ``geomcollapse report`` rebuilds the toy's table."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from geomcollapse import cli, sweep
from tests import sweep_toy

ROOT = Path(__file__).resolve().parent.parent
TOY = "tests.sweep_toy"
BASE = {"experiment": TOY, "base": {"inner": {"scale": 0.5}, "shifts": [1.0, 2.0]}}


def _config(tmp_path: Path, stem: str, grid: dict, **overrides) -> Path:
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps({**BASE, "output": f"{stem}.jsonl", "grid": grid, **overrides}))
    return path


def _value(a: float, j: int) -> float:
    """The toy's row ``j`` with the BASE fields: ``a(j+1)² + 0.5·(1 + 2)``."""
    return a * (j + 1) ** 2 + 1.5


def _z(seed: int, b: int) -> list[float]:
    return jax.random.normal(jax.random.key(seed), (b,), jnp.float64).tolist()


def _spy(monkeypatch, name: str) -> list:
    """Record each call of the toy's ``name`` (``sweep_cell`` or ``sweep_cells``)."""
    calls, real = [], getattr(sweep_toy, name)

    def spy(configs, outdir):
        calls.append(configs)
        return real(configs, outdir)

    monkeypatch.setattr(sweep_toy, name, spy)
    return calls


def test_rows_equal_the_toys_closed_form_from_a_toml_config(tmp_path):
    (tmp_path / "toy.toml").write_text(
        f'experiment = "{TOY}"\noutput = "out/toy.jsonl"\n'
        "[base]\nshifts = [1.0, 2.0]\ninner = {scale = 0.5}\n"
        "[grid]\na = [0.5, 2.0]\nb = [3, 2]\nseed = [0, 7]\n"
    )
    config = sweep.load_config(tmp_path / "toy.toml")
    cells = sweep.expand_cells(config)
    assert cells[5].config == sweep_toy.Config(
        a=2.0, b=3, seed=7, shifts=(1.0, 2.0), inner=sweep_toy.Inner(scale=0.5)
    )
    header, rows = sweep.read_rows(sweep.run_sweep(config, progress=False, outdir=tmp_path))
    assert config.output == tmp_path / "out" / "toy.jsonl"
    assert header["experiment"] == TOY and header["cells"] == 8
    assert header["grid"] == {"a": [0.5, 2.0], "b": [3, 2], "seed": [0, 7]}
    assert len(rows) == 4 * 3 + 4 * 2
    expected = []
    for a in (0.5, 2.0):  # the grid's key order: a, then b, then seed
        for b in (3, 2):
            for seed in (0, 7):
                cell = len({e["cell"] for e in expected})
                for j, z in enumerate(_z(seed, b)):
                    expected.append(
                        {
                            "cell": cell,
                            "cell_id": cells[cell].id,
                            "cell_rows": b,
                            "params": {"a": a, "b": b, "seed": seed},
                            "j": j,
                            "value": _value(a, j),
                            "z": z,
                        }
                    )
    assert rows == expected
    ids = [c.id for c in cells]
    assert len(set(ids)) == 8 and all(i.startswith(f"{n}-") for n, i in enumerate(ids))
    assert [c.id for c in sweep.expand_cells(config)] == ids  # stable


def test_json_values_take_the_fields_types(tmp_path):
    ints = sweep.parse_config(
        {**BASE, "output": "x.jsonl", "base": {"shifts": [1, 2]}, "grid": {"a": [3]}}, tmp_path
    )
    floats = sweep.parse_config(
        {**BASE, "output": "x.jsonl", "base": {"shifts": [1.0, 2.0]}, "grid": {"a": [3.0]}},
        tmp_path,
    )
    (cell,) = sweep.expand_cells(ints)
    assert cell.config == sweep_toy.Config(a=3.0, shifts=(1.0, 2.0))
    assert type(cell.config.a) is float and all(type(x) is float for x in cell.config.shifts)
    assert cell.id == sweep.expand_cells(floats)[0].id


def _complete_cells(path: Path) -> int:
    if not path.exists() or not path.read_text():
        return 0
    return len({r["cell"] for r in sweep.read_rows(path)[1]})


def test_sigkilled_sweep_resumes_row_for_row_with_no_lost_or_duplicated_row(tmp_path):
    grid = {"a": [0.5, 1.0, 2.0], "b": [2, 3], "seed": [0, 1]}  # 12 cells, 30 rows
    sleepy = {"base": {**BASE["base"], "sleep": 0.25}, "name": "toy"}
    killed = _config(tmp_path, "killed", grid, **sleepy)
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "geomcollapse.cli", "sweep", str(killed), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _complete_cells(out) < 1:
        time.sleep(0.01)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= _complete_cells(out) < 12, "the kill must leave cells to compute"
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"30 rows in {out}" in resumed.stdout
    reference = sweep.load_config(_config(tmp_path, "fresh", grid, **sleepy))
    fresh = sweep.run_sweep(reference, progress=False, outdir=ROOT)
    assert out.read_text() == fresh.read_text()  # header and every row, in order
    lines = out.read_text().splitlines()
    keys = [(r["cell"], r["j"]) for r in map(json.loads, lines[1:])]
    assert len(keys) == len(set(keys)) == 30
    _, rows = sweep.read_rows(out)
    assert [r["value"] for r in rows] == [
        _value(a, j) for a in (0.5, 1.0, 2.0) for b in (2, 3) for _ in (0, 1) for j in range(b)
    ]


def test_resume_drops_a_partial_line_and_an_incomplete_cell(tmp_path, monkeypatch):
    grid = {"b": [3], "a": [1.0, 2.0], "seed": [0, 1]}  # 4 cells of 3 rows
    config = sweep.load_config(_config(tmp_path, "cut", grid))
    path = sweep.run_sweep(config, progress=False, outdir=tmp_path)
    full = path.read_text()
    lines = full.split("\n")
    # cell 0 whole, cell 1 with one of its 3 rows, then half of its second row
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:30])
    _, rows = sweep.read_rows(path)
    assert [r["cell"] for r in rows] == [0, 0, 0]  # only complete cells are read
    calls = _spy(monkeypatch, "sweep_cell")
    sweep.run_sweep(config, progress=False, outdir=tmp_path)
    assert [(c.a, c.seed) for c in calls] == [(1.0, 1), (2.0, 0), (2.0, 1)]  # cells 1-3
    assert path.read_text() == full


def test_a_changed_config_or_experiment_refuses_to_resume(tmp_path):
    grid = {"a": [1.0, 2.0]}
    config = sweep.load_config(_config(tmp_path, "same", grid))
    path = sweep.run_sweep(config, progress=False, outdir=tmp_path)
    written = path.read_text()
    for changed in ({"a": [1.0, 3.0]}, {"a": [1.0, 2.0], "b": [2]}):
        other = sweep.load_config(_config(tmp_path, "same", changed))
        with pytest.raises(ValueError, match="holds a sweep of a different config"):
            sweep.run_sweep(other, progress=False, outdir=tmp_path)
    other = sweep.load_config(_config(tmp_path, "same", grid, base={"a": 5.0}))
    with pytest.raises(ValueError, match="different config"):
        sweep.run_sweep(other, progress=False, outdir=tmp_path)
    assert path.read_text() == written
    landscape = {"sweep": "same", "config_sha256": "0" * 64, "format": 1, "batch_size": 2}
    path.write_text(json.dumps(landscape) + '\n{"id": 0, "batch": 0, "batch_rows": 1}\n')
    with pytest.raises(ValueError, match="different config"):  # a landscape sweep's file
        sweep.run_sweep(config, progress=False, outdir=tmp_path)
    # a complete cell whose resolved fields differ (the Config's defaults changed)
    old_id = sweep.expand_cells(config)[0].id
    path.write_text(written.replace(old_id, "0-0123456789"))
    with pytest.raises(ValueError, match=r"cell 0 has id '0-0123456789', but this config"):
        sweep.run_sweep(config, progress=False, outdir=tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"base": {"c": 1.0}},
            r"unknown field 'c' in base of experiment 'tests\.sweep_toy': "
            r"Config has fields \['a', 'b', 'seed', 'sleep', 'shifts', 'inner'\]",
        ),
        ({"grid": {"aa": [1.0]}}, r"unknown field 'aa' in grid of experiment 'tests\.sweep_toy'"),
        ({"base": {"inner": {"scal": 2.0}}}, r"unknown field 'inner\.scal' in base.*\['scale'"),
        ({"grid": {"a": []}}, r"grid\['a'\] must be a non-empty list"),
        ({"grid": {"a": 1.0}}, r"grid\['a'\] must be a non-empty list"),
        (
            {"experiment": "no_such_claim"},
            r"unknown experiment 'no_such_claim': not registered \(registered: \[.*'defences'",
        ),
        ({"experiment": "tests.no_such_toy"}, r"no module 'tests\.no_such_toy'"),
        ({"experiment": "geomcollapse.theory"}, "defines no frozen dataclass Config"),
        ({"experiment": "a b"}, "experiment must be a module name"),
        ({"base": {"a": float("nan")}}, r"base\.a is nan"),
        ({"grid": {"a": [1.0, float("-inf")]}}, r"grid\.a\[1\] is -inf"),
        ({"seeds": [0]}, r"unknown key\(s\) \['seeds'\] in the experiment sweep config"),
    ],
)
def test_bad_experiment_configs_name_the_offender(tmp_path, changes, message):
    raw = {**BASE, "output": "x.jsonl", "grid": {"a": [1.0]}, **changes}
    with pytest.raises(ValueError, match=message):
        sweep.parse_config(raw, tmp_path)


def test_cells_that_differ_only_in_seed_run_together_when_batched(tmp_path, monkeypatch):
    grid = {"seed": [0, 1, 2], "a": [1.0, 2.0]}  # a cell's seed-mates are not adjacent
    sequential = sweep.load_config(_config(tmp_path, "sequential", grid, name="toy"))
    together = sweep.load_config(_config(tmp_path, "together", grid, name="toy"))
    cell_calls, cells_calls = _spy(monkeypatch, "sweep_cell"), _spy(monkeypatch, "sweep_cells")
    sweep.run_sweep(sequential, progress=False, outdir=tmp_path)  # on CPU: one by one
    assert len(cell_calls) == 6 and not cells_calls
    sweep.run_sweep(together, progress=False, outdir=tmp_path, batch_seeds=True)
    assert len(cell_calls) == 6
    assert [[(c.seed, c.a) for c in group] for group in cells_calls] == [
        [(0, 1.0), (1, 1.0), (2, 1.0)],
        [(0, 2.0), (1, 2.0), (2, 2.0)],
    ]
    _, rows = sweep.read_rows(together.output)
    _, reference = sweep.read_rows(sequential.output)
    cells = [c for c in range(6) for _ in range(2)]  # b = 2 rows per cell
    assert [r["cell"] for r in rows] == [r["cell"] for r in reference] == cells
    for row, ref in zip(rows, reference, strict=True):
        assert row["z"] == pytest.approx(ref["z"], rel=1e-15, abs=1e-15)
        assert {k: v for k, v in row.items() if k != "z"} == {
            k: v for k, v in ref.items() if k != "z"
        }


def test_report_rebuilds_the_toys_table_and_refuses_what_it_cannot(tmp_path, capsys):
    grid = {"a": [0.5, 2.0], "b": [2, 3]}
    config = sweep.load_config(_config(tmp_path, "rep", grid))
    path = sweep.run_sweep(config, progress=False, outdir=tmp_path)
    assert cli.main(["report", str(path), "--out", str(tmp_path / "tables")]) == 0
    table = tmp_path / "tables" / "sweep_toy.md"
    assert capsys.readouterr().out.split() == [str(table)]
    body = [line.split(" | ") for line in table.read_text().splitlines()[2:]]
    expected = [(a, b) for a in (0.5, 2.0) for b in (2, 3)]
    assert len(body) == len(expected)
    for (cell, params, count, mean), (a, b) in zip(body, expected, strict=True):
        assert (cell, params, count) == (f"| {expected.index((a, b))}", f"a={a}, b={b}", str(b))
        assert float(mean.rstrip(" |")) == pytest.approx(
            sum(_value(a, j) for j in range(b)) / b, rel=1e-15
        )

    (tmp_path / "garbage.jsonl").write_text("not json\n")
    landscape = json.dumps({"sweep": "x", "format": 1, "config_sha256": "0"})
    (tmp_path / "landscape.jsonl").write_text(landscape + "\n")
    no_report = json.dumps({"sweep": "x", "format": 1, "experiment": "geomcollapse.theory"})
    (tmp_path / "no_report.jsonl").write_text(no_report + "\n")
    (tmp_path / "empty.jsonl").write_text(path.read_text().split("\n")[0] + "\n")
    for name, message in {
        "absent.jsonl": "absent.jsonl' does not exist",
        "garbage.jsonl": "garbage.jsonl is not a sweep output",
        "landscape.jsonl": "landscape.jsonl holds no complete row yet",
        "no_report.jsonl": "no_report.jsonl holds no complete cell yet",
        "empty.jsonl": "empty.jsonl holds no complete cell yet",
    }.items():
        assert cli.main(["report", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("geomcollapse report: error: ") and message in err, (name, err)
        assert "\n" not in err.rstrip("\n"), err


def test_rows_of_another_model_are_refused_before_they_join_a_resumed_sweep(tmp_path, monkeypatch):
    """A module's ``SWEEP_INVARIANTS`` (prediction's and defences' θ* digest): rows that
    record another value than the rows already written are refused, naming both, and
    nothing is appended; with the first value back, the sweep resumes and completes."""
    model, stop_at = ["m1"], [1.0]
    real = sweep_toy.sweep_cell

    def stamped(config, outdir):
        if config.a == stop_at[0]:
            raise RuntimeError("interrupted")
        return [{**row, "model": model[0]} for row in real(config, outdir)]

    monkeypatch.setattr(sweep_toy, "SWEEP_INVARIANTS", ("model",), raising=False)
    monkeypatch.setattr(sweep_toy, "sweep_cell", stamped)
    config = sweep.load_config(_config(tmp_path, "stamped", {"a": [0.5, 1.0, 2.0]}))
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep.run_sweep(config, progress=False, outdir=tmp_path)
    written = config.output.read_text()
    assert [r["model"] for r in sweep.read_rows(config.output)[1]] == ["m1", "m1"]
    model[0], stop_at[0] = "m2", None
    with pytest.raises(ValueError, match=r"model = m2, but the rows before them .* record m1"):
        sweep.run_sweep(config, progress=False, outdir=tmp_path)
    assert config.output.read_text() == written  # nothing appended
    model[0] = "m1"
    rows = sweep.read_rows(sweep.run_sweep(config, progress=False, outdir=tmp_path))[1]
    assert [r["model"] for r in rows] == ["m1"] * 6 and len({r["cell"] for r in rows}) == 3
    fresh = sweep.load_config(_config(tmp_path, "mixed", {"a": [0.5, 2.0]}))
    model[0] = "m1"

    def drifting(config, outdir):  # a model that changes between the cells of one run
        return [{**row, "model": f"m{config.a}"} for row in real(config, outdir)]

    monkeypatch.setattr(sweep_toy, "sweep_cell", drifting)
    with pytest.raises(ValueError, match=r"model = m2\.0, but .* record m0\.5"):
        sweep.run_sweep(fresh, progress=False, outdir=tmp_path)
    assert [r["model"] for r in sweep.read_rows(fresh.output)[1]] == ["m0.5", "m0.5"]


def test_part_files_of_two_models_are_not_merged(tmp_path, monkeypatch):
    """Two processes of one sweep (each its own part file), the second at another model:
    each part agrees with itself, so only the merge can see the mix, and it refuses."""
    from geomcollapse import _experiment_sweep

    real = sweep_toy.sweep_cell
    model = ["m1"]
    monkeypatch.setattr(sweep_toy, "SWEEP_INVARIANTS", ("model",), raising=False)
    monkeypatch.setattr(
        sweep_toy,
        "sweep_cell",
        lambda config, outdir: [{**r, "model": model[0]} for r in real(config, outdir)],
    )
    config = sweep.load_config(_config(tmp_path, "parts", {"a": [0.5, 1.0, 2.0]}))
    monkeypatch.setattr(_experiment_sweep, "processes", lambda: (1, 2))
    sweep.run_sweep(config, progress=False, outdir=tmp_path)  # cell 1, into its part
    model[0] = "m2"
    monkeypatch.setattr(_experiment_sweep, "processes", lambda: (0, 2))
    with pytest.raises(ValueError, match=r"record model = m1, m2: .* not merged"):
        sweep.run_sweep(config, progress=False, outdir=tmp_path)  # cells 0 and 2, then merge
    parts = sorted(p.name for p in tmp_path.glob("parts.jsonl.part-*"))
    assert parts == ["parts.jsonl.part-0-of-2", "parts.jsonl.part-1-of-2"]  # left as they were


def test_a_cell_with_a_row_written_twice_is_refused_not_dropped(tmp_path):
    """No killed run leaves more rows than a cell announces: reading them was a silent loss."""
    out = sweep.run_sweep(
        sweep.load_config(_config(tmp_path, "dup", {"b": [1, 2]})), progress=False
    )
    _, rows = sweep.read_rows(out)
    assert [r["cell"] for r in rows] == [0, 1, 1]
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join([lines[0], lines[1], lines[1], *lines[2:]]))  # cell 0's row twice
    with pytest.raises(ValueError, match=r"holds 2 rows of cell 0, which announces 1"):
        sweep.read_rows(out)
    out.write_text("".join(lines[:3]))  # killed after the first of cell 1's two rows
    assert [r["cell"] for r in sweep.read_rows(out)[1]] == [0]  # incomplete: left out
