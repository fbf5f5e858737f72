"""Data from where users keep it: Hugging Face datasets, parquet / CSV / Arrow tables, save_to_disk folders,
column mapping, formats detected per source, a validation split carved from the training data, and mixing.

A source (`--train-data`, `--validation-data`, eval's `--test-data`, generate's `--data`) is one of
    org/name[:config][@split]   a Hugging Face dataset id; from the local cache when HF_HUB_OFFLINE=1
    file.parquet | file.arrow   a table with named columns (one row per sample)
    file.csv | file.tsv         a table with a header row, comma / tab separated (every cell read as text), unless
                                it lists sample JSON files (below)
    folder/                     a `save_to_disk` folder (it holds dataset_info.json or dataset_dict.json), else a
                                folder of sample JSON files
    file.json | file.jsonl      a JSON list of samples, or one per line (read by dataset.py: exact line numbers)
Any source takes `@SPLIT`, the `datasets` split syntax: `@train`, `@train[:95%]`, `@train[10:500]`, `@test+validation`.
A source with one split needs none; with several, name one (the error lists them). Several training sources are
joined with commas: `--train-data a.parquet,org/name@train --mix 0.7,0.3`.

Which .csv/.tsv is a list of sample files, decided by content: its first non-blank line, or the second when the
first is a header, has a first cell (tab-separated) ending in `.json`. Then it is today's layout (dataset.py).

Formats, detected per source from its column names (or the first record's keys), after --columns:
    ours        text|ocr, answer, question, system, image, id
    alpaca      instruction, input, output (+ system): instruction -> question, input -> text (the document,
                placed before the question and truncated by --max-len), output -> answer
    OpenAI      messages: [{role, content}], content a string or parts [{type: text, text}, {type: image, image}];
                images where the conversation puts them: image parts and <image> placeholders in the text, matched
                in order to the row's `images` column (several images, several turns)
    ShareGPT    conversations: [{from, value}]  (FineTome-100k), <image> placeholders with an `images` column too
    tool calls  OpenAI's tool_calls and role "tool" in messages, or ShareGPT's function_call / observation turns, with a
                `tools` column of function schemas (a list, or its JSON text); dataset.py parses them
    TRL         prompt, completion (strings, or message lists: the loss on the completion); text alone with --lm-text
                (language modelling, the loss on every token; a .txt file: one sample per paragraph)
    DPO         prompt, chosen, rejected (strings, or message lists: TRL's conversational form)
Images: a path (relative to the table's file, or to a save_to_disk folder itself; inside that folder unless
--allow-outside-paths), or a `datasets` Image feature (bytes are written once to $FINETUNE_CACHE/images/<sha256>;
a path is used as it is).
Table cells that are null, and empty cells of a CSV, count as absent (text: an empty document); integer answers
and ids are used as their text (0 -> "0").

`--columns text=article,answer=category,image=img` renames a table's columns to our fields (in --config: a mapping).
It applies to every source that has the mapped columns. A mapped column that a source lacks is an error (one line
listing the source's columns), unless the source has the field under our name already or is in one of the other
formats (so a mapped CSV mixes with an alpaca JSON); so is a table with no column to read.

Rows are validated by dataset.parse_sample / parse_preference, so every rule of dataset.py holds; an error names
the file, `row N` (data rows counted from 1, the header not counted) and the column. A table is read memory-mapped
(Arrow) and parsed on demand (`Samples`): validation streams over it once, and tokenise.encode_cached tokenises it
with `datasets.map` into Arrow files, keyed on the dataset's fingerprint, so memory stays bounded (bench/data_bench.py; figures in
docs/benchmarks.md).

Training only (`prepare`, after loading): --mix ratios (seeded; the mix is as large as the sources allow without
repeating a sample, or --train-samples), --validation-split F|N (a seeded split, stratified by answer for closed-set
tasks; the held-out ids go to run.json: a resumed run reuses them and `eval.py -c RUN --split validation` scores
them), --train-samples N (a seeded subset, after the split). run.json and the start-up report count each source.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path

import dataset
from dataset import DataError
from finetune import tokenise

FIELDS = ("text", "ocr", "answer", "question", "system", "image", "id", "messages", "conversations", "prompt",
          "chosen", "rejected", "instruction", "input", "output", "images", "prompt_messages", "chosen_messages",
          "rejected_messages", "completion", "label", "tools")
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
RECORD_SUFFIXES = (".json", ".jsonl", ".txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
SPLIT = re.compile(r"^\w+(\[[^\]]*\])?(\+\w+(\[[^\]]*\])?)*$")


# ------------------------------------------------------------------------------------------------ options
def parse_columns(value, where="--columns") -> dict:
    """'text=article,answer=category' (or a mapping from --config) -> {"text": "article", "answer": "category"}."""
    if not value:
        return {}
    pairs = value.items() if isinstance(value, dict) else [p.partition("=")[::2] for p in str(value).split(",")]
    out = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if ours not in FIELDS or not theirs:
            raise DataError(where, None, None, f"expected FIELD=COLUMN pairs with FIELD one of "
                                 f"{', '.join(FIELDS[:7])}, ...; got {ours + '=' + theirs!r}")
        out[ours] = theirs
    return out


def check_preference_options(args):
    """--mix, --validation-split and --train-samples work on samples, not on preference pairs."""
    if args.mix or args.validation_split or args.train_samples:
        raise DataError("--trainer dpo", None, None, "--mix, --validation-split and --train-samples are not "
                        "supported for preference pairs yet")


# ------------------------------------------------------------------------------------------------ what a spec is
def split_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'org/name:config@train[:95%]' -> ('org/name', 'config', 'train[:95%]'); local paths keep their colons."""
    spec = str(spec).strip()
    path, split = spec, None
    if "@" in spec and not Path(spec).exists():
        head, _, tail = spec.rpartition("@")
        if SPLIT.match(tail.replace(" ", "")):
            path, split = head, tail.replace(" ", "")
    config = None
    if not Path(path).exists() and HUB_ID.match(path) and ":" in path:
        path, config = path.split(":", 1)
    return path, config, split


