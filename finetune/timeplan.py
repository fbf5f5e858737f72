"""The plan's time, once the model has loaded: a training step, a validation and the whole run, estimated from costs
measured on this model now, and the default bound of free-text validation (SFT and the classifier head).

    vplan = timeplan.plan_time(args, s, model, plan, out, vplan)
        plan["time"] and plan["validation"] (and run.json), the plan's time line printed; the trainer's
        ValidationPlan with its estimate and the free-text samples

The costs (measure_costs), on a batch of training rows and one of validation prompts:
    forward      one forward pass over the training rows, cut to MEASURED_TOKENS in all: seconds per token
    decode       (validation that generates) 1 and 1 + DECODE_STEPS new tokens on the validation prompts: the
                 seconds of one decoding step at that batch, and of the prompt
The estimate:
    a step       STEP_FORWARDS forward passes (forward + backward) over a step's tokens, one more with checkpointing
    a validation the loss (one forward pass per sample), plus scores (one forward pass per sample) or generation
                 (batches x (prompt + budget x a decoding step): every output running to the budget, the worst case)
    the run      steps x a step + validations x a validation, the step-0 baseline counted
Free-text validation generates on the first samples (whole batches) that keep all validations within
VALIDATION_SHARE of the run by this estimate, at most FREE_TEXT_SAMPLES; none when not even one batch would, and the
run then validates the loss alone (unless --metric chrf or exact_match asks for generation: one batch); one batch
when the costs cannot be measured. --val-samples chooses the count, --eval-steps how often, --max-new-tokens the
budget. The plan line says when validation would take more than that share; the summary sets the measured time
beside the estimate. GRPO, DPO and KTO runs, and runs without validation data (whose time the step lines' ETA
gives from the second step), get no time plan.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from pathlib import Path

from finetune import decoding, launch, runs
from finetune.batching import pad_batch
from finetune.progress import duration
from finetune.training import ValidationPlan

STEP_FORWARDS = 3  # a training step costs about this many forward passes over its tokens (forward + backward)
DECODE_STEPS = 8   # new tokens generated (after the first) to time one decoding step
VALIDATION_SHARE, SHARE_WORDS = 0.2, "a fifth"  # the share of the run validations take at most by default
FREE_TEXT_SAMPLES = 32  # free-text validation generates on at most this many samples by default
# tokens of the measured forward pass, whose seconds are start-up a plain TRL script does not spend; the seconds
# per token of a 256-token pass stood for a step's within -5% to +8% on the qwen0.5b shape, where a 64-token pass,
# at half the seconds, measured more per token and gave a step 1.2-4.8x too long (docs/benchmarks.md, start-up)
MEASURED_TOKENS = 256


def generates(args, s) -> bool:
    """Does the run's validation generate (free text, or --predict generate on a closed set)?"""
    return bool(s.val) and args.trainer == "sft" and args.head != "classifier" and \
        (not s.classes or args.predict == "generate")


def validations_in(args, steps: int, steps_per_epoch: int) -> int:
    """The validations of a run: the step-0 baseline (not on --resume), then one every --eval-steps (and one at the
    last step when it is no multiple of them), else one per epoch begun (the Trainer's own schedule)."""
    during = math.ceil(steps / args.eval_steps) if args.eval_steps else math.ceil(steps / max(1, steps_per_epoch))
    return during + (0 if args.resume else 1)


def free_text_samples(train_s: float, validations: int, loss_s: float, batch_s: float, batch: int, available: int,
                      metric: str | None = None) -> int:
    """How many of the first validation samples free-text validation generates on by default: the whole batches
    (`batch_s` seconds each) that keep all `validations` (each also `loss_s` of loss) within VALIDATION_SHARE of the
    run (`train_s` of training + the validations), at most FREE_TEXT_SAMPLES and the `available` samples; none when
    not even one batch fits, unless --metric asks for chrF or exact match (then one batch, over the share: the plan
    line says so)."""
    allowed = VALIDATION_SHARE / (1 - VALIDATION_SHARE) * train_s / max(validations, 1) - loss_s
    batches = math.floor(allowed / batch_s) if batch_s > 0 else available
    n = max(0, min(FREE_TEXT_SAMPLES, available, batches * batch))
    if n == 0 and metric in ("chrf", "exact_match"):
        n = min(batch, available)
    return n


