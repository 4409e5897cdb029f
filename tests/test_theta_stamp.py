"""Study rows record the θ* they were computed at, and no analysis mixes two θ*.

``prediction.stamped`` stamps every row of a study sweep (prediction, defences, the early-
warning and validation studies read those rows) with ``_transformer.theta_digest(θ*)``;
``_common.one_theta`` refuses rows of two θ*, or recorded beside unrecorded ones, wherever
rows are read back (``committed_sweep_rows``, ``geomcollapse report``).
"""

import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import defences, prediction
from experiments._common import THETA_FIELD, committed_sweep_rows, one_theta
from experiments._transformer import theta_digest


def _theta():
    return {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}


def test_stamped_rows_carry_the_digest_of_theta_star_bytes():
    theta = _theta()
    setup = prediction.Setup(*([None] * len(prediction.Setup._fields)))._replace(params32=theta)
    rows = prediction.stamped([{"K": 1, "harmfulness": 0.5}, {"K": 2}], setup)
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
    with pytest.raises(ValueError, match=r"2 different θ\* \(ab, not recorded\)"):
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
        with pytest.raises(ValueError, match="the sweep holds rows computed at 2"):
            module.report([{**r, THETA_FIELD: "ab"} for r in rows[:1]] + rows[1:2], tmp_path)


@pytest.mark.full  # 16 s: θ*'s Lanczos and a scan of SGD steps on the transformer
def test_sgd_onset_transformer_rows_carry_the_digest_of_the_theta_they_ran_at(tmp_path):
    """A miniature transformer cell of ``sgd_onset`` (2 seeds, 3 steps): every row records
    the digest of the committed tiny ``θ*`` that ``aligned_model`` gave."""
    import dataclasses

    from experiments import sgd_onset
    from experiments._transformer import aligned_model

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
