"""The instrumentation a bench runs a training script under, in a process of its own: bench/gpu.py's runs
(`gpu.py --child`) and bench/probe.py's (train_bench.py's two arms) go through this one module, so every bench
counts tokens, times steps and reads memory with the same code.

The script (train.py, or any script that builds a transformers Trainer) runs unchanged as __main__; transformers
itself is patched, so whichever Trainer subclass the script builds, every Trainer of the process gets:
  - a token count for each training batch: the real tokens (attention mask, or the samples of a padding-free row),
    the sum of the samples' squared lengths (attention FLOPs grow with it) and the positions processed (rows x
    padded width);
  - a step clock: a mark at the start of training and after every optimiser step (synchronised on CUDA);
  - with time_batches, the seconds of each training step (forward + backward, synchronised on CUDA) and the batch's
    shape; off for gpu.py, whose clock needs no synchronisation between an optimiser step's micro-batches;
  - with turns (probe.py's lockstep), a wait for its turn before each training step and a hand-over after it; the
    wrapper is the outermost training_step, so the waits fall outside the script's own step timer.

At exit, whatever happened (a crash included), it writes the stats file, JSON:
  steps          [seconds since training began, real tokens, squared lengths, the trainer's own real_tokens
                 counter or null] at the start of training and after every optimiser step
  tokens, sq_tokens, processed, counted   the totals above (counted: at least one batch was counted)
  batches, step_seconds, wait_seconds     [rows, padded width, seconds] per timed batch; their seconds summed;
                                          seconds spent waiting for the other arm
  linear_params  the weights of the model's nn.Linear layers (for a rough 4N MFU)
  first_step_unix  time.time() when the first training step began (before any lockstep wait): start-up's end
  padding_free, attn_implementation       train.py's padding-free choice and the attention it ran on (--child)
  exit, exception                         the script's exit code; the exception that ended it, if one did
  peak_gib, reserved_gib, max_rss_gib, torch_threads   torch.cuda.max_memory_allocated / _reserved (null on CPU),
                                          the process's max RSS, torch's threads

    gpu.py --child STATS [--force-padding-free] [--varlen] [--memory-gib G] SCRIPT -- ARGS...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import sys
import time
import traceback
from pathlib import Path

from varlen import register_varlen, segment_starts

ROOT = Path(__file__).resolve().parent.parent


def new_stats() -> dict:
    return {"steps": [], "tokens": 0, "sq_tokens": 0, "processed": 0, "counted": False, "batches": [],
            "step_seconds": 0.0, "wait_seconds": 0.0, "linear_params": 0, "padding_free": None, "exit": None,
            "first_step_unix": None}


# ------------------------------------------------------------------------------------------------ gpu.py --child
def child(argv) -> int:
    """`gpu.py --child STATS [--force-padding-free] [--varlen] [--memory-gib G] SCRIPT -- ARGS...`: runs SCRIPT
    with the counters attached and writes STATS; the options are the changes a measurement makes to the run."""
    o = child_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    stats = new_stats()
    if o.memory_gib and cuda:
        cap_memory(stats, o.memory_gib)
    sys.path.insert(0, str(ROOT))
    if o.varlen:
        register_varlen()
    watch_padding_free(stats, o.force_padding_free)
    attach(stats, cuda)
    return run_script(o.script, o.args, o.stats, stats, cuda)


def child_args(argv):
    p = argparse.ArgumentParser(prog="gpu.py --child")
    p.add_argument("stats")
    p.add_argument("--force-padding-free", action="store_true")
    p.add_argument("--varlen", action="store_true")
    p.add_argument("--memory-gib", type=float)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def cap_memory(stats: dict, gib: float):
    """Acts as a smaller GPU: the caching allocator raises OutOfMemoryError past `gib` of the device's memory."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    stats["memory_cap_gib"] = gib


def watch_padding_free(stats: dict, force: bool):
    """Records train.py's padding-free choice and the attention it runs on; with `force`, overrides the choice
    (the padding-free arm)."""
    from finetune import batching

    chosen = batching.padding_free

    def padding_free(model, vision):
        flat = True if force else chosen(model, vision)
        stats["padding_free"] = flat
        stats["attn_implementation"] = str(getattr(getattr(model, "config", None), "_attn_implementation", None))
        return flat

    batching.padding_free = padding_free  # train.py calls batching.padding_free(...) at run time


