"""The GPU extra installs the JAX the project is pinned to (pyproject.toml, constraints.txt)."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

ROOT = Path(__file__).resolve().parent.parent


def _pinned(lines, name: str) -> str:
    """The ``==`` version of ``name`` among requirement ``lines`` (one pin, exactly)."""
    found = [Requirement(line) for line in lines if Requirement(line).name == name]
    assert len(found) == 1, f"{name}: {len(found)} requirements"
    (spec,) = found[0].specifier
    assert spec.operator == "==", f"{name} is not pinned: {found[0]}"
    return spec.version


def test_the_cuda12_extra_pins_the_projects_jax():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = project["optional-dependencies"]["cuda12"]
    constraints = [
        line.split("#")[0].strip()
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    ]
    version = _pinned(extra, "jax")
    assert [Requirement(r).extras for r in extra] == [{"cuda12"}]  # jax[cuda12], nothing else
    assert version == _pinned([c for c in constraints if c], "jax")
    (jax,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "jax"]
    assert jax.specifier.contains(version)  # the extra never asks for a JAX the project refuses
