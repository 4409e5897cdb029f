"""Sweep configs and outputs that were accepted and misled, or left a file that blocked the
corrected run; each case fails without its check (found by a probe of the sweep path)."""

import json
from pathlib import Path

import numpy as np
import pytest

from geomcollapse import spec_sweep, sweep

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "spec_mlp.py"
TOY = {"experiment": "tests.sweep_toy", "base": {"b": 1}}


def _config(tmp_path: Path, stem: str, raw: dict) -> Path:
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_cell_that_fails_when_computed_is_named_and_blocks_nothing(tmp_path):
    """Before: the bare error, and the header it left made the corrected config
    'a sweep of a different config'."""
    bad = _config(tmp_path, "bad", {**TOY, "output": "out.jsonl", "grid": {"a": [1.0, -1.0]}})
    with pytest.raises(ValueError, match=r"^tests\.sweep_toy failed on cell 1 \{\"a\": -1\.0\}: "):
        sweep.run_sweep(sweep.load_config(bad), progress=False, outdir=tmp_path)
    out = tmp_path / "out.jsonl"
    assert len(out.read_text().splitlines()) == 2  # the header and cell 0's row are kept
    # a header alone (the first cell failed) is another config's only in name: replaced
    first = _config(tmp_path, "first", {**TOY, "output": "first.jsonl", "grid": {"a": [-1.0]}})
    with pytest.raises(ValueError, match="failed on cell 0"):
        sweep.run_sweep(sweep.load_config(first), progress=False, outdir=tmp_path)
    assert len((tmp_path / "first.jsonl").read_text().splitlines()) == 1
    fixed = _config(tmp_path, "first", {**TOY, "output": "first.jsonl", "grid": {"a": [2.0]}})
    header, rows = sweep.read_rows(
        sweep.run_sweep(sweep.load_config(fixed), progress=False, outdir=tmp_path)
    )
    assert [r["value"] for r in rows] == [2.0] and header["grid"] == {"a": [2.0]}
    # rows of another config are still never replaced
    other = _config(tmp_path, "other", {**TOY, "output": "out.jsonl", "grid": {"a": [3.0]}})
    with pytest.raises(ValueError, match="holds a sweep of a different config"):
        sweep.run_sweep(sweep.load_config(other), progress=False, outdir=tmp_path)


