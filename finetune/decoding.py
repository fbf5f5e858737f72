"""Decoding, in one place: how generation runs in train.py's validation, eval.py, generate.py and export.py's parity
check, and the command-line flags that change it. Every model.generate call of ours is made here (generate_ids).

    dec = resolve(cfg, classes, args)        a Decoding: the budget rule's max new tokens and the decoding options
                                             (the flags given over the task's defaults), frozen
    add_decoding_options(parser)             --max-new-tokens, --num-beams, --repetition-penalty,
                                             --no-repeat-ngram-size (eval.py, generate.py)
    add_budget_option(group, what)           --max-new-tokens alone (train.py: its validation's budget)
    generate(model, tokenizer, prompts, dec)     a batch of completions, decoded: one model.generate call
    generate_ids(model, tokenizer, enc, dec)     the new token ids of one model.generate call
    free_text_batch(model, prompt_tokens, budget) eval.py's and generate.py's batch for free text (-b not given)

Defaults (transformers' generate() does the work; these are its own keyword arguments; bench/decoding.py measures
each setting, figures in docs/benchmarks.md): plain greedy for closed-set answers. Free text adds a repetition
penalty of 1.2: it took fine-tuned SmolLM2's UDHR translations from chrF 17.3 to 28.9 and the outputs that looped to
the budget from 54% to 5%, and ran faster (fewer tokens); beams and n-gram blocking did worse. Closed-set answers keep
plain greedy: the penalty also divides the scores of prompt tokens, and the prompt lists the class names.

The budget rule (max new tokens), the same in validation, eval.py, generate.py and the parity check (BUDGET_RULE):
    --max-new-tokens given                            that
    the run's own train.py --max-new-tokens           that (run.json: eval.py then generates as validation did)
    the run's longest training answer, L tokens       ceil(1.5 x L) + 16  (run.json's longest_answer_tokens)
    no record of a run (a base model, zero-shot)      32 for closed-set answers, 256 for free text
L counts the end-of-turn token. A model stops within the answers it learnt; the margin leaves room for one a little
more verbose than its longest answer, and an output that loops costs at most 1.5 x L + 16 steps: the worst case the
plan's validation time is computed from (finetune/timeplan.py).

Speed: generation runs batched (samples sorted by prompt length, left padded: finetune/batching.py), with the KV
cache, in one model.generate call per batch, with no callback of ours per token. bench/decode_bench.py compares
train.py's validation, eval.py and generate.py with a plain batched model.generate on the same model and prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.batching import pad_batch
from finetune.monitor import available_bytes

DECODING = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
FREE_TEXT_DECODING = {**DECODING, "repetition_penalty": 1.2}
BUDGET_MARGIN = (1.5, 16)  # the budget: 1.5 x the run's longest training answer + 16 tokens
NO_RUN_BUDGET = {"classes": 32, "free text": 256}
# eval.py's and generate.py's batch for free text (-b not given): bench/decode_bench.py's fastest batch on the 2-core
# CPU, lowered to what fits in FREE_MEMORY_SHARE of the free memory (free_text_batch)
FREE_TEXT_BATCH = 32
FREE_MEMORY_SHARE = 0.25
BUDGET_RULE = (f"{BUDGET_MARGIN[0]:g} x the run's longest training answer + {BUDGET_MARGIN[1]} tokens, or the run's "
               f"own --max-new-tokens; without a run {NO_RUN_BUDGET['classes']} for closed-set answers, "
               f"{NO_RUN_BUDGET['free text']} for free text")


@dataclass(frozen=True)
class Decoding:
    """What one generation does: the budget, the options over plain greedy, and a temperature (0: greedy)."""
    max_new_tokens: int
    num_beams: int = DECODING["num_beams"]
    repetition_penalty: float = DECODING["repetition_penalty"]
    no_repeat_ngram_size: int = DECODING["no_repeat_ngram_size"]
    temperature: float = 0.0

    def options(self) -> dict:
        """The options of DECODING, as metrics.json records them."""
        return {k: getattr(self, k) for k in DECODING}

    def kwargs(self, tokenizer) -> dict:
        """model.generate's keyword arguments: the budget, stop on the end-of-turn token, pad with ours, and greedy
        (sampling keeps the model's own top_p / top_k; greedy switches them off, so transformers does not warn)."""
        how = dict(do_sample=True, temperature=self.temperature) if self.temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, **how, **self.options())


def default_decoding(classes) -> dict:
    return dict(FREE_TEXT_DECODING if not classes else DECODING)


def generation_budget(cfg: dict, classes=None, given: int | None = None) -> int:
    """Max new tokens by the budget rule (module docstring): `given` (--max-new-tokens), else the run's own
    --max-new-tokens, else a margin over its longest training answer, else a fixed default."""
    if given:
        return given
    if cfg.get("max_new_tokens"):
        return cfg["max_new_tokens"]
    longest = cfg.get("longest_answer_tokens")
    if longest:
        return math.ceil(BUDGET_MARGIN[0] * longest) + BUDGET_MARGIN[1]
    return NO_RUN_BUDGET["classes" if classes else "free text"]