def kind(spec: str) -> str:
    """'hub', 'table', 'disk' (save_to_disk), 'json' (dataset.py reads it, formats converted here) or 'records'
    (dataset.py's own layouts: a listing TSV, a folder of JSON files, a path that is not there)."""
    path, config, split = split_spec(spec)
    p = Path(path)
    if p.is_dir():
        return "disk" if any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")) \
            else "records"
    if p.is_file():
        if p.suffix in (".parquet", ".arrow") or (p.suffix in (".csv", ".tsv") and not dataset.is_listing(p)):
            return "table"
        return "json" if p.suffix in (".json", ".jsonl") else "records"
    if HUB_ID.match(path + (f":{config}" if config else "")) and p.suffix not in (*TABLE_SUFFIXES, *RECORD_SUFFIXES):
        return "hub"
    return "records"  # not there: dataset.read_records says so


def handles(spec) -> bool:
    """Does this spec need finetune/sources.py (several sources, a split, a table, a Hub id, a save_to_disk folder)?"""
    spec = str(spec)
    parts = [s for s in spec.split(",")] if "," in spec and not Path(spec).exists() else [spec]
    return len(parts) > 1 or kind(spec) != "records" or bool(split_spec(spec)[2])


def resolved(spec) -> str:
    """The spec with local paths made absolute (for run.json): Hub ids and @splits kept as written."""
    out = []
    for s in (str(spec).split(",") if handles(spec) else [str(spec)]):
        path, config, split = split_spec(s)
        if kind(s) != "hub":
            path = str(Path(path).resolve())
        out.append(path + (f":{config}" if config else "") + (f"@{split}" if split else ""))
    return ",".join(out)


# ------------------------------------------------------------------------------------------------ reading tables
def read_table(spec: str):
    """(datasets.Dataset, file name for messages, folder that relative image paths start from)."""
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    path, config, split = split_spec(spec)
    k = kind(spec)
    try:
        with tokenise.quiet_datasets():
            ds, where = _read(k, path, config)
    except (ConnectionError, FileNotFoundError) as e:
        if k == "hub":
            raise DataError(path, None, None, "not in the local Hugging Face cache and not reachable "
                            f"({_first(e)}); run once with the network, or check the id") from None
        raise DataError(path, None, None, f"cannot read: {_first(e)}") from None
    # what a damaged or foreign file raises: pyarrow's errors, pandas' ParserError and UnicodeDecodeError (both
    # ValueErrors), datasets' wrapper of a builder's failure, an unreadable file
    except (ValueError, OSError, ArrowException, DatasetGenerationError) as e:
        raise DataError(path, None, None, f"cannot read as a {k}: {_first(e)}") from None
    return _pick_split(ds, path, split), path, where


def _read(k, path, config):
    """(Dataset or DatasetDict, the folder relative image paths start from) of a hub id, save_to_disk folder or table."""
    import datasets

    if k == "hub":
        return datasets.load_dataset(path, config), Path.cwd()
    if k == "disk":
        return datasets.load_from_disk(path), Path(path)
    p = Path(path)
    builder = TABLE_SUFFIXES[p.suffix]
    extra = _csv_options(p) if builder == "csv" else {}
    return datasets.load_dataset(builder, data_files=str(p), **extra), p.parent


