"""The option tables of README.md and docs/*.md, generated from the CLIs' argparse parsers.

    uv run docs/gen_options.py           rewrite every table between its markers
    uv run docs/gen_options.py --check   exit 1, naming each table that differs from its parser (tests/test_docs.py)

A table sits between two marker comments, and everything between them is this script's output:

    <!-- options:train -->      (or eval, generate, export)
    <!-- /options -->

Each row is one option as its parser defines it: the flags, the default (argparse's; "–" when the option has none
of its own and the help says what applies), and the help text. The parsers are built without importing torch or
any other ML library (train.build_parser and the others import only the standard library and our light modules).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("train", "eval", "generate", "export")
MARKER = re.compile(r"(<!-- options:(\w+) -->\n)(.*?)(<!-- /options -->)", re.S)
NONE = "–"


def load_cli(name: str):
    """The CLI script as a module (train.py -> module "train_cli"), without running its main()."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


def parser(name: str) -> argparse.ArgumentParser:
    return load_cli(name).build_parser()


def _options(action) -> list[str]:
    if not action.option_strings:  # a positional: export.py's RUN / OUTPUT
        return [action.dest.upper()]
    return list(action.option_strings)


def default_text(action) -> str:
    """The default as a user reads it: "required", "off" for a switch, the value, or "–" for none of its own."""
    if action.required or not action.option_strings:
        return "required"
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or isinstance(action, argparse._StoreConstAction):
        return NONE
    return str(action.default)


def help_text(p: argparse.ArgumentParser, action) -> str:
    text = p._get_formatter()._expand_help(action) if action.help else ""
    if action.choices and not isinstance(action.choices, dict):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return " ".join(text.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(p: argparse.ArgumentParser) -> list[tuple[str, list[str], str, str]]:
    """(group title, option strings, default text, help) for every option of one parser, in parser order."""
    out = []
    for group in p._action_groups:
        for action in group._group_actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                    action.help == argparse.SUPPRESS:
                continue
            out.append((group.title, _options(action), default_text(action), help_text(p, action)))
    return out


def _flags(options: list[str]) -> str:
    return ", ".join(f"`{o}`" for o in options)


def table(name: str) -> str:
    """The markdown for one CLI: a table per argument group (export.py: a column for its commands)."""
    p = parser(name)
    if name == "export":
        return _export_table(p)
    lines, current = [], None
    for group, options, default, text in rows(p):
        if group != current:
            if current is not None:
                lines.append("")
            title = "general" if group in ("options", "optional arguments", "positional arguments") else group
            lines += [f"*{title}*", "", "| option | default | what it does |", "|---|---|---|"]
            current = group
        lines.append(f"| {_flags(options)} | {_cell(default)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _export_table(p: argparse.ArgumentParser) -> str:
    """One row per option, with the subcommands that take it (the same option is defined once per subcommand)."""
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    merged: dict[tuple, list] = {}
    for command, sp in sub.choices.items():
        for _, options, default, text in rows(sp):
            key = (tuple(options), default, text)
            merged.setdefault(key, []).append(command)
    lines = ["| option | commands | default | what it does |", "|---|---|---|---|"]
    for (options, default, text), commands in merged.items():
        lines.append(f"| {_flags(list(options))} | {', '.join(commands)} | {_cell(default)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str, tables: dict[str, str]) -> str:
    def fill(m):
        if m.group(2) not in tables:
            raise SystemExit(f"unknown options table {m.group(2)!r} (known: {', '.join(CLIS)})")
        return m.group(1) + "\n" + tables[m.group(2)] + "\n" + m.group(4)

    return MARKER.sub(fill, text)


def stale(files=None) -> list[str]:
    """The files whose option tables differ from what the parsers generate ([] when all agree)."""
    tables = {name: table(name) for name in CLIS}
    return [str(f.relative_to(ROOT)) for f in files or doc_files() if render(f.read_text(), tables) != f.read_text()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    check = ap.parse_args(argv).check
    tables = {name: table(name) for name in CLIS}
    bad = []
    for f in doc_files():
        old = f.read_text()
        new = render(old, tables)
        if new != old:
            bad.append(f.relative_to(ROOT))
            if not check:
                f.write_text(new)
    for f in bad:
        print(f"{f}: {'out of date (run uv run docs/gen_options.py)' if check else 'rewritten'}")
    sys.exit(1 if check and bad else 0)


if __name__ == "__main__":
    main()
