"""Data: every layout our users bring, validated, turned into token ids with the loss on the answer only.

Layouts (`--train-data`, `--validation-data`, `--test-data`):
    samples.tsv        first column lists sample JSON files, paths relative to the TSV (a header row
                       whose first cell does not end in .json is skipped; other columns are ignored)
    samples/           a folder of sample JSON files (one sample per file)
    samples.json       a JSON list of samples (or one sample)
    samples.jsonl      one sample per line
    -d rvl-cdip-ocr/   RVL-CDIP OCR layout: train_0000_13_aws.json, validation_..., test_...; the split is
                       the filename prefix, the class index the last number before --suffix (default _aws),
                       the document text the "ocr" field, class names from --classes (default: RVL-CDIP's 16)
    Hub ids, parquet / CSV / Arrow tables, save_to_disk folders, JSON in other formats (alpaca, OpenAI with
    images), --columns and several sources: finetune/sources.py, whose load_samples / load_preferences read any
    source and hand each record to parse_sample / parse_preference here. This module imports no other module of
    the project: it is the bottom layer.

A sample is one of
    {"answer": str, "text"|"ocr"?: str, "image"?: path, "question"?: str, "system"?: str, "id"?: str}
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}     loss on every assistant turn
    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}       ShareGPT
Tool calling (SFT): OpenAI's assistant {"tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}
and {"role": "tool"} results, or ShareGPT's "function_call" (value: the JSON of a call, or a list of them) and
"observation" turns, with an optional "tools" list of function schemas (or its JSON text). The chat template renders
them (its tools= argument: Qwen2.5, Llama 3.1 and later); the loss is on the calls and replies, never on results.
Image paths are relative to the file that names them and, like the files a TSV lists, must resolve inside
the data folder (the folder given, or the data file's folder) unless allow_outside (--allow-outside-paths).
A UTF-8 BOM is accepted; a TSV's extra columns are ignored. A question comes from the sample or from the
prompts file (`-p prompts.json`: {"system": [...], "question": [...]}); during training one prompt is
drawn per sample (seeded), validation and eval always use the first.

Bad input raises DataError: one line naming the file, the sample and the field. The CLIs print it and
exit with status 2 before a model is loaded or anything is written. Sample ids (their "id", else their
position) must be unique within a data path.

    from dataset import load_prompts, Formatter
    from finetune.sources import load_samples
    samples = load_samples("data/fortunes/train.jsonl", prompts=load_prompts("prompts.json"))

Before training, `uv run dataset.py check` (train.py's data options and --trainer, --test-data, -m for the
tokenizer) prints the counts, token lengths, two samples as trained with the loss-carrying tokens marked, and
duplicates, leakage and noise between the splits (finetune/datacheck.py; docs/data.md).
"""
from __future__ import annotations

import bisect
import csv
import hashlib
import json
import random
import re
from itertools import accumulate
from dataclasses import dataclass, field, replace
from pathlib import Path

from jinja2 import Environment, TemplateError, nodes
from jinja2.ext import Extension

RVL_CDIP_CLASSES = [
    "letter", "form", "email", "handwritten", "advertisement", "scientific report", "scientific publication",
    "specification", "file folder", "news article", "budget", "invoice", "presentation", "questionnaire",
    "resume", "memo",
]
PIECES_CACHED = 50_000  # text pieces whose token ids one Formatter keeps (Formatter.text_ids)
CHECKED_TEXTS = 64  # texts of several pieces whose piece-by-piece ids a Formatter compares with the whole text's
IMAGE = "<image>"  # where a conversation puts an image: matched in order to the sample's `images`
CALL, TOOL = "tool_call", "tool"  # roles of an assistant turn that calls tools and of a tool's result: their text is
                                   # the message's JSON (tool_message), what the chat template renders
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system", "function_call": CALL, "observation": TOOL, "tool": TOOL}


class DataError(Exception):
    """A problem in the user's data: str(e) is the one line the CLIs print (file, sample, field, what)."""

    def __init__(self, file, sample=None, field=None, message=""):
        where = str(file)
        if sample is not None:
            where += f": sample {sample}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass
class Sample:
    id: str
    file: str                      # where it came from, for error messages
    turns: list[tuple[str, str]]   # (role, text) in order; the last assistant turn is the reference answer
    image: str | None = None       # absolute path: the document's image, before the first user turn's text
    document: str | None = None    # the part --max-len may truncate (text/ocr)
    needs_prompt: bool = False     # a question/system must come from prompts.json
    context: int = 0               # leading turns that are prompt only: no loss on their assistant replies (TRL's
                                   # prompt-completion form, whose prompt may hold earlier replies)
    images: tuple = ()             # absolute paths, one per IMAGE placeholder in the turns, in order
    lm: bool = False               # language-modelling text (--lm-text): the one assistant turn is the text itself,
                                   # the loss on every token, no chat template
    tools: list | None = None      # function schemas ({"type": "function", "function": {...}}), the chat template's tools=

    @property
    def answer(self) -> str | None:
        return next((t for r, t in reversed(self.turns) if r == "assistant"), None)

    @property
    def all_images(self) -> list[str]:
        """Every image the model must see, in the order the rendered conversation shows them."""
        return ([self.image] if self.image else []) + list(self.images)


# ----------------------------------------------------------------------------------------------- reading files
# Bytes that are not UTF-8 are decoded to lone surrogates (surrogateescape) rather than failing the whole file at
# a byte offset: once the JSON is parsed, _not_utf8 finds them and the error names the sample and field.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
OUTSIDE_HINT = "pass --allow-outside-paths to allow it"


def _read_text(path: Path, sample=None) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, sample, None, "file not found") from None
    except OSError as e:
        raise DataError(path, sample, None, f"cannot read: {e.strerror}") from None
    return raw.decode("utf-8-sig", errors="surrogateescape")  # a BOM (Windows editors) is harmless: dropped


