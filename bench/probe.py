"""Run a training script with counters attached (train_bench.py runs both of its arms through this).

    BENCH_STATS=stats.json [BENCH_TURN=turn BENCH_ARM=ours BENCH_OTHER=plain] uv run bench/probe.py SCRIPT ARGS...

Wraps TRL's `SFTTrainer.training_step`, which our train.py's trainer subclass and a plain SFTTrainer both go
through, so both arms are measured by the same code: per training batch it counts the real tokens (attention
mask) and the processed ones (rows x padded width), and the seconds spent in the step (forward + backward,
synchronised on CUDA). At exit it writes those, each batch's shape and seconds, the parameters of the model's
linear layers (for MFU) and the peak memory (process max RSS; on CUDA torch.cuda.max_memory_allocated) to
$BENCH_STATS as JSON.

Lockstep (BENCH_TURN set): two arms running at the same time take their training steps in turns, through a file
holding the name of the arm whose step is next, so both see the same load on a shared machine. Seconds spent
waiting for the other arm are counted apart (wait_seconds).
"""
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path


class Lockstep:
    """Turn-taking with the other arm: the file `turn` holds the name of the arm whose step is next. Flag files
    say that an arm has reached its first step ("ready": neither starts its steps while the other is still loading)
    or that its training is over ("done": the other stops waiting for it)."""

    def __init__(self, turn, me, other, stats):
        self.turn, self.me, self.other, self.stats = turn, me, other, stats

    def flag(self, arm, state):
        return Path(f"{self.turn}.{arm}.{state}")

    def wait(self):
        start = time.perf_counter()
        self.flag(self.me, "ready").touch()
        while not self.flag(self.other, "done").exists():
            if self.flag(self.other, "ready").exists() and Path(self.turn).read_text() == self.me:
                break
            time.sleep(0.005)
        self.stats["wait_seconds"] += time.perf_counter() - start

    def pass_turn(self, done=False):
        if done:
            self.flag(self.me, "done").touch()
        Path(f"{self.turn}.{self.me}.tmp").write_text(self.other)
        os.replace(f"{self.turn}.{self.me}.tmp", self.turn)  # atomic: the other arm never reads a half-written name


def attach(stats, lockstep, cuda):
    """Wraps SFTTrainer.training_step (counters, clock, turns) and SFTTrainer.train (hands the turn over for good
    when training ends, so that the other arm stops waiting for this one)."""
    import torch
    from trl import SFTTrainer

    def training_step(self, model, inputs, *args, **kwargs):
        if not stats["linear_params"]:
            stats["linear_params"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        stats["steps"] += 1
        stats["processed_tokens"] += ids.numel()
        stats["real_tokens"] += int(mask.sum()) if mask is not None else ids.numel()
        if lockstep:
            lockstep.wait()
        start = time.perf_counter()
        try:
            return original_step(self, model, inputs, *args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            stats["step_seconds"] += seconds
            stats["batches"].append([*ids.shape, round(seconds, 3)])  # rows, padded width, seconds
            if lockstep:
                lockstep.pass_turn()

    def train(self, *args, **kwargs):
        try:
            return original_train(self, *args, **kwargs)
        finally:
            if lockstep:
                lockstep.pass_turn(done=True)

    original_step, original_train = SFTTrainer.training_step, SFTTrainer.train
    SFTTrainer.training_step, SFTTrainer.train = training_step, train


def main():
    import torch

    stats = dict(steps=0, real_tokens=0, processed_tokens=0, step_seconds=0.0, wait_seconds=0.0, linear_params=0,
                 batches=[])
    cuda = torch.cuda.is_available()
    turn = os.environ.get("BENCH_TURN")
    lockstep = Lockstep(turn, os.environ.get("BENCH_ARM"), os.environ.get("BENCH_OTHER"), stats) if turn else None
    attach(stats, lockstep, cuda)
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)  # as if the script had been run directly
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if lockstep:
            lockstep.pass_turn(done=True)  # also when the script failed before or during training
        stats["torch_threads"] = torch.get_num_threads()
        stats["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        stats["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        with open(os.environ["BENCH_STATS"], "w") as f:
            json.dump(stats, f)


if __name__ == "__main__":
    main()
