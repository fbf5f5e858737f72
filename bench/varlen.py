"""Padding-free attention on torch's own variable-length flash kernel, for bench/gpu.py's padding-free arm.

train.py flattens batches (one row, position_ids restarting at each sample, no mask) only when flash-attention is
loaded; the GPU image has no flash_attn. This module gives transformers an attention function on
torch.nn.attention.varlen.varlen_attn (CUDA) under the name VARLEN: register_varlen() in the training process, and
a model whose config asks for attn_implementation=VARLEN attends within each sample, as flash-attention's varlen
kernel does for train.py when flash_attn is installed.

Torch and transformers are imported when a function needs them: the parent bench process only reads VARLEN.
"""
from __future__ import annotations

import importlib.util
import inspect

VARLEN = "finetune_varlen"  # the name the kernel is registered under, as an attention and a mask implementation


def varlen_attention(kernel=None):
    """A transformers attention function for padding-free batches on torch's varlen flash kernel (`kernel`
    replaces it: tests). Both of its signatures are handled: (..., is_causal=) in torch 2.10/2.11,
    (..., window_size=(-1, 0)) later."""
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
    """Makes VARLEN an attention implementation transformers models can ask for (this process only)."""
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