def _read_json(path: Path, sample=None):
    try:
        return json.loads(_read_text(path, sample))
    except json.JSONDecodeError as e:
        raise DataError(path, sample, None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _lines(path: Path) -> list[str]:
    # not str.splitlines: that also splits at U+2028 and friends, which JSON strings may hold unescaped
    return [line.lstrip("\ufeff").rstrip("\r") for line in _read_text(path).split("\n")]


def _not_utf8(value, where=""):
    """Where in a parsed JSON value text holds bytes that are not UTF-8 ('messages[1].content'), else None."""
    if isinstance(value, str):
        return where if _NOT_UTF8.search(value) else None
    if isinstance(value, dict):
        parts = [(f"{where}.{k}" if where else k, v) for k, v in value.items()]
    else:
        parts = [(f"{where}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else []
    for w, v in parts:
        if (hit := _not_utf8(v, w)) is not None:
            return hit
    return None


def _check_utf8(value, file, sid):
    where = _not_utf8(value)
    if where is not None:
        raise DataError(file, sid, where or None, "not UTF-8 text: save the file as UTF-8")


def data_root(path, allow_outside=False) -> Path | None:
    """The folder that paths named in the data must stay inside: a folder layout itself, else the data file's
    folder. None (no check) with --allow-outside-paths."""
    path = Path(path)
    return None if allow_outside else path.resolve() if path.is_dir() else path.parent.resolve()


def _inside(p: Path, root: Path | None) -> bool:
    return root is None or p.resolve().is_relative_to(root)  # resolve(): a symlink counts where it points


def read_records(path: str | Path, allow_outside=False) -> list[tuple[Path, str, dict]]:
    """(file, sample, raw record) for every sample a path holds, in any layout but RVL-CDIP."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json")
        if not files:
            raise DataError(path, None, None, "folder holds no .json sample files")
        records = [(f, f.stem, _read_json(f, f.stem)) for f in files]
    elif path.suffix in (".tsv", ".csv", ".txt"):
        records = _read_tsv(path, data_root(path, allow_outside))
    elif path.suffix == ".jsonl":
        records = [(path, f"line {n}", _json_line(path, n, line)) for n, line in enumerate(_lines(path), 1)
                   if line.strip()]
    elif path.suffix == ".json":
        data = _read_json(path)
        records = [(path, f"#{i}", d) for i, d in enumerate(data if isinstance(data, list) else [data])]
    else:
        raise DataError(path, None, None, "unknown layout: expected a .tsv, .json, .jsonl file or a folder")
    if not records:
        raise DataError(path, None, None, "file holds no samples")
    for f, sid, rec in records:
        _check_utf8(rec, f, sid)
    _check_ids(records)
    return records


def is_listing(path: Path) -> bool:
    """A .csv/.tsv/.txt whose first (or, after a header, second) non-blank line starts with a cell ending .json."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            lines = [line for line in (f.readline() for _ in range(50)) if line.strip()][:2]
    except OSError:
        return True  # read_records names the problem
    return any(line.split("\t")[0].strip().endswith(".json") for line in lines)


def text_records(path: Path) -> list[tuple[Path, str, dict]]:
    """A .txt file of language-modelling text (--lm-text): one sample per paragraph (blocks between blank lines),
    named by the line it starts on."""
    records, block, start = [], [], 0
    for n, line in enumerate(_lines(path) + [""], 1):
        if line.strip():
            start = start or n
            block.append(line)
        elif block:
            records.append((path, f"line {start}", {"text": "\n".join(block)}))
            block, start = [], 0
    if not records:
        raise DataError(path, None, None, "file holds no text")
    for f, sid, rec in records:
        _check_utf8(rec, f, sid)
    return records


def _json_line(path, n, line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {n}", None, f"invalid JSON: {e.msg} at column {e.colno}") from None


def _check_ids(records):
    """Predictions are keyed by sample id: two samples with one id would overwrite each other. Name both."""
    seen = {}
    for f, sid, rec in records:
        key = _sample_id(rec, f, sid) if isinstance(rec, dict) else sid
        if key in seen:
            f0, sid0 = seen[key]
            also = f"sample {sid0}" if f0 == f else f"{f0}: sample {sid0}"
            raise DataError(f, sid, "id", f"duplicate sample id {key!r}: also {also}")
        seen[key] = (f, sid)


def _sample_id(rec, file, sid) -> str:
    """The sample's own "id" if it has one (what predictions and errors call it), else its position."""
    v = rec.get("id")
    if v is None:
        return sid
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(file, sid, "id", f"expected a string or an integer, got {type(v).__name__}")
    if not str(v).strip():
        raise DataError(file, sid, "id", "empty string")
    return str(v)


def _read_tsv(path: Path, root):
    """Sample files listed in the first column, relative to the TSV; a header row and other columns are ignored."""
    reader = csv.reader(_lines(path), delimiter="\t")
    rows = [(reader.line_num, row) for row in reader if any(map(str.strip, row))]  # blank lines skipped
    if rows and not rows[0][1][0].strip().endswith(".json"):
        rows = rows[1:]  # a header
    out, seen = [], {}
    for n, row in rows:
        cell, f = row[0].strip(), path.parent / row[0].strip()
        if not cell:
            raise DataError(path, f"line {n}", "file", "empty first column: expected a sample JSON file")
        if _NOT_UTF8.search(cell):
            raise DataError(path, f"line {n}", "file", "not UTF-8 text: save the file as UTF-8")
        if not _inside(f, root):
            raise DataError(path, f"line {n}", "file", f"path outside the data folder {root}: {cell!r}; "
                            + OUTSIDE_HINT)
        if not f.is_file():
            raise DataError(path, f"line {n}", "file", f"sample file {cell!r} not found")
        if f.resolve() in seen:
            raise DataError(path, f"line {n}", "file", f"{cell!r} is listed twice (also line {seen[f.resolve()]})")
        seen[f.resolve()] = n
        out.append((f, f.stem, _read_json(f, f.stem)))
    return out


def load_prompts(path: str | Path | None) -> dict:
    """{"system": [str, ...], "question": [str, ...]}; either list may be absent, none may be empty."""
    if path is None:
        return {"system": [], "question": []}
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, None, None, 'expected an object {"system": [...], "question": [...]}')
    _check_utf8(data, path, None)
    unknown = set(data) - {"system", "question"}
    if unknown:
        raise DataError(path, None, sorted(unknown)[0], 'unknown key: expected only "system" and "question"')
    out = {}
    for key in ("system", "question"):
        v = data.get(key, [])
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list):
            raise DataError(path, None, key, "expected a list of non-empty strings")
        if key in data and not v:
            raise DataError(path, None, key, "empty list: give at least one prompt or leave the key out")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s.strip():
                raise DataError(path, None, f"{key}[{i}]", "expected a list of non-empty strings")
        out[key] = v
    return out


def load_classes(path: str | Path) -> list[str]:
    """Class names from a JSON list or a file with one name per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "classes file not found")
    if path.suffix == ".json":
        names = _read_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(path, None, None, "expected a JSON list of class names")
        entries = [(f"#{i}", n) for i, n in enumerate(names)]
    else:
        entries = [(f"line {i}", n) for i, n in enumerate(_lines(path), 1)]
    seen = {}  # normalised name -> where: answers are matched normalised, so 'Food' and 'food.' are one class
    for where, name in entries:
        if _NOT_UTF8.search(name):
            raise DataError(path, where, None, "not UTF-8 text: save the file as UTF-8")
        if not name.strip():
            continue
        if normalize(name) in seen:
            raise DataError(path, where, None, f"duplicate class name {name.strip()!r} (also {seen[normalize(name)]})")
        seen[normalize(name)] = where
    if not seen:
        raise DataError(path, None, None, "no class names")
    return [n.strip() for _, n in entries if n.strip()]


# ----------------------------------------------------------------------------------------------- samples
def _str_field(rec, key, file, sid, required=False):
    """A string field; present but blank is an error, except for a document (a blank page has no text) and a
    system prompt (exported chats often carry an empty one: it counts as none)."""
    v = rec.get(key)
    if v is None:
        if required:
            raise DataError(file, sid, key, "missing")
        return None
    if not isinstance(v, str):
        raise DataError(file, sid, key, f"expected a string, got {type(v).__name__}")
    if not v.strip() and key not in ("text", "ocr", "system"):
        raise DataError(file, sid, key, "empty string" + ("" if required else ": leave the key out instead"))
    return v


def _turns(rec, key, file, sid, require_assistant=True, tools=False):
    """(role, text) turns of a message list; tools: tool calls and results are allowed (SFT), as CALL and TOOL turns."""
    msgs = rec[key]
    if isinstance(msgs, dict):  # one message (ShareGPT preference pairs: chosen / rejected)
        msgs = [msgs]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(file, sid, key, "expected a non-empty list of messages")
    sharegpt = key == "conversations" or (isinstance(msgs[0], dict) and "from" in msgs[0])
    rk, ck = ("from", "value") if sharegpt else ("role", "content")
    turns = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        calls = m.get("tool_calls") if isinstance(m, dict) and not sharegpt else None  # a table's null: no calls
        if not isinstance(m, dict) or rk not in m or (ck not in m and not calls):
            raise DataError(file, sid, where, f"expected {{'{rk}': ..., '{ck}': ...}}")
        role = ROLE_ALIASES.get(str(m[rk]).lower())
        if role is None:
            raise DataError(file, sid, f"{where}.{rk}", f"unknown role {m[rk]!r}")
        text = m.get(ck)
        if calls and role == "assistant":  # OpenAI: an assistant message that calls tools, its content often null
            role, text = CALL, _call_turn(text or "", calls, file, sid, f"{where}.tool_calls")
        elif role == CALL:  # ShareGPT's function_call: its value the JSON of one call or a list of them
            text = _call_turn("", _json_value(text, file, sid, f"{where}.{ck}", "tool call"), file, sid,
                              f"{where}.{ck}")
        elif not isinstance(text, str):
            raise DataError(file, sid, f"{where}.{ck}", f"expected a string, got {type(text).__name__}")
        elif role == TOOL:
            if not any(r == CALL for r, _ in turns):
                raise DataError(file, sid, where, "a tool result before any tool call")
            meta = {k: m[k] for k in ("name", "tool_call_id") if isinstance(m.get(k), str)}
            text = json.dumps({"content": text, **meta})
        if role in (CALL, TOOL) and not tools:
            raise DataError(file, sid, where, SFT_ONLY)
        turns.append((role, text))
    if require_assistant and not any(r in ("assistant", CALL) for r, _ in turns):
        raise DataError(file, sid, key, "no assistant turn to learn from")
    return turns


# ----------------------------------------------------------------------------------------------- tool calling
SFT_ONLY = "tool calls, results and schemas are for SFT (--trainer sft), not preference data"


def _no_tools(rec, file, sid):
    if rec.get("tools"):
        raise DataError(file, sid, "tools", SFT_ONLY)


def _json_value(v, file, sid, where, what):
    """A JSON text parsed (ShareGPT and tables keep tool calls, arguments and schemas as text); other values as
    they are."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError as e:
        raise DataError(file, sid, where, f"{what} is not valid JSON: {e.msg} at column {e.colno}") from None


def _call_turn(content, calls, file, sid, where) -> str:
    """A CALL turn's text: the assistant message's content and its calls in OpenAI's form, arguments a dict (what
    chat templates render: Qwen2.5's writes them with tojson, a JSON string would be quoted twice)."""
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise DataError(file, sid, where, "expected a tool call {\"name\": ..., \"arguments\": {...}} or a list of them")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]" if where.endswith("tool_calls") else where
        fn = call.get("function", call) if isinstance(call, dict) else None  # OpenAI's {"type", "function"} or bare
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(file, sid, at, "a tool call without a 'name'")
        args = _json_value(fn.get("arguments", {}), file, sid, f"{at}.arguments", "the tool call's arguments")
        if not isinstance(args, dict):
            raise DataError(file, sid, f"{at}.arguments", f"expected a JSON object, got {type(args).__name__}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args},
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return json.dumps({"content": content, "tool_calls": out})


TOOL_TEXTS = 256  # distinct `tools` texts kept parsed (_tool_schemas): a data set often repeats one on every row
_tool_texts: dict[str, list] = {}


def _tool_schemas(rec, file, sid) -> list | None:
    """The `tools` field: a list of function schemas (or its JSON text), each wrapped in OpenAI's
    {"type": "function", "function": {...}} as chat templates expect; None when absent or empty. Rows with the
    same JSON text share one list, which nothing changes."""
    text = rec.get("tools")
    if isinstance(text, str) and text in _tool_texts:
        return _tool_texts[text]
    tools = _json_value(text, file, sid, "tools", "the tools list")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise DataError(file, sid, "tools", f"expected a list of function schemas, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(file, sid, f"tools[{i}]", "expected a function schema: a JSON object with a 'name'")
        out.append(t if "function" in t else {"type": "function", "function": t})
    if isinstance(text, str):
        if len(_tool_texts) >= TOOL_TEXTS:
            _tool_texts.clear()
        _tool_texts[text] = out
    return out


def tool_message(role, text) -> dict:
    """The chat-template message of a CALL or TOOL turn."""
    return {"role": "assistant" if role == CALL else "tool", **json.loads(text)}


LM_HINT = "; for language-modelling text (the loss on every token) pass --lm-text"


def parse_sample(rec, file: Path, sid: str, require_answer=True, root: Path | None = None, lm=False) -> Sample:
    """One validated sample; image paths must resolve inside root (None: anywhere). lm (--lm-text): a record that
    holds only "text" (and an "id") is language-modelling text, not a document waiting for its answer."""
    if not isinstance(rec, dict):
        raise DataError(file, sid, None, f"expected a JSON object, got {type(rec).__name__}")
    sid = _sample_id(rec, file, sid)
    for key in ("messages", "conversations"):
        if key in rec:
            turns = _turns(rec, key, file, sid, tools=True)
            return Sample(id=sid, file=str(file), turns=turns, context=_context(rec, turns, file, sid),
                          images=_placed_images(rec, turns, file, sid, root), tools=_tool_schemas(rec, file, sid))
    if set(rec) - {"id"} == {"text"}:
        if lm:
            text = _str_field(rec, "text", file, sid, required=True)
            if not text.strip():
                raise DataError(file, sid, "text", "empty string")
            return Sample(id=sid, file=str(file), turns=[("assistant", text)], lm=True)
        if require_answer:
            raise DataError(file, sid, "answer", "missing" + LM_HINT)
    answer = _str_field(rec, "answer", file, sid, required=require_answer)
    system = _str_field(rec, "system", file, sid)
    question = _str_field(rec, "question", file, sid)
    document = _str_field(rec, "text", file, sid)
    if document is None:
        document = _str_field(rec, "ocr", file, sid)
    image = _str_field(rec, "image", file, sid)
    if image is not None:
        image = _check_image(file, sid, image, root)
    if document is None and image is None and question is None:
        raise DataError(file, sid, "text", "a sample needs a 'text' (or 'ocr'), an 'image' or a 'question'")
    turns = [("system", system)] if system else []
    turns.append(("user", question or ""))
    if answer is not None:
        turns.append(("assistant", answer))
    return Sample(id=sid, file=str(file), turns=turns, image=image, document=document,
                  needs_prompt=question is None or system is None, tools=_tool_schemas(rec, file, sid))


def _placed_images(rec, turns, file, sid, root) -> tuple:
    """The `images` list matched in order to the IMAGE placeholders of the turns: as many of one as of the other,
    or the sample names what is missing (an image never goes unseen, a placeholder never stays literal text)."""
    images = rec.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise DataError(file, sid, "images", f"expected a list of image paths, got {type(images).__name__}")
    marks = sum(t.count(IMAGE) for r, t in turns if r not in (CALL, TOOL))
    if marks != len(images):
        raise DataError(file, sid, "images", f"{marks} {IMAGE} placeholder(s) in the conversation but "
                        f"{len(images)} image(s): each image needs its placeholder where the conversation shows it")
    for i, path in enumerate(images):
        if not isinstance(path, str) or not path.strip():
            raise DataError(file, sid, f"images[{i}]", "expected an image path")
    return tuple(_check_image(file, sid, path, root, f"images[{i}]") for i, path in enumerate(images))


def _context(rec, turns, file, sid) -> int:
    """"context_turns" (sources.py writes it for TRL's conversational prompt-completion form): how many leading
    turns are the prompt; the completion after them must hold an assistant turn to learn from."""
    n = rec.get("context_turns", 0)
    if n and not any(r in ("assistant", CALL) for r, _ in turns[n:]):
        raise DataError(file, sid, "completion", "no assistant turn to learn from")
    return n


def _check_image(file: Path, sid: str, rel: str, root: Path | None, key="image") -> str:
    """The image's absolute path, once it is known to lie inside root and to be a readable image."""
    p = (Path(file).parent / rel).resolve()
    if not _inside(p, root):
        raise DataError(file, sid, key, f"path outside the data folder {root}: {rel!r}; {OUTSIDE_HINT}")
    if not p.is_file():
        raise DataError(file, sid, key, f"image file {rel!r} not found")
    if p.stat().st_size == 0:
        raise DataError(file, sid, key, f"image file {rel!r} is empty (0 bytes)")
    from PIL import Image  # only data with images pays for the import

    try:
        with Image.open(p) as im:
            im.verify()  # header and checksums without decoding the pixels: cheap enough for every sample
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for a damaged file
        raise DataError(file, sid, key, f"image file {rel!r} cannot be read: {_first_line(e)}") from None
    return str(p)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_samples(path, prompts=None, require_answer=True, require_question=True, allow_outside=False,
                 lm=False) -> list[Sample]:
    """Every sample of a TSV / folder / JSON / JSONL path in our own format, validated; prompts fill in missing
    questions. The plain format (--response-template) needs no question: pass require_question=False. Files and
    images the data names must lie inside its folder (data_root) unless allow_outside. Other sources and formats:
    finetune.sources.load_samples."""
    root = data_root(path, allow_outside)
    lm_file = lm and Path(path).suffix == ".txt" and not is_listing(Path(path))
    records = text_records(Path(path)) if lm_file else read_records(path, allow_outside)
    samples = [parse_sample(rec, f, sid, require_answer, root, lm) for f, sid, rec in records]
    check_samples(samples, prompts, require_question)
    return samples


def load_rvl_cdip(folder, split: str, classes: list[str], suffix="_aws", prompts=None,
                  require_question=True, allow_outside=False) -> list[Sample]:
    """The RVL-CDIP OCR layout: `<split>_<n>_<class index><suffix>.json` with the text in "ocr"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, None, "no such folder")
    root = data_root(folder, allow_outside)
    pattern = re.compile(rf"^{re.escape(split)}_.*?(\d+){re.escape(suffix)}\.json$")
    samples = []
    for f in sorted(folder.iterdir()):
        m = pattern.match(f.name)
        if not m:
            continue
        idx = int(m.group(1))
        if idx >= len(classes):
            raise DataError(f, f.stem, "class index", f"{idx} but only {len(classes)} classes are known "
                            "(give --classes FILE)")
        rec = _read_json(f, f.stem)
        if not isinstance(rec, dict):
            raise DataError(f, f.stem, None, f"expected a JSON object, got {type(rec).__name__}")
        _check_utf8(rec, f, f.stem)
        ocr = _str_field(rec, "ocr", f, f.stem, required=True)
        rec = {"ocr": ocr, "answer": classes[idx], **({"image": rec["image"]} if "image" in rec else {})}
        samples.append(parse_sample(rec, f, f.stem, root=root))
    if not samples:
        raise DataError(folder, None, None, f"no files named {split}_*{suffix}.json")
    check_samples(samples, prompts, require_question)
    return samples


def check_samples(samples, prompts, require_question=True):
    """Every sample has a question, its own or one from prompts.json. (Duplicate ids: read_records.)"""
    for s in samples:
        if s.needs_prompt and require_question:
            user = next(t for r, t in s.turns if r == "user")
            if not user and not (prompts and prompts.get("question")):
                raise DataError(s.file, s.id, "question",
                                "missing: put a 'question' in the sample or pass -p prompts.json")


def infer_classes(samples: list[Sample]) -> list[str] | None:
    """A closed label set when every answer is short and repeats, in first-seen order. Answers that differ only in
    case, surrounding whitespace or punctuation ('Food.', 'FOOD', ' food ') are one class (normalize), named by
    its most frequent spelling (the first seen on a tie)."""
    return classes_of(samples)[0]


CLASSES_MAX = 100  # answers of more distinct classes (after normalize) are free text, not a closed set
CLASS_CHARS_MAX = 60  # nor are answers of a class name longer than this


def answer_spellings(answers, into: dict | None = None) -> dict[str, dict[str, int]]:
    """normalized answer -> each exact spelling -> count, over answers (None: no answer), added to into."""
    spellings = {} if into is None else into
    for a in answers:
        if a is not None:
            forms = spellings.setdefault(normalize(a), {})
            forms[a] = forms.get(a, 0) + 1
    return spellings


def classes_of(samples) -> tuple[list[str] | None, bool]:
    """(infer_classes, whether every answer is spelled as its class's name already: to_classes would change
    nothing), from one pass over the samples. A lazy table's samples (finetune/sources.py's Samples) give their
    answers' spellings as their validation pass kept them (their spellings(); None: past a closed set), so the
    rows are not parsed again to find that out."""
    spellings = samples.spellings() if hasattr(samples, "spellings") else \
        answer_spellings(s.answer for s in samples)
    if spellings is None:
        return None, False
    counts = [sum(forms.values()) for forms in spellings.values()]
    if len(counts) < 2 or len(counts) > CLASSES_MAX or min(counts) < 2 or \
            max(len(k) for k in spellings) > CLASS_CHARS_MAX:
        return None, False
    classes = []
    for forms in spellings.values():
        stripped: dict[str, int] = {}  # surrounding whitespace does not make a spelling of its own
        for form, n in forms.items():
            stripped[form.strip()] = stripped.get(form.strip(), 0) + n
        classes.append(max(stripped, key=stripped.get))
    return classes, all(list(forms) == [c] for forms, c in zip(spellings.values(), classes))


def normalize(text: str) -> str:
    """The one rule for matching an answer to a class: case, surrounding whitespace and punctuation do not count."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", text.strip().lower())


def to_classes(samples: list[Sample], classes: list[str], whose="the classes") -> list[Sample]:
    """Every reference answer replaced by the class name it matches (normalize), once, when the data is loaded:
    training targets, validation, eval metrics, predictions.tsv and the confusion matrix then all compare class
    names, never spellings. An answer that matches no class is a DataError."""
    index = {normalize(c): c for c in classes}
    if not isinstance(samples, list) and all(s.answer is None or index.get(normalize(s.answer)) == s.answer
                                             for s in samples):
        return samples  # a lazy table (finetune/sources.py) already written with class names: keep it lazy, memory bounded
    out = []
    for s in samples:
        if s.answer is not None:
            name = index.get(normalize(s.answer))
            if name is None:
                raise DataError(s.file, s.id, "answer", f"{s.answer!r} is not one of {whose} ({', '.join(classes)})")
            if name != s.answer:
                last = max(i for i, (role, _) in enumerate(s.turns) if role == "assistant")
                s = replace(s, turns=s.turns[:last] + [("assistant", name)] + s.turns[last + 1:])
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------- formatting
def pick_prompt(sample: Sample, prompts: dict | None, rng: random.Random | None):
    """Fill in system / question from prompts.json: random per sample in training (rng), else the first."""
    prompts = prompts or {}
    turns = list(sample.turns)
    if sample.needs_prompt:
        choose = (lambda xs: rng.choice(xs)) if rng else (lambda xs: xs[0])
        has_system = turns[0][0] == "system"
        ui = 1 if has_system else 0
        if not turns[ui][1] and prompts.get("question"):
            turns[ui] = ("user", choose(prompts["question"]))
        if not has_system and prompts.get("system"):
            turns.insert(0, ("system", choose(prompts["system"])))
    return turns


def sample_rng(seed: int, sample_id: str) -> random.Random:
    """Per-sample RNG: the same prompt draw for the same seed and sample, whatever the order or workers."""
    return random.Random(int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:16], 16))