def _timed(fn) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_costs(model, tokenizer, rows: list[list[int]], prompts=None, dec=None) -> dict:
    """Seconds per token of one forward pass over `rows` (training rows, right padded) and, given validation
    `prompts`, of one decoding step at their batch and of their prompt, measured on this model now by generating 1
    and 1 + DECODE_STEPS tokens by `dec` (the module docstring)."""
    import torch

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids, mask = (t.to(dev) for t in pad_batch(rows, tokenizer.pad_token_id, left=False))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    try:
        with torch.inference_mode():
            model(input_ids=ids[:1, :16], attention_mask=mask[:1, :16], **keep)  # first-call set-up, not timed
            costs = {"forward_s_per_token": _timed(lambda: model(input_ids=ids, attention_mask=mask, **keep))
                     / ids.numel()}
        if prompts:
            enc = decoding.encode_batch(model, tokenizer, prompts)

            def run(n):
                decoding.generate_ids(model, tokenizer, enc, dataclasses.replace(dec, max_new_tokens=n),
                                      min_new_tokens=n)

            run(1)
            one, more = _timed(lambda: run(1)), _timed(lambda: run(1 + DECODE_STEPS))
            step = max(more - one, 0.0) / DECODE_STEPS
            costs.update(decode_s_per_step=step, prompt_s=max(one - step, 0.0), decode_batch=len(prompts))
    finally:
        model.train(was_training)
    return costs