def _csv_options(p: Path) -> dict:
    """Every cell as text (a CSV has no types: pandas would read '007' as 7), empty cells as ''."""
    import datasets

    sep = "\t" if p.suffix == ".tsv" else ","
    with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), [])
    return {"delimiter": sep, "keep_default_na": False, "encoding": "utf-8-sig",
            "features": datasets.Features({c: datasets.Value("string") for c in header})}


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _pick_split(ds, path, split):
    """A Dataset from a Dataset or DatasetDict and a `datasets` split expression (slicing included)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    names = list(ds)
    if split is None:
        if len(names) > 1:
            raise DataError(path, None, None, f"has splits {', '.join(names)}: name one, e.g. {path}@{names[0]}")
        return ds[names[0]]
    try:  # datasets' own parser of 'train[:95%]+test': the same syntax as load_dataset(split=...)
        instr = datasets.ReadInstruction.from_spec(split).to_absolute({n: len(ds[n]) for n in names})
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(path, None, None, f"split {split!r}: {_first(e)} (splits: {', '.join(names)})") \
            from None
    parts = [ds[i.splitname].select(range(i.from_, i.to)) for i in instr]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ------------------------------------------------------------------------------------------------ formats
def detect(columns) -> str | None:
    """The format of a source from its column names (a table) or its first record's keys (JSON)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols or "chosen_messages" in cols:  # ShareGPT's pairs hold conversations too
        return "dpo"
    if "label" in cols and cols & {"completion", "messages", "conversations"}:
        return "kto"  # TRL's unpaired preferences
    if "messages" in cols:
        return "openai"
    if "conversations" in cols:
        return "sharegpt"
    if "completion" in cols:  # TRL's prompt-completion form
        return "completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if cols & {"text", "ocr", "answer", "question", "image", "prompt"}:
        return "ours"
    return None


ALPACA = {"question": "instruction", "text": "input", "answer": "output"}  # our field -> alpaca's
COMPLETION = {"question": "prompt", "answer": "completion"}  # our field -> TRL's prompt-completion form's
OWN_NAMES = {"alpaca": ALPACA, "completion": COMPLETION}


class Converter:
    """Rows of one source (dicts of its columns, renamed by --columns) -> records in dataset.py's keys, and errors
    that name the user's own columns. `names`: our field -> the user's name for it."""

    def __init__(self, fmt: str, names: dict, table: bool, blank_is_absent=False):
        self.fmt, self.table, self.blank_is_absent = fmt, table, blank_is_absent
        self.names = {**{k: names.get(v, v) for k, v in OWN_NAMES.get(fmt, {}).items()}, **names}

    def clean(self, row: dict) -> dict:
        out = {}
        for k, v in row.items():
            if v is None or (self.blank_is_absent and v == "" and k not in ("text", "ocr")):
                continue  # a null cell (or an empty CSV cell) is an absent field
            if self.table and k in ("answer", "output", "id") and isinstance(v, int) and not isinstance(v, bool):
                v = str(v)  # integer labels are their text (a table's column has one type; JSON keeps its rule)
            out[k] = v
        return out

    def __call__(self, row: dict, file, sid) -> tuple[dict, bool]:
        """(record, trusted): trusted when the image is a file we wrote (no data-folder check for it)."""
        rec = self.clean(row) if isinstance(row, dict) else row
        if not isinstance(rec, dict):
            return rec, False
        if self.fmt == "alpaca":
            rec = {"question": rec.get("instruction"), "text": rec.get("input") or None, "answer": rec.get("output"),
                   **{k: rec[k] for k in ("system", "id", "tools") if k in rec}}
            rec = {k: v for k, v in rec.items() if v is not None}
        elif self.fmt == "openai" or self.fmt == "kto":
            rec = _openai(rec, file, sid)
        elif self.fmt == "completion":
            rec = _prompt_completion(rec, file, sid)
        elif self.fmt == "dpo" and not ({"messages", "conversations"} & set(rec)):
            rec = {(f"{k}_messages" if k in ("prompt", "chosen", "rejected") and isinstance(v, list) else k): v
                   for k, v in rec.items()}
        trusted = False
        if isinstance(rec.get("image"), dict):  # a datasets Image feature, undecoded: {"bytes", "path"}
            rec["image"], trusted = _image_file(rec["image"], file, sid)
        if isinstance(rec.get("images"), list) and any(isinstance(v, dict) for v in rec["images"]):
            files = [_image_file(v, file, sid) if isinstance(v, dict) else (v, False) for v in rec["images"]]
            rec["images"], trusted = [f for f, _ in files], all(t for _, t in files)
        return rec, trusted

    def error(self, e):
        """The DataError with the field renamed to the user's column (tables) or key."""
        msg = str(e)
        m = re.search(r"field '([A-Za-z_]+)", msg)
        if m and (self.table or m.group(1) in self.names):
            word = "column" if self.table else "field"
            msg = f"{msg[:m.start()]}{word} '{self.names.get(m.group(1), m.group(1))}{msg[m.end():]}"
        return _error(msg)


