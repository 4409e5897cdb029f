"""A sweep over two JAX processes (``jax.distributed`` on the CPU): shares, parts, kill, merge."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from geomcollapse import sweep
from tests import sweep_toy

ROOT = Path(__file__).resolve().parent.parent
SLEEP = 0.4  # seconds per cell: the kill lands between cells
CONFIG = {
    "experiment": "tests.sweep_toy",
    "name": "toy",  # the same header for the two-process and the one-process output
    "base": {"sleep": SLEEP, "b": 2},
    "grid": {"a": [1.0, 2.0, 3.0, 4.0], "seed": [0, 1]},  # 8 cells, 4 per process
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(config: Path, count: int) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geomcollapse.cli",
                "sweep",
                str(config),
                "--no-progress",
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                str(count),
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


def _complete_cells(path: Path) -> list[int]:
    if not path.exists():
        return []
    cells: dict[int, int] = {}
    for line in path.read_text().split("\n")[1:]:
        if line.endswith("}"):
            row = json.loads(line)
            cells[row["cell"]] = cells.get(row["cell"], 0) + 1
    return sorted(c for c, n in cells.items() if n == CONFIG["base"]["b"])


@pytest.mark.full
def test_two_processes_share_the_cells_survive_a_sigkill_and_merge_row_for_row(
    tmp_path, monkeypatch
):
    config = tmp_path / "two.json"
    config.write_text(json.dumps({**CONFIG, "output": "two.jsonl"}))
    part1 = tmp_path / "two.jsonl.part-1-of-2"
    procs = _launch(config, 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and procs[1].poll() is None and not _complete_cells(part1):
        time.sleep(0.01)
    assert procs[1].poll() is None, procs[1].communicate()
    procs[1].send_signal(signal.SIGKILL)  # one process dies mid-sweep ...
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)  # ... and the job is stopped, to be restarted whole
    procs[0].wait()
    done1 = _complete_cells(part1)
    assert 1 <= len(done1) < 4 and all(c % 2 == 1 for c in done1)  # its share: odd cells
    assert not (tmp_path / "two.jsonl").exists()  # nothing merged yet

    restarted = _launch(config, 2)
    outs = [p.communicate(timeout=120) for p in restarted]
    assert [p.returncode for p in restarted] == [0, 0], outs
    assert "16 rows" in outs[0][0] and "process 0 of 2" in outs[0][0]
    assert not list(tmp_path.glob("two.jsonl.part-*")), "the parts are merged and removed"

    # One process, same config: the reference, byte for byte (the toy's sleep skipped).
    monkeypatch.setattr(sweep_toy, "time", SimpleNamespace(sleep=lambda seconds: None))
    single = tmp_path / "one.json"
    single.write_text(json.dumps({**CONFIG, "output": "one.jsonl"}))
    reference = sweep.run_sweep(sweep.load_config(single), progress=False)
    merged = tmp_path / "two.jsonl"
    assert merged.read_text() == reference.read_text()
    _, rows = sweep.read_rows(merged)
    assert [(r["cell"], r["j"]) for r in rows] == [(c, j) for c in range(8) for j in range(2)]


def test_process_flags_go_together(tmp_path, capsys):
    from geomcollapse import cli

    config = tmp_path / "c.json"
    config.write_text(json.dumps({**CONFIG, "output": "c.jsonl"}))
    assert cli.main(["sweep", str(config), "--coordinator", "localhost:1"]) == 2
    assert "go together" in capsys.readouterr().err
    args = ["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"]
    assert cli.main(["sweep", str(config), *args]) == 2
    assert "--process-id must be in [0, 2)" in capsys.readouterr().err
