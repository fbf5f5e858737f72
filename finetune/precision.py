"""Precision: every dtype decision of training, inference and export, from one rule.

    training   --mixed-precision auto: bf16 where the GPU has it, fp16 on older GPUs; on a CPU with bf16
               instructions (AVX512-BF16, AMX) bf16 autocast for LoRA runs and for runs that checkpoint, else
               float32 (resolve, cpu_choice). The frozen base of a LoRA run sits in that 16-bit dtype, on a GPU and
               on such a CPU alike (training_dtype: no weight casts at every layer, half the weight memory), with the
               trainable weights in float32 (float32_trainable); full fine-tuning keeps float32 master weights
               under autocast, and a CPU's QLoRA computes in float32 (bench/precision_probe.py measured the CPU
               settings; docs/benchmarks.md, precision on a CPU).
    run.json   "precision" (the resolved choice) and "weights_dtype" (training_dtype's name), which export.py
               merges in (export_dtype; runs written before weights_dtype existed: from "precision").
    inference  eval.py / generate.py / parity: bf16 on a GPU that has it; on a CPU the run's weights_dtype where
               it is bfloat16 and the CPU has bf16 instructions (the base weights validation saw), else float32;
               --mixed-precision overrides (inference_dtype).

Only this module turns a choice into a dtype; torch is imported inside the functions so that --help stays fast.
"""
from __future__ import annotations

from finetune import launch

CHOICES = ("auto", "bf16", "fp16", "no")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


def resolve(choice: str) -> str:
    """'bf16', 'fp16' or 'no': --mixed-precision auto is bf16 where the GPU has it, fp16 on older GPUs, off on a
    CPU (train.py first resolves it with cpu_choice)."""
    import torch

    if choice != "auto":
        return choice
    if launch.device_kind() != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cpu_choice(choice: str, gradient_checkpointing: bool, trainable: str = "full") -> str:
    """--mixed-precision auto on a CPU with bf16 instructions (AVX512-BF16, AMX): bf16 for LoRA runs (a bf16 base,
    training_dtype) and for other runs that checkpoint (autocast over float32 weights); else float32. A bf16 base
    is faster and smaller than float32 on every measured shape; autocast over float32 weights casts every weight
    at every layer, which on short batches costs more than bf16 saves, so without a bf16 base it follows
    checkpointing (long batches gain from it)."""
    if choice != "auto" or launch.device_kind() != "cpu":
        return choice
    return "bf16" if (gradient_checkpointing or trainable == "lora") and cpu_has_bf16() else "no"


def cpu_has_bf16() -> bool:
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def trainer_flags(choice: str) -> dict:
    """TrainingArguments' bf16 / fp16 (autocast) for a --mixed-precision choice."""
    prec = resolve(choice)
    return {"bf16": prec == "bf16", "fp16": prec == "fp16"}


def training_dtype(trainable: str, choice: str):
    """The dtype the weights are loaded in for training. LoRA weights train in float32 anyway (float32_trainable);
    the frozen base sits in bf16/fp16 on a GPU and in bf16 on a CPU. Full fine-tuning keeps float32 master weights
    and lets autocast run the matmuls in 16 bits; a CPU's QLoRA keeps float32 (its compute dtype)."""
    import torch

    prec = resolve(choice)
    cpu = launch.device_kind() == "cpu"
    if trainable == "full" or prec == "no" or (cpu and (trainable != "lora" or prec != "bf16")):
        return torch.float32
    return torch.bfloat16 if prec == "bf16" else torch.float16


def float32_trainable(model) -> None:
    """The trainable weights of a model with a 16-bit base in float32 on a CPU (PEFT upcasts LoRA's own, not a
    classifier head or token rows it trains in full): AdamW's updates on 16-bit weights would round away."""
    import torch

    if launch.device_kind() != "cpu":
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def weights_dtype(trainable: str, choice: str) -> str:
    """training_dtype's name ("float32", "bfloat16"): what run.json records and export.py merges in."""
    return str(training_dtype(trainable, choice)).removeprefix("torch.")


def describe(trainable: str, choice: str) -> str:
    """The model line's words: 'float32 (no mixed precision)' or 'bf16 mixed precision (float32 weights)'."""
    prec = resolve(choice)
    if prec == "no":
        return "float32 (no mixed precision)"
    return f"{prec} mixed precision ({weights_dtype(trainable, choice)} weights)"


def inference_dtype(choice: str | None = None, run_config: dict | None = None):
    """Scoring and generation: --mixed-precision when given (bf16, fp16, no = float32), else bf16 on a GPU that
    has it; on a CPU the run's weights_dtype where it is bfloat16 and the CPU has bf16 instructions (the run
    trained and validated on that base), else float32."""
    import torch

    if choice in (None, "auto"):
        if launch.device_kind() == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        bf16_run = (run_config or {}).get("weights_dtype") == "bfloat16" and cpu_has_bf16()
        return torch.bfloat16 if bf16_run else torch.float32
    return getattr(torch, DTYPE_NAMES[choice])


def export_dtype(run_config: dict) -> str:
    """The dtype a merge is written in by default: the dtype of the run's base weights, or a QLoRA run's compute
    dtype (run.json "weights_dtype": training_dtype's name); a run.json without it names its
    resolved precision ("precision", else the flag "mixed_precision"): no -> float32, bf16 / fp16 -> 16 bits.
    An unresolved 'auto' becomes float32, which loses nothing."""
    if run_config.get("weights_dtype"):
        return run_config["weights_dtype"]
    prec = run_config.get("precision") or run_config.get("mixed_precision")
    return {"bf16": "bfloat16", "fp16": "float16"}.get(prec, "float32")


def torch_dtype(name: str):
    """'bfloat16' -> torch.bfloat16 (export's --dtype names)."""
    import torch

    return getattr(torch, name)
