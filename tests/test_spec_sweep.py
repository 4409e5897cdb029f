"""A swept ablation of a user's model: docs/sweeps.md's `geomcollapse.spec_sweep` config, run
as written (with tests/spec_mlp.py as the spec), each row against the library call."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from geomcollapse import model_spec, spec_sweep, sweep

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "tests" / "spec_mlp.py")


def _documented_config() -> dict:
    """The JSON block of docs/sweeps.md that names ``geomcollapse.spec_sweep``."""
    text = (ROOT / "docs" / "sweeps.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "geomcollapse.spec_sweep" in b]
    return json.loads(block)


def test_the_documented_ablation_runs_and_each_row_is_the_library_call(tmp_path):
    raw = _documented_config()
    raw["base"]["spec"] = SPEC
    path = tmp_path / "my_model_lr.json"
    path.write_text(json.dumps(raw))
    out = sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    _, rows = sweep.read_rows(out)
    grid = raw["grid"]
    assert len(rows) == len(grid["lr"]) * len(grid["d"])
    spec = model_spec.load_spec(SPEC)
    for row in rows:
        lr, d = row["params"]["lr"], row["params"]["d"]
        direct = model_spec.diagnose_spec(
            spec, key=jax.random.key(0), lr=lr, d=d, steps=raw["base"]["steps"],
            threshold=raw["base"]["threshold"],
        )  # fmt: skip
        expected = direct.to_dict()
        assert row["aic"]["coupling"] == pytest.approx(expected["aic"]["coupling"], rel=1e-12)
        assert row["trace"] == pytest.approx(expected["trace"], rel=1e-12)
        assert row["lr"] == lr and row["d"] == expected["d"]
        step = expected["crossing_step"]
        assert row["crossing_step"] == (None if step in ("inf", "nan") else step)
    # the crossing step: the first k with the forecast Δu(lr·k) past the threshold
    found = [r for r in rows if r["crossing_step"] is not None]
    assert len({r["lr"] for r in found}) >= 2, [r["crossing_step"] for r in rows]
    for r in found:
        k, lr, c = r["crossing_step"], r["lr"], r["delta_u_coefficients"]
        before, at = np.polynomial.polynomial.polyval([lr * (k - 1), lr * k], c)
        assert before < raw["base"]["threshold"] <= at and r["crossing_time"] == lr * k
    # the documented report: crossing_step against lr, seeds aggregated
    written = sweep.report(out, tmp_path, x="lr", y="crossing_step")
    assert {p.suffix for p in written} == {".png", ".md"}
    assert all(p.stat().st_size > 0 for p in written)


def test_a_cell_without_a_loadable_spec_is_refused_before_anything_is_written(tmp_path):
    for base, match in (({}, "spec: name the model's spec"), ({"spec": "nope.py"}, "nope")):
        config = {
            "experiment": "geomcollapse.spec_sweep",
            "output": "out.jsonl",
            "base": base,
            "grid": {"lr": [0.01]},
        }
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
        assert not (tmp_path / "out.jsonl").exists()


def test_a_sweep_resumed_after_the_model_changed_is_refused(tmp_path):
    """Rows of two models never share an output: each row records the model's digest."""
    spec = tmp_path / "my_model.py"
    source = Path(SPEC).read_text(encoding="utf-8")
    spec.write_text(source, encoding="utf-8")
    raw = {
        "experiment": "geomcollapse.spec_sweep",
        "output": "out.jsonl",
        "base": {"spec": str(spec)},
        "grid": {"d": [1, 2]},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(raw))
    out = sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    _, rows = sweep.read_rows(out)
    digest = spec_sweep.model_digest(model_spec.load_spec(str(spec)))
    assert [r["model_sha256"] for r in rows] == [digest, digest]
    assert {r["spec_source"] for r in rows} == {str(spec.resolve())}
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # killed after cell 0
    # the same file, its fine-tuning labels changed: a new model under the old name
    spec.write_text(source + "\n\n_old = spec\n\n\ndef spec():\n" + _SCALED, encoding="utf-8")
    spec_sweep._loaded.cache_clear()  # a new process would load the file again
    spec_sweep._digest.cache_clear()
    assert spec_sweep.model_digest(model_spec.load_spec(str(spec))) != digest
    with pytest.raises(ValueError, match="model_sha256"):
        sweep.run_sweep(sweep.load_config(path), progress=False, outdir=tmp_path)
    assert out.read_text() == "".join(lines[:2])  # nothing appended


_SCALED = """    s = _old()
    x, labels = s["task_args"]
    return {**s, "task_args": (x, (labels + 1) % 3)}
"""


def test_the_model_digest_holds_across_objects_and_takes_prng_keys():
    """An nnx GraphDef prints object addresses, and a typed key has no bytes of its own:
    the digest read them and differed per process, or raised after the diagnosis ran."""
    from flax import nnx

    def spec_of(seed_of_model: int, key_seed: int) -> model_spec.ModelSpec:
        graphdef, params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(seed_of_model)), nnx.Param)
        x = jax.numpy.ones((4, 3))
        return model_spec.ModelSpec(
            skill_loss=lambda p, g, x, k: 0.0,
            task_loss=lambda p, g, x, k: 0.0,
            params=params,
            skill_args=(graphdef, x, jax.random.key(key_seed)),
            task_args=(x,),
        )

    a, b = spec_of(0, 1), spec_of(0, 1)  # equal models, distinct GraphDef objects
    assert a.skill_args[0] is not b.skill_args[0]
    assert spec_sweep.model_digest(a) == spec_sweep.model_digest(b)
    assert spec_sweep.model_digest(a) != spec_sweep.model_digest(spec_of(1, 1))  # θ*
    assert spec_sweep.model_digest(a) != spec_sweep.model_digest(spec_of(0, 2))  # the key