def resolve(cfg: dict, classes=None, args=None, temperature: float = 0.0) -> Decoding:
    """The decoding of a run (`cfg`: its run.json, or what eval.py knows of a base model): the flags of `args` that
    were given (None: not given) over default_decoding(classes), and the budget rule's max new tokens."""
    given = {k: getattr(args, k) for k in DECODING if getattr(args, k, None) is not None}
    return Decoding(max_new_tokens=generation_budget(cfg, classes, getattr(args, "max_new_tokens", None)),
                    temperature=temperature, **{**default_decoding(classes), **given})


RUN_BUDGET = f"{BUDGET_MARGIN[0]:g} x the longest training answer + {BUDGET_MARGIN[1]} tokens"


def add_budget_option(parser, what: str = "generation budget", default: str = BUDGET_RULE):
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"{what}: new tokens at most (default: {default})")


def add_decoding_options(parser):
    """--max-new-tokens, --num-beams, --repetition-penalty, --no-repeat-ngram-size (eval.py and generate.py)."""
    add_budget_option(parser)
    a = parser.add_argument
    a("--num-beams", type=int, default=None,
      help=f"beam search with N beams (default {DECODING['num_beams']}: greedy)")
    a("--repetition-penalty", type=float, default=None,
      help=f"divide the scores of tokens already in the prompt or output by this (default: "
           f"{FREE_TEXT_DECODING['repetition_penalty']:g} for free text, {DECODING['repetition_penalty']:g} (off) for "
           "closed-set answers)")
    a("--no-repeat-ngram-size", type=int, default=None,
      help=f"never repeat an n-gram of this size in the output (default {DECODING['no_repeat_ngram_size']}: off)")


def generate_ids(model, tokenizer, enc: dict, dec: Decoding, streamer=None, **extra):
    """(B, T) new token ids of one model.generate call on encoded inputs (input_ids, attention_mask, and a
    processor's image tensors); rows that end early are padded after their end-of-turn token. `extra`: more of
    generate's arguments (the time plan's min_new_tokens)."""
    import torch

    with torch.inference_mode():
        out = model.generate(**enc, streamer=streamer, **dec.kwargs(tokenizer), **extra)
    return out[:, enc["input_ids"].shape[1]:]


def encode_batch(model, tokenizer, prompts: list[list[int]], processor=None, prompt_texts=None, images=None) -> dict:
    """A batch's inputs on the model's device, left padded: token ids, or the processor's text + images (`images`:
    each prompt's list of images; the processor takes them flat, in the order the prompts show them)."""
    dev = next(model.parameters()).device
    if processor is not None and images is not None and any(images):
        from PIL import Image

        return processor(text=prompt_texts, images=[Image.open(i).convert("RGB") for paths in images for i in paths],
                         return_tensors="pt", padding=True, padding_side="left").to(dev)
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id, left=True)
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}


def generate(model, tokenizer, prompts: list[list[int]], dec: Decoding, processor=None, prompt_texts=None,
             images=None) -> list[str]:
    """Completions of a batch of prompts, decoded with special tokens dropped."""
    enc = encode_batch(model, tokenizer, prompts, processor, prompt_texts, images)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in generate_ids(model, tokenizer, enc, dec)]


def until_end(row: list[int], eos_id) -> list[int]:
    """A generated row up to and with its first end-of-turn token (what follows is padding)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def kv_cache_bytes(config, tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes of the KV cache for `tokens` positions (all rows together) of a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) // max(heads, 1))
    return 2 * (getattr(text, "num_hidden_layers", 0) or 0) * kv_heads * head_dim * dtype_bytes * tokens


def free_text_batch(model, prompt_tokens: int, max_new_tokens: int, wanted: int = FREE_TEXT_BATCH) -> int:
    """The batch for free-text generation when -b is not given: `wanted` (FREE_TEXT_BATCH, the fastest on the
    benchmark), halved until the batch's KV cache at its longest (the longest prompt + the budget) and its
    last-position logits fit in FREE_MEMORY_SHARE of the free memory (the GPU's, else the machine's)."""
    import torch

    param = next(model.parameters())
    free = torch.cuda.mem_get_info(param.device)[0] if param.device.type == "cuda" else available_bytes()
    if free is None:
        return wanted
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = getattr(text, "vocab_size", 0) or 0
    batch = wanted
    while batch > 1 and (kv_cache_bytes(model.config, batch * (prompt_tokens + max_new_tokens), param.element_size())
                         + batch * vocab * 4 * 2) > FREE_MEMORY_SHARE * free:
        batch //= 2
    return batch
