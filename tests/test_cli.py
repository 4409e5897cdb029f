"""The ``geomcollapse`` command line and the experiments' shared flags."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import _common, reproduce
from geomcollapse import cli, linalg, registry

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "geomcollapse.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_run_writes_into_outdir_from_any_working_directory(tmp_path):
    out = tmp_path / "out"
    proc = _run("run", "gd_vs_flow", "--quick", "--outdir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[reproduced]" in proc.stdout
    assert "== gd_vs_flow ==" in proc.stdout and "== gd_vs_flow: " in proc.stdout  # stage lines
    assert (out / "figures" / "gd_vs_flow.png").is_file()
    assert (out / "experiments" / "results" / "gd_vs_flow.json").is_file()


def test_version_help_and_bad_flags(tmp_path):
    version = _run("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("geomcollapse ")
    helped = _run("reproduce", "--help", cwd=tmp_path)
    assert (
        helped.returncode == 0 and "--full" in helped.stdout and "paper_repro.md" in helped.stdout
    )
    assert cli.main(["run", "gd_vs_flow", "--tasks", "shift"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["run", "gd_vs_flow", "--quick", "--full"])  # mutually exclusive
    with pytest.raises(SystemExit):
        cli.main(["run", "no_such_experiment"])


def test_cli_lists_the_main_jobs_experiments():
    assert list(cli.EXPERIMENTS) == [m.NAME for m in reproduce.EXPERIMENTS]
    assert cli.TRANSFORMER == {m.NAME for m in reproduce.EXPERIMENTS if "transformer" in m.NAME}


def test_experiments_register_themselves_and_the_checkout_table_matches():
    modules = {m.NAME: m for m in reproduce.EXPERIMENTS}
    entries = registry.registered(registry.EXPERIMENT_GROUP)
    assert set(entries) == set(modules) == set(cli.EXPERIMENTS)
    for name, module in modules.items():
        assert registry.load_experiment(name) is module
    assert registry.command("run") is _common.run_command
    assert registry.command("reproduce") is reproduce.reproduce_command
    assert registry.command("no_such_command") is None
    for group in (registry.EXPERIMENT_GROUP, registry.COMMAND_GROUP):  # installed == pyproject
        table = registry._checkout_table(group)
        assert table == {name: ep.value for name, ep in registry.registered(group).items()}
    with pytest.raises(ValueError, match=r"unknown experiment 'figures': not registered"):
        registry.experiment_module("figures")


def test_a_checkout_run_without_installing_reads_its_pyproject(monkeypatch):
    monkeypatch.setattr(registry.importlib.metadata, "entry_points", lambda group: [])
    assert registry.command("run") is _common.run_command
    assert registry.experiment_module("defences") == "experiments.defences"


def test_without_registered_commands_run_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(registry, "registered", lambda group: {})
    assert cli.main(["run", "gd_vs_flow"]) == 2
    assert "no experiments are registered" in capsys.readouterr().err


def test_progress_prints_a_line_per_stage_when_not_a_terminal(capfd):
    A = jnp.diag(jnp.arange(1.0, 41.0))
    linalg.top_eigenpairs(lambda v: A @ v, jnp.zeros(40), 2, key=jax.random.key(0), progress=True)
    err = capfd.readouterr().err
    assert "[lanczos] started" in err and "[lanczos] done:" in err
    linalg.top_eigenpairs(lambda v: A @ v, jnp.zeros(40), 2, key=jax.random.key(0))
    assert "[lanczos]" not in capfd.readouterr().err  # progress off: silent


def test_a_long_stage_says_where_it_is_between_its_start_and_end(capfd, monkeypatch):
    """Off a terminal, a running stage prints its count every ``interval`` seconds."""
    from geomcollapse.progress import _StageLines, progress_bar

    monkeypatch.setattr(_StageLines, "interval", 0.0)  # every step: the lines are checkable
    assert list(progress_bar(range(3), desc="stage", enabled=True)) == [0, 1, 2]
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "[stage] started (3 steps)"
    assert [line.split(",")[0] for line in lines[1:4]] == [
        f"[stage] {i}/3 steps" for i in (1, 2, 3)
    ]
    assert lines[4].startswith("[stage] done: 3 steps in ") and len(lines) == 5
    monkeypatch.setattr(_StageLines, "interval", 3600.0)
    with progress_bar(total=5, desc="quiet", enabled=True) as bar:
        bar.update(5)
    assert len(capfd.readouterr().err.splitlines()) == 2  # within the hour: start and end
