"""``python -m tools.house`` on a tiny planted package: each defect it looks for is found."""

import json
import subprocess
import sys
from pathlib import Path

from tools import house

ROOT = Path(__file__).resolve().parent.parent

FILES = {
    "lib/__init__.py": "",
    "lib/_inner.py": "def _helper():\n    return 1\n\n\ndef shared():\n    return 2\n",
    # a private name across modules, and a private module from inside its package (fine)
    "lib/user.py": "from lib._inner import _helper, shared\n",
    # the same helper reached through an imported module
    "lib/attr.py": "from lib import _inner\n\nVALUE = _inner._helper()\n",
    "lib/sub/__init__.py": "",
    "lib/sub/_deep.py": "X = 1\n",
    # a private module of lib.sub from outside lib.sub
    "lib/outside.py": "import lib.sub._deep\n",
    # a cycle: a -> b statically, b -> a by importlib with a literal name
    "lib/a.py": "from lib import b\n",
    "lib/b.py": 'import importlib\n\nA = importlib.import_module("lib.a")\n',
    # the library reaching up into the experiments: by statement and by string
    "lib/up.py": (
        '"""Mentions experiments.x in a docstring, which is fine."""\n'
        "import importlib\n\n\n"
        "def load(name):\n"
        '    return importlib.import_module(f"experiments.{name}")\n'
    ),
    "lib/up2.py": "def late():\n    import experiments.x\n\n    return experiments.x\n",
    "experiments/__init__.py": "",
    "experiments/x.py": "from lib import shared_name\n",
    "experiments/_common.py": "",
    "experiments/y.py": "from experiments import _common\n",  # inside its package: fine
}


def _plant(root: Path, long_body: int) -> None:
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    body = "".join(f"    x{i} = {i}\n" for i in range(long_body))
    (root / "lib" / "long.py").write_text(
        f"class Holder:\n    def method(self):\n{body.replace('    ', '        ')}"
        f"        return 0\n\n\ndef short():\n    return 1\n"
    )


def _measure(root: Path) -> dict:
    return house.measure(root, library="lib", packages=("lib", "experiments"))


def test_finds_planted_private_imports_cycle_upward_imports_and_long_function(tmp_path):
    _plant(tmp_path, long_body=85)
    report = _measure(tmp_path)
    private = {(r["file"], r["imports"]) for r in report["private_imports"]}
    assert private == {
        ("lib/user.py", "lib._inner._helper"),
        ("lib/attr.py", "lib._inner._helper"),
        ("lib/outside.py", "lib.sub._deep"),
    }
    assert [c["modules"] for c in report["cycles"]] == [["lib.a", "lib.b"]]
    assert report["cycles"][0]["loop"] == ["lib.a", "lib.b", "lib.a"]
    upward = {(r["file"], r["imports"]) for r in report["library_imports_experiments"]}
    assert upward == {("lib/up.py", "experiments."), ("lib/up2.py", "experiments.x")}
    over = [(f["function"], f["lines"]) for f in report["functions_over_80"]]
    assert over == [("Holder.method", 87)]  # def line + 85 assignments + return
    lines = report["library_lines"]
    assert lines["files"]["lib/long.py"] == 92
    assert lines["total"] == sum(lines["files"].values())
    assert "experiments/x.py" not in lines["files"]


def test_a_clean_package_reports_nothing(tmp_path):
    _plant(tmp_path, long_body=79)  # 81 lines with def and return: still too long
    for name in ("lib/user.py", "lib/attr.py", "lib/outside.py", "lib/b.py"):
        (tmp_path / name).write_text("from lib._inner import shared\n")
    (tmp_path / "lib" / "up.py").write_text('"""Mentions experiments.x, harmlessly."""\n')
    (tmp_path / "lib" / "up2.py").write_text("")
    report = _measure(tmp_path)
    assert report["private_imports"] == []
    assert report["cycles"] == []
    assert report["library_imports_experiments"] == []
    assert [f["lines"] for f in report["functions_over_80"]] == [81]
    _plant(tmp_path, long_body=78)
    assert _measure(tmp_path)["functions_over_80"] == []


def test_the_command_prints_text_and_json(tmp_path):
    _plant(tmp_path, long_body=85)
    run = [sys.executable, "-m", "tools.house", "--root", str(tmp_path)]
    text = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "library lines: 0 in 0 files" in text  # no geomcollapse/ under tmp_path
    assert "import cycles: 0" in text  # lib is not among the default packages
    run += ["--library", "lib", "--packages", "lib,experiments,tools"]  # tools/ absent: skipped
    text = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "functions over 80 lines: 1;" in text and "private imports: 3" in text
    assert "import cycles: 1" in text and "lib.a -> lib.b -> lib.a" in text
    as_json = subprocess.run(
        [*run, "--json"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(as_json)
    assert set(report) == {
        "library_lines",
        "longest_functions",
        "functions_over_80",
        "private_imports",
        "library_imports_experiments",
        "cycles",
    }