SLOT = "zslot{}q7"  # a string's placeholder in a skeleton: letters and digits, which JSON and HTML leave as they are
SLOT_RE = re.compile(r"zslot(\d+)q7")
# a string's stand-in when a shape is checked for trust (Skeletons._modes): JSON and HTML escaping, trimming, case
# and ASCII-only escaping each change it
CANARY = " \"\\<&'\n\t\x01\u00e9 Zq{} \r"
SKELETONS = 1024  # conversation shapes whose skeleton one Formatter keeps (0: none, every prefix rendered)
SKELETON_CHECKS = 4  # conversations of each shape whose every prefix is rendered as well and compared


def _slotted(value, values: list, key=None):
    """value with each non-empty string replaced by a placeholder (SLOT), the strings appended to values in order;
    roles and types stay (templates branch on them), as do empty strings (templates test them)."""
    if isinstance(value, str):
        if not value or key in ("role", "type"):
            return value
        values.append(value)
        return SLOT.format(len(values) - 1)
    if isinstance(value, dict):  # a dict's strings and other leaves handled here: most of a message's values
        out = {}
        for k, v in value.items():
            if type(v) is str:
                if v and k != "role" and k != "type":
                    values.append(v)
                    v = SLOT.format(len(values) - 1)
            elif isinstance(v, (dict, list, tuple, str)):
                v = _slotted(v, values, k)
            out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        return [_slotted(v, values) for v in value]
    return value


