"""unsloth cannot be imported without an NVIDIA GPU, but its source can be read. Every unsloth class, method and
keyword argument our code calls must exist under that name in the unsloth / unsloth-zoo that uv.lock pins, so an
upgrade that renames one fails here, in CI, instead of in a user's first GPU run.

What is checked: our code (the scripts at the top of the repository and bench/) is parsed with `ast` for
`from unsloth import X` and every call `X.method(..., kw=...)` (also through a local alias such as
`loader = FastVisionModel if vision else FastLanguageModel`), plus the methods unsloth adds to a model
(`model.save_pretrained_gguf(...)`). unsloth's source is parsed too (never imported): X must be exported by the
package (following its star imports), the method must be defined on X or a base class, and each keyword must be a
parameter there. A method that only forwards `**kwargs` hands the keyword to the next definition up the classes;
one that reaches no explicit parameter must be in PASS_THROUGH, which says where unsloth sends it.

Where the source comes from: the installed packages when `uv sync --extra unsloth` put them in this environment;
else the versions locked in uv.lock, fetched once without their dependencies with uv's own installer
(`uv pip install --no-deps --target`, about 100 MB unpacked) into ~/.cache/finetune/unsloth-src/VERSION/.
Why not `--extra unsloth` in .ci/run: CI installs what the README tells users to install (no unsloth, whose
dependencies add torchao, diffusers and xformers to the environment every other test runs in), and the fetch
costs two wheels (34 MB) from the same index uv sync uses. Offline and without the extra, the test is skipped,
except in CI (CI set), where it fails: CI must never pass it without reading the source.
vLLM is not an extra of this project (train.py --vllm only checks that it is importable), so nothing is checked
for it here.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unsloth", "unsloth_zoo")
# keywords that unsloth takes through **kwargs on purpose, and where it sends them
PASS_THROUGH = {
    ("FastModel", "from_pretrained", "num_labels"): "transformers' from_pretrained (auto_model's config)",
}
# methods unsloth binds onto a loaded model, and the function that implements each (module, name)
MODEL_METHODS = {"save_pretrained_gguf": ("unsloth.save", "unsloth_save_pretrained_gguf")}


# ------------------------------------------------------------------------------------------------ our calls
def our_calls(files) -> list[dict]:
    """{file, line, owner (class name or None for a model method), method, keywords, positional} per call."""
    calls = []
    for f in files:
        tree = ast.parse(Path(f).read_text(), filename=str(f))
        for scope in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]:
            names: dict[str, set[str]] = {}  # local name -> the unsloth classes it may stand for
            for node in _own_nodes(scope):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "unsloth":
                    for a in node.names:
                        names[a.asname or a.name] = {a.name}
            for node in _own_nodes(scope):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    options = _names_in(node.value)
                    if options and all(o in names for o in options):
                        names[node.targets[0].id] = set().union(*(names[o] for o in options))
            for node in _own_nodes(scope):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                kws = [k.arg for k in node.keywords if k.arg]
                positional = sum(not isinstance(a, ast.Starred) for a in node.args)
                base = node.func.value
                if isinstance(base, ast.Name) and base.id in names:
                    for owner in sorted(names[base.id]):
                        calls.append(dict(file=Path(f).name, line=node.lineno, owner=owner, method=node.func.attr,
                                          keywords=kws, positional=positional))
                elif node.func.attr in MODEL_METHODS:
                    calls.append(dict(file=Path(f).name, line=node.lineno, owner=None, method=node.func.attr,
                                      keywords=kws, positional=positional))
    return calls


def _own_nodes(scope):
    """The nodes of a module or function, not those of the functions nested in it (they are scopes of their own)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _names_in(expr) -> list[str]:
    if isinstance(expr, ast.Name):
        return [expr.id]
    if isinstance(expr, ast.IfExp):
        return _names_in(expr.body) + _names_in(expr.orelse)
    return [""]  # anything else: not an alias of unsloth classes


