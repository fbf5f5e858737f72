"""The docs against the code (docs/README.md, "How the docs are checked"): option tables generated from the parsers,
commands that parse, links that resolve, no history, measured figures in one place, the README's quickstart."""
import argparse
import ast
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import gen_options  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "GPU.md"]
CLI_COMMAND = re.compile(r"^(?:uv run |python3? )(train|eval|generate|export)\.py(?=\s|$)(.*)$")


def parsers():
    return {name: gen_options.parser(name) for name in gen_options.CLIS}


def subparsers(p):
    sub = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub[0].choices) if sub else {}


def actions(p):
    """Every option of a parser (and of its subcommands), without -h."""
    for sp in [p, *subparsers(p).values()]:
        for a in sp._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                yield a


def expected_default(a) -> str:
    if a.required or not a.option_strings:
        return "required"
    if a.nargs == 0 and a.default is False:
        return "off"
    if a.default is None or a.const is not None and a.nargs == 0:
        return "–"
    return str(a.default)


# ------------------------------------------------------------------------------------------------ option tables
def test_every_option_table_is_what_the_parser_generates():
    assert gen_options.stale() == [], "run: uv run docs/gen_options.py"


def _table_rows(name):
    """(option strings, default cell) of each row of the CLI's table in the docs; the table must exist once."""
    blocks = [m.group(3) for page in PAGES for m in gen_options.MARKER.finditer(page.read_text()) if m.group(2) == name]
    assert len(blocks) == 1, f"{name}: {len(blocks)} option tables in the docs (want one)"
    rows = []
    for line in blocks[0].splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.append((tuple(re.findall(r"`([^`]+)`", cells[0])), cells[-2].replace("\\|", "|")))
    return rows


@pytest.mark.parametrize("name", gen_options.CLIS)
def test_tables_and_parsers_agree_on_names_and_defaults(name):
    rows = _table_rows(name)
    want = {(tuple(a.option_strings) or (a.dest.upper(),), expected_default(a)) for a in actions(parsers()[name])}
    assert set(rows) == want, {"in the docs only": set(rows) - want, "in the parser only": want - set(rows)}


def test_a_help_texts_own_default_matches_the_parser():
    """"(default X)" in a help text must say what argparse's default is (numbers compared as numbers)."""
    bad = []
    for name, p in parsers().items():
        for a in actions(p):
            m = re.search(r"\(default ([^\s;,)]+)", a.help or "")
            if not m or a.default is None:
                continue
            said = m.group(1).rstrip(":/")
            try:
                same = float(said) == float(a.default)
            except (TypeError, ValueError):
                same = said == str(a.default)
            if not same:
                bad.append(f"{name} {a.option_strings}: help says {said!r}, default is {a.default!r}")
    assert not bad, bad


def test_parsers_build_without_ml_libraries():
    code = ("import sys; sys.path.insert(0, 'docs'); import gen_options; "
            "[gen_options.parser(n) for n in gen_options.CLIS]; "
            "heavy = {'torch', 'transformers', 'trl', 'peft', 'datasets'} & set(sys.modules); "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------ commands
def _doc_commands():
    """(where, CLI, argv) of every command line for our CLIs in the pages (code blocks and inline code) and in the
    module docstrings of the scripts and the library (the --help texts of generate.py and export.py)."""
    texts = [(p.relative_to(ROOT), p.read_text()) for p in PAGES]
    for py in [*ROOT.glob("*.py"), *(ROOT / "finetune").glob("*.py")]:
        doc = ast.get_docstring(ast.parse(py.read_text()))
        if doc:
            texts.append((py.relative_to(ROOT), doc))
    for where, text in texts:
        text = text.replace("\\\n", " ")
        lines = text.splitlines() + re.findall(r"`((?:uv run|python3?) (?:train|eval|generate|export)\.py[^`]*)`", text)
        for line in lines:
            m = CLI_COMMAND.match(line.strip())
            if not m or "..." in m.group(2) or "|" in m.group(2):
                continue
            argv = shlex.split(m.group(2), comments=True)
            argv = argv[:next((i for i, w in enumerate(argv) if w in ("&&", "||", ";")), len(argv))]
            if any(w.startswith("$") for w in argv):
                continue
            yield str(where), m.group(1), argv


def test_every_documented_command_parses():
    ps, bad, n = parsers(), [], 0
    for where, cli, argv in _doc_commands():
        n += 1
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ps[cli].parse_args(argv)
        except SystemExit as e:
            if e.code:  # --help exits with 0
                bad.append(f"{where}: {cli}.py {shlex.join(argv)}")
    assert n > 30 and not bad, bad


def test_readme_quickstart_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and block[1] == "uv run pytest", block
    ci = [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert ci[-2:] == ["uv sync --locked", "uv run pytest"]
    m = CLI_COMMAND.match(block[0])
    assert m and m.group(1) == "train"
    args = parsers()["train"].parse_args(shlex.split(m.group(2)))
    for path in (args.train_data, args.validation_data, args.prompts):
        assert (ROOT / path).is_file(), path
    import importlib.util

    assert importlib.util.find_spec(args.model) is not None, f"{args.model}: the quickstart model is not installed"


# ------------------------------------------------------------------------------------------------ links
def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2, ..."""
    seen, out = {}, set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_links_resolve():
    bad = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ what the docs say
HISTORY = re.compile(r"\bsession \d|\bissue \d|\bno GPU was (lent|available)|\bthe new rule\b|\bbefore these\b|"
                     r"\bearlier checkpoint\b|\bnow the default\b|\bas estimated since\b|\bnot (been )?measured yet\b|"
                     r"\bnot yet measured\b|\bhas not been run here\b|\bfor now\b", re.I)


def _help_texts():
    for name, p in parsers().items():
        yield f"{name}.py --help", p.format_help()
        for command, sp in subparsers(p).items():
            yield f"{name}.py {command} --help", sp.format_help()


def test_no_history_in_the_docs_or_the_help():
    texts = [(str(p.relative_to(ROOT)), p.read_text()) for p in PAGES if p.parent.name != "bench"]
    texts += list(_help_texts())
    bad = [f"{where}: {m.group(0)!r}" for where, text in texts for m in HISTORY.finditer(text)]
    assert not bad, bad


MEASURED = re.compile(r"\d[\d.,]*\s*(samples/s|real tok(ens)?/s|tok/s\b)|\d+ min \d+ s\b|"
                      r"peak(ed)?[^.|]{0,40}?\d+\.\d+ GiB")


def test_measured_figures_live_in_benchmarks_md():
    pages = [p for p in PAGES if p.name != "benchmarks.md"]
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in pages for m in MEASURED.finditer(p.read_text())]
    assert not bad, bad


def test_readme_first_screen_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines.index("## Where to read more") <= 70