def _probed(shape, canaries: list):
    """A shape with each placeholder replaced by a _Probe of its canary."""
    if isinstance(shape, str):
        m = SLOT_RE.fullmatch(shape)
        return _Probe(canaries[int(m[1])]) if m else shape
    if isinstance(shape, dict):
        return {k: _probed(v, canaries) for k, v in shape.items()}
    if isinstance(shape, list):
        return [_probed(v, canaries) for v in shape]
    return shape


def _fill(parts, values, modes=None) -> tuple[str, list[int]]:
    """A skeleton's text with values in its placeholders (a JSON string's inside where modes says so), and where
    each literal part starts in it."""
    out = parts[:]
    out[1::2] = [values[i] for i in parts[1::2]]
    for k, escaped in enumerate(modes or ()):
        if escaped:
            out[2 * k + 1] = json.dumps(out[2 * k + 1], ensure_ascii=False)[1:-1]
    ends = list(accumulate(map(len, out)))
    return "".join(out), [0, *ends[1::2]]


class _Probe(str):
    """A string that records what a chat template does with it other than writing it out (Skeletons._modes):
    reading any attribute or method, its length, items, comparisons, hashing, arithmetic, formatting. Writing it
    out (str(), joining into the output) is not recorded, and `+` keeps a _Probe, so a use of the sum is recorded."""
    used: list = []

    def __getattribute__(self, name):
        if name != "__class__":  # isinstance() reads __class__ when the type alone does not match
            _Probe.used.append(name)
        return str.__getattribute__(self, name)

    def __str__(self):
        return self

    def __bool__(self):  # a placeholder stands for a non-empty string (empty ones stay in the shape)
        return True

    def __add__(self, other):
        return _Probe(str.__add__(self, other))

    def __radd__(self, other):
        return _Probe(str.__add__(other, self)) if isinstance(other, str) else NotImplemented


def _recorded(name):
    base = getattr(str, name, None)

    def use(self, *args):
        _Probe.used.append(name)
        if base is None:
            raise TypeError(f"a string has no {name}")
        return base(self, *args)
    return use


for _name in ("__len__", "__iter__", "__reversed__", "__getitem__", "__contains__", "__eq__", "__ne__", "__lt__",
              "__le__", "__gt__", "__ge__", "__hash__", "__mul__", "__rmul__", "__mod__", "__rmod__", "__format__",
              "__repr__", "__int__", "__float__", "__index__"):
    setattr(_Probe, _name, _recorded(_name))

# Filters that record any look at a _Probe (they call its methods or dunders), or hand their input back as it is;
# `join` and `tojson` build a new string that nothing records, so a template may only write theirs straight out.
# Left out: `int` and `wordcount` (they read the text in C), `format`, and any filter a template's environment adds.
TRACED_FILTERS = {"abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e", "escape",
                  "first", "float", "forceescape", "groupby", "indent", "items", "join", "last", "length", "list",
                  "lower", "map", "max", "min", "pprint", "reject", "rejectattr", "replace", "reverse", "round",
                  "safe", "select", "selectattr", "slice", "sort", "string", "sum", "title", "tojson", "trim",
                  "truncate", "unique", "upper"}
