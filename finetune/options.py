"""Command-line checks shared by train.py, eval.py, generate.py and export.py, all made before anything loads.

    fail(message)                    one line on stderr, exit status 2, no traceback
    range_error(args, table)         the first numeric option outside its range, as that line
    train_option_error(args, given)  the first pair of training options that cannot work together, or an option
                                     the chosen mode would silently ignore
    data_option_error(args)          its clashes among the data options and --trainer, also `dataset.py check`'s
    given_options(defaults, args)    the options whose value differs from their default (from flags or --config)
    add_data_options(parser)         the data options, one definition for train.py and `dataset.py check`
    layout_defaults(args)            the defaults that follow the data layout (-d: the classifier head)

A user who passes an option expects it to do something: an option that the chosen mode ignores is reported,
never silently dropped, and a clash is reported before the model loads, so no run folder is left behind.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys

# Options whose values are secrets: never written to run.json or logs. Named one by one (a filter on "token" or
# "key" in the name would also drop --set-pad-token or a future --max-tokens).
SECRET_OPTIONS = frozenset({"hub_token", "hf_token", "wandb_api_key", "api_key", "password"})


def fail(message: str):
    """Bad input: one line, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_data_options(p):
    """The data options of train.py, also read by `dataset.py check` (finetune/datacheck.py): one definition."""
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="a Hub id (org/name[:config][@split]), a .parquet/.csv/.tsv/.arrow table, a "
                   "save_to_disk folder, a .json/.jsonl file, a TSV of sample JSON files or a folder of them; "
                   "several, comma-separated, to mix (docs/data.md)")
    g.add_argument("--validation-data", help="same layouts; validation runs each epoch or every --eval-steps")
    g.add_argument("--columns", help="map a table's columns to our fields: text=article,answer=category,image=img")
    g.add_argument("--lm-text", action="store_true", help="records that hold only \"text\", and .txt files (one "
                   "sample per paragraph), are language-modelling text: the loss on every token (continued "
                   "pre-training); without it such a record is a document waiting for its answer")
    g.add_argument("--validation-split", metavar="F|N", help="hold out a fraction F or N samples of the training "
                   "data for validation (seeded, stratified for closed-set tasks; the ids go to run.json)")
    g.add_argument("--train-samples", type=int, metavar="N", help="train on a seeded subset of N samples")
    g.add_argument("--mix", metavar="R,R,...", help="sampling ratios of the comma-separated --train-data sources "
                   "(seeded); the mix is as large as they allow, or --train-samples")
    g.add_argument("-d", "--data", help="RVL-CDIP OCR folder: train_*/validation_*/test_* files")
    g.add_argument("--suffix", help="RVL-CDIP file suffix before .json (default _aws)")
    g.add_argument("--classes", help="class names: a JSON list or one per line (default for -d: RVL-CDIP's 16)")
    g.add_argument("-p", "--prompts", help='prompts.json: {"system": [...], "question": [...]}, drawn per sample')
    g.add_argument("--allow-outside-paths", action="store_true",
                   help="let image / sample file paths in the data point outside its folder (off: a safety check)")
    g.add_argument("--max-len", type=int, default=1024,
                   help="max tokens per sample; the document is truncated, never the answer (default 1024)")
    g.add_argument("--num-preprocess-workers", type=int, metavar="N",
                   help="processes that tokenise a large data set (default min(4, CPU cores)); the result is cached "
                   "in $FINETUNE_CACHE or ~/.cache/finetune, so a re-run with the same data starts at once")
    g.add_argument("--response-template", help="plain completion format for base models, e.g. '### Classification:' "
                   "(default: the model's chat template)")
    g.add_argument("--head", choices=["generative", "classifier"],
                   help="generative: the answer as text (default with --train-data); classifier: a classification "
                   "head on the LLM (default with -d, as in the RVL-CDIP code; -d --generative uses the plain format "
                   "with '### Classification:')")
    g.add_argument("--generative", dest="head", action="store_const", const="generative", help="= --head generative")
    g.add_argument("--classifier", dest="head", action="store_const", const="classifier", help="= --head classifier")
    return g


def layout_defaults(args):
    """Defaults that follow the data layout. -d is the RVL-CDIP code's interface and keeps its semantics: the
    classifier head unless --generative; --generative alone is the plain completion format with '### Classification:'
    (and QLoRA on a GPU: train.py's default_trainable). --train-data: a generative head in the chat format."""
    rvl = args.data is not None and args.trainer == "sft"
    if args.head is None:
        args.head = "classifier" if rvl else "generative"
    if rvl and args.head == "generative" and args.response_template is None:
        args.response_template = "### Classification:"


# (dest, lowest, highest, lowest allowed itself?): None = unbounded on that side. Sizes and counts are >= 1.
AT_LEAST_ONE = ("batch_size", "train_samples", "grad_accum", "max_len", "lora_rank", "lora_alpha", "num_generations",
                "max_completion_len", "total_batch_size", "max_batch_size_per_device", "eval_steps", "save_steps",
                "val_samples", "num_preprocess_workers", "max_new_tokens", "limit", "num_beams",
                "early_stopping")
RANGES = {
    "lr": (0.0, None, False),
    "epochs": (0.0, None, False),
    "warmup": (0.0, None, True),
    "weight_decay": (0.0, None, True),
    "lora_dropout": (0.0, 1.0, True),
    "temperature": (0.0, None, True),
    "beta": (0.0, None, True),
    "repetition_penalty": (0.0, None, False),
    "no_repeat_ngram_size": (0, None, True),  # 0: off
    "seed": (0, None, True),
    "early_stopping_delta": (0.0, None, True),
}


