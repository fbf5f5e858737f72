"""The layering stays drawable: entry scripts -> finetune/ -> dataset.py, no circles, project imports at the top.

    entry scripts   train.py, eval.py, generate.py, export.py, and rewards.py (the user's GRPO rewards, which
                    train.py hands to the library)
    library         finetune/*.py: imports dataset.py and its own modules, never an entry script
    bottom          dataset.py: imports no module of the project, not even in its __main__ block (`dataset.py check`
                    hands over to finetune/datacheck.py in a process of its own)

Imports are read with ast, so a violation anywhere in a file fails, whether or not that line ever runs. Heavy
third-party libraries (torch, transformers, TRL, PEFT, datasets) may be imported inside functions to keep --help
fast; a module of our own may not (that hides a circle instead of removing it)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"train", "eval", "generate", "export", "rewards"}
BOTTOM = {"dataset"}
LIBRARY = {f"finetune.{p.stem}" for p in (ROOT / "finetune").glob("*.py") if p.stem != "__init__"}
PROJECT = ENTRY | BOTTOM | LIBRARY | {"finetune"}


def _file(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py") if module != "finetune" else ROOT / "finetune/__init__.py"


def project_imports(module: str):
    """(imported project module, line, at top level?) for every import statement in the module's file; an
    `if __name__ == "__main__":` block counts as top level."""
    tree = ast.parse(_file(module).read_text())
    found = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            else:
                visit(child, inner)
                continue
            for name in names:
                if name in PROJECT:
                    found.append((name, child.lineno, top))
    visit(tree, True)
    return found


def graph():
    return {m: {n for n, _, _ in project_imports(m) if n != m} for m in PROJECT}


def test_dataset_imports_no_project_module():
    assert project_imports("dataset") == []


def test_library_never_imports_an_entry_script():
    upward = [(m, n, line) for m in LIBRARY | {"finetune"} for n, line, _ in project_imports(m) if n in ENTRY]
    assert upward == []


def test_project_imports_are_at_the_top_of_each_file():
    inside = [(m, n, line) for m in PROJECT for n, line, top in project_imports(m) if not top]
    assert inside == []


def test_no_import_circles():
    g, state, cycles = graph(), {}, []

    def walk(m, path):
        state[m] = "open"
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                walk(n, path + [n])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            walk(m, [m])
    assert cycles == []


@pytest.mark.parametrize("script", ["train", "eval", "generate", "export", "dataset"])
def test_scripts_import_without_torch(script):
    """--help stays fast: importing a script (and so every project module it reaches) loads no heavy library."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {script}; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
