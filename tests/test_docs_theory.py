"""docs/theory.md exists, has §1-§7, and every "docs/theory.md §N" citation resolves."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
SECTIONS = range(1, 8)
# "docs/theory.md §4", "docs/theory.md §2-§4" (a range), "docs/theory.md, §5"
CITATION = re.compile(r"docs/theory\.md,?\s*§(\d+)(?:\s*[-–]\s*§?(\d+))?")
HEADING = re.compile(r"^#{2,3} §(\d+)(?:\.\d+)?\s", re.MULTILINE)


def _tracked(*patterns: str) -> list[Path]:
    """Tracked files matching ``patterns`` (git pathspecs), or a walk when git is absent."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *patterns],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", ".git", "node_modules", "__pycache__"}
        suffixes = {Path(p).suffix for p in patterns} if patterns else None
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not skip & set(p.relative_to(ROOT).parts)
            and (suffixes is None or p.suffix in suffixes)
        ]


def _sections() -> set[int]:
    return {int(n) for n in HEADING.findall(THEORY.read_text(encoding="utf-8"))}


def test_theory_doc_has_sections_1_to_7():
    assert THEORY.is_file()
    text = THEORY.read_text(encoding="utf-8")
    for n in SECTIONS:
        assert re.search(rf"^## §{n} ", text, re.MULTILINE), f"docs/theory.md lacks '## §{n}'"


def test_every_citation_names_an_existing_section():
    sections = _sections()
    bad, found = [], 0
    for path in _tracked("*.py", "*.md"):
        if not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) else lo
                found += 1
                missing = [n for n in range(lo, hi + 1) if n not in sections]
                if missing or hi < lo:
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)}")
    assert found > 0, "no docs/theory.md citations found: the search is broken"
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)


def test_no_file_points_outside_the_repository():
    this = Path(__file__).resolve()
    forbidden = (".." + "/shared", "/work" + "/shared", "THEORY" + ".md")
    offenders = []
    for path in _tracked():
        if path.resolve() == this or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (figures)
        offenders += [f"{path.relative_to(ROOT)}: {s}" for s in forbidden if s in text]
    assert not offenders, "\n".join(offenders)
