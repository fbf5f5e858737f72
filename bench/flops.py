"""Model FLOPs and MFU for bench/gpu.py: how many FLOPs a trained token costs, and what share of the device's peak
a measured rate is.

MFU conventions (model FLOPs over the device's dense bf16 peak; attention counted as in PaLM, appendix B):
  full fine-tuning    6N + 12 L d T per token       (forward 2N, backward 4N)
  LoRA / QLoRA        4N + 6 N_lora + 12 L d T      (the frozen weights get no weight gradient: forward 2N and the
                                                     input gradient 2N; the adapters train in full)
  N = the weights of every matmul (attention and MLP projections, the LM head; not the embedding lookup), L layers,
  d = heads x head size, T = the sample's length. `mfu_6n` gives the 6N figure for LoRA runs too: some LoRA
  reports use it, and it reads 1.5x higher on the linear part.

The device's peak comes from its name (PEAKS: dense bf16 tensor-core figures); gpu.py's --peak-tflops overrides it.
"""
from __future__ import annotations

# dense bf16 tensor-core peaks (TFLOP/s) by device name, the more specific names first ("H100 PCIe" before "H100")
PEAKS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0),
         ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("B200", 2250.0)]

# the conventions above, as gpu.json states them next to the figures
CONVENTIONS = {
    "mfu_full": "6N + 12 L d T FLOPs per token (PaLM appendix B), over the dense bf16 peak",
    "mfu_lora": "4N + 6 N_lora + 12 L d T per token: frozen weights get forward and input-gradient FLOPs only",
    "mfu_6n": "LoRA runs counted as full fine-tuning (6N + 12 L d T): the figure some LoRA reports give",
    "N": "weights of every matmul: attention and MLP projections and the LM head (not the embedding lookup)",
}


def device_peak(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a CUDA device by its name, None for one not in PEAKS."""
    return next((v for k, v in PEAKS if k in device_name), None)


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
