"""The code's shape, as ARCHITECTURE.md draws it: imports point down its layer table, no
tool or study imports an entry script, library messages name fields (not scripts or flags),
and the pruning script's main reads top to bottom."""
from __future__ import annotations

import ast
import re

from helpers import ROOT

ENTRY_SCRIPTS = {"revit_scratch", "nvit_prune"}


def _module_files() -> dict[str, object]:
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in ("models", "pruning", "tools", "benchmarks"):
        files.update({f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py")})
    return files


def _imports(path) -> set[str]:
    """The project modules a file imports (packages by their own name)."""
    own = {"models", "pruning", "tools", "benchmarks"}
    out = set()
    package = path.parent.name if path.parent != ROOT else None
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{package}.{node.module or ''}".rstrip(".") if node.level else node.module]
        for name in names:
            top = name.split(".")[0]
            out.add(top if top in own or top in {p.stem for p in ROOT.glob("*.py")} else "")
    return out - {""}


def _layers() -> list[set[str]]:
    """ARCHITECTURE.md's layer table, top row first: the modules (or packages) in each row."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text.split("| layer | files | knows about |")[1].split("\n\n")[0]
    rows = []
    for line in table.strip().splitlines()[1:]:
        files = line.split("|")[2]
        rows.append({re.sub(r"(\.py|/)$", "", f) for f in re.findall(r"`([\w/]+(?:\.py|/))`", files)})
    return rows


def test_imports_point_down_the_layer_table():
    layers = _layers()
    layer_of = {name: i for i, row in enumerate(layers) for name in row}
    files = _module_files()
    tops = {name.split(".")[0] for name in files}
    assert tops <= set(layer_of), f"not in ARCHITECTURE.md's table: {sorted(tops - set(layer_of))}"
    wrong = []
    for name, path in files.items():
        mine = layer_of[name.split(".")[0]]
        for dep in _imports(path):
            if layer_of[dep] < mine:
                wrong.append(f"{name} imports {dep}")
    assert wrong == []


def test_no_tool_or_study_imports_an_entry_script():
    files = _module_files()
    for name, path in files.items():
        if name.startswith(("tools.", "benchmarks.")):
            assert not _imports(path) & ENTRY_SCRIPTS, name


def test_library_messages_name_fields_not_scripts_or_flags():
    """models/ and pruning/ say which field is at fault; the scripts turn it into the flag
    (flags.FLAG_OF_FIELD) and say which tool to run."""
    flag = re.compile(r"(?<![\w-])--[a-z][\w-]*")
    script = re.compile(r"\b(revit_scratch|nvit_prune|tools/\w+)\.py\b")
    found = []
    for folder in ("models", "pruning"):
        for path in (ROOT / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                          and n.body and isinstance(n.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and id(node) not in docstrings:
                    if flag.search(node.value) or script.search(node.value):
                        found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def test_the_pruning_scripts_main_reads_top_to_bottom():
    tree = ast.parse((ROOT / "nvit_prune.py").read_text())
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 120
    nested = [n for n in ast.walk(main) if n is not main
              and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    assert nested == []
