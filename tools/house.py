"""The repository's shape: library lines, long functions, private imports, upward imports, cycles.

Run from the repository root: ``python -m tools.house`` (``--json`` for the same
report as JSON; ``--root DIR``, ``--library``, ``--packages`` to measure another
tree). Everything is read with :mod:`ast`; nothing is imported or run. It reports:

- the library's lines (``geomcollapse/``), in all and per file;
- its longest functions (methods and nested functions too, ``def`` line to last
  line), and every one over 80 lines;
- private names used across modules: ``from a.b import _x`` (or ``a.b._x``
  through an imported module) from any other module, and a private module
  (``a._m``) imported from outside its package ``a``; over ``geomcollapse/``,
  ``experiments/``, ``benchmarks/`` and ``tools/`` (tests may reach in);
- ``experiments`` imported by the library: statically, or by string
  (``importlib.import_module("experiments.x")``, or any string in its code,
  docstrings aside, that starts with ``experiments.``);
- import cycles among those four packages: static imports (at any depth, so a
  deferred import counts) plus ``importlib.import_module`` of a literal name.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LIBRARY = "geomcollapse"
PACKAGES = ("geomcollapse", "experiments", "benchmarks", "tools")
UPWARD = "experiments"  # what the library must never import
LONG = 80  # a function over this many lines is reported
SHOWN = 10  # the longest functions listed, or all over LONG if more


@dataclass(frozen=True)
class Module:
    """One source file: its dotted name, its path from the root and its syntax tree."""

    name: str
    path: str
    tree: ast.Module
    is_package: bool

    @property
    def package(self) -> str:
        """The package whose member this module is (itself for an ``__init__``)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    """One imported thing: the module it resolves to, and the name taken from it (if any)."""

    line: int
    module: str
    name: str | None  # ``from module import name`` where name is not a submodule
    how: str  # "import", "from", "string" (import_module) or "attribute" (mod._x)


def read_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    """Every ``.py`` file under ``root/<package>`` for each package, by dotted name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            tree = ast.parse(path.read_text(), filename=str(path))
            modules[name] = Module(name, str(path.relative_to(root)), tree, is_package)
    return modules


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not _dunder(name)


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _literal_import(node: ast.Call) -> str | None:
    """``"x.y"`` of ``importlib.import_module("x.y")`` / ``import_module`` / ``__import__``."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports(module: Module, modules: dict[str, Module]) -> Iterator[Import]:
    """What ``module`` imports, at any depth: statements, literal strings, ``mod._x`` uses."""
    aliases = {}  # local name -> first-party module it is bound to
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name, None, "import")
                if alias.asname or alias.name in modules:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    yield Import(node.lineno, sub, None, "from")
                    aliases[alias.asname or alias.name] = sub
                else:
                    yield Import(node.lineno, base, alias.name, "from")
        elif isinstance(node, ast.Call) and _literal_import(node):
            yield Import(node.lineno, _literal_import(node), None, "string")
    for node in ast.walk(module.tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
            and f"{aliases[node.value.id]}.{node.attr}" not in modules
        ):
            yield Import(node.lineno, aliases[node.value.id], node.attr, "attribute")


