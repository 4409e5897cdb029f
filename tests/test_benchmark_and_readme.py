"""The benchmarks run (on tiny problems) and their doc tables are current.

The docs' python examples run in tests/test_docs.py, the README's in tests/test_diagnose.py."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import (
    _common,
    block_lanczos,
    curvature_speed,
    early_warning_overhead,
    landscape_batch,
    monitor_overhead,
    sharded_scaling,
)
from geomcollapse import curvature, landscapes, models
from tests.conftest import symmetric_with_spectrum

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.full
def test_benchmark_runs_on_a_tiny_problem(tmp_path):
    with jax.enable_x64(False):
        result = curvature_speed.main(
            quick=True, sizes=(30, 16, 10), num_examples=64, outdir=tmp_path
        )
    saved = json.loads(next(tmp_path.glob("curvature_speed_*.json")).read_text())
    assert saved["num_params"] == result["num_params"] == 30 * 16 + 16 + 16 * 10 + 10
    ratios = saved["operators"]["ratio_to_gradient"]
    assert ratios["gradient"] == 1.0 and all(r > 0 for r in ratios.values())
    run = saved["top10_hessian"]["runs"][0]
    assert run["ours"]["all_converged"]
    # both solvers find the float64 reference top-10 to float32 accuracy at tol 1e-3
    assert run["ours"]["max_rel_eig_error"] < 1e-3 and run["eigsh"]["max_rel_eig_error"] < 1e-3
    # the seed sweep's seed 0 is the timed run's start vector: same count
    seeds = saved["top10_hessian"]["matvecs_by_start_seed"]
    assert seeds["ours"] == [run["ours"]["matvecs"]] and seeds["eigsh"] == [run["eigsh"]["matvecs"]]
    assert "Matvecs at tol 0.001 over start vectors" in curvature_speed.markdown_table(saved)


def test_block_lanczos_counter_finds_the_dense_top_k():
    """The benchmark's block-Lanczos matvec counter against ``numpy.linalg.eigh``."""
    n = 240
    rng = np.random.default_rng(0)
    A = symmetric_with_spectrum(np.r_[np.linspace(3.0, 2.0, 10), rng.uniform(-0.5, 1.0, n - 10)])
    ref = np.sort(np.linalg.eigvalsh(A))[::-1][:10]
    for b in (1, 2, 5):
        matvecs, values = block_lanczos.block_lanczos_top(
            lambda V: V @ A, n, 10, b, tol=1e-8, seed=b
        )
        assert matvecs is not None and matvecs % b == 0 and matvecs < n
        np.testing.assert_allclose(values, ref, rtol=1e-10)
    # a budget too small to converge is reported as None
    assert (
        block_lanczos.block_lanczos_top(
            lambda V: V @ A, n, 10, 2, tol=1e-8, seed=0, max_matvecs=12
        )[0]
        is None
    )


@pytest.mark.full
def test_transformer_benchmark_problem_and_solvers_on_the_tiny_model():
    with jax.enable_x64(False):
        problem = curvature_speed.transformer_problem(jax.random.key(0), "tiny", 4)
        _, params = models.transformer_init(jax.random.key(0), "tiny")
        assert curvature.num_params(problem.params) == curvature.num_params(params)
        # the batch loss is the mean of the per-sequence losses (equal lengths)
        per_sequence = jax.vmap(problem.example_loss, in_axes=(None, 0))(
            problem.params, problem.batch
        )
        np.testing.assert_allclose(
            problem.loss(problem.params, problem.batch), per_sequence.mean(), rtol=1e-6
        )
        eig = curvature_speed.eigen_benchmarks(
            problem, 1.0, tols=(1e-3,), k=4, repeats=1, block_sizes=(2,), block_seeds=1
        )
    run = eig["runs"][0]
    (block,) = eig["block_lanczos"]
    assert block["block_size"] == 2 and block["matvecs"][0] % 2 == 0
    assert 0 < block["vmapped_time_per_vector"] < 10
    assert run["ours"]["all_converged"]
    # both solvers find the float64 reference top-4 (tokens stay integers there)
    assert run["ours"]["max_rel_eig_error"] < 1e-3 and run["eigsh"]["max_rel_eig_error"] < 1e-3


def test_benchmark_tables_in_the_docs_are_generated_from_the_results(tmp_path):
    """docs/benchmarks.md's tables are what the ``--readme`` writers make of benchmarks/results."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text(_common.DOC.read_text(encoding="utf-8"), encoding="utf-8")
    results = ROOT / "benchmarks" / "results"
    for stem in ("curvature_speed", "curvature_speed_transformer"):
        curvature_speed.update_doc(json.loads((results / f"{stem}_cpu.json").read_text()), doc)
    saved = json.loads((results / "landscape_batch_cpu.json").read_text())
    _common.replace_table("landscape-batch-table", landscape_batch.markdown_table(saved), doc)
    saved = json.loads((results / "monitor_overhead_cpu.json").read_text())
    _common.replace_table("monitor-overhead-table", monitor_overhead.markdown_table(saved), doc)
    saved = json.loads((results / "early_warning_overhead_cpu.json").read_text())
    table = early_warning_overhead.markdown_table(saved)
    _common.replace_table("early-warning-overhead-table", table, doc)
    saved = json.loads((results / "sharded_scaling_cpu.json").read_text())
    _common.replace_table("sharded-scaling-table", sharded_scaling.markdown_table(saved), doc)
    assert doc.read_text(encoding="utf-8") == _common.DOC.read_text(encoding="utf-8")


@pytest.mark.full
def test_landscape_batch_benchmark_runs_and_agrees_with_the_loop(tmp_path):
    result = landscape_batch.main(quick=True, num=8, n=24, num_times=8, outdir=tmp_path)
    saved = json.loads(next(tmp_path.glob("landscape_batch_*.json")).read_text())
    assert saved["num_landscapes"] == 8 and saved["one_call_seconds"]["krylov"] > 0
    # one call computes each landscape's own numbers, by either route
    assert result["max_rel_deviation_one_call_vs_loop"] < 1e-12
    assert result["max_rel_deviation_coupling_vs_aic"] < 1e-10
    # the Krylov route converged and agrees with the dense-eigh route
    assert saved["krylov_all_converged"] and saved["all_finite"]
    dev = saved["max_rel_deviation_krylov_vs_dense"]
    assert set(dev) == set(landscapes.QuadraticSummary._fields)
    assert all(value < 1e-8 for value in dev.values()), dev
    assert "(8 landscapes, n = 24)" in landscape_batch.markdown_table(saved)
    vmapped = landscape_batch.main(quick=True, num=4, n=8, num_times=4, outdir=tmp_path, vmap=True)
    assert vmapped["one_call_mode"]["dense"] == "vmap"
    assert vmapped["max_rel_deviation_one_call_vs_loop"] < 1e-12