def _error(message: str):
    """A DataError carrying a finished one-line message."""
    err = DataError.__new__(DataError)
    Exception.__init__(err, message)
    return err


def _openai(rec, file, sid):
    """OpenAI / TRL messages whose content may be a list of text and image parts: each becomes one string, an
    image part written as dataset.IMAGE where it stood. The row's `images` are matched in order to the image
    parts that name no image of their own and to the IMAGE placeholders of the text, so `images` ends up in the
    order the conversation shows them (dataset.parse_sample checks the counts)."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        return rec
    pool, ordered, out = list(rec.get("images") or []) if isinstance(rec.get("images"), list) else [], [], []

    def take(where):
        if not pool:
            raise DataError(file, sid, where, f"an image placeholder without an image: the row's 'images' has "
                            f"{len(ordered)}")
        ordered.append(pool.pop(0))

    for i, m in enumerate(msgs):
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            for _ in range(c.count(dataset.IMAGE)):
                take(f"messages[{i}].content")
        elif isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                kind_ = part.get("type") if isinstance(part, dict) else None
                if kind_ == "text":
                    texts.append(part.get("text") or "")
                    for _ in range(texts[-1].count(dataset.IMAGE)):
                        take(f"messages[{i}].content[{j}]")
                elif kind_ in ("image", "image_url"):
                    url = part.get("image_url")
                    v = part.get("image") or part.get("path") or (url.get("url") if isinstance(url, dict) else url)
                    if v is None:
                        take(f"messages[{i}].content[{j}]")
                    else:
                        ordered.append(v)
                    texts.append(dataset.IMAGE)
                else:
                    raise DataError(file, sid, f"messages[{i}].content[{j}].type",
                                    f"expected 'text' or 'image', got {kind_!r}")
            m = {**m, "content": "".join(texts)}
        out.append(m)
    if pool:
        raise DataError(file, sid, "images", f"{len(pool)} image(s) more than the conversation has placeholders "
                        f"({dataset.IMAGE} or image parts) for")
    return {**rec, "messages": out, **({"images": ordered} if ordered or "images" in rec else {})}


def _prompt_completion(rec, file, sid):
    """TRL's prompt-completion form: strings are our question and answer; message lists (its conversational form)
    are one conversation whose prompt turns carry no loss (context_turns), the loss on the completion."""
    prompt, completion = rec.get("prompt"), rec.get("completion")
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "completion")}
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return {**rest, **({"question": prompt} if prompt is not None else {}), "answer": completion}
    for key, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, list) or not v:
            raise DataError(file, sid, key, "expected a non-empty list of messages (the other of prompt and "
                            "completion is one)")
    return _openai({**rest, "messages": prompt + completion, "context_turns": len(prompt)}, file, sid)


def _image_file(value: dict, file, sid) -> tuple[str, bool]:
    """An Image feature's cell: its bytes written once to the cache (content-addressed), else its path."""
    data, path = value.get("bytes"), value.get("path")
    if not data:
        if not path:
            raise DataError(file, sid, "image", "an Image cell with neither bytes nor a path")
        return path, False
    root = tokenise.cache_root()
    if root is None:
        root = Path(tempfile.gettempdir()) / "finetune-images"
    digest = hashlib.sha256(data).hexdigest()
    out = root / "images" / f"{digest}{Path(path or '').suffix or '.img'}"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp")
        tmp.write_bytes(data)
        tmp.rename(out)
    return str(out), True


# ------------------------------------------------------------------------------------------------ --columns
def _mapping(have, file, columns) -> tuple[dict, dict]:
    """(rename: the user's column -> our field, names: our field -> the user's column) for --columns (parsed:
    parse_columns), checked against the columns a source has."""
    rename, names = {}, {}
    own = detect(have) not in (None, "ours")  # alpaca, messages, ShareGPT, DPO: needs no mapping (a mix of sources)
    for ours, theirs in (columns or {}).items():
        if theirs in have:
            rename[theirs], names[ours] = ours, theirs
        elif ours not in have and not own:  # nor does a source with the field under our name
            raise DataError(file, None, None, f"--columns {ours}={theirs}: no column {theirs!r}; the "
                                 f"{'table' if have else 'data'} has columns: {', '.join(have) or '(none)'}")
    return rename, names


def _require(fmt, cols, file, preference, require_answer, lm=False):
    """One line, with the columns the table has, when nothing in it can be read as samples."""
    has = f"the table has columns: {', '.join(cols)}"
    if fmt is None:
        raise DataError(file, None, None, f"no column to read samples from; {has}; name them with --columns "
                        "text=COLUMN,answer=COLUMN")
    if preference == "kto" and fmt != "kto":
        raise DataError(file, None, None, f"--trainer kto needs a label column with prompt and completion (or "
                        f"messages); {has}")
    if preference and preference != "kto" and fmt != "dpo":
        raise DataError(file, None, None, f"--trainer dpo needs prompt, chosen and rejected columns; {has}")
    if not preference and fmt == "ours" and require_answer and "answer" not in cols and not (lm and "text" in cols):
        raise DataError(file, None, None, f"no 'answer' column; {has}; map one with --columns answer=COLUMN"
                        + (dataset.LM_HINT if "text" in cols else ""))


