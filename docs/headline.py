"""The README's headline table, generated from ``paper_repro.md``.

Run ``python docs/headline.py`` after ``make reproduce`` to rewrite the table
between the README's ``<!-- headline`` markers; ``tests/test_docs.py`` fails
while the README's table differs from what this produces from the current
``paper_repro.md``. One row per claim with a computed verdict: the
experiment, the claim, the prediction and the measurement (each abridged to
``CELL_CHARS`` characters; the full text is in ``paper_repro.md``) and the
verdict. Rows without a verdict (``measured``, ``reported (no verdict)``,
``partial: no verdict``, ``not testable``, ``not run``) are counted under the
table, not shown: the README stays one screen as they grow.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAPER_REPRO = ROOT / "paper_repro.md"
MARKER = "headline"
CELL_CHARS = 72

NO_VERDICT = {"measured", "reported (no verdict)", "partial: no verdict", "not testable", "not run"}
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_EXPERIMENT = re.compile(r"python -m experiments\.(\w+)")
# "(Sec. 7 claims it for skill Fishers: issue #4)": a tracker reference means
# nothing to a reader of the README, so a parenthesis holding one is dropped.
_TRACKER_NOTE = re.compile(r"\s*\([^()]*\bissue #\d+[^()]*\)")
_FOOTER = re.compile(r"^\d+ of \d+ claims reproduced.*$", re.MULTILINE)


def parse_rows(text: str) -> list[dict[str, str]]:
    """The claim rows of ``paper_repro.md``: dicts with its five column names."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in _CELL_SPLIT.split(lines[0])[1:-1]]
    rows = []
    for line in lines[2:]:  # past the header and the |---| rule
        cells = [c.strip() for c in _CELL_SPLIT.split(line)[1:-1]]
        if len(cells) != len(header):
            raise ValueError(f"paper_repro.md row has {len(cells)} cells, expected {len(header)}")
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def abridge(text: str, limit: int = CELL_CHARS) -> str:
    """``text``, or its longest prefix that ends outside brackets, plus ``…``.

    A prefix may end before ``'; '``, ``', '`` or ``' ('`` at bracket depth 0,
    so no bracket is left open.
    """

    def width(end: int) -> int:
        return len(text[:end].replace("\\|", "|"))

    if width(len(text)) <= limit:
        return text
    best, depth = 0, 0
    for i, ch in enumerate(text):
        if width(i) > limit:
            break
        if ch in "([" and depth == 0 and text[i - 1 : i] == " ":  # a parenthesis, not f(x)
            best = i
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch in ";," and depth == 0 and text[i + 1 : i + 2] == " ":
            best = i
    if best == 0:
        best = text.rfind(" ", 0, limit)
    return text[:best].rstrip() + " …"


def headline_table(text: str) -> str:
    """The headline table (markdown) for the ``paper_repro.md`` text ``text``."""
    out = [
        "| experiment | claim | predicted | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    previous = None
    rows = parse_rows(text)
    reported = [r for r in rows if r["verdict"].strip("*") in NO_VERDICT]
    for row in rows:
        if row in reported:
            continue
        match = _EXPERIMENT.search(row["command"])
        name = match.group(1) if match else row["command"].strip("`")
        shown = f"`{name}`" if name != previous else ""
        previous = name
        claim = _TRACKER_NOTE.sub("", row["claim"])
        out.append(
            f"| {shown} | {claim} | {abridge(row['predicted'])} | {abridge(row['measured'])} "
            f"| {row['verdict']} |"
        )
    footer = _FOOTER.search(text)
    if footer:
        out += ["", footer.group(0)]
    if reported:
        out += [
            "",
            f"Not shown: {len(reported)} row{'s' * (len(reported) != 1)} that report"
            f"{'s' * (len(reported) == 1)} a measurement without a verdict or are not run yet "
            "(in paper_repro.md).",
        ]
    return "\n".join(out)


def replace_between_markers(text: str, marker: str, block: str) -> str:
    """``text`` with the lines between ``<!-- marker…`` and ``<!-- /marker -->`` replaced."""
    start = text.index(f"<!-- {marker}")
    start = text.index("\n", start) + 1
    end = text.index(f"<!-- /{marker} -->")
    return text[:start] + block + "\n" + text[end:]


def current_block(text: str, marker: str) -> str:
    """The lines between the markers (without the trailing newline)."""
    start = text.index(f"<!-- {marker}")
    start = text.index("\n", start) + 1
    return text[start : text.index(f"<!-- /{marker} -->")].rstrip("\n")


def main() -> int:
    """Rewrite the README's headline table from ``paper_repro.md``."""
    table = headline_table(PAPER_REPRO.read_text(encoding="utf-8"))
    readme = README.read_text(encoding="utf-8")
    README.write_text(replace_between_markers(readme, MARKER, table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
