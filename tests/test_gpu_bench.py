"""bench/gpu.py: the GPU measurement proves itself on CPU (--dry-run) before any GPU sees it, and the pieces a
dry run cannot reach (the varlen attention kernel of bench/varlen.py, the FLOP counts of bench/flops.py, the
out-of-memory and auto-batch parsers of bench/gpu_measure.py) are checked here against references and against
train.py's own messages, and the token counters of bench/harness.py (probe.py's too) on batches of known lengths."""
import argparse
import json
import sys

import pytest

from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "bench"))
import flops  # noqa: E402
import gpu_measure  # noqa: E402
import gpu_setup  # noqa: E402
import harness  # noqa: E402
import varlen  # noqa: E402

GPU_ONLY = {"unsloth-tiny-qwen2": "NVIDIA GPU", "grpo-vllm": "NVIDIA GPU", "auto-batch": "CUDA", "oom": "CUDA"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    proc = run_cli("bench/gpu.py", "--dry-run", "--out", out, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu.json").read_text()), proc.stdout


def test_dry_run_runs_every_path(dry_run):
    out, doc, stdout = dry_run
    results = {r["name"]: r for r in doc["results"]}
    assert set(results) == {"lora-tiny-qwen2", "padding-tiny-qwen2", "qlora-tiny-qwen2", "grpo", *GPU_ONLY}, results
    failed = {n: r.get("reason") for n, r in results.items() if r["status"] == "failed"}
    assert not failed, failed
    for name, needs in GPU_ONLY.items():  # stopped where the device is needed, saying so, with the command built
        assert results[name]["status"] == "skipped" and needs in results[name]["reason"], results[name]
        assert results[name]["command"].startswith("python train.py"), results[name]
    lora = results["lora-tiny-qwen2"]
    assert lora["status"] == "ok" and lora["tokens_per_s"] > 0 and lora["steps_measured"] >= 1
    assert lora["command"].startswith("python train.py -m ") and "--no-unsloth" in lora["command"]
    assert lora["train_py_says"].startswith("throughput:")
    pad = results["padding-tiny-qwen2"]
    assert pad["status"] == "ok" and pad["padding_free_taken"] is True and pad["forced"] is True
    assert pad["speedup"] > 0 and pad["padding"] > 0  # the padded arm padded; the flat arm did not
    assert pad["loss_rel_diff"] < 1e-3  # same samples, same first loss: the flat batch keeps them apart
    q = results["qlora-tiny-qwen2"]
    assert q["status"] == "ok" and q["peak_ratio"] > 0  # bitsandbytes' 4-bit base trains on CPU too
    assert results["grpo"]["status"] == "ok" and results["grpo"]["steps_per_s"] > 0
    assert [t["metric"] for t in doc["targets"]] == ["mfu", "peak_ratio", "speedup", "speedup"]
    assert doc["machine"]["versions"]["trl"] and doc["conventions"]["mfu_lora"].startswith("4N")
    table = (out / "gpu.md").read_text()
    assert "| lora-tiny-qwen2 | ok |" in table and "| oom | skipped |" in table and "| target |" in table


def test_varlen_attention_keeps_samples_apart():
    """The padding-free kernel wrapper (GPU: torch's varlen flash kernel) on a reference kernel: one flattened row
    of three samples gives each sample's own causal attention, grouped-query heads included, for both of the
    kernel's signatures."""
    import torch
    import torch.nn.functional as F

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, **kw):  # (tokens, heads, dim), one SDPA per segment
        assert kw.get("is_causal") is True or kw.get("window_size") == (-1, 0)
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                               scale=kw.get("scale"))
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    def new_api(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        return reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        return reference(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)

    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 3, 7], 4, 2, 8
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim)
    k, v = torch.randn(1, kv_heads, total, dim), torch.randn(1, kv_heads, total, dim)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    expected, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        kk, vv = (t[:, :, s].repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        expected.append(F.scaled_dot_product_attention(q[:, :, s], kk, vv, is_causal=True).transpose(1, 2))
        start += n
    expected = torch.cat(expected, dim=1)
    for kernel in (new_api, old_api):
        out, weights = varlen.varlen_attention(kernel)(None, q, k, v, None, scaling=dim ** -0.5, position_ids=pos)
        assert weights is None and out.shape == (1, total, heads, dim)
        torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="one padding-free row"):
        varlen.varlen_attention(new_api)(None, q.expand(2, -1, -1, -1), k, v, None, position_ids=pos)


