"""bench/gpu.py's report: OUT/gpu.json (every figure, the commands, the machine, the conventions), OUT/gpu.md (the
table and the targets) and OUT/runs.log (the end of each train.py run's output), and the one line a result gets on
the console as it is recorded.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib.metadata import distributions

from flops import CONVENTIONS as MFU_CONVENTIONS
from gpu_setup import UNSLOTH_SITE, say, short

# the measurements, in the order the report lists them (and --only names them)
ORDER = ["lora", "padding", "qlora", "unsloth", "grpo", "grpo-vllm", "auto-batch", "oom"]

# target: (measurement, metric, comparison, value, what it means)
TARGETS = [
    ("lora-{main}", "mfu", ">=", 0.45, "LoRA MFU on the {main} shape (best published single-GPU LoRA: 41-43%)"),
    ("qlora-{main}", "peak_ratio", "<=", 0.40, "QLoRA peak memory / bf16 LoRA peak memory"),
    ("unsloth-{main}", "speedup", ">=", 1.5, "unsloth tokens/s / plain PEFT tokens/s"),
    ("padding-{main}", "speedup", ">=", 1.3, "padding-free tokens/s / padded tokens/s (realistic lengths)"),
]

CONVENTIONS = {
    **MFU_CONVENTIONS,
    "tokens_per_s": "real (non-pad) tokens per second over the steps after the warm-up ones, each step timed to its "
                    "end on the device (optimiser step, data and logging included)",
    "peak_gib": "torch.cuda.max_memory_allocated of the train.py process (on CPU: its max RSS)",
}
# the figures a result's console line shows
SHOWN = ("tokens_per_s", "padded_tokens_per_s", "mfu", "mfu_6n", "peak_gib", "lora_peak_gib", "peak_ratio",
         "speedup", "steps_per_s", "batch", "padding", "loss_rel_diff")
VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "bitsandbytes", "unsloth",
            "unsloth_zoo", "xformers", "torchao", "vllm", "flash_attn")


def result_line(r: dict, elapsed: float) -> str:
    figures = ", ".join(f"{k} {_fmt(k, v)}" for k, v in r.items() if k in SHOWN and v is not None)
    return (f"[{elapsed:5.0f} s] {r['name']}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
            + (f": {figures}" if figures else ""))


def write(b) -> dict:
    """Writes the report of bench `b` (gpu.Bench) into b.out, prints the table and removes a temporary work
    folder; returns gpu.json's content."""
    b.out.mkdir(parents=True, exist_ok=True)
    rank = {k: i for i, k in enumerate(ORDER)}
    b.results.sort(key=lambda r: rank.get(_key(r["name"]), len(ORDER)))  # stable: shapes in run order
    doc = {"dry_run": b.args.dry_run, "seconds": round(time.time() - b.start, 1), "budget_s": b.plan["budget_s"],
           "machine": machine(b.cuda, b.peak, b.tokenizer_source), "plan": b.plan, "conventions": CONVENTIONS,
           "results": b.results, "targets": targets(b.results, b.plan["shapes"][0])}
    (b.out / "gpu.json").write_text(json.dumps(doc, indent=2, default=str))
    logs = sorted(b.work.glob("*.log"), key=lambda f: f.stat().st_mtime)
    (b.out / "runs.log").write_text("".join(  # the end of each train.py run's output, for what failed
        f"===== {f.stem}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-80:]) + "\n" for f in logs))
    if not b.args.workdir:
        shutil.rmtree(b.work, ignore_errors=True)
    table = markdown(doc)
    (b.out / "gpu.md").write_text(table)
    say("\n" + table)
    say(f"wrote {b.out / 'gpu.json'} and {b.out / 'gpu.md'} ({doc['seconds']:.0f} s in all)")
    return doc


def device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"


def machine(cuda: bool, peak, tokenizer_source) -> dict:
    import torch

    # unsloth's stack is installed apart (bench/bundle.py): its versions are read from there too
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version
             for d in [*distributions(), *distributions(path=[str(UNSLOTH_SITE)])]}
    versions = {m: found.get(m.replace("_", "-")) for m in VERSIONS}
    return {"device": device_name(cuda), "cuda": torch.version.cuda if cuda else None,
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            "peak_tflops_bf16": peak, "python": platform.python_version(), "cpus": os.cpu_count(),
            "versions": versions, "tokenizer": tokenizer_source}


def targets(results: list[dict], main_shape: str) -> list[dict]:
    main = short(main_shape)
    out = []
    for name, metric, op, value, what in TARGETS:
        name = name.format(main=main)
        r = next((x for x in results if x["name"] == name), None)
        got = r.get(metric) if r and r["status"] == "ok" else None
        met = None if got is None else (got >= value if op == ">=" else got <= value)
        out.append({"target": what.format(main=main), "measurement": name, "metric": metric,
                    "want": f"{op} {value:g}", "got": got, "met": met,
                    "status": r["status"] if r else "not run", "reason": r.get("reason") if r else None})
    return out


def _key(name: str) -> str:
    return next((k for k in sorted(ORDER, key=len, reverse=True) if name == k or name.startswith(k + "-")), name)


def _fmt(key, v) -> str:
    if v is None:
        return "–"
    if key in ("mfu", "mfu_6n", "padding"):
        return f"{100 * v:.1f}%"
    if key in ("peak_ratio", "speedup"):
        return f"{v:.2f}x" if key == "speedup" else f"{v:.2f}"
    if key == "loss_rel_diff":
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
    return str(v)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# GPU bench{' (dry run: CPU, tiny shapes; figures mean nothing)' if doc['dry_run'] else ''}", "",
             f"{m['device']}, peak {m['peak_tflops_bf16'] or '?'} bf16 TFLOP/s; torch {m['versions']['torch']}, "
             f"transformers {m['versions']['transformers']}, TRL {m['versions']['trl']}, PEFT "
             f"{m['versions']['peft']}, unsloth {m['versions']['unsloth'] or '-'}; {doc['seconds']:.0f} s in all", "",
             "| measurement | status | tokens/s | MFU (6N) | peak GiB | other | note |",
             "|---|---|---|---|---|---|---|"]
    lines += [result_row(r) for r in doc["results"]]
    lines += ["", "| target | want | got | met |", "|---|---|---|---|"]
    for t in doc["targets"]:
        got = _fmt(t["metric"], t["got"]) if t["got"] is not None else \
            f"({t['status']}{': no figure' if t['status'] == 'ok' else ''})"
        lines.append(f"| {t['target']} | {t['metric']} {t['want']} | {got} | "
                     f"{'yes' if t['met'] else 'no' if t['met'] is False else '–'} |")
    lines += ["", "MFU: LoRA = (4N + 6 N_lora + 12 L d T) x tokens/s / peak; in brackets the 6N count (full "
              "fine-tuning's). Tokens/s: real tokens after the warm-up steps.", ""]
    return "\n".join(lines)


def result_row(r: dict) -> str:
    other = []
    for key, label in (("speedup", "x"), ("peak_ratio", "QLoRA/LoRA peak"), ("steps_per_s", "steps/s"),
                       ("batch", "batch"), ("padded_tokens_per_s", "padded tok/s"),
                       ("lora_peak_gib", "LoRA GiB"), ("padding", "padding")):
        if r.get(key) is not None and not (key == "steps_per_s" and r.get("tokens_per_s")):
            other.append(f"{label} {_fmt(key, r[key])}" if label != "x" else f"{_fmt(key, r[key])} vs "
                         f"{r.get('vs') or 'baseline'}")
    mfu_cell = f"{_fmt('mfu', r.get('mfu'))}" + (f" ({_fmt('mfu', r['mfu_6n'])})" if r.get("mfu_6n") else "")
    note = r.get("reason") or r.get("note") or ""
    return (f"| {r['name']} | {r['status']} | {_fmt('tokens_per_s', r.get('tokens_per_s'))} | {mfu_cell} | "
            f"{_fmt('peak_gib', r.get('peak_gib'))} | {'; '.join(other)} | {note.replace('|', '/')} |")
