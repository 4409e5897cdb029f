"""Quantities of θ* alone, stored and committed (experiments._transformer.read_at_theta).

The main job reads Thm 6.1's constants and the predictors at θ* of the committed
tiny θ* instead of recomputing them; these tests check that a stored payload reads
back bit for bit, that a file of another key or a corrupted one is never used, that
the committed files are the ones the main job's configurations ask for, and (full
tier) that recomputing them from θ* gives the committed numbers.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest

from experiments import _transformer as T
from experiments import prediction as P
from experiments import transformer_onset as O
from experiments._common import ROOT


def _key(theta: str = "0123456789abcdef") -> dict:
    return {"size": "tiny", "dims": (10, 50), "tol": 1e-6, "theta": theta}


def test_a_stored_payload_reads_back_bit_for_bit(tmp_path):
    payload = {"C": 0.1 + 0.2, "D": 1 / 3, "nan": float("nan"), "list": [1e-300, -2.5, 7]}
    path = T.write_at_theta("thing", _key(), tmp_path, payload)
    assert path.parent == tmp_path / T.AT_THETA
    back = T.read_at_theta("thing", _key(), tmp_path)
    assert back["C"] == 0.1 + 0.2 and back["D"] == 1 / 3 and back["list"] == [1e-300, -2.5, 7]
    assert math.isnan(back["nan"])
    assert T.read_at_theta("thing", _key("fedcba9876543210"), tmp_path) is None  # another θ*
    assert T.read_at_theta("other", _key(), tmp_path) is None  # another quantity


def test_a_file_of_another_key_or_a_corrupted_file_is_not_used(tmp_path):
    """A file at the right name whose stored key differs (a forged or colliding name) and
    a half-written or garbled file are skipped with a warning naming the file."""
    written = T.write_at_theta("thing", _key(), tmp_path, {"C": 1.0})
    forged = T.at_theta_path("thing", _key("fedcba9876543210"), tmp_path)
    shutil.copy(written, forged)
    with pytest.warns(UserWarning, match="stored key differs"):
        assert T.read_at_theta("thing", _key("fedcba9876543210"), tmp_path) is None
    written.write_text(written.read_text()[:20])
    with pytest.warns(UserWarning, match=rf"{written.name} is not used: it cannot be read"):
        assert T.read_at_theta("thing", _key(), tmp_path) is None
    written.write_text(json.dumps({"payload": {"C": 1.0}}))  # no key
    with pytest.warns(UserWarning, match="cannot be read"):
        assert T.read_at_theta("thing", _key(), tmp_path) is None
    T.write_at_theta("thing", _key(), tmp_path, {"C": 1.0})  # the right key, D missing
    with pytest.warns(UserWarning, match=r"its payload lacks one of \['C', 'D'\]"):
        assert T.read_at_theta("thing", _key(), tmp_path, required=("C", "D")) is None
    assert T.read_at_theta("thing", _key(), tmp_path, required=("C",)) == {"C": 1.0}


def _main_job_keys(outdir):
    theta32 = T.aligned_model(O.QUICK.size, outdir, progress=False).params
    return (
        (O.CONSTANTS, O.constants_key(O.QUICK, theta32)),
        (P.PREDICTORS, P._predictor_key(P.QUICK, outdir)),
    )


def test_the_main_jobs_quantities_at_theta_star_are_committed(tmp_path):
    """The committed files answer exactly the keys of the main job's configurations (a
    changed QUICK or θ* without new files fails here), an ``outdir`` without them reads
    the committed ones, and a file under ``outdir`` comes first."""
    (name_c, key_c), (name_p, key_p) = _main_job_keys(tmp_path)
    assert key_c["theta"] == key_p["theta"] == T.theta_digest(T.aligned_model("tiny", ROOT).params)
    for name, key in ((name_c, key_c), (name_p, key_p)):
        assert T.at_theta_path(name, key, ROOT).is_file(), f"{name} of the main job not committed"
    constants = T.read_at_theta(name_c, key_c, tmp_path)
    assert 0 < constants["C"] and 0 < constants["D"]
    assert constants["quartic_radius"] == 24 * constants["C"] / constants["D"]
    assert constants["C"] == constants["cubic_search"]["value"] / 6
    assert constants["D"] == constants["quartic_search"]["value"]
    at = T.read_at_theta(name_p, key_p, tmp_path)
    assert set(P.QUICK.datasets) <= set(at)
    assert all(np.isfinite(at[d]["at_grad_norm"]) and at[d]["at_grad_norm"] > 0 for d in at)
    T.write_at_theta(name_c, key_c, tmp_path, {**constants, "C": 2.0})
    assert T.read_at_theta(name_c, key_c, tmp_path)["C"] == 2.0


def test_predictors_read_under_outdir_join_the_committed_ones(tmp_path):
    """A file under ``outdir`` with some datasets (an interrupted run, a study) hides
    none of the committed datasets: the two are merged, ``outdir``'s entry first."""
    key = P._predictor_key(P.QUICK, tmp_path)
    committed = T.read_at_theta(P.PREDICTORS, key, ROOT)
    first, second = P.QUICK.datasets[:2]
    mine = {**committed[first], "at_task_loss": -1.0}
    T.write_at_theta(P.PREDICTORS, key, tmp_path, {first: mine, "broken": {"at_grad_norm": 1}})
    got = P.predictors(P.QUICK, tmp_path)
    assert got[first] == mine and got[second] == committed[second]
    assert set(got) == set(P.QUICK.datasets)


