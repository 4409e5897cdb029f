"""The main job's process schedule (``--jobs``): one result for every schedule."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import gd_vs_flow, quartic_quadratic, reproduce
from experiments._common import ROOT

CHEAP = [quartic_quadratic, gd_vs_flow]  # seconds each on TINY


def _run(out, jobs):
    claims = reproduce.main(outdir=out, tiny=True, experiments=CHEAP, jobs=jobs)
    results = {m.NAME: (out / f"experiments/results/{m.NAME}.json").read_text() for m in CHEAP}
    table = (out / "paper_repro.md").read_text().rstrip().splitlines()[:-1]  # footer: wall time
    return claims, results, table


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    if isinstance(tree, bool) or not isinstance(tree, (int, float)):
        return []
    return [float(tree)]


@pytest.mark.full
def test_every_process_schedule_gives_the_same_bytes_and_the_in_process_numbers(tmp_path):
    one = _run(tmp_path / "one", 1)  # a fresh process per experiment, one at a time
    two = _run(tmp_path / "two", 2)  # two at a time, in whatever order they finish
    assert [c.claim for c in two[0]] == [
        row["claim"] for m in CHEAP for row in json.loads(one[1][m.NAME])["claims"]
    ]
    assert two[0] == one[0]  # every claim: measured text, verdict and labels
    assert two[1] == one[1]  # every results file, byte for byte
    assert two[2] == one[2]  # paper_repro.md but its wall-time footer
    here = _run(tmp_path / "here", None)  # one after another in this process
    assert [c.verdict for c in here[0]] == [c.verdict for c in two[0]]
    for m in CHEAP:  # the same science; the last bits may follow this process's history
        a = np.array(_numbers(json.loads(here[1][m.NAME])))
        b = np.array(_numbers(json.loads(two[1][m.NAME])))
        assert a.shape == b.shape and a.size > 10
        floor = 1e-12 * np.nanmax(np.abs(a))
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=floor, equal_nan=True, err_msg=m.NAME)


def test_a_failed_experiment_stops_the_run_before_what_needs_it(tmp_path, capfd, monkeypatch):
    """``gd_vs_flow`` made to need ``quartic_quadratic``, which fails (its output root is
    a file): the run raises naming it, ``gd_vs_flow`` never starts, no worker is left."""
    monkeypatch.setattr(reproduce, "NEEDS", {"gd_vs_flow": ("quartic_quadratic",)})
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(RuntimeError, match="experiment quartic_quadratic failed"):
        reproduce.main(outdir=blocked, tiny=True, experiments=CHEAP, jobs=2)
    printed = capfd.readouterr().out
    assert "== quartic_quadratic ==" in printed and "== gd_vs_flow ==" not in printed
    assert multiprocessing.active_children() == []


def test_a_needs_cycle_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    cycle = {"gd_vs_flow": ("quartic_quadratic",), "quartic_quadratic": ("gd_vs_flow",)}
    monkeypatch.setattr(reproduce, "NEEDS", cycle)
    with pytest.raises(ValueError, match="cycle"):
        reproduce.main(outdir=tmp_path, tiny=True, experiments=CHEAP, jobs=2)
    assert not (tmp_path / "experiments").exists()


def test_needs_name_experiments_of_the_main_job_that_come_before_them():
    names = [m.NAME for m in reproduce.EXPERIMENTS]
    for name, needs in reproduce.NEEDS.items():
        assert name in names
        assert all(names.index(d) < names.index(name) for d in needs), (name, needs)


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_positive_integer(tmp_path, jobs):
    with pytest.raises(ValueError, match="jobs"):
        reproduce.main(outdir=tmp_path, tiny=True, experiments=CHEAP[:1], jobs=jobs)


@pytest.mark.full
def test_workers_use_the_callers_compilation_cache(tmp_path):
    """``geomcollapse reproduce`` turns the persistent cache on in its own process; the
    experiments' fresh worker processes (``spawn``) write their programs there too."""
    code = (
        "from pathlib import Path; import sys\n"
        "from geomcollapse import compilation_cache\n"
        "from experiments import gd_vs_flow, reproduce\n"
        "import jax; jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
        "assert compilation_cache.enable() == Path(sys.argv[1])\n"
        "reproduce.main(outdir=Path(sys.argv[2]), tiny=True, experiments=[gd_vs_flow], jobs=1)\n"
    )
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "GEOMCOLLAPSE_COMPILATION_CACHE": str(cache)}
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    run = subprocess.run(
        [sys.executable, "-c", code, str(cache), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "experiments/results/gd_vs_flow.json").is_file()
    assert any(cache.iterdir()), "the worker compiled nothing into the caller's cache"


@pytest.mark.parametrize("tiny, full", [(False, False), (True, False), (False, True)])
def test_theta_readers_wait_for_the_alignment_only_when_theta_is_not_cached(
    tmp_path, monkeypatch, tiny, full
):
    """Every θ* a reader needs cached (or committed): the readers start at once; one
    missing: they all wait for transformer_finetune, the result needs kept."""
    seen = []

    def cached(answer):
        def check(size, outdir):
            seen.append((size, outdir))
            return answer(size)

        return check

    monkeypatch.setattr(reproduce, "theta_cached", cached(lambda size: True))
    assert reproduce.schedule_needs(tmp_path, tiny, full) == reproduce.NEEDS
    sizes = {size for size, outdir in seen if outdir == tmp_path}
    finetuned = "tiny-fast" if tiny else "small" if full else "tiny"
    assert finetuned in sizes and sizes <= {"tiny-fast", "tiny", "small"}
    for missing in sorted(sizes):
        monkeypatch.setattr(reproduce, "theta_cached", cached(lambda size, m=missing: size != m))
        waiting = reproduce.schedule_needs(tmp_path, tiny, full)
        for name in reproduce.READS_THETA:
            assert waiting[name][0] == "transformer_finetune", (missing, name)
            assert set(reproduce.NEEDS.get(name, ())) <= set(waiting[name])
        rest = {n: d for n, d in waiting.items() if n not in reproduce.READS_THETA}
        assert rest == {n: d for n, d in reproduce.NEEDS.items() if n not in reproduce.READS_THETA}


def test_theta_cached_sees_the_outdir_and_the_committed_theta(tmp_path):
    """``tiny``'s θ* is committed: cached for any outdir; ``tiny-fast`` only once it is
    under that outdir."""
    from experiments._transformer import checkpoint_dir, theta_cached

    assert theta_cached("tiny", tmp_path) and not theta_cached("tiny-fast", tmp_path)
    shutil.copytree(checkpoint_dir("tiny", ROOT), checkpoint_dir("tiny-fast", tmp_path))
    assert not theta_cached("tiny-fast", tmp_path)  # another config's checkpoint
    # aligned_model copies the committed θ* into an outdir without one: no training
    from experiments._transformer import aligned_model

    model = aligned_model("tiny", tmp_path / "elsewhere", progress=False)
    assert model.path == checkpoint_dir("tiny", tmp_path / "elsewhere").resolve()
    assert model.metrics._asdict() == aligned_model("tiny", ROOT).metrics._asdict()
    names = [m.NAME for m in reproduce.EXPERIMENTS]
    assert all(names.index("transformer_finetune") < names.index(n) for n in reproduce.READS_THETA)
