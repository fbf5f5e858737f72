"""Parity of an export with the run it came from: does the exported model answer as base + adapter did?

export.py runs this after every export (merge, vllm, gguf) and `export.py check OUT` runs it on an export made
earlier. Each export is reloaded the way its consumer loads it:

    merge  the merged folder through plain transformers (AutoModelForCausalLM, the dtype it was saved in)
    vllm   the exported adapter on the base, through PEFT (the lora_A / lora_B tensors vLLM's loader reads)
    gguf   the .gguf file through transformers' GGUF loader (it dequantises the llama.cpp tensors)

and compared with the reference, base + adapter as eval.py and generate.py load it (float32 on a CPU), on the first
N prompts of the run's validation data (its training data when it had none; --check-data FILE to choose): the
number of prompts whose greedy answers are identical, token for token, and the largest logit difference over the
prompt and the reference answer. One line is printed and OUT/parity.json keeps it:

    parity: 16/16 greedy identical, max |dlogit| 0.004 (merge float32, 16 validation prompts)

Below --min-identical (a fraction of the prompts, default 0.9) export.py exits with status 1: the export is kept
for inspection, and the line says what to try (a bf16 merge of a float32 run is the usual cause).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dataset import DataError, Formatter, RVL_CDIP_CLASSES, load_prompts, load_rvl_cdip
from finetune import runs, sources
from finetune.errors import ModelError
from finetune.modeling import load_base, load_for_inference, load_processing, model_class, setup_tokens


def prompt_samples(cfg: dict, data: str | None, n: int):
    """The first n samples of the validation data (else the training data), text only: what the check prompts."""
    need_q = not cfg.get("response_template")
    try:
        prompts = load_prompts(cfg.get("prompts"))
        if data:
            samples = sources.load_samples(data, prompts, require_answer=False, require_question=need_q,
                                           allow_outside=True, columns=cfg.get("columns"))
        elif cfg.get("validation_data") or cfg.get("train_data"):
            src = cfg.get("validation_data") or cfg["train_data"]
            samples = sources.load_samples(src, prompts, require_answer=False, require_question=need_q,
                                           allow_outside=True, columns=cfg.get("columns"))
        elif cfg.get("data"):
            classes = cfg.get("classes") or RVL_CDIP_CLASSES
            samples = load_rvl_cdip(cfg["data"], "validation", classes, cfg.get("suffix") or "_aws", prompts, need_q,
                                    True) or load_rvl_cdip(cfg["data"], "train", classes, cfg.get("suffix") or "_aws",
                                                           prompts, need_q, True)
        else:
            raise ModelError("the run names no data to check on: give --check-data FILE (or --no-check)")
    except DataError as e:
        raise ModelError(f"parity check data: {e} (give --check-data FILE, or --no-check)") from None
    if not samples:
        raise ModelError("parity check: no samples in the data (give --check-data FILE, or --no-check)")
    # images are left out: the check is about the language model's weights, which text prompts exercise
    return [dataclasses.replace(s, image=None) for s in samples[:n]], prompts


def compare(reference, candidate, prompt_ids: list[list[int]], eos_id, pad_id, max_new: int) -> dict:
    """Greedy answers of both models and the largest |logit difference| over prompt + reference answer."""
    import torch

    same, worst = 0, 0.0
    device = next(reference.parameters()).device
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            kw = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
            ref = reference.generate(x, **kw)[0]
            cand = candidate.generate(x.to(next(candidate.parameters()).device), **kw)[0].to(device)
            same += bool(ref.shape == cand.shape and torch.equal(ref, cand))
            full = ref[None]
            a = reference(full).logits.float()
            b = candidate(full.to(next(candidate.parameters()).device)).logits.float().to(device)
            worst = max(worst, (a - b).abs().max().item())
    return {"identical": same, "prompts": len(prompt_ids), "max_abs_dlogit": worst}


def load_candidate(kind: str, out: Path, cfg: dict):
    """The export, reloaded as its consumer loads it (see the module docstring)."""
    if kind == "merge":
        return model_class(cfg.get("vision")).from_pretrained(out).eval()  # the dtype it was saved in
    if kind == "vllm":
        model, _, _ = load_for_inference(cfg, str(out))
        return model
    ggufs = sorted(out.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelError(f"{out}: expected one .gguf file, found {len(ggufs)}")
    import torch

    return load_base(str(ggufs[0]), False, torch.float32).eval()


def gguf_prompt_ids(out: Path, cfg: dict, prompts: dict, samples) -> list[list[int]]:
    """The prompts as the GGUF's tokenizer (transformers' GGUF loader, with the run's token settings) encodes them."""
    tokenizer, _ = load_processing(str(next(out.glob("*.gguf"))), False)
    setup_tokens(tokenizer, None, cfg.get("response_template"), cfg.get("set_pad_token"),
                 cfg.get("add_special_tokens"))
    fmt = Formatter(tokenizer, None, cfg.get("response_template"), cfg.get("max_len") or 1024, prompts)
    return [fmt.prompt_ids(s) for s in samples]


def check(out, data: str | None = None, n: int = 16, max_new: int = 32, say=print) -> dict:
    """Compares the export in OUT with base + adapter of the run it came from; writes OUT/parity.json."""
    out = Path(out)
    prov = runs.export_config(out) if out.is_dir() else None
    if prov is None:
        raise ModelError(f"{out}: not an export of export.py (no {runs.EXPORT_CONFIG})")
    export = prov.get("export") or {}
    source = export.get("from")
    if not source or not Path(source).is_dir():
        raise ModelError(f"{out}: the run it was exported from ({source}) is gone: nothing to compare with")
    cfg, weights = runs.find_run(source)
    samples, prompts = prompt_samples(cfg, data, n)
    reference, tokenizer, processor = load_for_inference(cfg, str(weights))
    fmt = Formatter(tokenizer, processor, cfg.get("response_template"), cfg.get("max_len") or 1024, prompts)
    prompt_ids = [fmt.prompt_ids(s) for s in samples]
    candidate = load_candidate(export.get("kind", "merge"), out, cfg)
    result = compare(reference, candidate, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new)
    if export.get("kind") == "gguf":  # eval.py -m model.gguf tokenises with the GGUF's own tokenizer: same ids?
        result["tokenizer_identical"] = sum(a == b for a, b in zip(prompt_ids, gguf_prompt_ids(out, cfg, prompts,
                                                                                            samples)))
    what = export.get("kind", "merge") + (f" {export['dtype']}" if export.get("dtype") else "") + \
        (f" {export['quant']}" if export.get("quant") else "")
    source_name = "validation" if not data and cfg.get("validation_data") else "check" if data else "training"
    result["line"] = (f"parity: {result['identical']}/{result['prompts']} greedy identical, max |dlogit| "
                      f"{result['max_abs_dlogit']:.3g}"
                      + (f", tokenizer identical on {result['tokenizer_identical']}/{result['prompts']}"
                         if "tokenizer_identical" in result else "")
                      + f" ({what}, {result['prompts']} {source_name} prompts)")
    (out / "parity.json").write_text(json.dumps(result, indent=2))
    say(result["line"])
    return result


def verdict(result: dict, min_identical: float) -> str | None:
    """None when the export passes, else the one line to print."""
    if result["identical"] >= min_identical * result["prompts"] - 1e-9:
        return None
    return (f"parity below --min-identical {min_identical}: {result['identical']}/{result['prompts']} answers "
            "unchanged by the export (a 16-bit merge of a float32 run changes answers: try --dtype float32; a "
            "quantised GGUF: try --quant f16); the export is kept, inspect or delete it")