# ------------------------------------------------------------------------------------------------ tables
def _undecoded(ds):
    """Image columns as {"bytes", "path"} cells: nothing is decoded while reading (dataset.py verifies files)."""
    import datasets

    for name, feat in ds.features.items():
        inner = getattr(feat, "feature", None)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


class AnswerCodes:
    """A table's answers from its validation pass, each row's as a code into the distinct spellings (4 bytes a row),
    so that finding the closed set of classes (dataset.classes_of) does not parse every row again. Once the answers
    are past a closed set (more than dataset.CLASSES_MAX classes, or a longer name than CLASS_CHARS_MAX) the codes
    are dropped and `closed` is False; past SPELLINGS_KEPT spellings they are dropped too, and the rows are read."""
    SPELLINGS_KEPT = 10_000

    def __init__(self):
        self.codes, self.spellings, self.index, self.classes, self.closed = array("i"), [], {}, set(), True

    def add(self, answer: str | None):
        if self.codes is None:
            return
        code = -1 if answer is None else self.index.get(answer)
        if code is None:
            key = dataset.normalize(answer)
            self.classes.add(key)
            if len(self.classes) > dataset.CLASSES_MAX or len(key) > dataset.CLASS_CHARS_MAX:
                self.closed, self.codes = False, None
                return
            if len(self.spellings) >= self.SPELLINGS_KEPT:
                self.codes = None
                return
            code = self.index[answer] = len(self.spellings)
            self.spellings.append(answer)
        self.codes.append(code)

    def answers(self, indices=None):
        """The answers of the rows at indices (None: every row), or None where the codes were dropped."""
        if self.codes is None:
            return None
        return (None if c < 0 else self.spellings[c] for c in (self.codes if indices is None else
                                                              (self.codes[int(i)] for i in indices)))


class Table:
    """One table source: a memory-mapped datasets.Dataset, each row parsed into a Sample (or Preference) when
    it is read, so a million rows cost their Arrow pages, not a million Python objects."""

    def __init__(self, spec, preference=False, require_answer=True, allow_outside=False, columns=None, lm=False):
        ds, self.file, where = read_table(spec)
        ds = _undecoded(ds)
        rename, names = _mapping(ds.column_names, self.file, columns)
        if rename:
            taken = [c for c in rename.values() if c in ds.column_names and c not in rename]
            ds = ds.remove_columns(taken).rename_columns(rename)
        self.format = detect(ds.column_names)
        _require(self.format, ds.column_names, self.file, preference, require_answer, lm)
        self.convert = Converter(self.format, names, table=True, blank_is_absent=Path(self.file).suffix in
                                 (".csv", ".tsv") and kind(spec) == "table")
        self.root = None if allow_outside or kind(spec) == "hub" else Path(where).resolve()
        self.ds, self.spec, self.preference, self.require_answer, self.lm = ds, spec, preference, require_answer, lm
        self.answers = None  # AnswerCodes, from validate
        self.path = Path(self.file)  # once: a Path per row costs more than parsing the row
        # a save_to_disk folder: image paths are relative to the folder itself, not to the folder it lies in
        self.base = Path(where) if kind(spec) == "disk" else None

    def __len__(self):
        return len(self.ds)

    def parse(self, row: dict, n: int):
        sid = f"row {n + 1}"
        try:
            rec, trusted = self.convert(row, self.file, sid)
            if self.base is not None:
                rec = self._from_base(rec)
            root = None if trusted else self.root
            return _parse(rec, self.path, sid, self.preference, self.require_answer, root, self.lm)
        except DataError as e:
            raise self.convert.error(e) from None

    def _from_base(self, rec: dict) -> dict:
        """Relative image paths of a save_to_disk folder made relative to the folder itself."""
        def move(p):
            return str(self.base / p) if isinstance(p, str) and not Path(p).is_absolute() else p

        if "image" in rec:
            rec["image"] = move(rec["image"])
        if isinstance(rec.get("images"), list):
            rec["images"] = [move(p) for p in rec["images"]]
        return rec

    def get(self, n: int):
        return self.parse(self.ds[int(n)], int(n))

    def rows(self, indices=None, batch=1000):
        """(row number, row dict) in order, read in Arrow batches."""
        ds = self.ds if indices is None else self.ds.select(indices)
        pos = 0
        for b in ds.iter(batch_size=batch):
            for values in zip(*b.values()):
                yield (pos if indices is None else int(indices[pos])), dict(zip(b, values))
                pos += 1

    def validate(self, prompts, require_question):
        """Every row parsed once: the errors of dataset.py, before a model is loaded. Nothing is kept but each
        row's answer as a code (AnswerCodes), for the closed set of classes."""
        seen = {} if "id" in self.ds.column_names else None
        self.answers = None if self.preference else AnswerCodes()
        with tokenise.collection_paused():
            for n, row in self.rows():
                s = self.parse(row, n)
                if self.answers is not None:
                    self.answers.add(s.answer)
                try:
                    dataset.check_samples([s], prompts, require_question)
                except DataError as e:
                    raise self.convert.error(e) from None
                if seen is not None:
                    if s.id in seen:
                        raise self.convert.error(DataError(self.file, f"row {n + 1}", "id", f"duplicate sample "
                                                             f"id {s.id!r}: also row {seen[s.id]}"))
                    seen[s.id] = n + 1

    @property
    def fingerprint(self) -> str:
        """The dataset's fingerprint (datasets: it changes with the files' content and every transform) and how
        rows become samples (format, mapping, checks, this module's code)."""
        code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        return _hash([self.ds._fingerprint, self.spec, self.format, self.convert.names, self.require_answer, self.lm,
                      self.preference, str(self.root), code])


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ a lazy sequence
class Samples(Sequence):
    """The samples of one or more sources, in order: parts [(name, base, indices)], base a Table (rows parsed
    when read) or a list of Samples, indices None (all) or sorted positions in base (repeats allowed: a mix)."""

    def __init__(self, parts):
        self.parts = [(name, base, None if idx is None else list(idx)) for name, base, idx in parts]

    @staticmethod
    def _size(base, idx):
        return len(base) if idx is None else len(idx)

    def __len__(self):
        return sum(self._size(b, i) for _, b, i in self.parts)

    def __iter__(self):
        for _, base, idx in self.parts:
            if isinstance(base, Table):
                yield from (base.parse(row, n) for n, row in base.rows(idx))
            else:
                yield from (base if idx is None else (base[i] for i in idx))

    def _locate(self, i):
        for p, (_, base, idx) in enumerate(self.parts):
            if i < self._size(base, idx):
                return p, (i if idx is None else idx[i])
            i -= self._size(base, idx)
        raise IndexError(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        p, n = self._locate(i + len(self) if i < 0 else i)
        base = self.parts[p][1]
        return base.get(n) if isinstance(base, Table) else base[n]

    def take(self, positions):
        """The samples at these positions (ascending) as a new Samples: nothing is read."""
        per = [[] for _ in self.parts]
        for i in positions:
            p, n = self._locate(i)
            per[p].append(n)
        # every part stays, empty or not: a part's index is its source's place in --train-data (run.json's ids)
        return Samples([(name, base, per[p]) for p, (name, base, _) in enumerate(self.parts)])

    def __add__(self, other):
        return Samples(self.parts + [("", other, None)])

    def __radd__(self, other):
        return Samples([("", other, None)] + self.parts)

    def spellings(self) -> dict | None:
        """dataset.answer_spellings of every sample's answer, a table's from the codes its validation pass kept
        (AnswerCodes); None when a whole table's answers are past a closed set (dataset.classes_of: no classes)."""
        out = {}
        for name, base, idx in self.parts:
            kept = base.answers if isinstance(base, Table) else None
            if kept is not None and not kept.closed and idx is None:
                return None
            answers = kept.answers(idx) if kept is not None else None
            if answers is None:  # a list, or a table whose codes were dropped: its samples read
                answers = (s.answer for s in Samples([(name, base, idx)]))
            dataset.answer_spellings(answers, out)
        return out

    def part_of(self):
        """(part index, sample) for every sample: what --validation-split stores (ids repeat across sources)."""
        for p, (name, base, idx) in enumerate(self.parts):
            for s in Samples([(name, base, idx)]):
                yield p, s

    @property
    def fingerprint(self) -> str | None:
        """For tokenise.cache_key when every part is a table (else None: the samples are hashed one by one)."""
        if not all(isinstance(b, Table) for _, b, _ in self.parts):
            return None
        return _hash([[b.fingerprint, None if i is None else hashlib.sha256(str(i).encode()).hexdigest()]
                      for _, b, i in self.parts])

    def encode(self, fmt, train: bool, workers: int = 1, progress=None):
        """(datasets.Dataset of encoded rows, worker processes): every part through finetune/tokenise.py's
        datasets.map, tables read row by row from their Arrow files (bounded memory); `progress` (a
        progress.Progress) counts the rows."""
        import datasets

        pieces, used = [], 1
        for p, (_, base, idx) in enumerate(self.parts):
            source = base if isinstance(base, Table) else tokenise.SampleList(base)
            ds, n = tokenise.encode_source(source, idx, fmt, train, workers, f"part{p}", progress)
            pieces.append(ds)
            used = max(used, n)
        return (pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)), used


