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

A sample is one of
    {"answer": str, "text"|"ocr"?: str, "image"?: path, "question"?: str, "system"?: str, "id"?: str}
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}     loss on every assistant turn
    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}       ShareGPT
Image paths are relative to the file that names them. A question comes from the sample or from the
prompts file (`-p prompts.json`: {"system": [...], "question": [...]}); during training one prompt is
drawn per sample (seeded), validation and eval always use the first.

Bad input raises DataError: one line naming the file, the sample and the field. The CLIs print it and
exit with status 2 before a model is loaded or anything is written.

    from dataset import load_samples, Formatter
    samples = load_samples("data/fortunes/train.jsonl", prompts=load_prompts("prompts.json"))
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

RVL_CDIP_CLASSES = [
    "letter", "form", "email", "handwritten", "advertisement", "scientific report", "scientific publication",
    "specification", "file folder", "news article", "budget", "invoice", "presentation", "questionnaire",
    "resume", "memo",
]
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system"}


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
    image: str | None = None       # absolute path
    document: str | None = None    # the part --max-len may truncate (text/ocr)
    needs_prompt: bool = False     # a question/system must come from prompts.json

    @property
    def answer(self) -> str | None:
        return next((t for r, t in reversed(self.turns) if r == "assistant"), None)


# ----------------------------------------------------------------------------------------------- reading files
def _read_json(path: Path, sample=None):
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, sample, None, "file not found") from None
    except OSError as e:
        raise DataError(path, sample, None, f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is harmless: accept it
    except UnicodeDecodeError as e:
        raise DataError(path, sample, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, sample, None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def read_records(path: str | Path) -> list[tuple[Path, str, dict]]:
    """(file, sample id, raw dict) for every sample a path holds, in any layout but RVL-CDIP."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json")
        if not files:
            raise DataError(path, None, None, "folder holds no .json sample files")
        return [(f, f.stem, _read_json(f)) for f in files]
    if path.suffix in (".tsv", ".csv", ".txt"):
        return _read_tsv(path)
    if path.suffix == ".jsonl":
        out = []
        try:
            lines = path.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(path, None, None, f"not UTF-8 text (byte {e.start})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append((path, f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {n}", None, f"invalid JSON: {e.msg} at column {e.colno}") from None
        if not out:
            raise DataError(path, None, None, "file holds no samples")
        return out
    if path.suffix == ".json":
        data = _read_json(path)
        items = data if isinstance(data, list) else [data]
        if not items:
            raise DataError(path, None, None, "file holds no samples")
        return [(path, f"#{i}", d) for i, d in enumerate(items)]
    raise DataError(path, None, None, "unknown layout: expected a .tsv, .json, .jsonl file or a folder")


def _read_tsv(path: Path):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text (byte {e.start})") from None
    rows = [r for r in csv.reader(text.splitlines(), delimiter="\t") if r and r[0].strip()]
    if rows and not rows[0][0].strip().endswith(".json"):
        rows = rows[1:]  # header
    if not rows:
        raise DataError(path, None, None, "TSV lists no sample files")
    out = []
    for n, row in enumerate(rows, 1):
        f = (path.parent / row[0].strip())
        if not f.is_file():
            raise DataError(path, f"row {n}", "file", f"sample file {row[0].strip()!r} not found")
        out.append((f, f.stem, _read_json(f, sample=f"row {n}")))
    return out


def load_prompts(path: str | Path | None) -> dict:
    """{"system": [str, ...], "question": [str, ...]}; either list may be absent, none may be empty."""
    if path is None:
        return {"system": [], "question": []}
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, None, None, 'expected an object {"system": [...], "question": [...]}')
    unknown = set(data) - {"system", "question"}
    if unknown:
        raise DataError(path, None, sorted(unknown)[0], 'unknown key: expected only "system" and "question"')
    out = {}
    for key in ("system", "question"):
        v = data.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise DataError(path, None, key, "expected a list of non-empty strings")
        if key in data and not v:
            raise DataError(path, None, key, "empty list: give at least one prompt or leave the key out")
        out[key] = v
    return out


def load_classes(path: str | Path) -> list[str]:
    """Class names from a JSON list or a file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "classes file not found")
    if path.suffix == ".json":
        names = _read_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(path, None, None, "expected a JSON list of class names")
    else:
        try:
            names = path.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(path, None, None, f"not UTF-8 text (byte {e.start})") from None
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DataError(path, None, None, "no class names")
    seen = set()
    for i, n in enumerate(names):
        if normalize(n) in seen:
            raise DataError(path, f"line {i + 1}", None, f"duplicate class name {n!r}")
        seen.add(normalize(n))
    return names


# ----------------------------------------------------------------------------------------------- samples
def _str_field(rec, key, file, sid, required=False):
    v = rec.get(key)
    if v is None:
        if required:
            raise DataError(file, sid, key, "missing")
        return None
    if not isinstance(v, str):
        raise DataError(file, sid, key, f"expected a string, got {type(v).__name__}")
    if required and not v.strip():
        raise DataError(file, sid, key, "empty string")
    return v


def _turns(rec, key, file, sid, require_assistant=True):
    msgs = rec[key]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(file, sid, key, "expected a non-empty list of messages")
    rk, ck = ("from", "value") if key == "conversations" else ("role", "content")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise DataError(file, sid, f"{key}[{i}]", f"expected {{'{rk}': ..., '{ck}': ...}}")
        role = ROLE_ALIASES.get(str(m[rk]).lower())
        if role is None:
            raise DataError(file, sid, f"{key}[{i}].{rk}", f"unknown role {m[rk]!r}")
        if not isinstance(m[ck], str):
            raise DataError(file, sid, f"{key}[{i}].{ck}", "expected a string")
        turns.append((role, m[ck]))
    if require_assistant and not any(r == "assistant" for r, _ in turns):
        raise DataError(file, sid, key, "no assistant turn to learn from")
    return turns


def parse_sample(rec, file: Path, sid: str, require_answer=True) -> Sample:
    if not isinstance(rec, dict):
        raise DataError(file, sid, None, f"expected a JSON object, got {type(rec).__name__}")
    sid = str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else sid
    for key in ("messages", "conversations"):
        if key in rec:
            return Sample(id=sid, file=str(file), turns=_turns(rec, key, file, sid))
    answer = _str_field(rec, "answer", file, sid, required=require_answer)
    system = _str_field(rec, "system", file, sid)
    question = _str_field(rec, "question", file, sid)
    document = _str_field(rec, "text", file, sid)
    if document is None:
        document = _str_field(rec, "ocr", file, sid)
    image = _str_field(rec, "image", file, sid)
    if image is not None:
        image = _check_image(file, sid, image)
    if document is None and image is None and question is None:
        raise DataError(file, sid, "text", "a sample needs a 'text' (or 'ocr'), an 'image' or a 'question'")
    turns = [("system", system)] if system else []
    turns.append(("user", question or ""))
    if answer is not None:
        turns.append(("assistant", answer))
    return Sample(id=sid, file=str(file), turns=turns, image=image, document=document,
                  needs_prompt=question is None or system is None)


def _check_image(file: Path, sid: str, rel: str) -> str:
    p = (Path(file).parent / rel).resolve()
    if not p.is_file():
        raise DataError(file, sid, "image", f"image file {rel!r} not found")
    if p.stat().st_size == 0:
        raise DataError(file, sid, "image", f"image file {rel!r} is empty")
    return str(p)


def load_samples(path, prompts=None, require_answer=True, require_question=True) -> list[Sample]:
    """Every sample of a TSV / folder / JSON / JSONL path, validated; prompts fill in missing questions.
    The plain format (--response-template) needs no question: pass require_question=False."""
    samples = [parse_sample(rec, f, sid, require_answer) for f, sid, rec in read_records(path)]
    check_samples(samples, prompts, require_question)
    return samples


def load_rvl_cdip(folder, split: str, classes: list[str], suffix="_aws", prompts=None,
                  require_question=True) -> list[Sample]:
    """The RVL-CDIP OCR layout: `<split>_<n>_<class index><suffix>.json` with the text in "ocr"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, None, "no such folder")
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
        rec = _read_json(f)
        if not isinstance(rec, dict):
            raise DataError(f, f.stem, None, "expected a JSON object")
        ocr = _str_field(rec, "ocr", f, f.stem, required=True)
        s = parse_sample({"ocr": ocr, "answer": classes[idx], "image": rec.get("image")} if "image" in rec
                         else {"ocr": ocr, "answer": classes[idx]}, f, f.stem)
        samples.append(s)
    if not samples:
        raise DataError(folder, None, None, f"no files named {split}_*{suffix}.json")
    check_samples(samples, prompts, require_question)
    return samples


def check_samples(samples, prompts, require_question=True):
    seen = {}
    for s in samples:
        if s.id in seen:
            raise DataError(s.file, s.id, "id", f"duplicate sample id (also in {seen[s.id]})")
        seen[s.id] = s.file
        if s.needs_prompt and require_question:
            user = next(t for r, t in s.turns if r == "user")
            if not user and not (prompts and prompts.get("question")):
                raise DataError(s.file, s.id, "question",
                                "missing: put a 'question' in the sample or pass -p prompts.json")


def infer_classes(samples: list[Sample]) -> list[str] | None:
    """A closed label set when every answer is short and repeats: the answers, in first-seen order."""
    answers = [s.answer for s in samples if s.answer is not None]
    counts = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    if len(counts) < 2 or len(counts) > 100 or min(counts.values()) < 2 or max(len(a) for a in counts) > 60:
        return None
    return list(counts)


def normalize(text: str) -> str:
    """Case, surrounding whitespace and punctuation do not count when matching answers."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", text.strip().lower())


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

    # --- text rendering
    def _user_content(self, sample, text):
        if self.processor is not None and sample.image is not None:
            return [{"type": "image"}, {"type": "text", "text": text}]
        return text

    def _messages(self, sample, turns, document):
        msgs = []
        for role, text in turns:
            if role == "user" and sample.document is not None and document is not None and not msgs_has_user(msgs):
                text = f"{document}\n\n{text}" if text else document
            if role == "user" and not msgs_has_user(msgs):
                msgs.append({"role": role, "content": self._user_content(sample, text)})
            else:
                msgs.append({"role": role, "content": text})
        return msgs

    def _render(self, msgs, add_generation_prompt):
        owner = self.processor if self.processor is not None and getattr(self.processor, "chat_template", None) \
            else self.tokenizer
        return owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, sample, turns, document):
        """[(text, trainable)] whose concatenation is the whole conversation."""
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
        segs, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], add_generation_prompt=True)
            upto = self._render(msgs[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError(sample.file, sample.id, "messages",
                                "the chat template renders a conversation differently from its prefixes; "
                                "cannot tell prompt from answer")
            segs += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        if msgs[-1]["role"] != "assistant":  # a prompt for inference
            segs.append((self._render(msgs, add_generation_prompt=True)[len(done):] + (self.prefill or ""), False))
        return segs

    def _ids(self, text, first):
        special = first and self.response_template is not None  # chat templates write their own BOS
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def encode(self, sample: Sample, train: bool = False, with_answer: bool = True) -> dict | None:
        """input_ids + labels (-100 outside the answers), truncating the document to fit --max-len.

        For image samples the processor must expand the image tokens, so this returns the text pieces instead
        ({"prompt_text", "answer_text", "image"}) and the collator tokenises them. Returns None for a sample
        that cannot fit (counted in self.dropped).
        """
        turns = pick_prompt(sample, self.prompts, sample_rng(self.seed, sample.id) if train else None)
        if not with_answer and turns[-1][0] == "assistant":
            turns = turns[:-1]
        document = sample.document
        for _ in range(4):
            segs = self.segments(sample, turns, document)
            ids, labels = [], []
            for i, (text, trainable) in enumerate(segs):
                t = self._ids(text, i == 0)
                ids += t
                labels += t if trainable else [-100] * len(t)
            excess = len(ids) - self.max_len if self.max_len else 0
            if excess <= 0:
                break
            if not document:
                if sample.document is None and sample.image is None:
                    self.dropped += 1  # a conversation too long for --max-len: nothing to truncate
                    return None
                raise DataError(sample.file, sample.id, "answer", f"prompt and answer alone take {len(ids)} "
                                f"tokens, more than --max-len {self.max_len}")
            doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
            document = self.tokenizer.decode(doc_ids[: max(0, len(doc_ids) - excess - 2)])
        else:
            raise DataError(sample.file, sample.id, "text", "could not truncate the document to --max-len")
        if document != sample.document:
            self.truncated += 1
        out = {"id": sample.id, "input_ids": ids, "labels": labels, "length": len(ids),
               "text": "".join(t for t, _ in segs)}
        if self.processor is not None and sample.image is not None:
            if len(segs) > 2:
                raise DataError(sample.file, sample.id, "image", "image samples must be single-turn")
            out.update(prompt_text=segs[0][0], answer_text=segs[1][0] if len(segs) > 1 else "", image=sample.image)
        return out

    def prompt_text(self, sample, train: bool = False) -> str:
        """The inference prompt as text (chat template + generation prompt + prefill, document truncated), for
        trainers that tokenise text themselves (GRPO, DPO). A BOS the chat template wrote is dropped when the
        tokenizer adds its own, or it would appear twice."""
        probe = Sample(id=sample.id, file=sample.file, turns=[t for t in sample.turns if t[0] != "assistant"],
                       image=getattr(sample, "image", None), document=getattr(sample, "document", None),
                       needs_prompt=sample.needs_prompt)
        text = self.encode(probe, train=train, with_answer=False)["text"]
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The inference prompt (first system/question prompt, generation prompt appended), truncated."""
        return self.encode(sample, train=False, with_answer=False)["input_ids"]

    def answer_text(self, answer: str) -> str:
        """The text of a reply as the model must produce it, end-of-turn included (for --predict score)."""
        probe = Sample(id="probe", file="", turns=[("user", "x"), ("assistant", answer)])
        text = self.segments(probe, probe.turns, None)[-1][0]
        # the newline a chat template writes after the end-of-turn token is not part of the reply
        return text if self.response_template is not None else text.rstrip("\n")

    def answer_ids(self, answer: str) -> list[int]:
        return self._ids(self.answer_text(answer), False)


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


def parse_preference(rec, file: Path, sid: str) -> Preference:
    """{"prompt"|"question", "system"?, "image"?, "chosen", "rejected"} or the message-list form
    {"prompt_messages", "chosen_messages", "rejected_messages"} (the replies: their assistant turns)."""
    if not isinstance(rec, dict):
        raise DataError(file, sid, None, f"expected a JSON object, got {type(rec).__name__}")
    sid = str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else sid
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
    return Preference(sid, str(file), turns, chosen, rejected, _check_image(file, sid, image) if image else None,
                      needs_prompt=question is None or system is None)


def load_preferences(path, prompts=None) -> list[Preference]:
    prefs = [parse_preference(rec, f, sid) for f, sid, rec in read_records(path)]
    check_samples(prefs, prompts)
    return prefs
