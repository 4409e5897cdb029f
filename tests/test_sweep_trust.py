"""Sweeps users can trust and plot (issue 28): a refused config writes nothing, a second
concurrent run refuses, files follow the umask, ``report`` plots any column of any sweep
with seeds aggregated, and the theory experiments sweep."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from geomcollapse import _sweep_io, _sweep_report, cli, sweep

ROOT = Path(__file__).resolve().parent.parent
LANDSCAPES = {
    "name": "tiny",
    "output": "tiny.jsonl",
    "times": {"start": 1e-3, "stop": 1.0, "num": 6},
    "seeds": [0, 1, 2],
    "grid": {
        "n": [10],
        "d": [2],
        "top": [[2.0, 1.0]],
        "tail_mass": [0.0, 0.05],
        "epsilon": [0.0],
        "kappa": [0.1, 1.0],
    },
}


def _write(tmp_path: Path, config: dict, name: str = "cfg.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_a_refused_cell_leaves_no_file_and_the_corrected_config_runs(tmp_path):
    bad = {**LANDSCAPES, "grid": {**LANDSCAPES["grid"], "d": [2, 3]}}  # top has 2 values
    with pytest.raises(ValueError, match=r"grid run 12 \(seed=0, n=10, d=3.*top must hold d=3"):
        sweep.run_sweep(sweep.load_config(_write(tmp_path, bad)), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json"]  # no output, part or lock file
    path = sweep.run_sweep(sweep.load_config(_write(tmp_path, LANDSCAPES)), progress=False)
    assert len(sweep.read_rows(path)[1]) == 12
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "tiny.jsonl"]  # the lock is gone


def test_an_experiment_cell_its_check_refuses_leaves_no_file(tmp_path):
    config = {
        "experiment": "crossover",
        "output": "x.jsonl",
        "base": {"n": 12, "top": [2.0, 1.0], "epsilons": [1e-5]},
        "grid": {"d": [2, 3]},
    }
    with pytest.raises(ValueError, match=r"grid cell 1 \{'d': 3\}: top must hold d=3"):
        sweep.run_sweep(sweep.load_config(_write(tmp_path, config)), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json"]


def test_outputs_are_created_with_the_process_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = sweep.run_sweep(sweep.load_config(_write(tmp_path, LANDSCAPES)), progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027; mkstemp made it 0o600


@pytest.mark.full
def test_a_concurrent_second_run_of_a_config_refuses_and_no_row_is_doubled(tmp_path):
    config = {
        "experiment": "tests.sweep_toy",
        "output": "toy.jsonl",
        "base": {"sleep": 0.5},
        "grid": {"a": [float(a) for a in range(60)]},  # 30 s: stopped once the second exits
    }
    path = _write(tmp_path, config)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "geomcollapse.cli", "sweep", str(path), "--no-progress"]

    def launch():
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    first = launch()
    lock = tmp_path / "toy.jsonl.lock"
    deadline = time.monotonic() + 60
    while not lock.exists():  # the first run holds the lock from its first write on
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = launch()
    out2, err2 = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second started: lengthen it"
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert second.returncode == 2 and "another sweep is writing" in err2, (out2, err2)
    assert "Traceback" not in err2
    _, rows = sweep.read_rows(tmp_path / "toy.jsonl")
    cells = [r["cell"] for r in rows]
    assert cells and cells == sorted(c for c in set(cells) for _ in range(2))  # each cell once
    assert not lock.exists()  # removed by the interrupted run on its way out


def test_the_lock_refuses_a_second_holder_and_is_released_on_error(tmp_path):
    out = tmp_path / "o.jsonl"
    with _sweep_io.exclusive(out):
        with pytest.raises(ValueError, match=r"another sweep is writing .*o\.jsonl\.lock"):
            with _sweep_io.exclusive(out):  # a second open file: flock refuses it
                pass
        assert (tmp_path / "o.jsonl.lock").exists()
    assert not (tmp_path / "o.jsonl.lock").exists()
    with pytest.raises(RuntimeError), _sweep_io.exclusive(out):
        raise RuntimeError
    with _sweep_io.exclusive(out):  # released by the error
        pass


def test_t_quantile_matches_scipy():
    for dof in (*range(1, 80), 200, 10_000):
        assert _sweep_report.t975(dof) == pytest.approx(scipy.stats.t.ppf(0.975, dof), rel=3e-5)


@pytest.fixture(scope="module")
def landscape_output(tmp_path_factory) -> Path:
    """The tiny landscape sweep's output, run once for the report tests."""
    root = tmp_path_factory.mktemp("report")
    return sweep.run_sweep(sweep.load_config(_write(root, LANDSCAPES)), progress=False)