# ------------------------------------------------------------------------------------------------ the counters
def count_batch(stats: dict, inputs):
    """Adds the real tokens, sum of squared sample lengths and processed positions of one training batch."""
    import torch

    if not isinstance(inputs, dict) or not torch.is_tensor(inputs.get("input_ids")):
        return
    ids = inputs["input_ids"]
    if torch.is_tensor(inputs.get("attention_mask")):
        lengths = inputs["attention_mask"].sum(-1).tolist()
    elif torch.is_tensor(inputs.get("position_ids")):  # padding-free: samples restart at position 0
        pos = inputs["position_ids"].reshape(-1)
        starts = segment_starts(pos).tolist() + [pos.numel()]
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    else:
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    stats["tokens"] += int(sum(lengths))
    stats["sq_tokens"] += int(sum(n * n for n in lengths))
    stats["processed"] += int(ids.numel())
    stats["counted"] = True


def attach(stats: dict, cuda: bool, time_batches: bool = False, turns=None):
    """Patches transformers so that every Trainer built in this process gets the step clock and wraps its
    training_step (and, with `turns`, its train): see the module docstring. `turns` has wait() and
    pass_turn(done=False) (probe.py's Lockstep)."""
    import transformers.trainer

    clock = step_clock(stats, cuda)
    transformers.trainer.DEFAULT_CALLBACKS.append(clock)  # every Trainer built in this process gets it
    init = transformers.trainer.Trainer.__init__

    def patched_init(self, *a, **k):
        init(self, *a, **k)
        clock.trainer = self
        # the outermost training_step and train, whatever subclass or patch is underneath
        self.training_step = counted_step(self.training_step, stats, cuda, time_batches, turns)
        if turns:
            self.train = handing_over(self.train, turns)

    transformers.trainer.Trainer.__init__ = patched_init


def step_clock(stats: dict, cuda: bool):
    """A TrainerCallback making a mark at the start of training and after every optimiser step: (seconds, real
    tokens so far, squared lengths so far, the trainer's own real_tokens)."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()
            stats["steps"] = [[0.0, stats["tokens"], stats["sq_tokens"], self._real()]]

        def on_step_end(self, args, state, control, **kw):
            sync()
            stats["steps"].append([time.perf_counter() - self.t0, stats["tokens"], stats["sq_tokens"], self._real()])

        def _real(self):  # train.py's own counter (FinetuneTrainer.real_tokens): GRPO completions, unsloth
            return getattr(self.trainer, "real_tokens", None)

    return Clock()


def counted_step(step, stats: dict, cuda: bool, time_batches: bool, turns):
    """`step` (a bound training_step) counting its batch, and with time_batches or turns, timed and taking turns."""
    import torch

    def training_step(model, inputs, *args, **kwargs):
        if stats.get("first_step_unix") is None:  # start-up ends here: the command's start to its first step
            stats["first_step_unix"] = time.time()
        count_batch(stats, inputs)
        if not stats["linear_params"]:
            stats["linear_params"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        if not (time_batches or turns):
            return step(model, inputs, *args, **kwargs)
        if turns:
            waited = time.perf_counter()
            turns.wait()
            stats["wait_seconds"] += time.perf_counter() - waited
        start = time.perf_counter()
        try:
            return step(model, inputs, *args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            stats["step_seconds"] += seconds
            shape = list(getattr(inputs.get("input_ids"), "shape", ())) if isinstance(inputs, dict) else []
            stats["batches"].append([*shape, round(seconds, 3)])  # rows, padded width, seconds
            if turns:
                turns.pass_turn()

    return training_step


def handing_over(train, turns):
    """`train` handing the turn over for good when training ends, so that the other arm stops waiting for this one."""
    def wrapped(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        finally:
            turns.pass_turn(done=True)

    return wrapped


# ------------------------------------------------------------------------------------------------ the run
def run_script(script: str, args: list, stats_file: str, stats: dict, cuda: bool) -> int:
    """Runs `script` as __main__ with `args` (a leading "--" dropped), as if it had been run directly, and returns
    its exit code; writes the stats, with the peak memory, however it ended (a crashed run's stats are read too)."""
    import torch

    script = os.path.abspath(script)
    sys.argv = [script, *(args[1:] if args[:1] == ["--"] else args)]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException as e:  # a traceback: train.py should have turned it into one line
        traceback.print_exc()
        stats["exception"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        code = 1
    finally:
        stats["exit"] = code
        stats["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        stats["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
        stats["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        stats["torch_threads"] = torch.get_num_threads()
        Path(stats_file).write_text(json.dumps(stats))
    return code


def exit_code(code) -> int:
    """The process exit status sys.exit(code) gives, its message printed as Python prints it."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
