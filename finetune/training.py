"""What train.py adds to TRL's and transformers' trainers: real-token throughput, our samplers, closed-set and
free-text validation, the classifier head's own learning rate, best/ and latest/ saves, --auto-batch-size, the summary.

    trainer = make_trainer_class(SFTTrainer)(...)    # any of TRL's trainers, or transformers' Trainer
    trainer.validation = closed_set_validation(...)  # accuracy / macro-F1 merged into each evaluation's metrics
    trainer.validation = free_text_validation(...)   # free text: chrF / exact match of generations
    trainer.validation_plan = ValidationPlan(...)    # how it generates, on how many samples, its planned seconds
                                                     (both show a progress line: finetune/progress.py)
    for cb in make_callbacks(args, out, saver, metric, history): trainer.add_callback(cb)
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import batching, classifier, launch, precision, runs, trl_cpu
from finetune.decoding import Decoding
from finetune.progress import Progress
from finetune.predict import TUNED_PROMPT_SET, TUNED_SCORE_RULE, classification_metrics, predict, text_metrics


def make_trainer_class(base, recompute_head: bool = True):
    """`base` (TRL's SFT/GRPO/DPO trainer, or transformers' Trainer for the classifier head) plus closed-set
    validation accuracy and real-token throughput. Without a GPU, TRL's Triton loss kernel is swapped for a
    torch one first (finetune/trl_cpu.py; recompute_head: the run checkpoints, so the LM head's logits are
    recomputed in the backward pass too rather than kept)."""
    trl_cpu.install(recompute_head)

    class FinetuneTrainer(base):
        validation = None  # callable(label, plan) -> dict of extra eval metrics (closed_set_validation)
        validation_plan = None  # the ValidationPlan validation is called with
        validation_seconds = 0.0  # spent in evaluate(), the loss pass included
        planned_steps = None  # the plan's steps: the progress line's total before train() sets max_steps
        real_tokens = 0    # non-pad tokens trained on, and the seconds spent in training steps (not validation)
        train_seconds = 0.0
        last_batch_shape = None  # (samples, tokens) of the batch in flight: named in an out-of-memory error
        head_lr = None  # --classifier: the new head's own learning rate (classifier.split_head_lr)

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if self.head_lr is not None and not getattr(self, "_head_split", False):
                classifier.split_head_lr(optimizer, self.model, self.head_lr)
                self._head_split = True
            return optimizer

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
            start = time.perf_counter()
            return_freed_memory()
            try:
                label = f"step {self.state.global_step}/{self.state.max_steps or self.planned_steps}  validation"
                self._extra = self.validation(label, self.validation_plan) if self.validation else {}
                return super().evaluate(*args, **kwargs)
            finally:
                self.validation_seconds += time.perf_counter() - start

        def log(self, logs, *args, **kwargs):
            if "eval_loss" in logs and getattr(self, "_extra", None):
                logs.update(self._extra)  # the same dict reaches on_evaluate callbacks
                self._extra = None
            return super().log(logs, *args, **kwargs)

    return FinetuneTrainer


@dataclass(frozen=True)
class ValidationPlan:
    """What a validation does beyond the loss: how it generates (decoding.resolve: the budget rule and the defaults
    eval.py and generate.py use for the run), on how many of the first validation samples free text generates
    (None: every one; 0: none, the loss alone), and the plan's estimate of its scoring or generation in seconds (the
    progress line's ETA until the first batch is done). finetune/timeplan.py sets the last two from the run's
    time."""
    decoding: Decoding
    samples: int | None = None
    seconds: float | None = None


def return_freed_memory():
    """Hands the heap memory that training steps freed back to the system (glibc's malloc_trim), before a
    validation: glibc keeps it resident, and a validation would run at the training steps' height (the quickstart's
    last validation: 4.31 GiB RSS without it, 2.0-2.7 GiB with it; docs/benchmarks.md). Nothing happens where the C
    library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def closed_set_validation(model, fmt, val, classes, args):
    """Validation accuracy and macro-F1 of a generative run on a closed-set task, by --predict (score/generate)."""
    def validation(label: str, plan: ValidationPlan):
        with evaluating(model), Progress(label, len(val), estimate=plan.seconds,
                                         show=launch.is_main_process()) as bar:
            res = predict(model, fmt, val, classes, args.predict, args.batch_size, plan.decoding,
                          progress=bar.update, rule=TUNED_SCORE_RULE,
                          prompt_set=TUNED_PROMPT_SET)  # as eval.py will score the run
        m = classification_metrics([r["reference"] for r in res], [r["prediction"] for r in res], classes)
        return {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro"]["f1"]}

    return validation


def free_text_validation(model, fmt, val, args):
    """chrF and exact match of generations on free-text validation samples: the task's own measure, which the loss
    only hints at. Generation is the slow part: it runs on the plan's first samples (finetune/timeplan.py: a bound
    that keeps validation within a share of the run, or --val-samples); none: {} (the loss alone)."""
    def validation(label: str, plan: ValidationPlan):
        samples = val if plan.samples is None else val[: plan.samples]
        if not samples:
            return {}
        with evaluating(model), Progress(label, len(samples), estimate=plan.seconds,
                                         show=launch.is_main_process()) as bar:
            res = predict(model, fmt, samples, None, "generate", args.batch_size, plan.decoding, progress=bar.update)
        m = text_metrics([r["reference"] for r in res], [r["prediction"] for r in res])
        return {"eval_chrf": m["chrf"], "eval_exact_match": m["exact_match"]}

    return validation


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for a validation, back in training mode after it if it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def training_arguments(args, out: Path, validates: bool) -> dict:
    """The TrainingArguments every mode shares (TRL's configs extend them)."""
    import torch

    return dict(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        lr_scheduler_type=args.scheduler, seed=args.seed, data_seed=args.seed,
        **precision.trainer_flags(args.mixed_precision),
        eval_strategy=("steps" if args.eval_steps else "epoch") if validates else "no",
        eval_steps=args.eval_steps, save_strategy="steps" if (args.save_steps or args.eval_steps) else "epoch",
        save_steps=args.save_steps or args.eval_steps or 500, save_total_limit=2,
        logging_steps=1, logging_first_step=True, logging_nan_inf_filter=False,  # a NaN loss must show: finetune/guards.py
        report_to=args.report_to,  # a list (options.trackers); [] for none
        run_name=args.name, remove_unused_columns=False, gradient_checkpointing=args.gradient_checkpointing,
        # batches of near-equal length (finetune/batching.py: FinetuneTrainer's samplers read the "length" column)
        length_column_name="length",
        disable_tqdm=not sys.stderr.isatty(), use_cpu=not torch.cuda.is_available(),
    )


# The share of the memory free at start-up that a CPU run may plan to fill before the default trades speed for
# memory: the rest is headroom for the estimate's error (docs/benchmarks.md, memory plan) and for the other
# programs of the machine.
MEMORY_SHARE = 0.8


def checkpointing_default(args, peak_without: float | None, available: float | None) -> bool:
    """--gradient-checkpointing when not given. On a CPU: on only when the run would not fit otherwise, that is when
    the plan's peak without it (monitor.make_plan: the precision the run gets without it, the LM head's logits
    kept) exceeds MEMORY_SHARE of the memory free for this process (monitor.available_bytes); memory is only worth
    buying with speed then. With it come bf16 autocast where the CPU has it (precision.cpu_choice) and the LM
    head's recomputation (trl_cpu). Off on a GPU (an out-of-memory error names the flag) and where either figure
    is unknown."""
    if args.gradient_checkpointing is not None:
        return args.gradient_checkpointing
    if launch.device_kind() == "cuda" or not peak_without or not available:
        return False
    on = peak_without > MEMORY_SHARE * available
    print(f"gradient checkpointing: {'on' if on else 'off'} (planned peak without it {peak_without / 2**30:.1f} GiB, "
          f"{'over' if on else 'within'} {MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB free; "
          "--gradient-checkpointing / --no-... to choose)")
    return on


def make_saver(trainer, owner, cfg: dict):
    """save(dest, info): the weights and tokenizer/processor (`owner`) into dest atomically, with run.json and the
    checkpoint info. Called on every rank: under FSDP / DeepSpeed ZeRO-3 each rank holds a shard of the weights and
    gathering the full state dict is a collective (all ranks at once); rank 0 then writes."""
    def save(dest: Path, info: dict):
        state = None
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            state = trainer.accelerator.get_state_dict(trainer.model_wrapped if trainer.is_deepspeed_enabled
                                                       else trainer.model)
        if not launch.is_main_process():
            return

        def write(tmp):
            trainer.model.save_pretrained(tmp, state_dict=state)
            owner.save_pretrained(tmp)
            runs.write_config(tmp, {**cfg, "checkpoint": info})
        runs.save_atomic(dest, write)

    return save


def make_callbacks(out: Path, save, metric: str, history: list):
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """best/ on every validation that improves `metric`; latest/ at every checkpoint; a JSONL log."""
        best = None

        def on_log(self, a, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                rec = {"step": state.global_step, **logs}
                history.append(rec)
                runs.append_log(out, rec)

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            value = (metrics or {}).get(metric)
            if value is None:
                return
            better = self.best is None or (value < self.best if metric.endswith("loss") else value > self.best)
            if better:  # every rank: the metrics are the same on all of them, and save() is collective under FSDP
                self.best = value
                save(out / "best", {"step": state.global_step, metric: value})

        def on_save(self, a, state, control, **kw):
            save(out / "latest", {"step": state.global_step})  # every rank; save() writes on rank 0 only

    return [RunCallback()]


def batch_line(args) -> str:
    return (f"batch: {launch.world_size()} process(es) x {args.batch_size} per device x {args.grad_accum} "
            f"accumulation = {args.total_batch_size} samples per optimiser step")


def auto_batch_size(args, trainer, fail):
    """--auto-batch-size: the largest per-device batch (<= --max-batch-size-per-device) whose worst-case step fits
    in GPU memory, with accumulation raised to keep --total-batch-size; every rank takes the smallest found.
    Returns the options with that batch derived (config.Options.derive), set on the trainer too."""
    import torch

    if not torch.cuda.is_available():
        print("warning: --auto-batch-size probes GPU memory; without a CUDA device -b is kept", file=sys.stderr)
        return args
    groups = launch.batch_candidates(args.total_batch_size, args.max_batch_size_per_device, launch.world_size())
    fits = launch.memory_probe(trainer.model, trainer.data_collator, trainer.train_dataset, trainer.args.device)
    try:
        p = launch.across_ranks(launch.largest_fitting(groups, fits), "min")
    except ValueError as e:
        fail(str(e))
    args = args.derive(batch_size=p, grad_accum=args.total_batch_size // (launch.world_size() * p))
    trainer.args.per_device_train_batch_size = trainer._train_batch_size = p
    trainer.args.gradient_accumulation_steps = args.grad_accum
    print(batch_line(args) + " (--auto-batch-size)")
    return args


def summarize(history, trainer, seconds, metric, out, plan=None, extra=()):
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_rss_gib()
    planned = (plan or {}).get("time")  # finetune/timeplan.py
    if planned:
        lines.append(f"time: {seconds:.0f} s in all, {trainer.validation_seconds:.0f} s of it validation "
                     f"({trainer.validation_seconds / max(seconds, 1e-9):.0%}); the plan estimated "
                     f"{planned['seconds']:.0f} s, {planned['validation_share']:.0%} validation")
    lines.append(f"throughput: {trainer.real_tokens / max(trainer.train_seconds, 1e-9):.0f} real tokens/s in training "
                 f"steps; {seconds:.0f} s in all with validation; peak memory {peak:.2f} GiB "
                 f"({'GPU' if torch.cuda.is_available() else 'process RSS'}"
                 + (f"; the plan estimated {plan['memory_gib']['peak']:.2f}" if (plan or {}).get("memory_gib") else "")
                 + ")")
    lines.extend(extra)
    lines.append(f"saved: {out}/best, {out}/latest")
    print("\n".join(lines))


def peak_rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