def test_report_plots_a_column_of_a_landscape_sweep_against_a_grid_axis(
    tmp_path, capsys, landscape_output
):
    path = landscape_output
    _, rows = sweep.read_rows(path)
    out = tmp_path / "out"
    args = ["report", str(path), "--out", str(out), "--x", "kappa", "--y", "aic.coupling"]
    assert cli.main(args) == 0
    png, md = out / "tiny_aic.coupling_vs_kappa.png", out / "tiny_aic.coupling_vs_kappa.md"
    assert capsys.readouterr().out.split() == [str(png), str(md)]
    assert png.stat().st_size > 0
    body = [line.strip("| ").split(" | ") for line in md.read_text().splitlines()[4:]]
    assert len(body) == 4  # 2 tail masses (series) × 2 kappas
    for label, kappa, n, mean, interval in body:
        tail = float(label.removeprefix("tail_mass="))
        values = [
            r["aic"]["coupling"]
            for r in rows
            if r["tail_mass"] == tail and r["kappa"] == float(kappa)
        ]
        assert int(n) == len(values) == 3
        half = scipy.stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
        low, high = (float(v) for v in interval.strip("[]").split(", "))
        assert float(mean) == pytest.approx(np.mean(values), rel=1e-5)
        assert (low, high) == pytest.approx(
            (np.mean(values) - half, np.mean(values) + half), rel=1e-4, abs=1e-6
        )
    # the default report of a landscape sweep: Δu curves and the AIC table
    assert cli.main(["report", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [
        str(out / "tiny_delta_u.png"),
        str(out / "tiny_aic.md"),
    ]
    table = (out / "tiny_aic.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 4  # title, blank, head, rule, 4 grid combinations


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--x", "seed", "--y", "aic.coupling"], "--x 'seed' is not a grid axis"),
        (["--x", "kapa", "--y", "aic.coupling"], "--x 'kapa' is not a grid axis"),
        (["--x", "kappa", "--y", "aic.coupl"], "--y 'aic.coupl': the rows have no 'coupl'"),
        (["--x", "kappa", "--y", "delta_u"], "--y 'delta_u' is a list, not a number"),
        (["--x", "kappa"], "give --x (a grid axis) and --y (a recorded column) together"),
    ],
)
def test_report_names_a_bad_axis_or_column(tmp_path, capsys, args, message, landscape_output):
    assert cli.main(["report", str(landscape_output), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geomcollapse report: error: ") and message in err, err


@pytest.mark.parametrize(
    ("experiment", "base", "grid"),
    [
        (
            "quartic_quadratic",
            {"n": 16, "d": 2, "top": [2.0, 1.0], "tail_mass": 0.1, "num_times": 121},
            {"coupling": [0.5]},
        ),
        (
            "crossover",
            {"n": 12, "d": 2, "top": [2.0, 1.0], "epsilons": [1e-5, 1e-3]},
            {"seed": [1]},
        ),
        (
            "aic_phase",
            {"n": 8, "kappas": [0.0, 1e-3, 1.0], "epsilons": [0.0, 1e-5]},
            {"T": [0.01]},
        ),
        pytest.param(  # 47 s on the 2-core machine: the other three check the same path
            "logistic_onset",
            {"num_landscapes": 16, "num_times": 12},
            {"seed": [0, 1]},
            marks=pytest.mark.full,
        ),
    ],
)
def test_theory_experiments_sweep_and_their_rows_are_their_compute(
    tmp_path, experiment, base, grid
):
    config = sweep.load_config(
        _write(
            tmp_path, {"experiment": experiment, "output": "e.jsonl", "base": base, "grid": grid}
        )
    )
    _, rows = sweep.read_rows(sweep.run_sweep(config, progress=False, outdir=tmp_path))
    cells = sweep.expand_cells(config)
    assert len(rows) == len(cells)
    module = sys.modules[config.module]
    for row, cell in zip(rows, cells, strict=True):
        assert row["params"] == cell.params
        results = module.compute(cell.config)  # deterministic: the same numbers, bit for bit
        recorded = [k for k in results if k in row]
        assert len(recorded) >= 2
        for key in recorded:
            as_json = json.dumps(results[key], default=lambda v: np.asarray(v).tolist())
            assert row[key] == json.loads(as_json), key
        verdicts = [c.passed for c in module.claims(results, cell.config, "x")]
        assert row["passed"] == verdicts and row["all_passed"] == all(verdicts)
    # no report of its own: the default one tabulates every number column per grid value
    # (seeds aggregated), each cell the mean [95% interval] of its group's rows
    (table,) = sweep.report(config.output, tmp_path / "report")
    assert table.name == "e_columns.md"
    lines = [line.strip("| ").split(" | ") for line in table.read_text().splitlines()[4:]]
    varying = [k for k, v in grid.items() if len(v) > 1 and k != "seed"]
    groups: dict = {}
    for r in rows:
        label = ", ".join(f"{k}={r['params'][k]}" for k in varying) or "every row"
        groups.setdefault(label, []).append(r)
    assert lines[0][1:] == list(groups) and lines[2] == [
        "rows",
        *map(str, map(len, groups.values())),
    ]
    body = {line[0]: line[1:] for line in lines[3:]}
    columns = _sweep_report.scalar_columns(rows[0])
    assert columns and list(body) == columns
    for path in columns:
        for members, text in zip(groups.values(), body[path], strict=True):
            mean, low, high, _ = _sweep_report.mean_interval(
                [_sweep_report.column(r, path) for r in members]
            )
            assert text == f"{mean:.4g} [{low:.4g}, {high:.4g}]", (path, text)


def test_logistic_onset_is_sweepable_and_checks_its_cells():
    from experiments import logistic_onset

    assert callable(logistic_onset.sweep_cell)
    bad = dataclasses.replace(logistic_onset.TINY, num_landscapes=1)
    with pytest.raises(ValueError, match="num_landscapes ≥ 2"):
        logistic_onset.check_config(bad)
    logistic_onset.check_config(logistic_onset.TINY)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"lr": [0.1, -1.0]}, r"grid cell 1 \{'lr': -1.0\}: lr must be"),
        ({"order": [4, 99]}, r"grid cell 1 \{'order': 99\}: order must lie in \[2, "),
        ({"d": [2, 100000]}, r"grid cell 1 \{'d': 100000\}: d=100000 must be smaller than n=51"),
        ({"steps": [10]}, r"grid cell 0 \{'steps': 10\}: lr is required with steps"),
        ({"seed": [0, -1]}, r"grid cell 1 \{'seed': -1\}: seed must be an integer"),
    ],
)
def test_a_spec_sweep_refuses_a_bad_later_cell_before_writing(tmp_path, grid, message):
    config = {
        "experiment": "geomcollapse.spec_sweep",
        "output": "out.jsonl",
        "base": {"spec": str(ROOT / "tests" / "spec_mlp.py")},
        "grid": grid,
    }
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(sweep.load_config(_write(tmp_path, config)), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json"]


@pytest.mark.parametrize(
    ("experiment", "grid", "message"),
    [
        ("prediction", {"size": ["tiny", "bogus"]}, r"grid cell 1 .*size must be one of"),
        ("prediction", {"sgd_lr": [-0.03]}, r"grid cell 0 .*sgd_lr must be a finite number > 0"),
        ("defences", {"batch_size": [0]}, r"grid cell 0 .*batch_size must be an integer ≥ 1"),
        ("defences", {"size": ["bogus"]}, r"grid cell 0 .*size must be one of"),
        ("sgd_onset", {"batch": [8, 0]}, r"grid cell 1 .*batch must be an integer ≥ 1"),
        ("sgd_onset", {"lr": [-1e-5]}, r"grid cell 0 .*lr must be a finite number > 0"),
        ("sgd_onset", {"tf_task": ["nope"]}, r"grid cell 0 .*tf_task must be one of"),
    ],
)
def test_a_study_sweep_refuses_bad_cell_values_before_writing(tmp_path, experiment, grid, message):
    config = {"experiment": experiment, "output": "out.jsonl", "grid": grid}
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(sweep.load_config(_write(tmp_path, config)), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json"]
