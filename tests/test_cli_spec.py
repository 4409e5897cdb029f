"""``geomcollapse diagnose --spec``: any model's report equals the library call's, and a
wrong spec is refused in one line naming what to fix (issue 28, deliverable 2).

The model is tests/spec_mlp.py, a plain-JAX MLP that is none of the library's models.
"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import geomcollapse
from geomcollapse import cli, model_spec
from tests import spec_mlp

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "tests" / "spec_mlp.py")


def _numbers(report: dict) -> dict:
    """The report without its free-text fields (every number and list kept)."""
    return {k: v for k, v in report.items() if k not in ("warnings", "d_rule")}


@pytest.mark.parametrize(
    "target", [SPEC, f"{SPEC}:spec_dataclass", "tests.spec_mlp", "tests.spec_mlp:spec"]
)
def test_the_cli_report_of_a_spec_equals_the_library_call(tmp_path, capsys, target):
    out = tmp_path / "out"
    argv = ["diagnose", "--spec", target, "--out", str(out), "--seed", "3", "--lr", "0.1"]
    assert cli.main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p for p in printed if p.startswith(str(out))] == [
        str(out / name) for name in geomcollapse.diagnosis.REPORT_FILES
    ]
    from_cli = json.loads((out / "report.json").read_text())
    fields = spec_mlp.spec()
    library = geomcollapse.diagnose(
        fields.pop("skill_loss"),
        fields.pop("task_loss"),
        fields.pop("params"),
        **fields,
        key=jax.random.key(3),
        lr=0.1,
    )
    expected = json.loads(library.to_json())
    assert from_cli["n"] == 51 and from_cli["lr"] == 0.1
    assert _numbers(from_cli) == _numbers(expected)  # the same computation: bit for bit
    assert from_cli["warnings"] == expected["warnings"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--spec", f"{SPEC}:not_a_spec"], "returned int; return a dict with keys"),
        (["--spec", f"{SPEC}:missing_params"], "has no ['params']: a spec needs"),
        (["--spec", f"{SPEC}:nope"], "defines no function 'nope' (its functions: ["),
        (["--spec", "tests/absent.py"], "tests/absent.py is not a file"),
        (["--spec", "no_such_module:spec"], "no module 'no_such_module'"),
        (["--spec", "not a module"], "neither a .py file nor a module name"),
        (["--spec", SPEC, "--task", "t.npy"], "--spec replaces --checkpoint, --skill and --task"),
        ([], "give --spec FILE.py[:function] (any model) or --checkpoint, --skill and --task"),
    ],
)
def test_a_wrong_spec_is_refused_in_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["diagnose", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geomcollapse diagnose: error: ") and message in err, err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


def _fields() -> dict:
    return spec_mlp.spec()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"skill_los": None}, "unknown key(s) ['skill_los']"),
        ({"task_loss": 3.0}, "task_loss must be a function (params, *args) -> scalar, got float"),
        ({"skill_logits": "logits"}, "skill_logits must be a function"),
        ({"task_args": np.zeros(3)}, "task_args must be a tuple of the loss's extra arguments"),
    ],
)
def test_model_spec_names_the_wrong_field(change, message):
    fields = {**_fields(), **change}
    with pytest.raises(ValueError, match=r"^the spec") as err:
        model_spec.model_spec(fields)
    assert message in str(err.value)


def test_a_list_of_args_is_a_tuple():
    fields = {**_fields(), "task_args": list(_fields()["task_args"])}
    assert isinstance(model_spec.model_spec(fields).task_args, tuple)


def test_the_spec_file_in_docs_diagnose_md_runs_through_the_cli(tmp_path, capsys):
    text = (ROOT / "docs" / "diagnose.md").read_text(encoding="utf-8")
    section = text[text.index("## Any model from the command line") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_model.py").write_text(code)
    out = tmp_path / "out"
    argv = ["diagnose", "--spec", str(tmp_path / "my_model.py"), "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    spec = model_spec.load_spec(str(tmp_path / "my_model.py"))
    library = model_spec.diagnose_spec(spec, key=jax.random.key(0))
    assert report["n"] == 15
    assert _numbers(report) == _numbers(json.loads(library.to_json()))


def test_a_cli_report_saved_with_arrays_feeds_the_monitor_in_one_line(tmp_path, capsys):
    """``diagnose --spec … --arrays`` → ``Diagnosis.load`` → ``monitor``: the same log as the
    monitor built from the library's diagnosis, on SGD of the spec's task loss."""
    import optax

    from geomcollapse import monitor as mon
    from geomcollapse.diagnosis import ARRAYS_FILE, Diagnosis
    from tests.conftest import run_optimizer

    out, lr, steps = tmp_path / "out", 0.1, 8
    argv = ["diagnose", "--spec", SPEC, "--out", str(out), "--seed", "3", "--lr", str(lr)]
    assert cli.main([*argv, "--steps", str(steps), "--arrays", "--no-progress"]) == 0
    assert str(out / ARRAYS_FILE) in capsys.readouterr().out.split()
    loaded = Diagnosis.load(out)
    fields = spec_mlp.spec()
    library = geomcollapse.diagnose(
        fields["skill_loss"],
        fields["task_loss"],
        fields["params"],
        skill_args=fields["skill_args"],
        task_args=fields["task_args"],
        skill_logits=fields["skill_logits"],
        key=jax.random.key(3),
        lr=lr,
        steps=steps,
    )
    grad = jax.grad(fields["task_loss"])

    def log_of(diagnosis):
        tx = mon.monitor(optax.sgd(lr), diagnosis, every=2)
        states = run_optimizer(tx, fields["params"], grad, steps, *fields["task_args"])[2]
        return mon.monitor_log(states[-1])

    ours, theirs = log_of(loaded), log_of(library)
    assert ours.step.size == steps // 2 - 1 and np.all(np.isfinite(ours.projected_loss))
    for name in ("projected_loss", "forecast", "exceeded"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-12)
    # without --arrays the saved report has no subspace, and the monitor says so
    bare = tmp_path / "bare"
    assert cli.main(["diagnose", "--spec", SPEC, "--out", str(bare), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="carries no subspace"):
        mon.monitor(optax.sgd(lr), Diagnosis.load(bare), every=2)
