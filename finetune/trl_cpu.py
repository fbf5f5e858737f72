"""TRL 1.x without a GPU: a plain-torch stand-in for its Triton log-probability kernel.

Every TRL 1.x trainer (SFT, GRPO, DPO) computes per-token log-probabilities through a "fused LM head" that calls
`trl.trainer.utils._ChunkedLogProbFunction`, a Triton kernel. Triton needs a GPU driver: on CPU it fails with
"RuntimeError: 0 active drivers". TRL has no switch to turn the fused head off (TRL issue #7244 plans a torch
fallback), so on machines without CUDA we replace that one symbol with the same computation in torch, chunked over
tokens. Nothing changes on a GPU. `install()` is idempotent; tests/test_rl.py checks it against a direct
log-softmax.
"""
from __future__ import annotations

ROWS_PER_CHUNK = 1024  # tokens whose [rows, vocab] logits are materialised at once
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _chunk(h, t, weight, bias, temperature, softcap, logit_scale, outputs):
    """Every output for one block of tokens, from its hidden states: the [rows, vocab] logits live only in here."""
    import torch

    z = torch.nn.functional.linear(h, weight, bias).float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    out = [logp.gather(-1, t[:, None])[:, 0]]
    if "entropy" in outputs:
        out.append(-(logp.exp() * logp).sum(-1))
    if "log_sum_sq_probs" in outputs:
        out.append(torch.logsumexp(2 * logp, -1).detach())
    if "mean_logits" in outputs:
        out.append((z / temperature).mean(-1).detach())
    if "is_top1" in outputs:
        out.append(z.argmax(-1) == t)
    return tuple(out)


class TorchChunkedLogProb:
    """Same call and outputs as trl.kernels.ChunkedLogProbFunction.apply. `chunk_size` is the kernel's vocabulary
    tile width: taken for the same signature, unused, as each block of ROWS_PER_CHUNK tokens gets one
    full-vocabulary log-softmax here.

    recompute (install's choice, from the run's plan): like the kernel, keep no logits for the backward pass: each
    block runs under activation checkpointing and is recomputed there (one more [rows, hidden] x [hidden, vocab]
    product per block, against the ~3 fp32 [tokens, vocab] tensors autograd would hold: 1.8 GiB for 8 x 400 tokens
    of a 49k-token vocabulary). Off, autograd keeps them and the head runs once: the faster choice when the run
    fits in memory without it (on a small model with a large vocabulary the head is most of the compute)."""
    recompute = True

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        import torch
        from torch.utils.checkpoint import checkpoint

        wanted = [k for k in OUTPUTS if k == "log_probs" or k in outputs]
        parts = {k: [] for k in wanted}
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        for start in range(0, hidden.shape[0], ROWS_PER_CHUNK):
            h, t = hidden[start:start + ROWS_PER_CHUNK], targets[start:start + ROWS_PER_CHUNK]
            args = (h, t, weight, bias, temperature, final_logit_softcapping, logit_scale, outputs)
            recompute = grad and TorchChunkedLogProb.recompute
            got = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
            for k, v in zip(wanted, got):
                parts[k].append(v)
        return tuple(torch.cat(parts[k]) if k in parts and parts[k] else
                     (hidden.new_zeros(0) if k == "log_probs" else None) for k in OUTPUTS)


def install(recompute: bool = True):
    """Use the torch stand-in when no CUDA device is present (the only place TRL's kernel can run); recompute: see
    TorchChunkedLogProb."""
    import torch

    if torch.cuda.is_available():
        return
    TorchChunkedLogProb.recompute = recompute
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError("this TRL version has no _ChunkedLogProbFunction: update finetune/trl_cpu.py for it")
    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb
