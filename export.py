"""Export a training run for serving: a merged 16-bit model, a vLLM-ready adapter, or (with unsloth) a GGUF file.

    uv run export.py merge log/NAME -o merged/NAME                     # best/ adapter merged into the base, bf16
    uv run export.py merge log/NAME/checkpoint-40 -o merged/c40 --dtype float16
    uv run export.py merge log/NAME/latest -o merged/NAME --base path/to/base-model   # the base moved
    uv run export.py vllm log/NAME -o adapters/NAME                    # LoRA tensors only, for vLLM's loader
    uv run export.py gguf log/NAME -o gguf/NAME --quant q4_k_m          # needs unsloth and an NVIDIA GPU

RUN is log/NAME (its best/), or log/NAME/best, latest or checkpoint-N, or a merged export (it holds
finetune_run.json). OUT must not exist or be empty; it is written to OUT.tmp and renamed, so a crash never leaves
a half-written export.

merge: base model + adapter -> one standalone model (safetensors, --dtype bfloat16 by default) that plain
transformers loads (AutoModelForCausalLM, or AutoModelForImageTextToText for vision-language runs) and that gives
the greedy outputs of base + adapter. The tokenizer/processor is saved as it was used in training: EOS = the end-of-
turn token (run.json tokens.eos_token, e.g. <|im_end|>), the run's pad token, no EOS appended by the tokenizer, and
generation_config.json stops on the end-of-turn token. run.json is copied to OUT/finetune_run.json (provenance;
generate.py -c OUT reads it). QLoRA adapters are merged into the base loaded unquantised in --dtype, never into the
4-bit weights (rounding the merged weights back to 4 bits would lose the adapter). The merged model is then
base(16-bit) + adapter, which is close to, but not bit-identical with, what the 4-bit base gave during training.
A full fine-tune has nothing to merge: it is re-saved in --dtype with the same tokenizer settings.
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'merged/NAME')('Hi'))"
    vllm serve merged/NAME

vllm: vLLM's LoRA loader accepts lora_A / lora_B tensors only. Embedding / output-head copies (modules_to_save,
trainable_token_indices) are dropped when the vocabulary did not change (the base config's vocab_size covers the
tokenizer, and the run added no tokens), and adapter_config.json says so. The source folder is not touched.
    vllm serve BASE --enable-lora --lora-modules NAME=adapters/NAME
When the vocabulary changed (train.py --add-special-tokens) they are kept: the new tokens' rows exist only there, and
without them the new ids would read untrained rows (or rows the base does not have). vLLM cannot serve such an
adapter: every LoRA adapter shares the base model's vocabulary (per-adapter extra vocabulary, read from
new_embeddings.safetensors, was deprecated in 2025 and then removed), and its loader rejects modules_to_save ("vLLM
only supports modules_to_save being None") and trainable-token tensors. The folder stays a working PEFT adapter
(base grown to the tokenizer's length first, as modeling.load_for_inference does); for vLLM serve the merged model,
which has the new rows in its weights and the tokens in its tokenizer:
    uv run export.py merge log/NAME -o merged/NAME && vllm serve merged/NAME

gguf: only with unsloth on an NVIDIA GPU (uv sync --extra unsloth). Elsewhere: merge, then llama.cpp's converter:
    python llama.cpp/convert_hf_to_gguf.py merged/NAME --outfile model.gguf
A run that added tokens is merged first (as `merge` does, into OUT/merged) and that model is converted: the GGUF
holds the grown vocabulary and the trained rows.

Errors (no such run, no adapter, OUT not empty) print one line `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from modeling import ModelError  # light: modeling imports torch and transformers lazily
from runs import find_run, is_adapter

DTYPES = ("bfloat16", "float16", "float32")
LORA_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)(\.|$)")


class ExportError(ModelError):
    """A problem the user can fix: str(e) is the one line the CLI prints."""


def _prepare_out(out) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; choose another -o")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out) -> Path:
    out = Path(out)
    if out.exists():
        out.rmdir()  # empty (checked in _prepare_out)
    tmp.rename(out)
    return out


def inference_tokens(tokenizer, processor, cfg: dict):
    """The training-time EOS (= end of turn) and pad token, and no EOS appended when encoding a prompt."""
    tokens = cfg.get("tokens") or {}
    if tokens.get("eos_token"):
        tokenizer.eos_token = tokens["eos_token"]
    if tokens.get("pad_token"):
        tokenizer.pad_token = tokens["pad_token"]
    if getattr(tokenizer, "add_eos_token", False):
        # Llama-style tokenizers can append EOS to every encoded text: a prompt ending in EOS is a finished
        # conversation, so the model would answer with nothing
        tokenizer.add_eos_token = False
    if processor is not None:
        processor.tokenizer = tokenizer


def stop_on_end_of_turn(model, tokenizer):
    """generation_config: stop on the end-of-turn token (first), keep the model's other stop ids, pad as trained."""
    gc = model.generation_config
    old = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    eot = tokenizer.eos_token_id
    gc.eos_token_id = [eot] + [i for i in old if i is not None and i != eot]
    gc.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------------ merge
