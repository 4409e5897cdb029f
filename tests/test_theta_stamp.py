"""Study rows record the θ* they were computed at, and no analysis mixes two θ*.

``_common.stamp`` stamps every row of a study sweep on the transformer (prediction,
defences, ``sgd_onset``'s transformer cells) with ``_transformer.theta_digest(θ*)``;
``_common.one_theta`` refuses rows of two θ*, or recorded beside unrecorded ones, where
rows are read back (``committed_sweep_rows``, prediction's and defences' reports); the
early-warning study refuses exploration and confirmatory rows of two θ*, and the validation
study refuses fresh runs beside study rows of another θ*.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import defences, early_warning, prediction, validation
from experiments._common import THETA_FIELD, committed_sweep_rows, one_theta, stamp
from experiments._transformer import aligned_model, theta_digest


def _theta():
    return {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}


def test_stamped_rows_carry_the_digest_of_theta_star_bytes():
    theta = _theta()
    rows = stamp([{"K": 1, "harmfulness": 0.5}, {"K": 2}], theta_digest(theta))
    raveled = np.concatenate([np.ones(3, np.float32), np.arange(6.0, dtype=np.float32)])  # b, w
    expected = hashlib.sha256(raveled.tobytes()).hexdigest()[:16]
    assert theta_digest(theta) == expected
    assert [r[THETA_FIELD] for r in rows] == [expected, expected]
    assert rows[0]["harmfulness"] == 0.5 and rows[1]["K"] == 2  # the rows otherwise unchanged
    moved = {**theta, "b": theta["b"].at[1].add(np.float32(2.0**-20))}  # 2⁻²⁰ in one value
    assert theta_digest(moved) != expected


def test_one_theta_names_the_one_digest_or_refuses_a_mixture():
    assert one_theta([{"K": 1}, {"K": 2}], "w") is None  # rows written before the stamp
    assert one_theta([{THETA_FIELD: "ab"}, {THETA_FIELD: "ab"}], "w") == "ab"
    assert one_theta([], "w") is None
    with pytest.raises(ValueError, match=r"sweeps/x\.jsonl holds rows computed at 2 .*ab, cd"):
        one_theta([{THETA_FIELD: "ab"}, {THETA_FIELD: "cd"}], "sweeps/x.jsonl")
    with pytest.raises(ValueError, match=r"2 different θ\* \(ab, not recorded\): rows written"):
        one_theta([{THETA_FIELD: "ab"}, {"K": 1}], "w")


def test_a_committed_sweep_with_rows_of_two_theta_is_refused_where_it_is_read(tmp_path):
    lines = (prediction.ROOT / prediction.STUDY_OUTPUT).read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    assert committed_sweep_rows(prediction.ROOT, prediction.STUDY_OUTPUT)  # as committed
    first = rows[0]["cell"]  # stamp one cell's rows only: a resume at another θ*
    mixed = [
        json.dumps({**r, THETA_FIELD: "0123456789abcdef"}) if r["cell"] == first else line
        for r, line in zip(rows, lines[1:], strict=True)
    ]
    out = tmp_path / prediction.STUDY_OUTPUT
    out.parent.mkdir(parents=True)
    out.write_text("\n".join([lines[0], *mixed]) + "\n")
    with pytest.raises(ValueError, match="different θ"):
        committed_sweep_rows(tmp_path, prediction.STUDY_OUTPUT)
    for module in (prediction, defences):  # `geomcollapse report` refuses them too
        with pytest.raises(ValueError, match="the sweep being reported holds rows computed at 2"):
            module.report([{**r, THETA_FIELD: "ab"} for r in rows[:1]] + rows[1:2], tmp_path)


def test_sgd_onset_transformer_rows_carry_the_digest_of_the_theta_they_ran_at(tmp_path):
    """A miniature transformer cell of ``sgd_onset`` (2 seeds, 3 steps): every row records
    the digest of the committed tiny ``θ*`` that ``aligned_model`` gave."""
    from experiments import sgd_onset

    config = dataclasses.replace(
        sgd_onset.Config(),
        tf_d=2, tf_prompts=8, tf_examples=8, tf_batch=4, tf_order=2,
        tf_seeds=2, tf_block=2, tf_k_max=3, tf_grid=3, seed_block=0,
    )  # fmt: skip
    rows = sgd_onset.sweep_cell(config, tmp_path)
    expected = theta_digest(aligned_model("tiny", tmp_path, progress=False).params)
    assert len(rows) == 2 and {r[THETA_FIELD] for r in rows} == {expected}
    assert [r["seed"] for r in rows] == [0, 1]
    assert one_theta(rows, "rows") == expected


def _stamped_copy(src: Path, dest: Path, digest: str | None) -> None:
    """``src``'s sweep output at ``dest`` with every row stamped ``digest`` (None: as is)."""
    lines = src.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    dest.parent.mkdir(parents=True, exist_ok=True)
    body = [json.dumps(r) for r in stamp(rows, digest)] if digest else lines[1:]
    dest.write_text("\n".join([lines[0], *body]) + "\n")


def test_early_warning_refuses_exploration_and_confirmatory_rows_of_two_theta(tmp_path):
    config = early_warning.STUDY
    root = prediction.ROOT
    for exploration, tiny, refused in (
        ("aa", "bb", True),
        ("aa", "aa", False),
        ("aa", None, False),
    ):
        _stamped_copy(root / config.exploration, tmp_path / config.exploration, exploration)
        _stamped_copy(root / config.tiny, tmp_path / config.tiny, tiny)
        if refused:
            with pytest.raises(ValueError, match=r"different θ\* \(aa, bb\)"):
                early_warning.load_rows(config, tmp_path)
        else:
            rows = early_warning.load_rows(config, tmp_path)
            assert rows[0][0][THETA_FIELD] == "aa"


def test_validation_refuses_fresh_runs_beside_study_rows_of_another_theta(tmp_path):
    config = validation.Config()
    current = theta_digest(aligned_model(config.size, tmp_path, progress=False).params)
    study = prediction.ROOT / prediction.STUDY_OUTPUT
    for digest, refused in (("0123456789abcdef", True), (current, False), (None, False)):
        _stamped_copy(study, tmp_path / prediction.STUDY_OUTPUT, digest)
        if refused:
            with pytest.raises(ValueError, match=f"at θ\\* {digest}, but this run's θ\\*"):
                validation.study_harms(config, tmp_path, current)
        else:
            validation.study_harms(config, tmp_path, current)  # recorded and equal, or unrecorded
