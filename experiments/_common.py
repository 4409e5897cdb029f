"""Shared plumbing for experiment scripts: claims table rows and result files."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Claim:
    """One row of ``paper_repro.md``: a claim, how it was checked and the verdict."""

    claim: str
    command: str
    predicted: str
    measured: str
    passed: bool
    labels: tuple[str, str] = ("reproduced", "NOT reproduced")  # verdict if passed / not

    @property
    def verdict(self) -> str:
        return self.labels[0] if self.passed else self.labels[1]


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically (temp file + rename): no half-written results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    os.replace(tmp, path)


def claims_payload(claims: list[Claim]) -> list[dict]:
    return [dict(asdict(c), verdict=c.verdict) for c in claims]