def test_a_committed_predictor_is_what_theta_star_gives_now(tmp_path):
    """A cheap recomputation of stored numbers (seconds): the task loss and gradient norm
    at θ* of the first main-job dataset, float64, against the committed predictors
    (the full tier recomputes a whole dataset's predictors and C, D)."""
    import jax.numpy as jnp

    from geomcollapse import models, training

    graphdef, params = T.aligned_model("tiny", tmp_path, progress=False).as_dtype(jnp.float64)
    loss = training.sequence_loss(models.transformer_logits(graphdef))
    name = P.QUICK.datasets[0]
    train, _ = P.dataset_split(P.QUICK, name)
    value, grad = jax.jit(jax.value_and_grad(loss))(params, train.tokens, train.targets, train.mask)
    stored = P.predictors(P.QUICK, tmp_path)[name]
    assert float(value) == pytest.approx(stored["at_task_loss"], rel=1e-12)
    norm = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grad)[0]))
    assert norm == pytest.approx(stored["at_grad_norm"], rel=1e-10)


@pytest.mark.full
def test_the_committed_constants_are_what_the_search_finds(tmp_path):
    """SS-HOPM from θ* again, as ``transformer_onset --quick`` runs it: the committed
    ``C``, ``D`` and every searched value, to 1e-10 (about 3 minutes)."""
    c = O.QUICK
    k_prompts, k_eig, _, _ = jax.random.split(jax.random.key(c.seed + 2000), 4)
    s = O._setup(c, tmp_path, k_prompts, k_eig)  # reads the committed constants
    fresh = O.search_constants(s.sf, s.kl, c, jax.random.fold_in(k_eig, 2))
    committed = s.constants.payload
    for field in ("C", "D", "quartic_radius"):
        np.testing.assert_allclose(fresh[field], committed[field], rtol=1e-10)
    for search in ("cubic_search", "quartic_search"):
        for field in ("screened", "refined"):
            np.testing.assert_allclose(
                fresh[search][field], committed[search][field], rtol=1e-10, atol=1e-14
            )
        assert fresh[search]["iterations"] == committed[search]["iterations"]


@pytest.mark.full
def test_the_committed_predictors_are_what_theta_star_gives(tmp_path):
    """The predictors at θ* of one main-job dataset, every field, computed again (about a
    minute)."""
    config = P.QUICK
    name = config.datasets[0]
    fresh = P._predictors_at_theta_star(P.setup_for(config, tmp_path), config, name)
    committed = P.predictors(config, tmp_path)[name]
    assert set(fresh) == set(committed)
    for field, value in fresh.items():
        np.testing.assert_allclose(value, committed[field], rtol=1e-10, atol=1e-14, err_msg=field)