def merge(run, out, dtype: str = "bfloat16", base: str | None = None) -> Path:
    """Base + adapter -> OUT, a standalone model in `dtype` with the inference tokenizer settings."""
    import torch

    from modeling import ModelError, load_for_inference

    cfg, weights = find_run(run)
    if base:
        cfg = {**cfg, "model": base}
    tmp = _prepare_out(out)
    try:
        # load_for_inference never quantises: a QLoRA adapter is applied to the base loaded in `dtype` (16-bit)
        model, tokenizer, processor = load_for_inference(cfg, str(weights), dtype=getattr(torch, dtype))
        if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
            raise ExportError(f"{cfg['model']}: the base model is stored quantised; merging into it would round the "
                              "adapter away: pass --base with its 16-bit original")
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model = model.to("cpu", getattr(torch, dtype))  # merged in fp32 where the adapter is fp32: cast back
        inference_tokens(tokenizer, processor, cfg)
        stop_on_end_of_turn(model, tokenizer)
        model.save_pretrained(tmp)  # safetensors (the only format transformers 5 writes)
        (processor or tokenizer).save_pretrained(tmp)
        prov = {**cfg, "export": {"from": str(weights.resolve()), "dtype": dtype, "base": cfg["model"]}}
        (tmp / "finetune_run.json").write_text(json.dumps(prov, indent=2))
    except ModelError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)


