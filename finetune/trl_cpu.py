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


class TorchChunkedLogProb:
    """Same call and outputs as trl.kernels.ChunkedLogProbFunction.apply; autograd does the backward. `chunk_size` is
    the kernel's vocabulary tile width: taken for the same signature, unused, as each block of ROWS_PER_CHUNK tokens
    gets one full-vocabulary log-softmax here."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        import torch

        parts = {k: [] for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        for start in range(0, hidden.shape[0], ROWS_PER_CHUNK):
            h, t = hidden[start:start + ROWS_PER_CHUNK], targets[start:start + ROWS_PER_CHUNK]
            z = torch.nn.functional.linear(h, weight, bias).float() * logit_scale
            if final_logit_softcapping is not None:
                z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
            z = z / temperature
            logp = torch.log_softmax(z, -1)
            parts["log_probs"].append(logp.gather(-1, t[:, None])[:, 0])
            if "entropy" in outputs:
                parts["entropy"].append(-(logp.exp() * logp).sum(-1))
            if "log_sum_sq_probs" in outputs:
                parts["log_sum_sq_probs"].append(torch.logsumexp(2 * logp, -1).detach())
            if "mean_logits" in outputs:
                parts["mean_logits"].append(z.mean(-1).detach())
            if "is_top1" in outputs:
                parts["is_top1"].append(z.argmax(-1) == t)
        return tuple(torch.cat(v) if v else (None if k != "log_probs" else hidden.new_zeros(0))
                     for k, v in parts.items())


def install():
    """Use the torch stand-in when no CUDA device is present (the only place TRL's kernel can run)."""
    import torch

    if torch.cuda.is_available():
        return
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError("this TRL version has no _ChunkedLogProbFunction: update finetune/trl_cpu.py for it")
    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb
