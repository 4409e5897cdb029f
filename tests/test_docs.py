"""The README and docs/ cannot drift: code runs, commands exist, links resolve, tables are current.

Code blocks: every fenced block names its language in its info string, and a
block that does not run as written says so with the word ``fragment`` after
it (```` ```python fragment ````). Every ``python`` block runs as written: those
of docs/*.md are executed here, each in a fresh namespace and a temporary
directory (small models: seconds each); the README's one example is executed,
with checks of its numbers, by tests/test_diagnose.py. ``json`` blocks parse.
Shell blocks (``bash``) are commands, checked statically below; ``text``
blocks are output.

The rest are static checks (no JAX, no experiment runs): every ``python -m MODULE``,
``python FILE.py``, ``geomcollapse SUBCOMMAND`` and ``make TARGET`` written in
code in README.md, docs/*.md or paper_repro.md names something that exists,
with its ``--flags`` defined where its parser lives; every relative Markdown
link and image points to an existing file (and heading, for ``#anchors``);
the README's headline table is what ``docs/headline.py`` makes of the current
paper_repro.md.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.M | re.S)
_BLOCK = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.M | re.S)  # fence, info, code
LANGUAGES = {"python", "bash", "json", "text"}
FRAGMENT = "fragment"  # the info string's word for a block that does not run as written
# the runnable python blocks executed by another test (page -> the test that runs them)
RUN_ELSEWHERE = {"README.md": "tests/test_diagnose.py"}
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_PY_MODULE = re.compile(r"python3?\s+-m\s+([\w.]+)([^\n#;&|]*)")  # module, rest of the command
_PY_FILE = re.compile(r"python3?\s+([\w./-]+\.py)\b")
_CLI = re.compile(r"(?:^|bin/)geomcollapse\s+([a-z][\w-]*)", re.M)
_MAKE = re.compile(r"(?:^|[\s(])make\s+([a-z][\w-]*)")
_FLAG = re.compile(r"--[\w-]+")
# a tracker reference ("#3", "issue 4") means nothing to a reader
_TRACKER = re.compile(r"(?<![\w&/#])#\d+\b|\bissues?\s+#?\d+\b", re.I)


def _load_headline():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "docs" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code(text: str) -> list[str]:
    """Fenced blocks and inline code spans of a Markdown text."""
    blocks = [m.group(0) for m in _FENCE.finditer(text)]
    prose = _FENCE.sub("", text)
    return blocks + _SPAN.findall(prose)


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans."""
    return _SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def _commands(pages) -> list[tuple[str, str]]:
    """``(page, code)`` for every code span and non-Python code block of ``pages``."""
    return [
        (p.name, code)
        for p in pages
        for code in _code(p.read_text(encoding="utf-8"))
        if not re.match(r"```py(thon)?[ \n]", code)
    ]


def _blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, m.group(2).strip(), m.group(3))
        for m in _BLOCK.finditer(text)
    ]


def _runnable(pages) -> list[tuple[str, int, str]]:
    """``(page, line, code)`` of every python block not marked as a fragment."""
    return [
        (page.name, line, code)
        for page in pages
        for line, info, code in _blocks(page)
        if info.split() == ["python"]
    ]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