def test_varlen_attention_plugs_into_transformers():
    """Registered as an attention implementation, a Qwen2 model on one flattened row (position_ids restarting per
    sample, no mask: TRL's padding-free batch) gives the logits of each sample run alone through SDPA."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and q.is_contiguous()
        calls.append(cu_q.tolist())
        outs = [torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale).transpose(0, 1)
            for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True)]
        return torch.cat(outs)

    varlen.register_varlen(kernel)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    samples = [torch.randint(0, 64, (n,)) for n in (5, 9, 3)]
    with torch.no_grad():
        alone = torch.cat([model(s.unsqueeze(0)).logits[0] for s in samples])
        model.config._attn_implementation = varlen.VARLEN
        flat = model(torch.cat(samples).unsqueeze(0),
                     position_ids=torch.cat([torch.arange(len(s)) for s in samples]).unsqueeze(0)).logits[0]
    torch.testing.assert_close(flat, alone, rtol=1e-4, atol=1e-4)
    assert calls == [[0, 5, 14, 17]] * 2  # one call per layer, the samples' boundaries from position_ids


def test_flops_match_the_published_parameter_counts():
    """N (every matmul's weights, the tied LM head counted once as a matmul) equals the published totals of
    Qwen2.5-0.5B (0.49B) and -1.5B (1.54B) to within their biases; LoRA counts 4N + 6 N_lora."""
    for shape, published in (("qwen2.5-0.5b", 0.494e9), ("qwen2.5-1.5b", 1.544e9)):
        cfg = json.loads((gpu_setup.SHAPES / f"{shape}.json").read_text())
        f = flops.flops_per_token(cfg, "lora")
        assert abs(f["n"] - published) / published < 0.01, (shape, f["n"])
        assert f["linear"] == 4 * f["n"] + 6 * f["n_lora"] and f["linear_6n"] == 6 * f["n"]
        assert flops.flops_per_token(cfg, "full")["linear"] == 6 * f["n"]
        assert f["attention"] == 12 * cfg["num_hidden_layers"] * cfg["hidden_size"]
    cfg = json.loads((gpu_setup.SHAPES / "qwen2.5-1.5b.json").read_text())
    m = flops.mfu(cfg, "lora", tokens=1000, sq_tokens=1000 * 2048, seconds=1.0, peak_tflops=1.0)
    f = flops.flops_per_token(cfg, "lora")
    assert m["mfu"] == pytest.approx((f["linear"] * 1000 + f["attention"] * 1000 * 2048) / 1e12)
    assert m["mfu_6n"] > m["mfu"]


def test_parsers_read_train_py_own_messages():
    """The oom and auto-batch checks parse train.py's real messages (guards.oom_message, training.batch_line)."""
    from finetune import guards, training

    args = argparse.Namespace(batch_size=64, max_len=2048, trainable="lora", split_model=False, lr=2e-4,
                              grad_accum=4, total_batch_size=32)
    message = "error: " + guards.oom_message(args, (64, 2048))
    assert gpu_measure.oom_ended_well(1, "loading...\n" + message + "\n") == (True, message)
    assert not gpu_measure.oom_ended_well(1, "Traceback (most recent call last):\n...\n" + message)[0]
    assert not gpu_measure.oom_ended_well(0, message)[0]
    args.batch_size, args.grad_accum = 8, 4
    assert gpu_measure.auto_batch_found(training.batch_line(args) + " (--auto-batch-size)") == 8


def test_steady_rate_skips_warmup_steps():
    stats = {"counted": True, "tokens": 400, "processed": 500,
             "steps": [[0.0, 0, 0, None], [5.0, 100, 0, None], [6.0, 200, 0, None], [7.0, 300, 0, None],
                       [8.0, 400, 0, None]]}
    s = gpu_measure.steady(stats, warmup=1)
    assert s["tokens_per_s"] == pytest.approx(100.0) and s["steps_measured"] == 3 and s["padding"] == pytest.approx(0.2)
    assert gpu_measure.steady({"steps": [[0.0, 0, 0, 0]]}, 1) == {}


def test_harness_counts_padded_and_padding_free_batches_alike():
    """The counters gpu.py's and probe.py's runs share: the same three samples, padded to the longest or flattened
    into one padding-free row, count the same real tokens and squared lengths; only the processed positions differ."""
    import torch

    lengths = [5, 3, 7]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    padded, flat = harness.new_stats(), harness.new_stats()
    harness.count_batch(padded, {"input_ids": torch.zeros(3, 7, dtype=torch.long), "attention_mask": mask})
    harness.count_batch(flat, {"input_ids": torch.zeros(1, 15, dtype=torch.long),
                               "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)})
    for stats, processed in ((padded, 21), (flat, 15)):
        assert (stats["tokens"], stats["sq_tokens"], stats["processed"], stats["counted"]) == (15, 83, processed, True)
    assert [harness.exit_code(c) for c in (None, 0, 3)] == [0, 0, 3]