TRACED_TESTS = {"boolean", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false", "float", "ge", "gt",
                "integer", "iterable", "le", "lower", "lt", "mapping", "ne", "none", "number", "odd", "sequence",
                "string", "true", "undefined", "upper", "==", "!=", "<", "<=", ">", ">="}
# filters that apply another filter or a test named by an argument: (that argument's position, the names allowed)
BY_NAME = {"map": (0, TRACED_FILTERS), "select": (0, TRACED_TESTS), "reject": (0, TRACED_TESTS),
           "selectattr": (1, TRACED_TESTS), "rejectattr": (1, TRACED_TESTS)}


def _written(above: list, node) -> bool:
    """Whether node's value goes straight into the template's output: through `+`, `~` and if-else only."""
    for parent in reversed(above):
        if isinstance(parent, nodes.Output):
            return True
        if not isinstance(parent, (nodes.Concat, nodes.Add, nodes.CondExpr)) or getattr(parent, "test", None) is node:
            return False
        node = parent
    return False


def _traceable(node, above: list, macros: set) -> bool:
    """Whether a chat template can look at a message's string only in ways a _Probe records (Skeletons._modes):
    what `~`, `join`, `tojson`, a macro or a {% set %} block make of one is a plain string, so those may only be
    written out; `x in y` reads x's text in C unless y is a _Probe or a literal list; a method of a plain string
    (or a global function) reads its arguments in C unless they are literals."""
    if isinstance(node, (nodes.AssignBlock, nodes.FilterBlock, nodes.CallBlock)):
        return False
    if isinstance(node, nodes.Filter) and (node.name not in TRACED_FILTERS or node.name not in ("default", "d")
                                           and not all(isinstance(a, nodes.Const) for a in node.args)):
        return False
    if isinstance(node, nodes.Test) and node.name not in TRACED_TESTS:
        return False
    if isinstance(node, nodes.Filter) and node.name in BY_NAME and len(node.args) > BY_NAME[node.name][0] \
            and node.args[BY_NAME[node.name][0]].value not in BY_NAME[node.name][1]:
        return False
    if isinstance(node, nodes.Compare) and any(op.op in ("in", "notin") for op in node.ops) \
            and not isinstance(node.expr, nodes.Const) \
            and not all(isinstance(op.expr, (nodes.List, nodes.Tuple)) for op in node.ops):
        return False
    if isinstance(node, nodes.Call):
        name = node.node.name if isinstance(node.node, nodes.Name) else None
        literal = not node.dyn_args and not node.dyn_kwargs \
            and all(isinstance(a, nodes.Const) for a in [*node.args, *(k.value for k in node.kwargs)])
        if name in macros and not _written(above, node) \
                or name not in macros and not literal and name not in ("namespace", "dict", "range", "raise_exception"):
            return False
    fresh = isinstance(node, nodes.Concat) or isinstance(node, nodes.Filter) and node.name in ("join", "tojson")
    if fresh and not _written(above, node):
        return False
    return all(_traceable(child, above + [node], macros) for child in node.iter_child_nodes())


class _Generation(Extension):
    """transformers' {% generation %} block, read as its body: the block writes its body's text out as it is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def traced_template(source) -> bool:
    """Whether Skeletons may trust a shape of this chat template once its probe renders match (_traceable)."""
    if not isinstance(source, str):
        return False
    try:
        tree = Environment(extensions=["jinja2.ext.loopcontrols", _Generation]).parse(source)
    except TemplateError:  # a syntax this environment lacks: not traced
        return False
    return _traceable(tree, [], {m.name for m in tree.find_all(nodes.Macro)})


class Skeletons:
    """A conversation's prefix renders through one render of the whole conversation.

    The loss mask needs the chat template's text of each prefix that ends before or after an assistant turn: two
    renders a turn, most of the time spent encoding conversations (docs/benchmarks.md, every data form), which no
    library caches. Conversations of one shape (the same roles, fields and tools, every string in the same place)
    differ only in their strings, so a shape's prefixes are rendered once with a placeholder for each string (its
    skeleton) and a conversation's prefixes are the skeleton's with its strings put back.

    A shape is trusted when its template can be shown to write each string out without looking at it (_modes): its
    conversations get no render of their own. Otherwise each conversation's whole render is compared with its
    filled skeleton, and the first SKELETON_CHECKS of a shape have every prefix compared: a template whose output
    depends on the strings' text (trimming, escaping, tests on the content, prefixes that do not nest) differs
    there, and that conversation, or that shape, is rendered prefix by prefix."""

    def __init__(self, traced=False):
        self.plans, self.rows, self.built, self.tool_reprs = {}, 0, 0, {}
        self.traced = traced  # the chat template passed traced_template: its shapes may be trusted

    def renders(self, render, msgs, tools, needed) -> dict | None:
        """{(n, generation prompt): render(msgs[:n], generation prompt, tools)} for each of needed, or None where
        the skeleton does not serve (the caller renders each)."""
        if not SKELETONS or (self.built > 64 and self.built * 4 > self.rows):  # few conversations share a shape
            return None
        values = []
        shape = _slotted(msgs, values)  # the tools stay as they are: a row's own tools make a shape of their own
        whole = (len(msgs), msgs[-1]["role"] != "assistant")
        key = (repr(shape), self._tools_key(tools), tuple(needed))
        self.rows += 1
        if key not in self.plans:
            if len(self.plans) >= SKELETONS:
                self.plans.clear()
            self.plans[key] = plan = self._plan(render, shape, tools, needed, whole)
            if plan["parts"] is not None and self.traced:
                plan["modes"] = self._modes(render, shape, tools, plan, len(values), whole)
            self.built += 1
        plan = self.plans[key]
        if plan["parts"] is None:
            return None
        text, starts = _fill(plan["parts"], values, plan["modes"])
        filled = {k: text[: starts[lit] + offset] for k, (lit, offset) in plan["cuts"].items()}
        if plan["modes"] is not None:
            plan["rows"] += 1
            return filled
        try:
            if render(msgs[: whole[0]], whole[1], tools) != text:
                plan["misses"] += 1
                if plan["misses"] > 16 and plan["misses"] * 2 > plan["rows"]:
                    plan["parts"] = None
                return None
        except (TemplateError, TypeError, ValueError):  # rendered one by one, its error comes as it always does
            return None
        plan["rows"] += 1
        if plan["checked"] < SKELETON_CHECKS:
            plan["checked"] += 1
            each = {(n, gen): render(msgs[:n], gen, tools) for n, gen in needed}
            if each != {k: filled[k] for k in needed}:
                plan["parts"] = None
                return each
        return filled

    def _tools_key(self, tools) -> str:
        """repr(tools), kept per list object (held, so its id is not reused): rows whose tools are one JSON text
        share one list (_tool_schemas), and its repr is most of a key's cost."""
        held = self.tool_reprs.get(id(tools))
        if held is None or held[0] is not tools:
            if len(self.tool_reprs) >= TOOL_TEXTS:
                self.tool_reprs.clear()
            held = self.tool_reprs[id(tools)] = (tools, repr(tools))
        return held[1]

    @staticmethod
    def _plan(render, msgs, tools, needed, whole) -> dict:
        """The skeleton of a shape: its whole render split into literal text and placeholders (parts: text, slot,
        text, ...), and where each prefix ends in it (cuts: the literal part and the offset in it)."""
        plan = {"parts": None, "cuts": {}, "checked": 0, "misses": 0, "rows": 0, "modes": None}
        try:
            texts = {k: render(msgs[: k[0]], k[1], tools) for k in {*needed, whole}}
        except (TemplateError, TypeError, ValueError):  # placeholders a template cannot take: each row rendered
            return plan
        text = texts[whole]
        if any(not text.startswith(t) for t in texts.values()):
            return plan  # the prefixes do not nest: _split says so, conversation by conversation
        parts = SLOT_RE.split(text)
        starts, pos = [], 0
        for j, part in enumerate(parts):
            starts += [pos] if j % 2 == 0 else []
            pos += len(part) if j % 2 == 0 else len(SLOT.format(part))
        for k in {*needed, whole}:
            lit = bisect.bisect_right(starts, len(texts[k])) - 1
            if len(texts[k]) - starts[lit] > len(parts[2 * lit]):
                return plan  # a prefix ends inside a placeholder
            plan["cuts"][k] = (lit, len(texts[k]) - starts[lit])
        plan["parts"] = [int(p) if j % 2 else p for j, p in enumerate(parts)]
        return plan

    @staticmethod
    def _modes(render, shape, tools, plan, strings, whole) -> list[bool] | None:
        """How a trusted shape writes each placeholder (False: as it is; True: as the inside of a JSON string, e.g.
        tool-call arguments through tojson), or None when the shape is not trusted. Trusted: its renders with a
        _Probe of a CANARY for each string record no use of them, and are its skeleton filled with the canaries,
        each written one way or the other. The template then writes every string out, in a way that does not
        depend on its text, and nothing else it writes depends on the strings' text."""
        canaries = [CANARY.format(i) for i in range(strings)]
        probed = _probed(shape, canaries)
        _Probe.used = []
        try:
            texts = {k: render(probed[: k[0]], k[1], tools) for k in plan["cuts"]}
        except (TemplateError, TypeError, ValueError):  # a template that cannot take the probes: not trusted
            return None
        finally:
            used, _Probe.used = _Probe.used, []
        if used:
            return None
        text, pos, modes = texts[whole], 0, []
        for j, part in enumerate(plan["parts"]):
            if j % 2:
                raw = canaries[part]
                modes.append(not text.startswith(raw, pos))
                part = json.dumps(raw, ensure_ascii=False)[1:-1] if modes[-1] else raw
            if not text.startswith(part, pos):
                return None
            pos += len(part)
        filled, starts = _fill(plan["parts"], canaries, modes)
        if pos != len(text) or any(texts[k] != filled[: starts[lit] + offset] for k, (lit, offset)
                                   in plan["cuts"].items()):
            return None
        return modes


@dataclass
class Formatter:
    """Turns samples into text and token ids, the same way for training, validation and eval.

    chat format: the model's chat template; the user turn is `<document>\\n\\n<question>` (document first, so
    truncation never reaches the question). plain format (--response-template): `<document>\\n\\n<template> <answer><eos>`.
    Token ids are built segment by segment (prompt, then each assistant reply) so the loss mask is exact and
    the prompt tokenises exactly as it will at inference time: no searching for a response template's ids.
    """
    tokenizer: object
    processor: object | None = None        # vision-language models
    response_template: str | None = None   # plain completion format for base models
    max_len: int | None = None
    prompts: dict | None = None
    seed: int = 0
    prefill: str | None = None             # text the reply starts with, appended to inference prompts
    truncated: int = 0                     # counters for the warnings printed after preprocessing
    dropped: int = 0
    dropped_ids: list = field(default_factory=list)  # the samples behind `dropped`, for run.json

    # --- text rendering
    def _content(self, text, image_first=False):
        """A turn's content: its text, or (vision) image parts where the document's image and IMAGE placeholders
        put them, as chat templates of vision-language models expect."""
        if self.processor is None or not (image_first or IMAGE in text):
            return text
        parts = [{"type": "image"}] if image_first else []
        for i, piece in enumerate(text.split(IMAGE)):
            parts += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": piece}] if piece else [])
        return parts

    def _messages(self, sample, turns, document):
        msgs = []
        for role, text in turns:
            if role in (CALL, TOOL):
                msgs.append(tool_message(role, text))
                continue
            first_user = role == "user" and not msgs_has_user(msgs)
            if first_user and sample.document is not None and document is not None:
                text = f"{document}\n\n{text}" if text else document
            msgs.append({"role": role, "content": self._content(text, first_user and sample.image is not None)})
        return msgs

    def _check_seen(self, sample):
        """A text-only model cannot see images: say so rather than train on the placeholders' text (a document's
        own image next to its text, e.g. an OCR page, is the one exception: the model reads the text)."""
        if self.processor is None and (sample.images or (sample.image and sample.document is None)):
            raise DataError(sample.file, sample.id, "images" if sample.images else "image",
                            "the model is text-only and cannot see images: use a vision-language model "
                            "(e.g. Qwen2-VL), or drop the images from the data")

    def _owner(self):
        """Whose chat template renders the conversation: a vision model's processor, else the tokenizer."""
        return self.processor if self.processor is not None and getattr(self.processor, "chat_template", None) \
            else self.tokenizer

    def _render(self, msgs, add_generation_prompt, tools=None):
        return self._owner().apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **({"tools": tools} if tools else {}))

    def _check_tools(self, sample, turns):
        """Tool calls, results and schemas need a chat template that renders them (TRL's supports_tool_calling
        renders a call and its result and looks for both; the schemas are probed the same way), else one line
        naming the template: a template that drops them would train on a conversation the data does not hold."""
        calls = any(r in (CALL, TOOL) for r, _ in turns)
        if not calls and not sample.tools:
            return
        field = "tools" if sample.tools else "tool_calls"
        if self.response_template is not None:
            raise DataError(sample.file, sample.id, field, "--response-template (the plain format) cannot show "
                            "tool calls: leave it out to use the model's chat template")
        support = self.__dict__.setdefault("_tool_support", {})  # per template, not a field: no part of the cache key
        if not support:
            from trl.chat_template_utils import supports_tool_calling

            probe = "probe_tool_b5e1c7"
            schema = {"type": "function", "function": {"name": probe, "parameters": {"type": "object"}}}
            try:
                schemas = probe in self._render([{"role": "user", "content": "hi"}], False, [schema])
            except (TemplateError, TypeError):  # TypeError: a template's tojson of a schema field it requires
                schemas = False
            support.update(calls=supports_tool_calling(self._owner()), schemas=schemas)
        lacks = "calls and results" if calls and not support["calls"] else \
            "schemas (tools=)" if sample.tools and not support["schemas"] else None
        if lacks:
            name = getattr(self._owner(), "name_or_path", None) or type(self._owner()).__name__
            raise DataError(sample.file, sample.id, field, f"the chat template of {name} cannot render tool {lacks}: "
                            "train a model whose template does (Qwen2.5, Llama 3.1 and later)")

    def segments(self, sample, turns, document):
        """[(text, trainable)] whose concatenation is the whole conversation."""
        self._check_tools(sample, turns)
        if self.response_template is not None:
            parts = [t for r, t in turns if r in ("system", "user") and t]
            if sample.document is not None and document is not None:
                parts.insert(len(parts) - 1 if len(parts) and turns[-1][0] == "assistant" else len(parts), document)
            prompt = "\n\n".join(parts + [self.response_template])
            ans = sample.answer if turns[-1][0] == "assistant" else None
            if ans is None:
                return [(prompt + (" " + self.prefill if self.prefill else ""), False)]
            return [(prompt, False), (" " + ans + (self.tokenizer.eos_token or ""), True)]
        msgs = self._messages(sample, turns, document)
        # prompt-only turns (TRL's prompt-completion form): counted from the sample's turns, past a system prompt
        # pick_prompt put in front of them
        context = sample.context + len(pick_prompt(sample, self.prompts, None)) - len(sample.turns) \
            if sample.context else 0
        asked = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= context]
        needed = [k for i in asked for k in ((i, True), (i + 1, False))]
        inference = msgs[-1]["role"] != "assistant"
        renders = self._renders(msgs, sample.tools, needed + [(len(msgs), True)] * inference)
        segs, done = [], ""
        for i in asked:
            segs += self._split(sample, done, renders[i, True], renders[i + 1, False])
            done = renders[i + 1, False]
        if inference:  # a prompt to answer
            segs.append((renders[len(msgs), True][len(done):] + (self.prefill or ""), False))
        return segs

    def _renders(self, msgs, tools, needed) -> dict:
        """{(n, generation prompt): the chat template's text of msgs[:n]} for each of needed: filled in from the
        skeleton of the conversation's shape (Skeletons) where it serves, else rendered one by one."""
        if not needed:
            return {}
        if "_skeletons" not in self.__dict__:  # per template, not a field: no part of the cache key
            self._skeletons = Skeletons(traced_template(getattr(self._owner(), "chat_template", None)))
        filled = self._skeletons.renders(self._render, msgs, tools, needed)
        return filled if filled is not None else {(n, gen): self._render(msgs[:n], gen, tools) for n, gen in needed}

    @staticmethod
    def _split(sample, done, before, upto):
        """The prompt and answer segments of one assistant turn: the rendered conversation before it (generation
        prompt included) and up to its end, less what earlier segments hold (done)."""
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError(sample.file, sample.id, "messages",
                            "the chat template renders a conversation differently from its prefixes; "
                            "cannot tell prompt from answer")
        return [(before[len(done):], False), (upto[len(before):], True)]

    def _ids(self, text, first):
        special = first and self.response_template is not None  # chat templates write their own BOS
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _segment_ids(self, groups: list[list[str]]) -> list[list[list[int]]]:
        """Each segment's token ids (as _ids) for groups of segments (one group a sample), in one tokenizer call for
        all of them: a call costs the tokenizer's Python overhead (and its thread pool's start) once per call, which
        is most of the time on short samples (docs/benchmarks.md, every data form)."""
        heads = [g[0] for g in groups if g] if self.response_template is not None else []
        rest = [t for g in groups for t in g[1 if heads else 0:]]
        head_ids = iter(self.tokenizer(heads, add_special_tokens=True)["input_ids"] if heads else [])
        rest_ids = iter(self.text_ids(rest) if rest else [])
        return [([next(head_ids)] if heads and g else []) + [next(rest_ids) for _ in g[1 if heads else 0:]]
                for g in groups]

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts, no special tokens added: as one tokenizer call, but through the fast tokenizer's own
        backend with each text taken as pieces that start where a special token starts, each piece's ids cached.
        A tool schema or system prompt that the chat template writes into every row is then tokenised once (no
        library caches this). A fast tokenizer splits its input at special tokens before anything else, so the
        pieces' ids are the text's; the calls check that they are, until CHECKED_TEXTS texts of several pieces have
        been compared, and the Formatter keeps the plain call when they are not."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        state = self.__dict__.setdefault("_pieces", {"split": self._special_split(), "checked": 0, "ids": {}})
        if state["split"] is None or backend is None or backend.truncation or backend.padding:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        cache = state["ids"]
        if len(cache) > PIECES_CACHED:
            cache.clear()
        pieces = [state["split"](t) for t in texts]
        new = list({p: None for ps in pieces for p in ps if p not in cache})
        # encode_batch_fast skips the character offsets, which nothing here reads (a fifth of the call's time)
        for p, e in zip(new, backend.encode_batch_fast(new, add_special_tokens=False) if new else []):
            cache[p] = e.ids
        ids = []
        for ps in pieces:
            ids.append([])
            for p in ps:
                ids[-1] += cache[p]  # extends in C: a comprehension over every id costs several times more
        if state["checked"] < CHECKED_TEXTS:  # the first texts of several pieces, tokenised whole as well
            probe = [k for k, ps in enumerate(pieces) if len(ps) > 1][:CHECKED_TEXTS - state["checked"]]
            whole = self.tokenizer([texts[k] for k in probe], add_special_tokens=False)["input_ids"] if probe else []
            if any(w != ids[k] for k, w in zip(probe, whole)):
                state["split"] = None
                return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            state["checked"] += len(probe)
        return ids

    def _special_split(self):
        """A function that splits a text where each special token starts (its non-empty pieces); None without
        special tokens, or when one strips the whitespace in front of it (that whitespace ends the piece before:
        the pieces' ids would differ)."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        special = [t for t in decoder.values() if t.special and t.content]
        if not special or any(t.lstrip for t in special):
            return None
        names = {t.content for t in special}
        # a token found inside another one past its start is no place to cut: the cut would split the other token
        names = sorted((n for n in names if not any(n in m[1:] for m in names if m != n)), key=len, reverse=True)
        if not names:
            return None
        rest = "|".join(re.escape(n[1:]) for n in names)
        first = re.escape(names[0][0])
        if all(n[0] == names[0][0] for n in names):  # the pieces matched whole, in C: a lookahead split tried at
            # every position costs three to four times as much, most of text_ids' own time on long prompts
            return re.compile(f"(?s)(?=.){first}?[^{first}]*(?:{first}(?!{rest})[^{first}]*)*").findall
        at_each = re.compile("(?=" + "|".join(map(re.escape, names)) + ")")
        return lambda text: [p for p in at_each.split(text) if p]

    @staticmethod
    def _assemble(segs, seg_ids) -> tuple[list[int], list[int]]:
        """input_ids and labels (-100 outside the trainable segments) from the segments' ids."""
        ids, labels = [], []
        for t, (_, trainable) in zip(seg_ids, segs):
            ids += t
            labels += t if trainable else [-100] * len(t)
        return ids, labels

    def encode(self, sample: Sample, train: bool = False, with_answer: bool = True) -> dict | None:
        """input_ids + labels (-100 outside the answers), truncating the document to fit --max-len.

        For image samples the processor must expand the image tokens, so this also returns the text pieces
        ({"segments": JSON [[text, trainable], ...], "images": JSON paths, "prompt_text"}) for the collator, and
        "truncated" says whether the document was cut. Returns None for a sample that cannot fit even with its
        document cut away (counted in self.dropped, named in self.dropped_ids); a prompt to answer
        (with_answer=False) that cannot fit is a DataError.
        """
        return self.encode_many([sample], train, with_answer)[0]

    def encode_many(self, samples, train: bool = False, with_answer: bool = True) -> list[dict | None]:
        """encode for each sample, every sample's segments tokenised in one tokenizer call; a sample over --max-len
        is rendered and tokenised again with its document cut (_fit)."""
        lm = [s for s in samples if s.lm]
        texts = iter(self._encode_text(lm)) if lm else None
        planned = []  # (sample, turns, segments) of the others
        for s in samples:
            if not s.lm:
                self._check_seen(s)
                turns = self._turns(s, train, with_answer)
                planned.append((s, turns, self.segments(s, turns, s.document)))
        encoded = zip(planned, self._segment_ids([[t for t, _ in segs] for _, _, segs in planned]))
        out = []
        for s in samples:
            if s.lm:
                out.append(next(texts))
                continue
            (_, turns, segs), seg_ids = next(encoded)
            ids, labels = self._assemble(segs, seg_ids)
            fit = self._fit(s, turns, with_answer, (segs, ids, labels))
            out.append(None if fit is None else self._row(s, *fit))
        return out

    def _row(self, sample, segs, ids, labels, document) -> dict:
        cut = document != sample.document
        self.truncated += cut
        out = {"id": sample.id, "input_ids": ids, "labels": labels, "length": len(ids),
               "text": "".join(t for t, _ in segs), "truncated": cut}
        if self.processor is not None and sample.all_images:
            # the processor expands each image into its tokens at batch time (batching.VisionCollator), segment by
            # segment so the loss mask stays exact; prompt_text is the whole text, for inference
            out.update(segments=json.dumps(segs), images=json.dumps(sample.all_images), prompt_text=out["text"])
        return out

    def _turns(self, sample, train, with_answer):
        """The sample's turns with its system / question filled in (a prompt drawn per sample in training)."""
        # the RNG only where a prompt is drawn: seeding one costs 6 us, a few per cent of a short row
        turns = pick_prompt(sample, self.prompts,
                            sample_rng(self.seed, sample.id) if train and sample.needs_prompt else None)
        return turns[:-1] if not with_answer and turns[-1][0] == "assistant" else turns

    def _fit(self, sample, turns, with_answer, whole=None):
        """(segments, input_ids, labels, document) with the document cut to fit --max-len; None for a sample that
        cannot fit even with its document cut away (counted in self.dropped, named in self.dropped_ids). whole:
        (segments, input_ids, labels) of the uncut sample when the caller has them already."""
        document = sample.document
        # Cutting `excess` tokens off the document nearly always fits at once; a few more rounds cover decode/encode
        # not round-tripping at the cut (merges across the new end), and the 2 extra tokens below leave room for it.
        for _ in range(4):
            if whole is None:
                segs = self.segments(sample, turns, document)
                whole = segs, *self._assemble(segs, self._segment_ids([[text for text, _ in segs]])[0])
            (segs, ids, labels), whole = whole, None
            excess = len(ids) - self.max_len if self.max_len else 0
            if excess <= 0:
                return segs, ids, labels, document
            if not document:
                if not with_answer:  # a prompt to answer: leaving it out would lose a prediction without a word
                    raise DataError(sample.file, sample.id, "question", f"the prompt alone takes {len(ids)} "
                                    f"tokens, more than --max-len {self.max_len}")
                # nothing left to truncate: one long sample is dropped and counted, not a reason to stop the run
                # (the caller stops when too many are: too_many_dropped)
                self.dropped += 1
                self.dropped_ids.append(sample.id)
                return None
            doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
            document = self.tokenizer.decode(doc_ids[: max(0, len(doc_ids) - excess - 2)])
        raise DataError(sample.file, sample.id, "text", "could not truncate the document to --max-len")

    def _encode_text(self, samples) -> list[dict]:
        """Language-modelling texts: the tokenizer's own special tokens, EOS after each, the loss on every token; cut
        at --max-len (counted in self.truncated: continued pre-training keeps the start of a long text)."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token else []
        out = []
        for s, ids in zip(samples, self.tokenizer([s.answer for s in samples])["input_ids"]):
            ids = ids + eos
            cut = bool(self.max_len) and len(ids) > self.max_len
            ids = ids[: self.max_len] if cut else ids
            self.truncated += cut
            out.append({"id": s.id, "input_ids": ids, "labels": list(ids), "length": len(ids), "text": s.answer,
                        "truncated": cut})
        return out

    def prompt_text(self, sample, train: bool = False) -> str:
        """The inference prompt as text (chat template + generation prompt + prefill, document truncated), for
        trainers that tokenise text themselves (GRPO, DPO). A BOS the chat template wrote is dropped when the
        tokenizer adds its own, or it would appear twice."""
        text = self.encode(prompt_only(sample), train=train, with_answer=False)["text"]
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self._adds_bos():
            text = text[len(bos):]
        return text

    def _adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS in front of a text itself: asked once per Formatter (not a field: no part of
        the cache key), not once per prompt."""
        if "_bos" not in self.__dict__:
            self.__dict__["_bos"] = self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        return self.__dict__["_bos"]

    def prompt_messages(self, sample, train: bool = False) -> list[dict]:
        """The inference prompt as chat messages, for trainers that render it themselves (GRPO on images): what
        prompt_text renders (the same prompt draw, the document cut to --max-len alike, image parts where the
        chat template shows the images), the prefill as a final assistant message to continue. Chat format only."""
        probe = prompt_only(sample)
        self._check_seen(probe)
        turns = self._turns(probe, train, with_answer=False)
        document = self._fit(probe, turns, with_answer=False)[3]
        msgs = self._messages(probe, turns, document)
        return msgs + ([{"role": "assistant", "content": self.prefill}] if self.prefill else [])

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The inference prompt (first system/question prompt, generation prompt appended), truncated."""
        return self.encode(sample, train=False, with_answer=False)["input_ids"]

    def answer_text(self, answer: str) -> str:
        """The text of a reply as the model must produce it, end-of-turn included (for --predict score)."""
        probe = Sample(id="probe", file="", turns=[("user", "x"), ("assistant", answer)])
        if self.response_template is not None:
            return self.segments(probe, probe.turns, None)[-1][0]
        msgs = self._messages(probe, probe.turns, None)
        # the probe's prompt is the same for every reply: rendered once per Formatter (DPO asks for two replies a pair)
        if "_probe_prompt" not in self.__dict__:
            self.__dict__["_probe_prompt"] = self._render(msgs[:1], add_generation_prompt=True)
        text = self._split(probe, "", self.__dict__["_probe_prompt"], self._render(msgs, False))[-1][0]
        # the newline a chat template writes after the end-of-turn token is not part of the reply
        return text.rstrip("\n")

    def answer_ids(self, answer: str) -> list[int]:
        return self._ids(self.answer_text(answer), False)


def prompt_only(sample) -> Sample:
    """A sample (or a preference / feedback record) reduced to its prompt: its turns less a final assistant turn
    (the answer); the assistant turns of the conversation before it are context and stay."""
    turns = list(sample.turns)
    while turns and turns[-1][0] == "assistant":
        turns.pop()
    return Sample(id=sample.id, file=sample.file, turns=turns,
                  image=getattr(sample, "image", None), document=getattr(sample, "document", None),
                  needs_prompt=sample.needs_prompt, images=getattr(sample, "images", ()),
                  tools=getattr(sample, "tools", None))


MAX_DROPPED_SHARE = 0.1  # above this share of samples too long for --max-len, the run stops: --max-len is wrong


def too_many_dropped(fmt: Formatter, total: int, what="--train-data") -> str | None:
    """The one line that stops a run whose samples do not fit --max-len too often (over MAX_DROPPED_SHARE of
    them), else None: a few long samples are dropped and counted, most of the data dropped is a wrong --max-len."""
    if total and fmt.dropped > MAX_DROPPED_SHARE * total:
        return (f"{what}: {fmt.dropped} of {total} samples do not fit --max-len {fmt.max_len} even with their "
                f"document cut away (first: {', '.join(map(str, fmt.dropped_ids[:3]))}); more than "
                f"{MAX_DROPPED_SHARE:.0%} of the data would be dropped: raise --max-len")
    return None


def msgs_has_user(msgs):
    return any(m["role"] == "user" for m in msgs)


# ----------------------------------------------------------------------------------------------- preference pairs
@dataclass
class Preference:
    """One DPO pair: the prompt turns (system/user), the chosen and the rejected reply."""
    id: str
    file: str
    turns: list[tuple[str, str]]
    chosen: str
    rejected: str
    image: str | None = None
    needs_prompt: bool = False


def parse_preference(rec, file: Path, sid: str, root: Path | None = None) -> Preference:
    """{"prompt"|"question", "system"?, "image"?, "chosen", "rejected"} or the message-list form
    {"prompt_messages", "chosen_messages", "rejected_messages"} (the replies: their assistant turns)."""
    if not isinstance(rec, dict):
        raise DataError(file, sid, None, f"expected a JSON object, got {type(rec).__name__}")
    sid = _sample_id(rec, file, sid)
    _no_tools(rec, file, sid)
    if "conversations" in rec or "messages" in rec:  # ShareGPT's pair form: chosen and rejected one message each
        key = "conversations" if "conversations" in rec else "messages"
        turns = _turns(rec, key, file, sid, require_assistant=False)
        return Preference(sid, str(file), turns, *(_reply(rec, k, file, sid) for k in ("chosen", "rejected")))
    if "prompt_messages" in rec:
        turns = _turns(rec, "prompt_messages", file, sid, require_assistant=False)
        replies = []
        for key in ("chosen_messages", "rejected_messages"):
            if key not in rec:
                raise DataError(file, sid, key, "missing")
            replies.append("".join(t for r, t in _turns(rec, key, file, sid) if r == "assistant"))
        return Preference(sid, str(file), turns, replies[0], replies[1])
    question = _str_field(rec, "prompt", file, sid)
    if question is None:
        question = _str_field(rec, "question", file, sid)
    system = _str_field(rec, "system", file, sid)
    chosen = _str_field(rec, "chosen", file, sid, required=True)
    rejected = _str_field(rec, "rejected", file, sid, required=True)
    image = _str_field(rec, "image", file, sid)
    turns = ([("system", system)] if system else []) + [("user", question or "")]
    return Preference(sid, str(file), turns, chosen, rejected, _check_image(file, sid, image, root) if image else None,
                      needs_prompt=question is None or system is None)


def _reply(rec, key, file, sid) -> str:
    """A reply given as a string, one message or a list of them (its assistant turns)."""
    if key not in rec:
        raise DataError(file, sid, key, "missing")
    if isinstance(rec[key], str):
        return _str_field(rec, key, file, sid, required=True)
    return "".join(t for r, t in _turns(rec, key, file, sid) if r == "assistant")


@dataclass
class Feedback:
    """One unpaired preference (KTO): the prompt turns, one reply and whether it is desirable."""
    id: str
    file: str
    turns: list[tuple[str, str]]
    completion: str
    label: bool
    needs_prompt: bool = False


def parse_feedback(rec, file: Path, sid: str) -> Feedback:
    """TRL's unpaired preference forms: {"prompt", "completion", "label"} (strings, or message lists) or
    {"messages"|"conversations", "label"} whose last assistant turn is the reply; label true or false."""
    if not isinstance(rec, dict):
        raise DataError(file, sid, None, f"expected a JSON object, got {type(rec).__name__}")
    sid = _sample_id(rec, file, sid)
    _no_tools(rec, file, sid)
    if "label" not in rec:
        raise DataError(file, sid, "label", "missing: true for a desirable reply, false for an undesirable one")
    if not isinstance(rec["label"], bool):
        raise DataError(file, sid, "label", f"expected true or false, got {rec['label']!r}")
    for key in ("messages", "conversations"):
        if key in rec:
            turns = _turns(rec, key, file, sid)
            last = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
            return Feedback(sid, str(file), turns[:last], turns[last][1], rec["label"])
    if isinstance(rec.get("prompt"), list):
        turns = _turns(rec, "prompt", file, sid, require_assistant=False)
        return Feedback(sid, str(file), turns, _reply(rec, "completion", file, sid), rec["label"])
    question = _str_field(rec, "prompt", file, sid)
    system = _str_field(rec, "system", file, sid)
    turns = ([("system", system)] if system else []) + [("user", question or "")]
    return Feedback(sid, str(file), turns, _reply(rec, "completion", file, sid), rec["label"],
                    needs_prompt=question is None or system is None)


def load_preferences(path, prompts=None, allow_outside=False) -> list[Preference]:
    """load_samples for preference pairs in our own format (other sources: finetune.sources.load_preferences)."""
    root = data_root(path, allow_outside)
    prefs = [parse_preference(rec, f, sid, root) for f, sid, rec in read_records(path, allow_outside)]
    check_samples(prefs, prompts)
    return prefs


if __name__ == "__main__":
    # `uv run dataset.py check ...`: the check is the library's (finetune/datacheck.py), which imports this module.
    # It runs in a process of its own, so that this file, the bottom layer, imports nothing of the project.
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    sys.exit(subprocess.call([sys.executable, "-m", "finetune.datacheck", *sys.argv[1:]], env=env))