def _cli_subcommands() -> set[str]:
    """Subcommands of the ``geomcollapse`` parser (built, not parsed from source)."""
    import argparse

    from geomcollapse import cli

    return {
        name
        for action in cli._parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def _flag_defined(module: str, flag: str) -> bool:
    """``flag`` is a string literal in the module's package (where its parser is built)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return False
    files = Path(spec.origin).parent.glob("*.py")
    return any(f'"{flag}"' in f.read_text(encoding="utf-8") for f in files)


def test_python_modules_and_files_in_commands_exist():
    pages = [*PAGES, ROOT / "paper_repro.md"]
    found, bad = 0, []
    for page, code in _commands(pages):
        for m in _PY_MODULE.finditer(code):
            found += 1
            module = m.group(1)
            if importlib.util.find_spec(module) is None:
                bad.append(f"{page}: python -m {module}: no such module")
                continue
            local = ROOT in Path(importlib.util.find_spec(module).origin or "/").parents
            for flag in _FLAG.findall(m.group(2)) if local else ():
                if not _flag_defined(module, flag):
                    bad.append(f"{page}: python -m {module} {flag}: flag not defined")
        for m in _PY_FILE.finditer(code):
            found += 1
            if not (ROOT / m.group(1)).is_file():
                bad.append(f"{page}: python {m.group(1)}: no such file")
    assert found > 20, "the command pattern matched almost nothing"
    assert not bad, "\n".join(bad)


def test_cli_subcommands_and_make_targets_exist():
    subcommands, targets = _cli_subcommands(), _make_targets()
    assert "sweep" in subcommands and {"reproduce", "test"} <= targets
    bad, found = [], 0
    for page, code in _commands(PAGES):
        for sub in _CLI.findall(code):
            found += 1
            if sub not in subcommands:
                bad.append(f"{page}: geomcollapse {sub}: not a subcommand of {sorted(subcommands)}")
        for target in _MAKE.findall(code):
            found += 1
            if target not in targets:
                bad.append(f"{page}: make {target}: not a Makefile target of {sorted(targets)}")
    assert found >= 3
    assert not bad, "\n".join(bad)


def test_relative_links_and_images_resolve():
    bad, found = [], 0
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            found += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file():
                bad.append(f"{page.name}: ({target}): no file {dest.relative_to(ROOT)}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: ({target}): no heading '#{anchor}' in {dest.name}")
    assert found > 20
    assert not bad, "\n".join(bad)


def test_readme_headline_table_is_generated_from_paper_repro():
    headline = _load_headline()
    expected = headline.headline_table((ROOT / "paper_repro.md").read_text(encoding="utf-8"))
    actual = headline.current_block(README.read_text(encoding="utf-8"), headline.MARKER)
    assert actual == expected, "README's headline table is stale: run `python docs/headline.py`"


def test_headline_abridges_cells_without_open_brackets():
    headline = _load_headline()
    text = "a value 1.0 (with a note, and more), then b 2.0; c 3.0 [x, y], d 4.0 and e 5.0"
    short = headline.abridge(text, limit=40)
    assert short.endswith(" …") and len(short) <= 42
    assert short.count("(") == short.count(")") and short.count("[") == short.count("]")
    assert headline.abridge("short", limit=40) == "short"
    assert headline.abridge("f(x) = 1, g(y) = 2", limit=12) == "f(x) = 1 …"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_tracker_references(page):
    hits = _TRACKER.findall(_prose(page.read_text(encoding="utf-8")))
    assert not hits, f"{page.name} cites the tracker: {hits}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The patterns find a missing module, subcommand, target, file and anchor."""
    page = (
        "Run `python -m experiments.nonexistent --quick`, `geomcollapse frobnicate x`,\n"
        "`make deploy`; see [gone](missing.md) and [here](#no-such-heading).\n# A heading\n"
    )
    assert _PY_MODULE.search(page).group(1) == "experiments.nonexistent"
    assert importlib.util.find_spec("experiments.nonexistent") is None
    assert _CLI.findall("`geomcollapse frobnicate x`".strip("`")) == ["frobnicate"]
    assert _MAKE.findall("make deploy") == ["deploy"] and "deploy" not in _make_targets()
    assert _LINK.findall(_prose(page)) == ["missing.md", "#no-such-heading"]
    (tmp_path / "p.md").write_text(page)
    assert _anchors(tmp_path / "p.md") == {"a-heading"}
    assert _slug("The `small` model (`--full`)") == "the-small-model---full"
    assert (
        _slug("§4 Closed forms on a quadratic landscape")
        == "4-closed-forms-on-a-quadratic-landscape"
    )
    assert not _flag_defined("experiments.crossover", "--no-such-flag")
    assert _TRACKER.findall("as in issue #4 and #12") == ["issue #4", "#12"]


def test_headline_shows_verdict_rows_and_counts_the_reported_ones():
    headline = _load_headline()
    text = "\n".join(
        [
            "| claim | command | predicted | measured | verdict |",
            "|---|---|---|---|---|",
            "| A holds | `python -m experiments.a` | 1 | 1.0 | **reproduced** |",
            "| B reported | `python -m experiments.a` | reported | 2.0 | **measured** |",
            "| C fails | `python -m experiments.b` | 3 | 4.0 | **NOT reproduced** |",
            "| D later | `python -m experiments.b` | 5 | rows not committed | **not run** |",
            "",
            "1 of 2 claims reproduced; main job wall time 1 s on CPU.",
        ]
    )
    table = headline.headline_table(text)
    assert "| `a` | A holds |" in table and "| `b` | C fails |" in table
    assert "B reported" not in table and "D later" not in table
    assert table.endswith(
        "Not shown: 2 rows that report a measurement without a verdict or are not run yet "
        "(in paper_repro.md)."
    )


def test_every_code_block_names_its_language_and_fragments_say_so():
    bad, found = [], 0
    for page in PAGES:
        for line, info, _ in _blocks(page):
            found += 1
            words = info.split()
            if not words or words[0] not in LANGUAGES or words[1:] not in ([], [FRAGMENT]):
                bad.append(
                    f"{page.name}:{line}: info string {info!r}: want one of {sorted(LANGUAGES)}, "
                    f"then '{FRAGMENT}' if it does not run as written"
                )
    assert found > 10
    assert not bad, "\n".join(bad)


def test_json_blocks_parse():
    import json

    blocks = [
        (page.name, line, code)
        for page in PAGES
        for line, info, code in _blocks(page)
        if info.split()[:1] == ["json"] and FRAGMENT not in info.split()
    ]
    assert blocks, "no json block found"
    for name, line, code in blocks:
        try:
            json.loads(code)
        except json.JSONDecodeError as err:
            pytest.fail(f"{name}:{line}: json block does not parse: {err}")


def test_runnable_blocks_elsewhere_are_run_there():
    for page, test in RUN_ELSEWHERE.items():
        assert _runnable([ROOT / page]), f"{page} has no runnable python block"
        assert f'"{page}"' in (ROOT / test).read_text(encoding="utf-8"), f"{test} runs no {page}"


_DOC_BLOCKS = _runnable([p for p in PAGES if p.name not in RUN_ELSEWHERE])


@pytest.mark.parametrize("page,line,code", _DOC_BLOCKS, ids=[f"{p}:{n}" for p, n, _ in _DOC_BLOCKS])
def test_python_blocks_of_the_docs_run_as_written(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace: dict = {"__name__": f"docs_{page}_{line}"}
    exec(compile("\n" * (line) + code, f"docs/{page}", "exec"), namespace)
    assert len(namespace) > 2, "the block defined nothing"


def test_the_block_checks_catch_what_they_are_for(tmp_path):
    """An unmarked ``py`` block, a bare fence and a fragment are told apart; line numbers hold."""
    page = tmp_path / "p.md"
    page.write_text("x\n```py\n1\n```\n```\nfoo\n```\n```python fragment\nf(\n```\n")
    blocks = _blocks(page)
    assert [(line, info) for line, info, _ in blocks] == [
        (2, "py"),
        (5, ""),
        (8, "python fragment"),
    ]
    assert _runnable([page]) == []
    page.write_text("```python\nx = 1\n```\n")
    assert _runnable([page]) == [("p.md", 1, "x = 1\n")]
