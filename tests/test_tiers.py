"""The two tiers: ``full``-marked tests are skipped by default, run with ``--full`` or
GEOMCOLLAPSE_FULL_TESTS=1 (tests/conftest.py), so ``make test`` stays short and
``make test-full`` runs everything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _outcomes(*args: str, env_flag: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GEOMCOLLAPSE_FULL_TESTS"}
    if env_flag is not None:
        env["GEOMCOLLAPSE_FULL_TESTS"] = env_flag
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/tier_probe.py",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "env_flag", "expected"),
    [
        ((), None, "1 passed, 1 skipped"),
        ((), "0", "1 passed, 1 skipped"),
        (("--full",), None, "2 passed"),
        ((), "1", "2 passed"),
    ],
)
def test_full_marked_tests_run_only_in_the_full_tier(args, env_flag, expected):
    assert _outcomes(*args, env_flag=env_flag).startswith(expected)