def _owner(name: str, modules: dict[str, Module]) -> str | None:
    """The first-party module that ``name`` (or its longest prefix) is, else None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _inside(module: Module, package: str) -> bool:
    return module.package == package or module.package.startswith(package + ".")


def private_imports(modules: dict[str, Module], packages: tuple[str, ...]) -> list[dict]:
    """Private names taken from another module, and private modules from outside their package."""
    found = []
    for module in modules.values():
        for imp in imports(module, modules):
            if imp.module.split(".")[0] not in packages:
                continue  # a third-party module: not this repository's rule
            parts = imp.module.split(".")
            for i, part in enumerate(parts):
                if _private(part) and not _inside(module, ".".join(parts[:i])):
                    found.append(_row(module, imp, imp.module))
                    break
            else:
                if imp.name and _private(imp.name) and imp.module != module.name:
                    found.append(_row(module, imp, f"{imp.module}.{imp.name}"))
    return sorted(found, key=lambda r: (r["file"], r["line"]))


def _row(module: Module, imp: Import, what: str) -> dict:
    return {"file": module.path, "line": imp.line, "imports": what, "how": imp.how}


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every string in the code (an f-string's literal start), no docstring."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant):
                yield node.lineno, first.value


def _names_upward(text: str, upward: str) -> bool:
    return text == upward or text.startswith(upward + ".")


def upward_imports(modules: dict[str, Module], library: str, upward: str) -> list[dict]:
    """Where the library imports ``upward``: statements, ``import_module`` or a module string."""
    found = []
    for module in modules.values():
        if not _inside(module, library):
            continue
        for imp in imports(module, modules):
            if _names_upward(imp.module, upward) and imp.how != "attribute":
                found.append(_row(module, imp, imp.module))
        for line, text in _strings(module.tree):
            if text != upward and _names_upward(text, upward):
                found.append({"file": module.path, "line": line, "imports": text, "how": "text"})
    unique = {(r["file"], r["line"], r["imports"]): r for r in found}
    return sorted(unique.values(), key=lambda r: (r["file"], r["line"]))


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (statements and literals)."""
    graph = {name: set() for name in modules}
    for module in modules.values():
        for imp in imports(module, modules):
            target = _owner(imp.module, modules)
            if target is not None and target != module.name and imp.how != "attribute":
                graph[module.name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def shortest_loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest import loop through the component's first module, as a path back to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    return component


def functions(modules: dict[str, Module], library: str) -> list[dict]:
    """Every function of the library (methods, nested ones), longest first."""
    found = []

    def walk(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    found.append({"file": path, "function": name, "lines": lines})
                walk(child, path, name + ".")
            else:
                walk(child, path, prefix)

    for module in modules.values():
        if _inside(module, library):
            walk(module.tree, module.path, "")
    return sorted(found, key=lambda r: (-r["lines"], r["file"], r["function"]))


def library_lines(root: Path, library: str) -> dict:
    """Lines of every ``.py`` file of the library, largest first, and their sum."""
    files = {
        str(p.relative_to(root)): len(p.read_text().splitlines())
        for p in sorted((root / library).rglob("*.py"))
    }
    ordered = dict(sorted(files.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"total": sum(files.values()), "files": ordered}


def measure(root: Path, library: str = LIBRARY, packages: tuple[str, ...] = PACKAGES) -> dict:
    """The whole report for the checkout at ``root`` (see the module docstring)."""
    present = tuple(p for p in packages if (root / p).is_dir())
    modules = read_modules(root, present)
    graph = import_graph(modules)
    loops = cycles(graph)
    funcs = functions(modules, library)
    return {
        "library_lines": library_lines(root, library),
        "longest_functions": funcs[: max(SHOWN, sum(f["lines"] > LONG for f in funcs))],
        "functions_over_80": [f for f in funcs if f["lines"] > LONG],
        "private_imports": private_imports(modules, present),
        "library_imports_experiments": upward_imports(modules, library, UPWARD),
        "cycles": [{"modules": c, "loop": shortest_loop(graph, c)} for c in loops],
    }


def render(report: dict) -> str:
    """The report as text, one section per measure."""
    lines_ = report["library_lines"]
    over = report["functions_over_80"]
    out = [f"library lines: {lines_['total']} in {len(lines_['files'])} files"]
    out += [f"  {n:6d}  {path}" for path, n in lines_["files"].items()]
    out.append(f"functions over {LONG} lines: {len(over)}; the longest (* over {LONG}):")
    out += [
        f"  {f['lines']:6d}{'*' if f['lines'] > LONG else ' '} {f['file']}:{f['function']}"
        for f in report["longest_functions"]
    ]
    private = report["private_imports"]
    out.append(f"cross-module private imports: {len(private)}")
    out += [f"  {r['file']}:{r['line']}  {r['imports']}  ({r['how']})" for r in private]
    upward = report["library_imports_experiments"]
    out.append(f"library imports of {UPWARD}: {len(upward)}")
    out += [f"  {r['file']}:{r['line']}  {r['imports']}  ({r['how']})" for r in upward]
    out.append(f"import cycles: {len(report['cycles'])}")
    for c in report["cycles"]:
        out.append(f"  {len(c['modules'])} modules, e.g. {' -> '.join(c['loop'])}")
        out.append(f"    {', '.join(c['modules'])}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.house [--json] [--root DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout"
    )
    parser.add_argument("--library", default=LIBRARY, help=f"the library (default {LIBRARY})")
    parser.add_argument(
        "--packages",
        default=",".join(PACKAGES),
        help=f"comma-separated packages read for imports (default {','.join(PACKAGES)})",
    )
    args = parser.parse_args(argv)
    report = measure(args.root, args.library, tuple(args.packages.split(",")))
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
