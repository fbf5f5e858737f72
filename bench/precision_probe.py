"""LoRA step speed and peak memory on a CPU by precision setting: float32, bf16 autocast over float32 weights, and a
bfloat16 frozen base (LoRA weights float32) with or without autocast.

    uv run bench/precision_probe.py --shape tiny-llama --rows 8 --tokens 300
    uv run bench/precision_probe.py --shape qwen2.5-0.5b --rows 1 --tokens 400 --settings fp32,bf16-base

Each setting runs in a process of its own (peak RSS is per process): a random-weight model of bench/shapes/SHAPE.json
(vocabulary 49,152 unless the shape is larger), LoRA r=16 alpha 32 dropout 0.05 on every linear layer (PEFT), AdamW
on the LoRA weights, --steps training steps on --rows x --tokens random tokens, the LM head on the last 4 tokens of
each row only (as TRL's fused head projects only label positions), gradient checkpointing with --checkpointing.
Prints one line a setting: the median seconds a step after a warm-up step, the process peak RSS and the loss of
the first step (the settings must agree on it to within bf16 rounding). One torch thread unless --threads.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("fp32", "autocast", "bf16-base", "bf16-base-autocast")


def one(shape: str, setting: str, rows: int, tokens: int, steps: int, checkpointing: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((ROOT / "bench" / "shapes" / f"{shape}.json").read_text())
    cfg["vocab_size"] = max(cfg["vocab_size"], 49152)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(0)
    base_dtype = torch.bfloat16 if setting.startswith("bf16-base") else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=base_dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = setting in ("autocast", "bf16-base-autocast")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (rows, tokens), generator=gen)
    head = model.get_output_embeddings().weight
    model.train()
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.base_model.model.model(input_ids=ids).last_hidden_state[:, -5:-1]
            # 2-D, as TRL's fused head takes the label positions' hidden states
            logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), head).float()
            loss = torch.nn.functional.cross_entropy(logits, ids[:, -4:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"setting": setting, "step_s": statistics.median(times[1:]), "first_s": times[0], "loss": losses[0],
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny-llama")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one(args.shape, args.one, args.rows, args.tokens, args.steps, args.checkpointing)))
        return
    print(f"{args.shape}: {args.rows} x {args.tokens} tokens, {args.steps} steps after a warm-up, "
          f"{'checkpointing' if args.checkpointing else 'no checkpointing'}, {args.threads} thread(s)")
    print("| setting | s a step | first step s | peak RSS GiB | first loss |\n|---|---|---|---|---|")
    for setting in args.settings.split(","):
        argv = [sys.executable, __file__, "--one", setting, "--shape", args.shape, "--rows", str(args.rows),
                "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(argv + (["--checkpointing"] if args.checkpointing else []), capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {setting} | {r['step_s']:.2f} | {r['first_s']:.2f} | {r['peak_gib']:.2f} | {r['loss']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
