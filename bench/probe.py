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


def main():
    import torch
    from trl import SFTTrainer

    stats = dict(steps=0, real_tokens=0, processed_tokens=0, step_seconds=0.0, wait_seconds=0.0, linear_params=0,
                 batches=[])
    cuda = torch.cuda.is_available()
    turn, me, other = os.environ.get("BENCH_TURN"), os.environ.get("BENCH_ARM"), os.environ.get("BENCH_OTHER")

    def flag(arm, state):  # "ready": at its first step; "done": its training is over
        return Path(f"{turn}.{arm}.{state}")

    def wait_turn():
        start = time.perf_counter()
        flag(me, "ready").touch()
        while not flag(other, "done").exists():
            if flag(other, "ready").exists() and Path(turn).read_text() == me:
                break
            time.sleep(0.005)
        stats["wait_seconds"] += time.perf_counter() - start

    def pass_turn(done=False):
        if done:
            flag(me, "done").touch()
        Path(f"{turn}.{me}.tmp").write_text(other)
        os.replace(f"{turn}.{me}.tmp", turn)  # atomic: the other arm never reads a half-written name

    def training_step(self, model, inputs, *args, **kwargs):
        if not stats["linear_params"]:
            stats["linear_params"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        stats["steps"] += 1
        stats["processed_tokens"] += ids.numel()
        stats["real_tokens"] += int(mask.sum()) if mask is not None else ids.numel()
        if turn:
            wait_turn()
        start = time.perf_counter()
        try:
            return original_step(self, model, inputs, *args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            stats["step_seconds"] += seconds
            stats["batches"].append([*ids.shape, round(seconds, 3)])  # rows, padded width, seconds
            if turn:
                pass_turn()

    def train(self, *args, **kwargs):
        try:
            return original_train(self, *args, **kwargs)
        finally:
            if turn:
                pass_turn(done=True)

    original_step, original_train = SFTTrainer.training_step, SFTTrainer.train
    SFTTrainer.training_step, SFTTrainer.train = training_step, train
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)  # as if the script had been run directly
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if turn:
            pass_turn(done=True)  # also when the script failed before or during training
        stats["torch_threads"] = torch.get_num_threads()
        stats["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        stats["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        with open(os.environ["BENCH_STATS"], "w") as f:
            json.dump(stats, f)


if __name__ == "__main__":
    main()