def test_an_output_that_is_json_but_not_a_sweep_is_said_to_be_one(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    path = _config(tmp_path, "c", {**TOY, "output": "notes.jsonl", "grid": {"a": [1.0]}})
    with pytest.raises(ValueError, match=r"notes\.jsonl is not a sweep output"):
        sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    assert (tmp_path / "notes.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "", ".", 5, "a\\b"])
def test_a_sweep_name_is_a_file_name_not_a_path(tmp_path, name):
    """Before: report wrote NAME_delta_u.png outside --out (or as `5_…`, `_…`)."""
    path = _config(tmp_path, "n", {**TOY, "output": "n.jsonl", "grid": {"a": [1.0]}, "name": name})
    with pytest.raises(ValueError, match=r"^name must be a plain file name"):
        sweep.load_config(path)


def test_a_report_refuses_a_header_whose_name_is_a_path(tmp_path):
    path = _config(tmp_path, "r", {**TOY, "output": "r.jsonl", "grid": {"a": [1.0, 2.0]}})
    out = sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    out.write_text("\n".join([json.dumps({**header, "sweep": "../escaped"}), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"sweep name must be a plain file name"):
        sweep.report(out, tmp_path / "report", x="a", y="value")
    assert not (tmp_path / "escaped_value_vs_a.png").exists()


def test_a_key_given_twice_in_a_json_config_is_refused(tmp_path):
    """Before: the last value won silently."""
    path = tmp_path / "dup.json"
    path.write_text(
        '{"experiment": "tests.sweep_toy", "output": "d.jsonl", "grid": {"a": [0.0], "a": [0.5]}}'
    )
    with pytest.raises(ValueError, match=r"gives the key 'a' twice in one object"):
        sweep.load_config(path)


def _spec_config(tmp_path, stem, base, grid):
    raw = {"experiment": "geomcollapse.spec_sweep", "output": f"{stem}.jsonl"}
    return _config(tmp_path, stem, {**raw, "base": base, "grid": grid})


def test_a_spec_sweep_refuses_a_grid_over_models_and_seeds_that_change_nothing(tmp_path):
    """Before: a grid over `spec` failed after cell 0 with a 'model changed' message; seeds
    of a dense-route model gave identical rows counted as independent samples."""
    other = tmp_path / "other.py"
    other.write_text(SPEC.read_text(encoding="utf-8"), encoding="utf-8")
    models = _spec_config(tmp_path, "m", {}, {"spec": [str(SPEC), str(other)]})
    with pytest.raises(ValueError, match=r"^grid\['spec'\]: .* cannot vary 'spec'"):
        sweep.load_config(models)
    seeds = _spec_config(tmp_path, "s", {"spec": str(SPEC)}, {"seed": [0, 1]})
    with pytest.raises(ValueError, match=r"^grid cell 1 \{'seed': 1\}: seed=1: this model \(n=51"):
        sweep.load_config(seeds)
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "s.jsonl").exists()


def test_a_spec_sweep_resumed_after_its_loss_code_changed_is_refused(tmp_path):
    """Before: the same θ* and data with another task loss passed model_sha256 and mixed
    rows of two models."""
    spec = tmp_path / "my_model.py"
    source = SPEC.read_text(encoding="utf-8")
    spec.write_text(source, encoding="utf-8")
    path = _spec_config(tmp_path, "code", {"spec": str(spec)}, {"d": [1, 2]})
    out = sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    _, rows = sweep.read_rows(out)
    assert {r["spec_sha256"] for r in rows} == {spec_sweep.source_digest(str(spec))}
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # killed after cell 0
    scaled = source.replace(
        "return -jnp.mean(jnp.take_along_axis", "return -3.0 * jnp.mean(jnp.take_along_axis"
    )
    assert scaled != source
    spec.write_text(scaled, encoding="utf-8")
    spec_sweep._loaded.cache_clear()  # a new process would load the file again
    spec_sweep._digest.cache_clear()
    with pytest.raises(ValueError, match=r"spec_sha256 = [0-9a-f]{64}, but the rows before"):
        sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    assert out.read_text() == "".join(lines[:2])  # nothing appended


def _landscape(tmp_path: Path, stem: str, **over) -> Path:
    raw = {
        "output": f"{stem}.jsonl",
        "batch_size": 2,
        "times": [0.01, 0.1],
        "grid": {"n": [6], "d": [2], "top": [[2.0, 1.0]], "tail_mass": [0.1], "epsilon": [0.0]},
        "seeds": [0, 1, 2],
        "name": stem,
        **over,
    }
    raw["grid"] = {**raw["grid"], **over.get("grid", {"coupling": [0.5]})}
    return _config(tmp_path, stem, raw)


def test_a_report_of_a_partial_sweep_says_so(tmp_path):
    """Before: a report of 2 of 3 runs (or 1 of 2 cells) read as the whole sweep."""
    out = sweep.run_sweep(sweep.load_config(_landscape(tmp_path, "part")), progress=False)
    lines = out.read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["runs"] == 3
    out.write_text("".join(lines[:3]))  # a kill after the first batch (2 runs)
    with pytest.warns(UserWarning, match=r"part\.jsonl is incomplete: 2 of 3 runs") as said:
        written = sweep.report(out, tmp_path / "r")
    assert [w.filename for w in said] == [__file__]
    aic = next(p for p in written if p.suffix == ".md").read_text()
    assert "**incomplete: 2 of 3 runs**" in aic
    toy = _config(tmp_path, "cells", {**TOY, "output": "cells.jsonl", "grid": {"a": [1.0, 2.0]}})
    path = sweep.run_sweep(sweep.load_config(toy), progress=False, outdir=tmp_path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.warns(UserWarning, match=r"incomplete: 1 of 2 cells"):
        (table,) = sweep.report(path, tmp_path / "c", x="a", y="value")[1:]
    assert "(incomplete: 1 of 2 cells)" in table.read_text()


def test_a_row_not_finite_at_late_times_still_counts_at_early_ones():
    """Before: a seed whose Δu overflowed at the last time was dropped at every time (the
    curve then showed the other seeds' mean, 1e-7 for 1e12); and squares of large finite
    values overflowed the interval to [-inf, inf]."""
    from geomcollapse import _sweep_report

    rows = [[1.0, 2.0, 3.0], [3.0, np.nan, 4.0], [5.0, 6.0, np.inf]]
    mean, low, high, n = _sweep_report.mean_interval(rows)
    np.testing.assert_array_equal(n, [3, 2, 2])
    np.testing.assert_allclose(mean, [3.0, 4.0, 3.5], rtol=1e-15)
    half = _sweep_report.t975(2) * np.std([1.0, 3.0, 5.0], ddof=1) / np.sqrt(3)
    np.testing.assert_allclose([low[0], high[0]], [3.0 - half, 3.0 + half], rtol=1e-15)
    big = _sweep_report.mean_interval([1e200, 2e200, 3e200])
    assert all(np.isfinite(big[:3])) and big[1] < 2e200 < big[2]
    spread = 1e200 * np.std([1.0, 2.0, 3.0], ddof=1) * _sweep_report.t975(2) / np.sqrt(3)
    assert big[2] - big[0] == pytest.approx(spread, rel=1e-12)


def test_the_delta_u_figure_says_what_a_log_axis_cannot_show():
    """Before: the band vanished silently where its lower end was ≤ 0, and points with a
    mean ≤ 0 were dropped with no word."""
    from geomcollapse import _sweep_report

    times = np.array([0.01, 0.1, 1.0])
    wide = (np.array([1.0, 2.0, 3.0]), np.array([0.5, -1.0, 2.0]), np.array([1.5, 5.0, 4.0]),
            np.array([3, 3, 3]))  # fmt: skip
    negative = (np.array([1.0, -2.0, 3.0]), np.array([0.5, -3.0, 2.0]),
                np.array([1.5, -1.0, 4.0]), np.array([3, 3, 2]))  # fmt: skip
    fig = _sweep_report.curves_figure(times, [("a", wide), ("b", negative)], "t")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "a (rows=3; band to ≤ 0 drawn to the bottom)",
        "b (rows=2–3 by t; 1 of 3 times ≤ 0 or none, not drawn)",
    ]
    band = ax.collections[0].get_paths()[0].vertices  # curve a's band covers all 3 times
    assert np.isclose(band[:, 0].min(), 0.01) and np.isclose(band[:, 0].max(), 1.0)
    assert band[:, 1].min() == pytest.approx(0.05)  # a tenth of the smallest positive value


def test_command_line_mistakes_get_one_line(tmp_path, capsys, monkeypatch):
    """Before: a raw [Errno 17] for --out naming a file, 'does not exist' for a directory,
    a KeyboardInterrupt traceback on Ctrl-C, a TypeError traceback for a spec function
    that takes arguments, and times.num = 1 dropping `stop` silently."""
    from geomcollapse import cli

    path = _config(tmp_path, "ok", {**TOY, "output": "ok.jsonl", "grid": {"a": [1.0]}})
    out = sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    (tmp_path / "afile").write_text("")
    cases = [
        (["report", str(out), "--out", str(tmp_path / "afile")], "exists and is not a directory"),
        (["report", str(tmp_path)], "is a directory; name the .jsonl file"),
        (["diagnose", "--spec", f"{SPEC}:logits"], "logits(params, x) takes arguments"),
    ]
    for argv, said in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert cli.main(["sweep", str(path), "--no-progress"]) == 130
    assert "interrupted; the rows written are kept" in capsys.readouterr().err
    one = _landscape(tmp_path, "one", times={"start": 0.01, "stop": 1.0, "num": 1})
    with pytest.raises(ValueError, match=r"^times\.num must be ≥ 2 with start and stop"):
        sweep.load_config(one)


def test_verdicts_are_reported_as_the_fraction_that_holds(tmp_path):
    """Before: `passed`/`all_passed` were in no default table and `--y all_passed` was
    refused ('is bool, not a number'): a failing claim was invisible in every report."""
    from geomcollapse import _sweep_report

    rows = [
        {"cell": 0, "params": {"a": 1}, "all_passed": True, "passed": [True, False]},
        {"cell": 1, "params": {"a": 1}, "all_passed": False, "passed": [True, True]},
        {"cell": 2, "params": {"a": 1}, "all_passed": True, "passed": [False, True]},
    ]
    assert _sweep_report.scalar_columns(rows[0]) == ["all_passed"]
    assert [_sweep_report.column(r, "passed.1") for r in rows] == [0.0, 1.0, 1.0]
    table = _sweep_report.columns_table({"sweep": "v", "cells": 3}, rows, tmp_path)
    line = next(x for x in table.read_text().splitlines() if x.startswith("| all_passed"))
    mean, low, high, _ = _sweep_report.mean_interval([1.0, 0.0, 1.0])
    assert line == f"| all_passed | {mean:.4g} [{low:.4g}, {high:.4g}] |" and mean == 2 / 3
