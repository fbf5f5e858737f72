"""Run a training script with counters attached (train_bench.py runs both of its arms through this).

    BENCH_STATS=stats.json [BENCH_TURN=turn BENCH_ARM=ours BENCH_OTHER=plain] uv run bench/probe.py SCRIPT ARGS...

Runs SCRIPT under bench/harness.py, the instrumentation bench/gpu.py's runs use too, with each training step
timed: our train.py's trainer subclass and a plain SFTTrainer are measured by the same code. Per training batch it
counts the real tokens (attention mask) and the processed ones (rows x padded width), and the seconds spent in the
step (forward + backward, synchronised on CUDA). At exit it writes those, each batch's shape and seconds, the
parameters of the model's linear layers (for MFU) and the peak memory (process max RSS; on CUDA
torch.cuda.max_memory_allocated) to $BENCH_STATS as JSON (the keys: bench/harness.py's docstring).

Lockstep (BENCH_TURN set): two arms running at the same time take their training steps in turns, through a file
holding the name of the arm whose step is next, so both see the same load on a shared machine. Seconds spent
waiting for the other arm are counted apart (wait_seconds).
"""
import os
import sys
import time
from pathlib import Path

import harness


class Lockstep:
    """Turn-taking with the other arm: the file `turn` holds the name of the arm whose step is next. Flag files
    say that an arm has reached its first step ("ready": neither starts its steps while the other is still loading)
    or that its training is over ("done": the other stops waiting for it)."""

    def __init__(self, turn, me, other):
        self.turn, self.me, self.other = turn, me, other

    def flag(self, arm, state):
        return Path(f"{self.turn}.{arm}.{state}")

    def wait(self):
        self.flag(self.me, "ready").touch()
        while not self.flag(self.other, "done").exists():
            if self.flag(self.other, "ready").exists() and Path(self.turn).read_text() == self.me:
                break
            time.sleep(0.005)

    def pass_turn(self, done=False):
        if done:
            self.flag(self.me, "done").touch()
        Path(f"{self.turn}.{self.me}.tmp").write_text(self.other)
        os.replace(f"{self.turn}.{self.me}.tmp", self.turn)  # atomic: the other arm never reads a half-written name


def main():
    import torch

    cuda = torch.cuda.is_available()
    turn = os.environ.get("BENCH_TURN")
    lockstep = Lockstep(turn, os.environ.get("BENCH_ARM"), os.environ.get("BENCH_OTHER")) if turn else None
    stats = harness.new_stats()
    harness.attach(stats, cuda, time_batches=True, turns=lockstep)
    try:
        code = harness.run_script(sys.argv[1], sys.argv[2:], os.environ["BENCH_STATS"], stats, cuda)
    finally:
        if lockstep:
            lockstep.pass_turn(done=True)  # also when the script failed before or during training
    sys.exit(code)


if __name__ == "__main__":
    main()
