"""A pytest plugin: CPU seconds (user + sys, this process and its children) per test file and test.

Wall time on the shared 2-core machine says little; CPU time does. Run the suite in
one process (no ``-n``) so every file's share is its own::

    nice -n 10 .venv/bin/python -m pytest -q -p tools.pytest_cpu

The report (``PYTEST_CPU_OUT``, default ``pytest_cpu.txt`` in the current directory) is
rewritten after every test, so a session that dies part-way keeps what it measured.
A session-scoped fixture is charged to the first test that uses it.
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict

import pytest

_FILE_CPU: dict[str, float] = defaultdict(float)
_FILE_WALL: dict[str, float] = defaultdict(float)
_TEST_CPU: dict[str, float] = {}
_TOP = 60


def cpu_seconds() -> float:
    """User + system seconds of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Charge the test's set-up, call and tear-down to its file."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    yield
    path = item.nodeid.split("::")[0]
    _FILE_CPU[path] += cpu_seconds() - cpu
    _FILE_WALL[path] += time.perf_counter() - wall
    _TEST_CPU[item.nodeid] = cpu_seconds() - cpu
    write_report(os.environ.get("PYTEST_CPU_OUT", "pytest_cpu.txt"))


def write_report(path: str) -> None:
    """Per-file CPU (and wall) seconds, most expensive first, then the costliest tests."""
    lines = [f"total {sum(_FILE_CPU.values()):.1f} cpu s in tests, {cpu_seconds():.1f} in all"]
    for name, cpu in sorted(_FILE_CPU.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cpu:8.1f} cpu s {_FILE_WALL[name]:8.1f} wall s  {name}")
    lines.append(f"\ncostliest {_TOP} tests (cpu s):")
    for name, cpu in sorted(_TEST_CPU.items(), key=lambda kv: -kv[1])[:_TOP]:
        lines.append(f"{cpu:8.1f}  {name}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