# ------------------------------------------------------------------------------------------------ unsloth's source
class Source:
    """unsloth and unsloth_zoo as parsed modules, with name resolution through (star) imports and base classes."""

    def __init__(self, root: Path):
        self.root, self.trees = root, {}

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None

    def tree(self, module: str):
        if module not in self.trees:
            p = self.path(module)
            self.trees[module] = ast.parse(p.read_text(), filename=str(p)) if p else None
        return self.trees[module]

    def _target(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self.path(module) and self.path(module).name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def resolve(self, module: str, name: str, seen=None):
        """(module, ClassDef / FunctionDef) that `name` is in `module`'s namespace, or None."""
        seen = set() if seen is None else seen
        if (module, name) in seen or self.tree(module) is None:
            return None
        seen.add((module, name))
        tree = self.tree(module)
        for node in tree.body:  # a definition at the top of the module (not one inside an if: MLX stand-ins)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return module, node
        stars = []
        for node in _own_nodes(tree):
            if not isinstance(node, ast.ImportFrom) or isinstance(node, ast.ClassDef):
                continue
            target = self._target(module, node)
            if target.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                if a.name == "*":
                    stars.append(target)
                elif (a.asname or a.name) == name:
                    found = self.resolve(target, a.name, seen) or self.resolve(f"{target}.{a.name}", name, seen)
                    if found:
                        return found
        for target in stars:
            found = self.resolve(target, name, seen)
            if found:
                return found
        return None

    def method_chain(self, module: str, cls: ast.ClassDef, method: str, seen=None) -> list[ast.FunctionDef]:
        """The definitions of `method` along the class and its bases, nearest first (a depth-first MRO)."""
        seen = set() if seen is None else seen
        if id(cls) in seen:
            return []
        seen.add(id(cls))
        own = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == method]
        chain = own[-1:]
        for base in cls.bases:
            if isinstance(base, ast.Name):
                found = self.resolve(module, base.id)
                if found and isinstance(found[1], ast.ClassDef):
                    chain += self.method_chain(found[0], found[1], method, seen)
        return chain

    def assigns_attribute(self, attr: str) -> bool:
        for p in (self.root / "unsloth").rglob("*.py"):
            if f".{attr}" in p.read_text(errors="replace"):
                tree = ast.parse(p.read_text(errors="replace"))
                if any(isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.ctx, ast.Store)
                       for n in ast.walk(tree)):
                    return True
        return False


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def problems(source: Source, calls) -> list[str]:
    """What does not exist in unsloth's source, one line per problem."""
    out = []
    for c in calls:
        where = f"{c['file']}:{c['line']}"
        if c["owner"] is None:  # a method unsloth binds onto the model
            module, func = MODEL_METHODS[c["method"]]
            found = source.resolve(module, func)
            if not found or not source.assigns_attribute(c["method"]):
                out.append(f"{where}: model.{c['method']}: unsloth no longer defines {module}.{func} and binds it")
                continue
            chain, label = [found[1]], f"model.{c['method']}"
            bound = 1  # self
        else:
            found = source.resolve("unsloth", c["owner"])
            if not found or not isinstance(found[1], ast.ClassDef):
                out.append(f"{where}: unsloth exports no class {c['owner']}")
                continue
            chain, label = source.method_chain(found[0], found[1], c["method"]), f"{c['owner']}.{c['method']}"
            bound = 0  # unsloth's loaders are static methods
            if not chain:
                out.append(f"{where}: {label}: no such method in unsloth")
                continue
        first = chain[0]
        n_pos = len(first.args.posonlyargs + first.args.args) - bound
        if first.args.vararg is None and c["positional"] > n_pos:
            out.append(f"{where}: {label}: takes {n_pos} positional arguments, we pass {c['positional']}")
        for kw in c["keywords"]:
            for fn in chain:
                if kw in params(fn):
                    break
                if fn.args.kwarg is None:  # an explicit signature without **kwargs: the keyword is not taken
                    out.append(f"{where}: {label}: no keyword argument {kw!r} (unsloth's parameters: "
                               f"{', '.join(params(fn))})")
                    break
            else:
                if (c["owner"], c["method"], kw) not in PASS_THROUGH:
                    out.append(f"{where}: {label}: keyword {kw!r} is no parameter; it only reaches **kwargs")
    return out


# ------------------------------------------------------------------------------------------------ where the source is
def locked_version(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == name)


def unsloth_source() -> Path:
    """A folder holding unsloth/ and unsloth_zoo/ at the locked versions (installed, or fetched into a cache)."""
    version = locked_version("unsloth")
    installed = [importlib.util.find_spec(p) for p in PACKAGES]  # find_spec does not import (runs no __init__)
    if all(installed):
        folders = {Path(s.origin).parent.parent for s in installed}
        from importlib.metadata import version as installed_version

        if len(folders) == 1 and installed_version("unsloth") == version:
            return folders.pop()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "unsloth-src"
    target = cache / f"{version}-{locked_version('unsloth-zoo')}"
    if all((target / p / "__init__.py").is_file() for p in PACKAGES):
        return target
    uv = os.environ.get("UV") or shutil.which("uv")
    why = "uv not found" if not uv else None
    if uv:
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([uv, "pip", "install", "--no-deps", "--quiet", "--target", str(tmp), "--python",
                               sys.executable, f"unsloth=={version}", f"unsloth-zoo=={locked_version('unsloth-zoo')}"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            if not target.exists():
                tmp.rename(target)
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(tmp, ignore_errors=True)
        why = (proc.stderr.strip().splitlines() or ["uv pip install failed"])[-1]
    message = f"cannot read unsloth {version}'s source: {why} (uv sync --extra unsloth installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def source():
    return Source(unsloth_source())


@pytest.fixture(scope="module")
def calls():
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "finetune").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return our_calls(files)


def test_the_calls_are_found(calls):
    """The extraction sees the calls we know of (a parser that finds nothing would pass everything)."""
    found = {(c["owner"], c["method"]) for c in calls}
    assert {("FastLanguageModel", "from_pretrained"), ("FastVisionModel", "from_pretrained"),
            ("FastLanguageModel", "get_peft_model"), ("FastVisionModel", "get_peft_model"),
            ("FastModel", "from_pretrained"), ("FastModel", "get_peft_model"),
            (None, "save_pretrained_gguf")} <= found, found
    loader = next(c for c in calls if c["file"] == "modeling.py" and c["method"] == "from_pretrained")
    assert {"model_name", "max_seq_length", "load_in_4bit", "full_finetuning", "device_map"} <= set(loader["keywords"])


def test_every_unsloth_name_we_call_exists(source, calls):
    assert problems(source, calls) == []


def test_a_renamed_keyword_or_method_is_caught(source):
    """The checker fails on what an upgrade could rename: a keyword, a method, a class."""
    fake = [dict(file="x.py", line=1, owner="FastLanguageModel", method="from_pretrained",
                 keywords=["model_name", "max_seq_lenght"], positional=0),
            dict(file="x.py", line=2, owner="FastModel", method="get_pft_model", keywords=[], positional=1),
            dict(file="x.py", line=3, owner="FastLanguageModle", method="from_pretrained", keywords=[], positional=0),
            dict(file="x.py", line=4, owner="FastVisionModel", method="get_peft_model", keywords=["r", "rank"],
                 positional=1)]
    found = problems(source, fake)
    assert len(found) == 4, found
    assert "max_seq_lenght" in found[0] and "get_pft_model" in found[1] and "FastLanguageModle" in found[2]
    assert "'rank'" in found[3]
