"""The accelerator runbook: stages cover the suite, records resume, the report judges targets."""

import json
import sys

from benchmarks import accelerator_check as ac
from geomcollapse import cli


def test_stages_cover_every_full_experiment_and_sweep(tmp_path):
    names = [s.name for s in ac.stages(tmp_path)]
    assert names[0] == "env" and names[-1] == "report"
    full = [n.removeprefix("full-") for n in names if n.startswith("full-")]
    assert full == [*cli.EXPERIMENTS] and {"defences", "validation"} <= set(full)
    assert {"sweep-prediction", "sweep-defences", "fisher-top10-small", "aic-large"} <= set(names)
    for stage in ac.stages(tmp_path):
        if stage.name.startswith("sweep-"):
            assert ac._prepare(stage, tmp_path) is None
            config = json.loads((tmp_path / "sweeps" / f"{stage.name[6:]}_tiny.json").read_text())
            assert config["output"] == f"{stage.name[6:]}_tiny.jsonl"  # beside the copy


def test_stages_are_recorded_skipped_once_done_and_stopped_by_the_budget(tmp_path, capsys):
    stage = ac.Stage("probe", (sys.executable, "-c", "print('ran')"), 1.0)
    record = ac.run_stage(stage, tmp_path, {}, timeout=60)
    assert record["status"] == "ok" and "ran" in record["output_tail"]
    assert json.loads((tmp_path / "stages.json").read_text())["probe"]["status"] == "ok"
    failing = ac.Stage("bad", (sys.executable, "-c", "raise SystemExit(3)"), 1.0)
    assert ac.run_stage(failing, tmp_path, {}, timeout=60)["status"] == "failed (3)"
    # --budget-s: the first stage (env, expected 60 s) does not fit in 1 s
    assert ac.main(["--outdir", str(tmp_path / "b"), "--budget-s", "1"]) == 0
    assert "stopped before env" in capsys.readouterr().out
    # a stage recorded ok is not run again (without --force)
    ac._save(tmp_path / "c", {"env": {"status": "ok", "info": {"backend": "gpu"}}})
    assert ac.main(["env", "--outdir", str(tmp_path / "c")]) == 0
    assert "== env" not in capsys.readouterr().out


def test_report_judges_each_target_from_the_stage_results(tmp_path):
    records = {
        "env": {"status": "ok", "info": {"platform": "gpu", "device_kind": "NVIDIA H200"}},
        **{f"full-{n}": {"status": "ok", "seconds": 100.0} for n in ac.FULL_EXPERIMENTS},
    }
    (tmp_path / "stages.json").write_text(json.dumps(records))
    ops = {"operators": {"ratio_to_gradient": {"hvp": 2.5}}}
    (tmp_path / "curvature_speed_transformer_gpu.json").write_text(json.dumps(ops))
    (tmp_path / "fisher_top10_small.json").write_text(json.dumps({"warm_s": 1.5}))
    targets = ac.stage_report(tmp_path)["targets"]
    total = 100.0 * len(ac.FULL_EXPERIMENTS)
    assert targets["full_suite_s"] == {"measured": total, "target": 1800, "met": True}
    assert targets["hvp_per_gradient_small"]["met"] is False  # 2.5 > 2 gradients
    assert targets["fisher_top10_small_s"]["met"] is True
    assert "| fisher_top10_small_s | 1.5 | ≤ 2 | True |" in (tmp_path / "report.md").read_text()
    # one experiment missing: the suite's time is not claimed
    del records["full-defences"]
    (tmp_path / "stages.json").write_text(json.dumps(records))
    assert ac.stage_report(tmp_path)["targets"]["full_suite_s"]["measured"] is None
