"""Rewrite a generated table between ``<!-- NAME ... -->`` and ``<!-- /NAME -->`` in the README."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def replace_table(marker: str, table: str, readme: Path = README) -> None:
    """Replace the lines between the opening ``<!-- marker`` line and ``<!-- /marker -->``."""
    text = readme.read_text()
    start = text.index(f"<!-- {marker}")
    start = text.index("\n", start) + 1
    end = text.index(f"<!-- /{marker} -->")
    readme.write_text(text[:start] + table + "\n" + text[end:])