def range_error(args) -> str | None:
    """The first numeric option outside its range (a negative learning rate would only fail in the optimiser,
    after the model has loaded): checked by every CLI right after parsing."""
    for name in AT_LEAST_ONE:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            return f"{flag(name)} must be at least 1, got {v}"
    for name, (lo, hi, lo_ok) in RANGES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return f"{flag(name)} must be a finite number, got {v}"
        if lo is not None and (v < lo or (v == lo and not lo_ok)):
            return f"{flag(name)} must be {'at least' if lo_ok else 'greater than'} {lo}, got {v}"
        if hi is not None and v >= hi:
            return f"{flag(name)} must be below {hi}, got {v}"
    if getattr(args, "max_steps", -1) not in (None, -1) and args.max_steps < 1:
        return f"--max-steps must be at least 1 (or -1: use --epochs), got {args.max_steps}"
    return None


def given_options(defaults: dict, args) -> set[str]:
    """Options set to something other than their parser default ({dest: default}, read before --config moved
    them), by a flag or by --config: the ones a user asked for."""
    return {d for d, v in defaults.items() if d != "help" and getattr(args, d, None) != v}


# Options that only one mode reads: (dest, does the mode use it?, the mode, in words)
def _mode_options(args):
    grpo, dpo, kto = args.trainer == "grpo", args.trainer == "dpo", args.trainer == "kto"
    prefs = dpo or kto
    return [
        ("num_generations", grpo, "--trainer grpo"),
        ("max_completion_len", grpo, "--trainer grpo"),
        ("temperature", grpo, "--trainer grpo"),
        ("rewards", grpo, "--trainer grpo"),
        ("reward_weights", grpo, "--trainer grpo"),
        ("prefill", grpo, "--trainer grpo"),
        ("vllm", grpo, "--trainer grpo"),
        ("beta", grpo or prefs, "--trainer grpo, dpo or kto"),
        ("dpo_loss", dpo, "--trainer dpo"),
        ("init_adapter", grpo or prefs, "--trainer grpo, dpo or kto"),
        ("suffix", args.data is not None, "-d (the RVL-CDIP OCR layout)"),
        ("mix", not prefs, "SFT, the classifier head and GRPO (not preference pairs yet)"),
        ("validation_split", args.trainer not in ("dpo", "kto"), "SFT, the classifier head and GRPO"),
        ("train_samples", not prefs, "SFT, the classifier head and GRPO (not preference pairs yet)"),
        ("max_batch_size_per_device", args.total_batch_size is not None or args.auto_batch_size,
         "--total-batch-size or --auto-batch-size"),
        ("lora_alpha", args.trainable != "full", "LoRA / QLoRA (not --trainable full)"),
        ("lora_dropout", args.trainable != "full", "LoRA / QLoRA (not --trainable full)"),
        ("target_modules", args.trainable != "full", "LoRA / QLoRA (not --trainable full)"),
        ("head_lr", args.head == "classifier", "--classifier"),
        ("predict", args.head != "classifier" and args.trainer == "sft",
         "generative SFT (how closed-set validation is measured)"),
        ("num_preprocess_workers", args.head != "classifier" and args.trainer == "sft",
         "SFT with a generative head (the tokenisation cache)"),
        ("max_new_tokens", args.head != "classifier" and args.trainer == "sft",
         "generative SFT (the generation budget of its validation)"),
        ("early_stopping_delta", getattr(args, "early_stopping", None) is not None, "--early-stopping"),
    ]


TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}  # --report-to name: its module


def trackers(text: str) -> list[str]:
    """--report-to: 'none' or comma-separated tracker names, each installed (argparse turns the error into one
    line and exit 2)."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        if n not in TRACKERS:
            raise argparse.ArgumentTypeError(f"{n!r} is not one of none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[n]) is None:
            raise argparse.ArgumentTypeError(f"{n} is not installed: uv sync --extra tracking")
    return names


def data_option_error(args) -> str | None:
    """A clash between the data options and --trainer (train.py and `dataset.py check` both refuse it)."""
    if args.data and args.train_data:
        return "give --train-data or -d/--data, not both"
    if args.head == "classifier" and args.trainer != "sft":
        return f"--classifier trains a classification head with SFT; it cannot be combined with --trainer {args.trainer}"
    if args.trainer in ("dpo", "kto") and args.data:
        return f"--trainer {args.trainer} reads preferences from --train-data, not -d"
    return None


def train_option_error(args, given: set[str]) -> str | None:
    """A clash between training options, or an option the chosen mode ignores; None when all is well."""
    bad = data_option_error(args)
    if bad:
        return bad
    if args.init_adapter and args.trainable == "full":
        return "--init-adapter starts a LoRA run from an SFT adapter; it cannot be combined with --trainable full"
    if args.vllm and args.add_special_tokens:
        return ("--vllm: vLLM builds the base model's vocabulary and cannot take the grown embeddings of "
                "--add-special-tokens; generate with transformers (drop --vllm)")
    if args.auto_batch_size and args.trainer != "sft":
        return "--auto-batch-size supports --trainer sft (GRPO/DPO memory depends on generation and pairs)"
    if args.total_batch_size is not None and "grad_accum" in given:
        return "--grad-accum is derived from --total-batch-size (and the process count); give one of them"
    if "max_steps" in given and "epochs" in given:
        return "--max-steps ends the run whatever --epochs says; give one of them"
    for dest, used, mode in _mode_options(args):
        if dest in given and not used:
            return f"{flag(dest)} only applies to {mode}; drop it (it would be ignored)"
    return None
