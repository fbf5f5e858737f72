"""bench/gpu.py's measurements, and the one way they run train.py.

Each measurement is a function of the bench (gpu.Bench: the plan, the device, the work folder, the models and data,
the results) that records one result: cheap checks first (libraries, device) and the time budget
(Bench.can_run), then its train.py runs. A GPU-only measurement on a machine without one still builds its command
and reports why it stops there. train() runs train.py in a subprocess under bench/harness.py (`gpu.py --child`)
and turns its stats into figures: tokens/s and steps/s over the steps after the warm-up ones, the padding, the
peak memory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flops import mfu
from gpu_setup import ROOT, UNSLOTH_SITE, short, with_attention
from varlen import VARLEN, varlen_kernel_available

GPU_PY = Path(__file__).resolve().parent / "gpu.py"


# ------------------------------------------------------------------------------------------------ one train.py run
def train(b, name, model: Path, data: Path, extra, force_padding_free=False, varlen=False, memory_gib=None,
          warmup=None, timeout=None, unsloth=False) -> dict:
    """Runs train.py -m MODEL --train-data DATA EXTRA as run `name` through `gpu.py --child` and returns its exit
    code, output, stats and steady-state figures (steady()), its command as a user would type it, and train.py's
    own throughput line."""
    stats_file = b.work / f"{name}.stats.json"
    stats_file.unlink(missing_ok=True)
    argv = ["-m", str(model), "--train-data", str(data), "--name", name, "--log-dir", str(b.work / "log"),
            *map(str, extra)]
    flags = ["--force-padding-free"] * force_padding_free + ["--varlen"] * varlen + \
        (["--memory-gib", str(memory_gib)] if memory_gib else [])
    cmd = [sys.executable, str(GPU_PY), "--child", str(stats_file), *flags, "train.py", "--", *argv]
    timeout = max(10, min(timeout or b.plan["run_timeout"], b.left() + 20))
    shutil.rmtree(b.work / "log" / name, ignore_errors=True)
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(b, unsloth), capture_output=True, text=True,
                              timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, _text(e.stdout), _text(e.stderr) + f"\n(killed after {timeout:.0f} s)"
    seconds = time.time() - started
    (b.work / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    run = {"rc": rc, "stdout": stdout, "stderr": stderr, "stats": stats, "wall_s": round(seconds, 1),
           "command": "python train.py " + " ".join(argv)}
    run.update(steady(stats, b.plan["warmup"] if warmup is None else warmup))
    run["train_py_says"] = next((x for x in reversed(stdout.splitlines()) if x.startswith("throughput:")), None)
    run["peak_gib"] = stats.get("peak_gib") if b.cuda else stats.get("max_rss_gib")
    return run


def child_env(b, unsloth: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "FINETUNE_CACHE": str(b.work / "cache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the first run writes the .pyc files the others then load
    if not b.cuda and b.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # lanes at once on a CPU: one thread each
    if unsloth and (UNSLOTH_SITE / "unsloth").is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(UNSLOTH_SITE), *filter(None, [env.get("PYTHONPATH")])])
    return env


def steady(stats: dict, warmup: int) -> dict:
    """Tokens/s and steps/s over the steps after the first `warmup` (compilation, allocator and cuBLAS warm-up)."""
    marks = stats.get("steps") or []
    if len(marks) < 2:
        return {}
    k = min(warmup, len(marks) - 2)
    (t0, n0, s0, r0), (t1, n1, s1, r1) = marks[k], marks[-1]
    seconds = t1 - t0
    if seconds <= 0:
        return {}
    tokens = n1 - n0 if stats.get("counted") else (r1 - r0 if r1 is not None and r0 is not None else None)
    out = {"steps_measured": len(marks) - 1 - k, "seconds_measured": round(seconds, 3),
           "steps_per_s": (len(marks) - 1 - k) / seconds}
    if tokens:
        out.update(tokens=tokens, sq_tokens=s1 - s0, tokens_per_s=tokens / seconds)
    if stats.get("counted") and stats.get("processed"):
        out["padding"] = 1 - stats["tokens"] / stats["processed"]
    return out


def failed_reason(run) -> str:
    if run["rc"] is None:
        return f"timed out after {run['wall_s']:.0f} s"
    lines = [x for x in (run["stderr"] or "").splitlines() if x.strip() and not x.startswith(" ")]
    return f"exit {run['rc']}: {lines[-1][:300] if lines else '(no output)'}"


def common(plan: dict, batch, steps, max_len=None) -> list:
    return ["-b", batch, "--max-steps", steps, "--max-len", max_len or plan["max_len"], "--save-steps", 100000,
            "--seed", 0]


def command(extra) -> str:
    return "python train.py -m MODEL --train-data DATA " + " ".join(map(str, extra))


def missing(*modules) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not importable" if gone else None


# ------------------------------------------------------------------------------------------------ measurements
def lora(b, shape, unsloth=False):
    p = b.plan
    name = f"{'unsloth' if unsloth else 'lora'}-{short(shape)}"
    what = f"train.py LoRA r=16 {'through unsloth' if unsloth else '(transformers + PEFT)'}, {shape} shape, " \
           f"-b {p['batch']} x {p['max_len']} tokens"
    extra = [*common(p, p["batch"], p["steps"]), "--unsloth" if unsloth else "--no-unsloth"]
    why = None
    if unsloth:
        why = ("unsloth needs an NVIDIA GPU (it cannot even be imported without one)" if not b.cuda
               else None if (UNSLOTH_SITE / "unsloth").is_dir() else missing("unsloth"))
    if not b.can_run(name, what, 45, why, command=command(extra)):
        return None
    folder, cfg = b.model(shape)
    run = train(b, name, folder, b.data["fixed"], extra, unsloth=unsloth)
    if run["rc"] != 0:
        return b.record(name, what, "failed", failed_reason(run), command=run["command"])
    fields = speed_fields(b, run, cfg, "lora")
    base = b.find(f"lora-{short(shape)}")
    if unsloth and base and base.get("tokens_per_s") and fields.get("tokens_per_s"):
        fields["speedup"] = fields["tokens_per_s"] / base["tokens_per_s"]
        fields["vs"] = base["name"]
    return b.record(name, what, "ok", **fields)


def speed_fields(b, run, cfg, trainable) -> dict:
    fields = {k: run.get(k) for k in ("tokens_per_s", "steps_per_s", "steps_measured", "seconds_measured",
                                      "padding", "peak_gib", "wall_s", "command", "train_py_says")}
    tokens, sq, seconds = run.get("tokens"), run.get("sq_tokens"), run.get("seconds_measured")
    if not fields["tokens_per_s"] and run.get("train_py_says"):
        # no batch counts (a library replaced the training step): train.py's own figure, over all its steps
        try:
            fields["tokens_per_s"] = float(run["train_py_says"].split()[1])
            fields["tokens_per_s_from"] = "train.py's report (every step, warm-up included)"
            tokens, sq, seconds = fields["tokens_per_s"], fields["tokens_per_s"] * b.plan["max_len"], 1.0
        except (IndexError, ValueError):
            pass
    if tokens and b.cuda:
        fields.update(mfu(cfg, trainable, tokens, sq, seconds, b.peak))
        if not b.peak:
            fields["mfu_note"] = "unknown device peak: pass --peak-tflops"
    return fields


def padding(b, shape):
    p = b.plan
    s = short(shape)
    name = f"padding-{s}"
    what = f"padded vs padding-free, {shape} shape, -b {p['var_batch']}, {p['var_min']}..{p['max_len']}-token " \
           f"samples (log-uniform)"
    kernel, why = padding_kernel(b.cuda)
    if not b.can_run(name, what, 80, why):
        return None
    folder, cfg = b.model(shape)
    extra = [*common(p, p["var_batch"], p["var_steps"]), "--no-unsloth", "--lora-dropout", 0,
             # on CPU float32, so that the two arms' first losses can be held to 1e-3 (bf16 rounds apart)
             *([] if b.cuda else ["--mixed-precision", "no"])]
    padded = train(b, f"padded-{s}", folder, b.data["variable"], extra)
    if padded["rc"] != 0:
        return b.record(name, what, "failed", "padded: " + failed_reason(padded))
    forced = kernel != "flash_attention_2"
    flat = train(b, f"padfree-{s}", with_attention(folder, kernel), b.data["variable"], extra,
                 force_padding_free=forced, varlen=kernel == VARLEN)
    if flat["rc"] != 0:
        return b.record(name, what, "failed", f"padding-free ({kernel}): " + failed_reason(flat),
                        padded_tokens_per_s=padded.get("tokens_per_s"))
    fields = padding_fields(b, s, cfg, kernel, padded, flat)
    if not flat["stats"].get("padding_free"):
        return b.record(name, what, "failed", "the padding-free arm still padded", **fields)
    if fields.get("loss_rel_diff") is not None and fields["loss_rel_diff"] > (0.02 if b.cuda else 1e-3):
        first = fields["first_loss"]
        return b.record(name, what, "failed", f"first-step losses differ ({first[0]:.4f} vs {first[1]:.4f}): "
                        "the kernel does not keep the samples apart", **fields)
    return b.record(name, what, "ok", **fields)


def padding_kernel(cuda: bool) -> tuple[str | None, str | None]:
    """(the padding-free arm's attention implementation, why there is none)."""
    if cuda and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2", None  # train.py turns padding-free on by itself with it: nothing forced
    if cuda:
        why = varlen_kernel_available()
        return (None, f"no varlen attention kernel: flash_attn not importable and {why}") if why else (VARLEN, None)
    return "sdpa", None  # dry run: the path only (SDPA builds a block-diagonal mask: slow, finetune/batching.py)


def padding_fields(b, s, cfg, kernel, padded, flat) -> dict:
    """The padding measurement's figures from its two arms' runs: speed-up, padding, peaks, first-step losses."""
    forced = kernel != "flash_attention_2"
    fields = {"kernel": kernel, "forced": forced, "padding_free_taken": flat["stats"].get("padding_free"),
              "attn_implementation": flat["stats"].get("attn_implementation"),
              "padded_tokens_per_s": padded.get("tokens_per_s"), "tokens_per_s": flat.get("tokens_per_s"),
              "padding": padded.get("padding"), "padded_peak_gib": padded.get("peak_gib"),
              "peak_gib": flat.get("peak_gib"), "commands": [padded["command"], flat["command"]]}
    if padded.get("tokens_per_s") and flat.get("tokens_per_s"):
        fields["speedup"] = flat["tokens_per_s"] / padded["tokens_per_s"]
    first = [_first_loss(b.work / "log" / n) for n in (f"padded-{s}", f"padfree-{s}")]
    if None not in first:
        fields["first_loss"] = first
        fields["loss_rel_diff"] = abs(first[0] - first[1]) / max(abs(first[0]), 1e-9)
    if b.cuda:
        fields.update({k: v for k, v in mfu(cfg, "lora", flat.get("tokens"), flat.get("sq_tokens"),
                                            flat.get("seconds_measured"), b.peak).items() if k == "mfu"})
    fields["note"] = f"kernel {kernel}" + ("; padding-free forced (train.py pads unless flash-attention is "
                                           "loaded)" if forced else "")
    return fields


def qlora(b, shape):
    p = b.plan
    s = short(shape)
    name = f"qlora-{s}"
    what = f"QLoRA (NF4) vs bf16 LoRA peak memory, {shape} shape, -b {p['qlora_batch']} x {p['max_len']} " \
           f"tokens, gradient checkpointing"
    if not b.can_run(name, what, 80, missing("bitsandbytes")):
        return None
    folder, cfg = b.model(shape)
    extra = [*common(p, p["qlora_batch"], p["qlora_steps"]), "--no-unsloth", "--gradient-checkpointing"]
    lora_run = train(b, f"lora-gc-{s}", folder, b.data["fixed"], extra, warmup=1)
    if lora_run["rc"] != 0:
        return b.record(name, what, "failed", "bf16 LoRA: " + failed_reason(lora_run))
    q = train(b, name, folder, b.data["fixed"], [*extra, "--trainable", "qlora"], warmup=1)
    if q["rc"] != 0:
        return b.record(name, what, "failed", failed_reason(q), lora_peak_gib=lora_run["peak_gib"])
    fields = {"peak_gib": q["peak_gib"], "lora_peak_gib": lora_run["peak_gib"], "tokens_per_s": q.get("tokens_per_s"),
              "lora_tokens_per_s": lora_run.get("tokens_per_s"), "commands": [lora_run["command"], q["command"]]}
    if q["peak_gib"] and lora_run["peak_gib"]:
        fields["peak_ratio"] = q["peak_gib"] / lora_run["peak_gib"]
    if not b.cuda:
        fields["note"] = "CPU: peak = process RSS (imports included), not comparable"
    return b.record(name, what, "ok", **fields)


def grpo(b, vllm=False):
    p = b.plan
    name = "grpo-vllm" if vllm else "grpo"
    shape = p["grpo_shape"]
    what = f"GRPO steps/s, {shape} shape (random weights: every completion runs to --max-completion-len), " \
           f"-b {p['grpo_batch']}, {p['grpo_generations']} generations of {p['grpo_len']} tokens, " \
           f"{'vLLM colocated' if vllm else 'transformers'} generation"
    extra = ["--trainer", "grpo", "-p", ROOT / "prompts.json", "--num-generations", p["grpo_generations"],
             "-b", p["grpo_batch"], "--max-completion-len", p["grpo_len"], "--max-steps", p["grpo_steps"],
             "--rewards", "correct", "--lr", "2e-5", "--no-unsloth", "--save-steps", 100000, "--seed", 0,
             "--max-len", p["max_len"],
             *(["--vllm"] if vllm else [])]
    why = ("vLLM needs an NVIDIA GPU" if not b.cuda else missing("vllm")) if vllm else None
    if not b.can_run(name, what, 60 if vllm else 45, why, command=command(extra)):
        return None
    folder, _ = b.model(shape)
    run = train(b, name, folder, ROOT / "data/fortunes/train.jsonl", extra, warmup=1)
    if run["rc"] != 0:
        return b.record(name, what, "failed", failed_reason(run), command=run["command"])
    fields = {k: run.get(k) for k in ("steps_per_s", "steps_measured", "seconds_measured", "peak_gib", "wall_s",
                                      "command")}
    base = b.find("grpo")
    if vllm and base and base.get("steps_per_s") and run.get("steps_per_s"):
        fields["speedup"] = run["steps_per_s"] / base["steps_per_s"]
        fields["vs"] = "grpo"
    return b.record(name, what, "ok", **fields)


def auto_batch(b, shape):
    p = b.plan
    name = "auto-batch"
    what = f"--auto-batch-size finds a per-device batch, {shape} shape, --total-batch-size {p['auto_total']} at " \
           f"{p['max_len']} tokens, GPU memory capped at {p['auto_cap_gib']} GiB"
    extra = [*common(p, p["auto_total"], 1), "--total-batch-size", p["auto_total"],
             "--max-batch-size-per-device", p["auto_total"], "--auto-batch-size", "--no-unsloth"]
    why = None if b.cuda else "needs CUDA (without a GPU train.py warns and keeps -b)"
    if not b.can_run(name, what, 40, why, command=command(extra)):
        return None
    folder, _ = b.model(shape)
    run = train(b, name, folder, b.data["fixed"], extra, memory_gib=p["auto_cap_gib"], warmup=0)
    line = next((x for x in run["stdout"].splitlines() if x.endswith("(--auto-batch-size)")), None)
    if run["rc"] != 0 or line is None:
        return b.record(name, what, "failed", failed_reason(run) if run["rc"] else
                        "no '(--auto-batch-size)' batch line in train.py's output", command=run["command"])
    return b.record(name, what, "ok", batch=auto_batch_found(line), line=line, wall_s=run["wall_s"],
                    command=run["command"], peak_gib=run["peak_gib"])


def oom(b, shape):
    p = b.plan
    name = "oom"
    what = f"a forced out-of-memory (-b {p['oom_batch']} x {p['max_len']} tokens, {shape} shape, GPU memory " \
           f"capped at {p['oom_cap_gib']} GiB) ends in train.py's one-line message"
    extra = [*common(p, p["oom_batch"], 1), "--no-unsloth"]
    why = None if b.cuda else "needs CUDA (the message is for torch.OutOfMemoryError)"
    if not b.can_run(name, what, 30, why, command=command(extra)):
        return None
    folder, _ = b.model(shape)
    run = train(b, name, folder, b.data["fixed"], extra, memory_gib=p["oom_cap_gib"], warmup=0)
    ok, last = oom_ended_well(run["rc"], run["stderr"])
    return b.record(name, what, "ok" if ok else "failed",
                    None if ok else f"exit {run['rc']}, last line: {last[:300]!r}", message=last,
                    command=run["command"])


# ------------------------------------------------------------------------------------------------ parsers
def auto_batch_found(line: str) -> int:
    """The per-device batch of train.py's '(--auto-batch-size)' batch line."""
    return int(line.split(" x ")[1].split()[0])


def oom_ended_well(rc, stderr: str) -> tuple[bool, str]:
    """(train.py ended an out-of-memory as promised: exit 1, the last line its one-line message, no traceback;
    that last line)."""
    lines = [x for x in (stderr or "").splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    return rc == 1 and last.startswith("error: CUDA out of memory") and "Traceback" not in stderr, last


def _first_loss(run: Path):
    f = run / "train_log.jsonl"
    if not f.is_file():
        return None
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            return rec["loss"]
    return None


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