# ------------------------------------------------------------------------------------------------ loading
def specs(spec) -> list[str]:
    spec = str(spec)
    return [s.strip() for s in spec.split(",") if s.strip()] if "," in spec and not Path(spec).exists() else [spec]


def _slice(items: list, path, split):
    """A JSON source's records cut by a split expression ('train[:100]'): the file is the one split 'train'."""
    if not split:
        return items
    import datasets

    try:
        instr = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(items)})
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(path, None, None, f"split {split!r}: {_first(e)} (a JSON file is the one split "
                             "'train')") from None
    return [r for i in instr for r in items[i.from_:i.to]]


def _parse(rec, file, sid, preference, require_answer, root, lm):
    """One record as its mode trains on it: a Sample, a preference pair (True: DPO) or unpaired feedback ("kto")."""
    if preference == "kto":
        return dataset.parse_feedback(rec, file, sid)
    if preference:
        return dataset.parse_preference(rec, file, sid, root)
    return dataset.parse_sample(rec, file, sid, require_answer, root, lm)


def _json_records(spec, preference, require_answer, allow_outside, columns, lm=False):
    """A JSON / JSONL source read by dataset.py, in the format detected from its first record, parsed."""
    path, _, split = split_spec(spec)
    records = _slice(dataset.read_records(path, allow_outside), path, split)
    first = next((r for _, _, r in records if isinstance(r, dict)), {})
    rename, names = _mapping(list(first), path, columns)
    fmt = detect(rename.get(k, k) for k in first) or "ours"
    convert, root, out = Converter(fmt, names, table=False), dataset.data_root(path, allow_outside), []
    for f, sid, rec in records:
        try:
            if isinstance(rec, dict) and rename:
                rec = {rename.get(k, k): v for k, v in rec.items()}
            rec, trusted = convert(rec, f, sid)
            root_ = None if trusted else root
            out.append(_parse(rec, f, sid, preference, require_answer, root_, lm))
        except DataError as e:
            raise convert.error(e) from None
    return out


def _load(spec, preference, prompts, require_answer, require_question, allow_outside, columns, lm=False):
    columns = parse_columns(columns)
    parts = []
    for s in specs(spec):
        k = kind(s)
        if k == "records":  # dataset.py's own layouts (the split, if any, cut here)
            path, _, split = split_spec(s)
            base = _slice([dataset.parse_feedback(r, f, sid) for f, sid, r in dataset.read_records(path, allow_outside)]
                          if preference == "kto" else
                          dataset.load_preferences(path, prompts, allow_outside) if preference else
                          dataset.load_samples(path, prompts, require_answer, require_question, allow_outside, lm),
                          path, split)
        elif k == "json":
            base = _json_records(s, preference, require_answer, allow_outside, columns, lm)
            dataset.check_samples(base, prompts, require_question or preference)
        else:
            base = Table(s, preference, require_answer, allow_outside, columns, lm)
            base.validate(prompts, require_question)
        parts.append((s, base, None))
    if len(parts) == 1 and isinstance(parts[0][1], list):
        return parts[0][1]
    return Samples(parts)


def load_samples(spec, prompts=None, require_answer=True, require_question=True, allow_outside=False, columns=None,
                 lm=False):
    """Every sample of any source (the module docstring), validated: a list, or a lazy Samples for tables and mixes.
    columns: --columns as given (a 'text=article,...' string or a mapping); lm (--lm-text): text-only records and
    .txt files are language-modelling text."""
    return _load(spec, False, prompts, require_answer, require_question, allow_outside, columns, lm)


def load_preferences(spec, prompts=None, allow_outside=False, columns=None, unpaired=False):
    """Preference pairs (DPO), or with unpaired unpaired preferences (KTO: dataset.Feedback), validated: a list, or a
    lazy Samples for tables and mixes (as load_samples)."""
    return _load(spec, "kto" if unpaired else True, prompts, True, True, allow_outside, columns)


# ------------------------------------------------------------------------------------------------ training only
def _fraction(value, what) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = -1
    if not v > 0:
        raise DataError(what, None, None, f"expected a positive number, got {value!r}")
    return v


