"""Watching a run: the plan before the model loads, one readable console line per logging interval, curves.png,
GRPO reward health, and quiet for library noise that does not concern the run.

    monitor.quiet_libraries(trainable)     first thing (every CLI): library messages that do not concern the run
                                           silenced where they come from
    plan = monitor.make_plan(args, s)      parameters (from the config, on the meta device: no weights loaded),
                                           trainable parameters, tokens per epoch, optimiser steps, peak memory
    print(monitor.plan_lines(plan))        the same dict goes into run.json ("plan")
    monitor.attach(trainer, args, out, history, plan, metric)
                                           the console line (in place of transformers' printed dicts), curves.png,
                                           --early-stopping, GRPO reward health
    monitor.summary_lines(history, ...)    early stop, reward signal: appended to training.summarize's report

The peak-memory estimate (bytes; on CPU it includes the process as it stands before the model loads):
    weights      parameters x bytes of their dtype (4-bit QLoRA: ~0.56 byte for the quantised linear layers)
    optimiser    16 bytes per trainable parameter (fp32 weight or master copy, gradient, AdamW's two moments)
    activations  activation_bytes(): what autograd keeps for the backward pass of the worst-case batch (-b x the
                 longest sample, capped by --max-len), from SAVED_BYTES, times BACKWARD_PEAK(_16BIT); with gradient
                 checkpointing each layer's input plus one layer's activations
    logits       the answer tokens' float32 logits (TRL computes them at answer tokens only, in blocks of 1,024
                 rows on CPU: finetune/trl_cpu.py), with their softmax and gradient: one block at a time when the
                 run checkpoints (recomputed in the backward pass), else kept for every answer token
    loading      the height of loading the weights (loading_bytes), which sets the peak where it is above the step's
                 (a bfloat16 base of a float32 checkpoint: the file's tensors and their bfloat16 copy at once)
bench/memory_estimate.py compares it with measured peaks; docs/benchmarks.md gives the error. The plan's peak
decides the CPU default of --gradient-checkpointing (training.checkpointing_default).
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from pathlib import Path

from finetune import launch, precision, runs
from finetune.modeling import load_config, lora_config, model_class, resolve_model
from finetune.progress import clock

# Bytes autograd keeps per token and layer for the backward pass, as (a, b) in a x hidden + b x intermediate size:
# measured with torch.autograd.graph.saved_tensors_hooks on the SmolLM2-135M (576 / 1536) and Qwen2.5-0.5B
# (896 / 4864) shapes, LoRA r16 on every linear layer, SDPA, padded batches. Key: (the weights: "float32", "autocast"
# (16-bit autocast over float32 weights) or "16-bit" (a 16-bit LoRA base under autocast), what trains). LoRA's
# dropout keeps a copy of each adapted layer's input: a third of the total.
SAVED_BYTES = {("float32", "lora+dropout"): (76, 18), ("float32", "lora"): (37, 15), ("float32", "full"): (48, 16),
               ("autocast", "lora+dropout"): (40, 19), ("autocast", "lora"): (22, 15), ("autocast", "full"): (32, 15),
               ("16-bit", "lora+dropout"): (52, 12), ("16-bit", "lora"): (28, 8)}
BACKWARD_PEAK = 1.45  # the step's peak over what is saved (gradients, temporaries): quickstart, fp32, measured RSS
# The same over a 16-bit base, whose gradients and temporaries are half as wide. The measured peak of one command
# varies from run to run by the heap memory glibc leaves free but resident after the step (qwen0.5b, -b 1: 3.86 or
# 4.35-4.40 GiB; SmolLM2, -b 2: 3.75 or 4.53 GiB): 1.28 keeps the plan within 15% of both on the three shapes of
# docs/benchmarks.md (speed and memory by shape), where 1.45 was 19-22% over the lower one
BACKWARD_PEAK_16BIT = 1.28
# With gradient checkpointing: bytes per token, layer and hidden unit that stay (the layer's float32 input and what
# the recomputation and its gradients hold), fitted on two measured SmolLM2 peaks: the quickstart (8 x 135 tokens)
# and bench/train_bench.py (4 x 812 tokens), about 450 KB a token in both
CHECKPOINTED_BYTES = 15
LOGIT_COPIES = 3  # float32 logits, their log-softmax, and its gradient
LOGIT_ROWS = 1024  # finetune/trl_cpu.ROWS_PER_CHUNK: answer tokens whose logits exist at once
WARN_EVERY = 10   # reward health: a problem that lasts is repeated every N logging steps
# What validation reports, on the console and in curves.png (the trainers log more: entropy, token counts, timings;
# those stay in train_log.jsonl)
SHOWN = ("loss", "accuracy", "macro_f1", "chrf", "exact_match", "reward", "format", "rewards/accuracies",
         "rewards/margins")


# ------------------------------------------------------------------------------------------------ library noise
# Library loggers whose messages never concern our runs, set to ERROR before the library is imported (a logger's
# level stays with it): bitsandbytes' CPU backend looks for an optional 4-bit kernel package (`kernels`) whenever
# it is imported (PEFT imports it on every run) and warns when it is missing, which concerns 4-bit (QLoRA) runs only:
# they get one note of ours instead. transformers warns once per process that it ignores
# clean_up_tokenization_spaces=True for a BPE tokenizer (SmolLM2's and Qwen's configs say True): it decodes as it
# should, there is nothing for the user to do. The bars of loading a model give way to our one line
# (modeling.loading).
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "transformers.tokenization_utils_tokenizers")


def quiet_libraries(trainable: str | None = None):
    """The one start-up place that silences library output at its source (train.py, eval.py, generate.py and
    export.py call it first): the loggers of QUIET_LOGGERS at ERROR, and without a terminal the Hub's download
    bars off. `trainable` "qlora" on a CPU: the one note about bitsandbytes' kernels."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # loading / saving bars redrawn as lines in a log file, dozens per run
        # transformers reads this variable when it is imported (after the data is checked, so that bad input is
        # reported without waiting for torch and transformers to load)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already (by a program that runs ours): switch them off now
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if trainable == "qlora":
        import torch

        if not torch.cuda.is_available():
            print("note: 4-bit QLoRA on CPU uses bitsandbytes' portable kernels (the `kernels` package would add a "
                  "faster one)", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the plan
def make_plan(args, s) -> dict:
    """The run's size before any weight is loaded: what it will cost, so a wrong batch or --max-len shows now."""
    params, trainable, quantised, arch = count_parameters(args, s)
    lengths = _lengths(s)
    world = launch.world_size()
    per_step = args.batch_size * args.grad_accum * world
    if args.trainer == "grpo":  # -b counts completions: each prompt is drawn num_generations times
        per_step = max(1, per_step // args.num_generations)
    steps_per_epoch = max(1, math.ceil(len(s.train_ds) / per_step))
    steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
    longest = min(max(lengths), args.max_len) if lengths else args.max_len
    if args.trainer == "grpo":
        longest += args.max_completion_len
    plan = {"parameters": params, "trainable_parameters": trainable, "train_samples": len(s.train_ds),
            "tokens_per_epoch": sum(lengths) if lengths else None, "samples_per_step": per_step,
            "steps": steps, "steps_per_epoch": steps_per_epoch, "longest_sample_tokens": longest}
    if arch:
        plan.update(estimate_memory(args, params, trainable, quantised, arch, longest, _answer_tokens(s)))
    return plan


def _answer_tokens(s, sample=2000) -> int | None:
    """The most loss-bearing (answer) tokens in one of the first `sample` training samples; None if unknown."""
    ds = s.train_ds
    if "labels" not in ds.column_names:
        return None
    labels = ds.select(range(min(sample, len(ds))))["labels"]
    if labels and not isinstance(labels[0], list):  # the classifier head: one class index per sample
        return 1
    return max((sum(1 for t in row if t != -100) for row in labels), default=0)


def _lengths(s) -> list[int]:
    ds = s.train_ds
    if "length" in ds.column_names:
        return list(ds["length"])
    if "input_ids" in ds.column_names:
        return [len(x) for x in ds["input_ids"]]
    if "prompt_ids" in ds.column_names:  # DPO / KTO (rl.dpo_dataset, rl.kto_dataset): each row the trainer
        import pyarrow.compute as pc   # makes is the prompt and one reply, padded to the longest reply

        def n(c):
            return pc.list_value_length(ds.data.column(c)).to_pylist()
        replies = [n(c) for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in ds.column_names]
        return [p + max(r) for p, *r in zip(n("prompt_ids"), *replies)]
    if "prompt" in ds.column_names:  # GRPO: text or chat prompts, tokenised by TRL later
        cols = ["prompt"]
        rows = ds.select_columns(cols)  # GRPO's images stay unopened
        return [sum(len(s.tokenizer(_text(s, r[c]), add_special_tokens=False)["input_ids"]) for c in cols)
                for r in rows]
    return []


def _text(s, column):
    """A text column as is; a chat prompt (GRPO on images) rendered as TRL renders it, a final assistant message
    (the prefill) continued, each image one placeholder token as in SFT's lengths."""
    if isinstance(column, str):
        return column
    more = column[-1]["role"] == "assistant"
    return s.processor.apply_chat_template(column, tokenize=False, add_generation_prompt=not more,
                                           continue_final_message=more)


def count_parameters(args, s):
    """(parameters, trainable, quantised-linear parameters, (layers, hidden, vocab)) of the model as train.py will
    build it, on the meta device (accelerate's init_empty_weights: no memory, no weights read). LoRA counts come
    from PEFT itself on that empty model, with the run's LoraConfig. (0, 0, 0, None) if the class will not build
    empty (custom code): the plan then leaves memory out."""
    import torch
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    cfg = load_config(args.model, args.trust_remote_code)
    try:
        # no_init_weights: initialising empty tensors changes no count and took 0.3-0.45 s of start-up on the
        # qwen0.5b shape (docs/benchmarks.md, start-up)
        with init_empty_weights(), no_init_weights():
            if args.head == "classifier":
                from transformers import AutoModelForSequenceClassification

                cfg.num_labels = len(s.classes or [0, 0])
                model = AutoModelForSequenceClassification.from_config(cfg)
            else:
                model = model_class(s.vision).from_config(cfg)
        # init_empty_weights leaves a tied output head untied (counted twice); tying inside it makes a new copy
        model.tie_weights()
        params = sum(p.numel() for p in model.parameters())
        quantised = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "head" not in n and "score" not in n)
        trainable = params
        if args.trainable != "full":
            from peft import get_peft_model

            with init_empty_weights():
                task = "SEQ_CLS" if args.head == "classifier" else "CAUSAL_LM"
                peft = get_peft_model(model, lora_config(args, task_type=task))
            trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    except Exception as e:  # noqa: BLE001 - an estimate on an empty (meta-device) model, which allocates nothing:
        # whatever a custom architecture raises there must not stop a run that would train
        print(f"note: no plan of parameters and memory ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
              file=sys.stderr)
        return 0, 0, 0, None
    layers, hidden, intermediate = model_shape(cfg)
    arch = (layers, hidden, len(s.tokenizer) if args.head != "classifier" else len(s.classes or [0, 0]), intermediate,
            getattr(cfg, "dtype", None))
    return params, trainable, quantised, arch


def estimate_memory(args, params, trainable, quantised, arch, longest, answer_tokens=None) -> dict:
    """Peak bytes of one training step, by the module docstring's formula, on this device."""
    import torch

    layers, hidden, vocab, intermediate, stored = arch
    width = torch.finfo(precision.training_dtype(args.trainable, args.mixed_precision)).bits // 8
    bits = {"qlora": 4.5, "qlora8": 8.5}.get(args.trainable)  # the block scales add ~0.5 bit per weight
    weights = params * width if bits is None else quantised * bits / 8 + (params - quantised) * width
    if args.trainable == "full":
        optimiser = trainable * (16 - width)  # the weights themselves are counted above
    else:
        optimiser = trainable * 16
    rows = args.batch_size * (2 if args.trainer in ("dpo", "kto") else 1)  # DPO: chosen and rejected; KTO: its KL pair
    activations = activation_bytes(args, (layers, hidden, intermediate), rows * longest, args.gradient_checkpointing)
    answers = rows * (answer_tokens if answer_tokens is not None else longest)
    if args.gradient_checkpointing or args.head == "classifier":  # one block's logits at a time (trl_cpu)
        logits = min(answers, LOGIT_ROWS) * vocab * 4 * LOGIT_COPIES
    else:  # autograd keeps every answer token's logits and log-softmax, plus one block's gradient
        logits = (2 * answers + min(answers, LOGIT_ROWS)) * vocab * 4
    cuda = torch.cuda.is_available()
    base = 0 if cuda else _rss_bytes()  # CUDA counts tensors only; CPU measures the whole process
    loading = 0 if cuda or bits is not None else loading_bytes(args.model, params, width, stored)
    total = base + max(weights + optimiser + activations + logits, loading)
    return {"memory_device": "cuda" if cuda else "cpu",
            "memory_gib": {k: round(v / 2**30, 3) for k, v in
                           (("process_before_model", base), ("weights", weights), ("optimiser", optimiser),
                            ("activations", activations), ("logits", logits), ("loading", loading),
                            ("peak", total))}}


def loading_bytes(model: str, params: int, width: int, stored) -> int:
    """What loading the weights adds to the process at its height, on a CPU (measured RSS): a GGUF file, the
    float32 tensors transformers dequantises it into and the model in its dtype; a checkpoint stored in another
    dtype than the training one (config.json's dtype, float32 when it names none), its tensors read from the file
    and their copy in the training dtype; else the weights once."""
    import torch

    folder, gguf = resolve_model(model)
    if gguf:
        return Path(folder, gguf).stat().st_size + params * (4 + width)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    stored_width = torch.finfo(stored if isinstance(stored, torch.dtype) else torch.float32).bits // 8
    return params * (width if stored_width == width else stored_width + width)


def model_shape(config) -> tuple[int, int, int]:
    """(layers, hidden size, MLP intermediate size) of a transformers config (a vision model's text part)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", 0) or 0
    return (getattr(text, "num_hidden_layers", 0) or 0, hidden,
            getattr(text, "intermediate_size", None) or 4 * hidden)


def activation_bytes(args, shape, tokens: int, checkpointing: bool) -> float:
    """Bytes the backward pass of a batch of `tokens` tokens needs at its peak (SAVED_BYTES x BACKWARD_PEAK, or
    BACKWARD_PEAK_16BIT over a 16-bit base). With gradient checkpointing autograd keeps each layer's input
    (CHECKPOINTED_BYTES) and recomputes one layer at a time."""
    import torch

    layers, hidden, intermediate = shape
    weights = "float32" if precision.resolve(args.mixed_precision) not in ("bf16", "fp16") else \
        "autocast" if precision.training_dtype(args.trainable, args.mixed_precision) == torch.float32 else "16-bit"
    kind = "full" if args.trainable == "full" else ("lora+dropout" if args.lora_dropout > 0 else "lora")
    a, b = SAVED_BYTES[(weights, kind)]
    one_layer = tokens * (a * hidden + b * intermediate)
    saved = tokens * hidden * CHECKPOINTED_BYTES * layers + one_layer if checkpointing else one_layer * layers
    return saved * (BACKWARD_PEAK_16BIT if weights == "16-bit" else BACKWARD_PEAK)


def available_bytes() -> int | None:
    """Memory this process can grow into: what it holds plus the machine's available memory (Linux
    /proc/meminfo MemAvailable); None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + _rss_bytes()
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    """The resident memory now (Linux /proc), else the peak so far (resource: macOS and the BSDs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def plan_lines(plan: dict, args) -> str:
    lines = []
    if plan.get("parameters"):
        lines.append(f"plan: {plan['parameters'] / 1e6:.1f}M parameters, {plan['trainable_parameters'] / 1e6:.2f}M "
                     f"trainable ({args.trainable})")
    tokens = f"{plan['tokens_per_epoch']:,} tokens per epoch, " if plan.get("tokens_per_epoch") else ""
    lines.append(f"plan: {plan['train_samples']} samples, {tokens}{plan['samples_per_step']} samples per step, "
                 f"{plan['steps']} optimiser steps; longest batch row {plan['longest_sample_tokens']} tokens")
    mem = plan.get("memory_gib")
    if mem:
        where = "GPU memory allocated" if plan["memory_device"] == "cuda" else "process RSS"
        step = mem["weights"] + mem["optimiser"] + mem["activations"] + mem["logits"]
        loads = f", while loading {mem['loading']:.2f}" if mem.get("loading", 0) > step else ""
        lines.append(f"plan: peak memory about {mem['peak']:.2f} GiB ({where}: weights {mem['weights']:.2f}, "
                     f"optimiser {mem['optimiser']:.2f}, activations {mem['activations']:.2f}, logits "
                     f"{mem['logits']:.2f}{loads}" + (f", process {mem['process_before_model']:.2f}" if
                                                       plan["memory_device"] == "cpu" else "") + ")")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the console
def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def console_line(logs: dict, step: int, total: int, tokens_per_s: float | None, elapsed: float,
                 eta: float | None) -> str | None:
    """One line for a logged dict: training (loss / reward) or validation (eval_*); None for the others (the
    final train_runtime dict: the summary says it better)."""
    if any(k.startswith("eval_") for k in logs):
        shown = {k.removeprefix("eval_"): v for k, v in logs.items() if k.removeprefix("eval_") in SHOWN
                 or k.startswith("eval_rewards/")}  # GRPO validation: each reward's mean too
        return f"step {step}/{total}  validation: " + "  ".join(f"{k} {_number(v)}" for k, v in shown.items())
    if "loss" not in logs and "reward" not in logs:
        return None
    parts = [f"step {step}/{total}"]
    for key, label in (("loss", "loss"), ("reward", "reward"), ("kl", "kl"), ("learning_rate", "lr")):
        if key in logs:
            parts.append(f"{label} {logs[key]:.3g}" if key == "learning_rate" else f"{label} {_number(logs[key])}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:.0f} tok/s")
    parts.append(f"elapsed {clock(elapsed)}")
    if eta is not None:
        parts.append(f"ETA {clock(eta)}")
    return "  ".join(parts)


def attach(trainer, args, out: Path, history: list, plan: dict, metric: str):
    """Our console line in place of the dict transformers prints each step (PrinterCallback without a terminal,
    ProgressCallback's tqdm.write with one: the bar itself stays), curves.png, --early-stopping, reward health."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_bar_class()())
    trainer.add_callback(_console_class()(trainer, plan))
    trainer.add_callback(_curves_class()(out / runs.CURVES, history, args.trainer == "grpo"))
    if args.trainer == "grpo":
        trainer.add_callback(_health_class()(args))
    if args.early_stopping:
        from transformers import EarlyStoppingCallback

        # transformers' own callback: it reads metric_for_best_model / greater_is_better from the arguments (set
        # here, and by nothing else: best/ is saved by training.make_callbacks, load_best_model_at_end stays off)
        trainer.args.metric_for_best_model = metric
        trainer.args.greater_is_better = not metric.endswith("loss")
        trainer.add_callback(_early_class(EarlyStoppingCallback)(args.early_stopping, args.early_stopping_delta))
    print(f"curves: {out / runs.CURVES} (rewritten at each validation and checkpoint)")


def _bar_class():
    from transformers import ProgressCallback

    class Bar(ProgressCallback):
        """The live tqdm bar, without the dict it writes under itself on every log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return Bar


def _console_class():
    from transformers import TrainerCallback

    class Console(TrainerCallback):
        """step/total, loss, lr, real tokens/s since the last line, elapsed, ETA (from the steps so far)."""

        def __init__(self, trainer, plan):
            self.trainer, self.plan, self.planned = trainer, plan, plan["steps"]
            self.start = self.mark = None

        def on_train_begin(self, args, state, control, **kw):
            self.start, self.first = time.time(), state.global_step
            self.mark = (self.trainer.real_tokens, self.trainer.train_seconds)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now, step = time.time(), state.global_step
            elapsed = now - self.start if self.start else 0.0
            done = step - getattr(self, "first", 0)
            eta = elapsed / done * (state.max_steps - step) if self.start and done >= 2 else None
            tps = None
            if self.mark is not None and ("loss" in logs or "reward" in logs):
                tokens, secs = self.trainer.real_tokens, self.trainer.train_seconds
                if secs > self.mark[1] and tokens > self.mark[0]:
                    tps = (tokens - self.mark[0]) / (secs - self.mark[1])
                self.mark = (tokens, secs)
            if eta is not None and "eta" not in self.plan:  # the run's plan: run.json now, its copies in saves later
                self.plan["eta"] = save_eta(Path(args.output_dir), step, eta)
            line = console_line(logs, step, state.max_steps or self.planned, tps, elapsed, eta)
            if line:
                from tqdm.auto import tqdm

                tqdm.write(line, file=sys.stdout)  # above a live bar, or a plain line in a log file

    return Console


def save_eta(out: Path, step: int, seconds_left: float) -> dict:
    """The ETA measured over the first steps, added to run.json's plan (once)."""
    eta = {"at_step": step, "seconds_left": round(seconds_left),
           "expected_end": (datetime.datetime.now().astimezone() +
                            datetime.timedelta(seconds=seconds_left)).isoformat(timespec="seconds")}
    runs.update_plan(out, "eta", eta)
    return eta


# ------------------------------------------------------------------------------------------------ curves.png
def smooth(values: list[float]) -> list[float]:
    """A centred moving average over a tenth of the run (at least 3 points): unlike an exponential average it does
    not lag behind the raw curve, so the two agree on where the loss turned."""
    half = max(1, len(values) // 20)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def write_curves(path: Path, history: list, grpo: bool = False):
    """One picture: training loss (raw and smoothed), learning rate, each validation metric against the step; for
    GRPO each reward's mean and the KL. Written to a temporary file then renamed: a viewer never sees half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    val_keys = [f"eval_{k}" for k in SHOWN if any(f"eval_{k}" in h for h in history)]
    panels = [("training loss", ["loss"]), ("learning rate", ["learning_rate"])]
    if grpo:
        panels += [("reward (mean per function)", sorted({k for h in history for k in h
                                                          if k.startswith("rewards/") and k.endswith("/mean")})),
                   ("KL to the reference", ["kl"])]
    panels += [(f"validation {k.removeprefix('eval_')}", [k]) for k in val_keys]  # one each: scales differ
    panels += [("validation reward (mean per function)", sorted({k for h in history for k in h
                                                                 if k.startswith("eval_rewards/")}))]
    panels = [(t, keys) for t, keys in panels if any(series(k)[0] for k in keys)]
    if not panels:
        return
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(10, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            x, y = series(key)
            if key == "loss" and len(y) > 5:
                ax.plot(x, y, alpha=0.3, label="raw")
                ax.plot(x, smooth(y), label="smoothed")
            else:
                ax.plot(x, y, marker="o" if len(y) < 20 else None, label=key.removeprefix("eval_").removeprefix(
                    "rewards/").removesuffix("/mean"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 or keys == ["loss"]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    runs.write_file(path, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)


def _curves_class():
    from transformers import TrainerCallback

    class Curves(TrainerCallback):
        def __init__(self, path, history, grpo):
            self.path, self.history, self.grpo = path, history, grpo

        def draw(self, state):
            if state.is_world_process_zero:
                write_curves(self.path, self.history, self.grpo)

        def on_evaluate(self, args, state, control, **kw):
            self.draw(state)

        def on_save(self, args, state, control, **kw):
            self.draw(state)

        def on_train_end(self, args, state, control, **kw):
            self.draw(state)

    return Curves


# ------------------------------------------------------------------------------------------------ early stopping
def _early_class(base):
    class EarlyStop(base):
        """transformers' EarlyStoppingCallback, minus its warning about load_best_model_at_end: best/ is ours. It
        records the step it stopped at only when its own patience ran out: a stop asked by another callback (Ctrl-C:
        guards.StopGuard) at an evaluation's step is not an early stop."""
        stopped_at = None

        def on_train_begin(self, args, state, control, **kw):
            pass

        def on_evaluate(self, args, state, control, metrics, **kw):
            if state.global_step == 0:
                return  # the baseline before the first step is a reference, not an evaluation to improve on
            super().on_evaluate(args, state, control, metrics, **kw)
            if self.early_stopping_patience_counter >= self.early_stopping_patience and self.stopped_at is None:
                self.stopped_at = state.global_step

    return EarlyStop


# ------------------------------------------------------------------------------------------------ reward health
def reward_problems(logs: dict, max_completion_len: int) -> list[tuple[str, str]]:
    """(kind, message) for each sign in one GRPO log dict that the step taught the policy nothing or little."""
    found = []
    if logs.get("frac_reward_zero_std") == 1.0:
        found.append(("zero_std", "every group of completions got the same reward: no learning signal this step "
                      "(easier prompts, more --num-generations, or a reward with partial credit)"))
    for key, value in logs.items():
        if key.startswith("rewards/") and key.endswith("/std") and value == 0.0:
            name = key.removeprefix("rewards/").removesuffix("/std")
            mean = logs.get(f"rewards/{name}/mean")
            found.append((f"constant:{name}", f"reward {name} returned one value ({_number(mean)}) for every "
                          "completion: it cannot tell them apart"))
    clipped = logs.get("completions/clipped_ratio")
    if clipped is not None and clipped > 0.5:
        found.append(("clipped", f"{clipped:.0%} of completions hit --max-completion-len {max_completion_len}: "
                      "raise it or reward shorter replies"))
    return found


def _health_class():
    from transformers import TrainerCallback

    class RewardHealth(TrainerCallback):
        """Warns once when a problem appears, then every WARN_EVERY logged steps while it lasts."""

        def __init__(self, args):
            self.max_len, self.seen = args.max_completion_len, {}

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            now = dict(reward_problems(logs, self.max_len))
            for kind in list(self.seen):
                if kind not in now:
                    del self.seen[kind]  # over: a return is warned at once again
            for kind, message in now.items():
                count = self.seen.get(kind, 0)
                if count % WARN_EVERY == 0:
                    again = f" (for {count} steps now)" if count else ""
                    print(f"warning: step {state.global_step}: {message}{again}", file=sys.stderr)
                self.seen[kind] = count + 1

    return RewardHealth


# ------------------------------------------------------------------------------------------------ summary
def summary_lines(history: list, trainer, args, metric: str) -> list[str]:
    lines = []
    fracs = [h["frac_reward_zero_std"] for h in history if "frac_reward_zero_std" in h]
    if fracs:
        lines.append(f"GRPO signal: {1 - sum(fracs) / len(fracs):.0%} of groups had reward variance (learning "
                     f"signal) over {len(fracs)} steps")
    from transformers import EarlyStoppingCallback

    # the callback is there with --early-stopping only (attach): found by its class, not by an attribute another
    # callback could share
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    if args.early_stopping and early is not None and early.stopped_at is not None:
        lines.append(f"early stopping: no improvement of {metric.removeprefix('eval_')} by more than {args.early_stopping_delta:g} "
                     f"in {args.early_stopping} evaluations; stopped at step {early.stopped_at} of "
                     f"{trainer.state.max_steps} (best/ keeps the best)")
    return lines