def plan_time(args, s, model, plan: dict, out: Path, vplan: ValidationPlan) -> ValidationPlan:
    """The run's time, estimated from costs measured on the loaded model (SFT and the classifier head; the module
    docstring), into plan["time"] and run.json, with the plan's time line printed. Returns the validation plan
    with its estimate and, for free text without --val-samples, the samples it generates on (every rank agrees;
    one batch when nothing could be measured)."""
    closed, b, gen = bool(s.classes), args.batch_size, generates(args, s)
    bounded = gen and not closed and args.val_samples is None  # the default bound applies
    # without a measurement: one batch (every rank takes part in the agreement, measured or not)
    unmeasured = dataclasses.replace(vplan, samples=launch.across_ranks(min(b, len(s.val)), "min")) if bounded \
        else vplan
    # a 4-bit base (qlora) is not run before training: bitsandbytes' CPU path keeps state from a forward pass that
    # makes the first training step fail ("a view of a leaf Variable ... in-place operation")
    # without validation data the estimate decides nothing: the step lines' ETA (from the second step, and
    # plan["eta"] in run.json) gives the run's time, and the measured pass's 0.1-2 s stay out of start-up
    if args.trainer != "sft" or args.trainable == "qlora" or not plan.get("steps") or not s.val or \
            "input_ids" not in s.train_ds.column_names:
        return unmeasured
    import torch

    budget = vplan.decoding.max_new_tokens
    try:
        rows = [list(r) for r in s.train_ds.select(range(min(b, len(s.train_ds))))["input_ids"]]
        rows = [r[:max(16, MEASURED_TOKENS // len(rows))] for r in rows]
        prompts = [s.val_fmt.encode(x, with_answer=False)["input_ids"] for x in s.val[:b]] if gen else None
        costs = measure_costs(model, s.tokenizer, rows, prompts, vplan.decoding)
    except torch.OutOfMemoryError:
        raise  # the run itself would not fit: train.py's out-of-memory advice, not a missing estimate
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a run that would train
        print(f"note: no time plan ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return unmeasured
    fwd = costs["forward_s_per_token"]
    mean_train = (plan.get("tokens_per_epoch") or 0) / max(1, plan["train_samples"])
    step_s = (STEP_FORWARDS + bool(args.gradient_checkpointing)) * fwd * plan["samples_per_step"] * mean_train
    train_s = plan["steps"] * step_s
    vals = validations_in(args, plan["steps"], plan.get("steps_per_epoch", plan["steps"])) if s.val else 0
    lengths = list(s.val_ds["length"]) if s.val_ds is not None and "length" in s.val_ds.column_names else []
    loss_s = len(s.val) * (sum(lengths) / len(lengths) if lengths else mean_train) * fwd  # the Trainer's loss pass
    score_s = loss_s if closed and not gen and args.head != "classifier" else 0.0  # one forward pass a sample
    batch_s = costs.get("prompt_s", 0.0) + budget * costs.get("decode_s_per_step", 0.0)
    n = len(s.val) if gen else 0
    if bounded:
        n = launch.across_ranks(free_text_samples(train_s, vals, loss_s, batch_s, b, len(s.val), args.metric), "min")
    generate_s = math.ceil(n / b) * batch_s
    val_s = loss_s + score_s + generate_s
    total = train_s + vals * val_s
    plan["time"] = {"seconds": round(total, 1), "seconds_per_step": round(step_s, 3), "validations": vals,
                    "seconds_per_validation": round(val_s, 2),
                    "validation_share": round(vals * val_s / total, 3) if total else 0.0,
                    "measured": {k: round(v, 6) if isinstance(v, float) else v for k, v in costs.items()}}
    if gen:
        plan["validation"] = {"max_new_tokens": budget, "generate_samples": n}
    print(time_lines(plan, args, len(s.val), closed, gen))
    if launch.is_main_process():
        for key in ("time", "validation"):
            if key in plan:
                runs.update_plan(out, key, plan[key])
    return dataclasses.replace(vplan, samples=n if bounded else vplan.samples,
                               seconds=generate_s if gen else (score_s or None))


def time_lines(plan: dict, args, n_val: int, closed: bool, gen: bool) -> str:
    """The plan's time line: the run, a step, a validation and what it does; a warning when validation takes more
    than VALIDATION_SHARE; the default's choice of free-text samples when it generates on fewer than there are."""
    t = plan["time"]
    n = (plan.get("validation") or {}).get("generate_samples")
    what = f"loss on {n_val} samples"
    if gen and n:
        what += f", generation on {n} x {plan['validation']['max_new_tokens']} new tokens at most, {args.batch_size} " \
                "a batch"
    elif closed and args.head != "classifier" and not gen:
        what += ", scores of every class"
    vals = (f", {t['validations']} validation{'s' if t['validations'] != 1 else ''} of about "
            f"{duration(t['seconds_per_validation'])} ({what})") if t["validations"] else ""
    steps = f"{plan['steps']} step{'s' if plan['steps'] != 1 else ''}"
    lines = [f"plan: about {duration(t['seconds'])} in all: {steps} of about {duration(t['seconds_per_step'])}{vals}; "
             f"validation {t['validation_share']:.0%} of the run"]
    if t["validation_share"] > VALIDATION_SHARE:
        lines.append(f"plan: validation would take more than {SHARE_WORDS} of the run: --val-samples, --eval-steps"
                     + (", --max-new-tokens" if gen else "") + " choose how much")
    if gen and not closed and args.val_samples is None and n < n_val:
        lines.append(f"plan: free-text validation generates on {n or 'none'} of the {n_val} samples, which keeps "
                     f"validation under {SHARE_WORDS} of the run"
                     + ("; it measures the loss alone (--val-samples N or --metric chrf to generate)"
                        if not n else " (--val-samples N to choose)"))
    return "\n".join(lines)