def _mix(train: Samples, ratios: str, total: int | None, seed: int) -> Samples:
    """Each source's share of the training set, drawn without repeats (seeded); the set is as large as the
    sources allow at these ratios, or --train-samples (a source too small for its share is repeated)."""
    weights = [_fraction(r, "--mix") for r in str(ratios).split(",")]
    if len(weights) != len(train.parts):
        raise DataError("--mix", None, None, f"{len(weights)} ratios for {len(train.parts)} training sources")
    shares = [w / sum(weights) for w in weights]
    sizes = [Samples._size(b, i) for _, b, i in train.parts]
    total = total or int(min(n / r for n, r in zip(sizes, shares)))
    counts = [round(r * total) for r in shares]
    rng, parts = random.Random(f"mix:{seed}"), []
    for (name, base, idx), n, k in zip(train.parts, sizes, counts):
        picks = sorted(rng.sample(range(n), k % n) + list(range(n)) * (k // n)) if k else []
        parts.append((name, base, [idx[j] if idx is not None else j for j in picks]))
    return Samples(parts)


def _carve(train: Samples, spec, seed: int, classes) -> list[int]:
    """Positions of the held-out validation samples: a seeded draw, stratified by answer for closed-set tasks
    (each class gives its share; largest remainders settle the rounding)."""
    n = len(train)
    value = _fraction(spec, "--validation-split")
    k = round(value * n) if value < 1 else int(value)
    if value >= 1 and value != int(value) or not 0 < k < n:
        raise DataError("--validation-split", None, None, f"{spec!r} leaves {n - k} of {n} samples to train on; "
                             "give a fraction in (0, 1) or a count below the number of samples")
    rng = random.Random(f"validation-split:{seed}")
    if not classes:
        return sorted(rng.sample(range(n), k))
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(train):
        groups.setdefault(dataset.normalize(s.answer or ""), []).append(i)
    exact = {c: len(g) * k / n for c, g in groups.items()}
    take = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (take[c] - exact[c], rng.random()))[: k - sum(take.values())]:
        take[c] += 1
    return sorted(i for c, g in groups.items() for i in rng.sample(g, take[c]))


def _held_out(train: Samples, ids) -> list[int]:
    """Positions of the [source, id] pairs a run stored (a resumed run, eval --split validation)."""
    want = {(p, i) for p, i in ids}
    return [pos for pos, (p, s) in enumerate(train.part_of()) if (p, s.id) in want]


def prepare(args, train, val, stored_split_ids=None):
    """--mix, --validation-split and --train-samples on the loaded training data. stored_split_ids: the held-out
    ids of the run being resumed (runs.stored_split_ids), so it validates on the very same samples. Returns
    (train, val, used): used holds what run.json records (data_sources, validation_split_ids)."""
    used = {}
    if not isinstance(train, Samples):
        if not (args.mix or args.validation_split or args.train_samples):
            return train, val, used  # one source as dataset.py read it: nothing to do
        train = Samples([(args.train_data or args.data, train, None)])
    if getattr(args, "mix", None):
        train = _mix(train, args.mix, args.train_samples, args.seed)
    elif len(train.parts) > 1 and args.train_samples:
        train = _mix(train, ",".join(str(Samples._size(b, i)) for _, b, i in train.parts), args.train_samples,
                     args.seed)
    if args.validation_split:
        if val:
            raise DataError("--validation-split", None, None, "give --validation-data or --validation-split, not both")
        if stored_split_ids is not None:
            held = _held_out(train, stored_split_ids)
        else:
            classes = dataset.load_classes(args.classes) if args.classes else dataset.infer_classes(train)
            held = _carve(train, args.validation_split, args.seed, classes)
        keep = sorted(set(range(len(train))) - set(held))
        val = list(train.take(held))
        used["validation_split_ids"] = [[p, s.id] for p, s in train.take(held).part_of()]
        train = train.take(keep)
    if args.train_samples and len(train.parts) == 1 and args.train_samples < len(train):
        train = train.take(sorted(random.Random(f"train-samples:{args.seed}").sample(range(len(train)),
                                                                                        args.train_samples)))
    used["data_sources"] = [{"source": name, "samples": Samples._size(b, i)} for name, b, i in train.parts]
    if len(used["data_sources"]) > 1 or args.validation_split or args.train_samples:
        counts = ", ".join(f"{x['source']}: {x['samples']}" for x in used["data_sources"])
        print(f"data used: {counts}" + (f"; validation split: {len(val)} held out (--validation-split "
                                        f"{args.validation_split})" if args.validation_split else ""))
    return train, val, used


def run_split(cfg, prompts, require_question, allow_outside=False) -> list:
    """eval.py --split validation: the samples a run held out with --validation-split, from its training data."""
    if not cfg.get("validation_split_ids"):
        raise DataError("--split validation", None, None, "the run was not trained with --validation-split")
    train = load_samples(cfg["train_data"], prompts, require_answer=True, require_question=require_question, lm=bool(cfg.get("lm_text")),
                         allow_outside=allow_outside, columns=cfg.get("columns"))
    train = train if isinstance(train, Samples) else Samples([(cfg["train_data"], train, None)])
    return list(train.take(_held_out(train, cfg["validation_split_ids"])))