# ------------------------------------------------------------------------------------------------ vLLM adapter
def vllm_adapter(run, out, say=print) -> Path:
    """Copies the adapter to OUT keeping only LoRA tensors, unless the vocabulary grew (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    cfg, weights = find_run(run)
    if not is_adapter(weights):
        raise ExportError(f"{weights}: a full model, not a LoRA adapter: serve it directly (vllm serve {weights})")
    st = weights / "adapter_model.safetensors"
    if not st.is_file():
        raise ExportError(f"{weights}: no adapter_model.safetensors (re-save the adapter with safetensors)")
    tensors = load_file(str(st))
    acfg = json.loads((weights / "adapter_config.json").read_text())
    extra = sorted(k for k in tensors if not LORA_TENSOR.search(k))
    tmp = _prepare_out(out)
    try:
        for f in weights.iterdir():  # tokenizer, chat template, run.json, README: unchanged
            if f.is_file() and f.name not in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(f, tmp / f.name)
        if extra:
            base_vocab, tok_len = _vocab_sizes(cfg, weights)
            rows = {tensors[k].shape[0] for k in extra if "token_adapter" not in k and tensors[k].dim() == 2}
            added = (cfg.get("tokens") or {}).get("added_tokens") or []  # new ids may fill a padded matrix's spare rows
            grown = tok_len > base_vocab or any(r > base_vocab for r in rows) or bool(added)
            names = sorted({_module_name(k) for k in extra})
            if grown:
                say(f"note: the vocabulary grew ({base_vocab} tokens in the base config, {tok_len} in the tokenizer"
                    + (f"; added {', '.join(added)}" if added else "") + f"): kept the {', '.join(names)} weights, "
                    "which hold the new tokens' rows. vLLM cannot load this adapter: its LoRA adapters share the "
                    "base vocabulary (extra-vocabulary support was removed) and it rejects non-LoRA tensors. "
                    f"For vLLM serve the merged model: uv run export.py merge {run} -o MERGED && vllm serve MERGED "
                    "(this folder stays a PEFT adapter for a base grown to the tokenizer's length)")
            else:
                for k in extra:
                    del tensors[k]
                acfg["modules_to_save"] = None
                acfg["trainable_token_indices"] = None
                say(f"dropped {len(extra)} non-LoRA tensors ({', '.join(names)}): vLLM's LoRA loader accepts "
                    "lora_A/lora_B only and the vocabulary is unchanged; any training of those weights is lost "
                    "(the merged model keeps it)")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)


def _module_name(key: str) -> str:
    parts = key.split(".")
    return next((p for p in reversed(parts) if p not in ("weight", "bias", "trainable_tokens_delta", "token_adapter",
                                                         "modules_to_save", "default")), key)


def _vocab_sizes(cfg, weights) -> tuple[int, int]:
    """(the base model config's vocab_size, the saved tokenizer's length)."""
    from modeling import ModelError, load_config, load_processing

    try:
        conf = load_config(cfg["model"], cfg.get("trust_remote_code", False))
        tokenizer, _ = load_processing(cfg["model"], cfg.get("vision", False), cfg.get("trust_remote_code", False),
                                       tokenizer_from=str(weights))
    except (ModelError, OSError) as e:
        raise ExportError(f"{cfg['model']}: cannot read the base model's vocabulary ({e})") from None
    return conf.get_text_config().vocab_size, len(tokenizer)


# ------------------------------------------------------------------------------------------------ GGUF
def gguf(run, out, quant: str = "q4_k_m") -> Path:
    """GGUF through unsloth (which builds llama.cpp itself); only where unsloth can run."""
    import importlib.util

    cfg, weights = find_run(run)
    if importlib.util.find_spec("unsloth") is None or not _cuda():
        raise ExportError("GGUF export needs unsloth and an NVIDIA GPU (uv sync --extra unsloth); here, merge and "
                          f"convert with llama.cpp: uv run export.py merge {run} -o MERGED && python "
                          "llama.cpp/convert_hf_to_gguf.py MERGED --outfile model.gguf")
    import unsloth  # noqa: F401  (patches transformers: import it before any model is built)
    from unsloth import FastLanguageModel, FastVisionModel

    loader = FastVisionModel if cfg.get("vision") else FastLanguageModel
    source = weights
    if (cfg.get("tokens") or {}).get("added_tokens") and is_adapter(weights):
        # the adapter's token rows index a grown matrix that unsloth's loader would not build: convert the merge
        source = merge(run, Path(out) / "merged", dtype="bfloat16")
    model, tok = loader.from_pretrained(model_name=str(source), load_in_4bit=False)  # 16-bit base + adapter
    tokenizer = getattr(tok, "tokenizer", tok)
    inference_tokens(tokenizer, tok if tok is not tokenizer else None, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained_gguf(str(out), tok, quantization_method=quant)
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ CLI
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the adapter into the base: a standalone 16-bit model")
    v = sub.add_parser("vllm", help="an adapter vLLM's LoRA loader accepts")
    g = sub.add_parser("gguf", help="a GGUF file (needs unsloth and an NVIDIA GPU)")
    for s in (m, v, g):
        s.add_argument("run", help="log/NAME (its best/), or log/NAME/best|latest|checkpoint-N")
        s.add_argument("-o", "--output", required=True, help="output folder (must not exist, or be empty)")
    m.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default bfloat16)")
    m.add_argument("--base", help="base model to merge into (default: run.json's model)")
    g.add_argument("--quant", default="q4_k_m", help="llama.cpp quantisation: q4_k_m (default), q8_0, f16, ...")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            out = merge(args.run, args.output, args.dtype, args.base)
        elif args.command == "vllm":
            out = vllm_adapter(args.run, args.output)
        else:
            out = gguf(args.run, args.output, args.quant)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
