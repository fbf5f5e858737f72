"""`dataset.py check`'s tokens and rendered sections (-m: the tokenizer only, no weights): the training samples'
lengths against --max-len as the chosen trainer tokenises them, and the first two as they are trained.

    sft, classifier   dataset.Formatter.encode, train.py's own path: prompt, answer (the tokens that carry the loss)
                      and total; a document over --max-len is truncated, a conversation that cannot fit is dropped;
                      the padding share of train.py's length-bucketed batches at -b
    grpo              the prompt as rl.grpo_dataset renders it (its document truncated to --max-len) and TRL's
                      GRPOTrainer tokenises it; the reference answer, which the `correct` reward compares with
    dpo, kto          the rows of rl.dpo_dataset / rl.kto_dataset (the prompt and each reply tokenised as SFT's
                      segments); TRL's collator cuts prompt + reply at --max-len (keep_start), and a sample whose
                      prompt alone fills it is dropped
Tokenised: a seeded draw of --token-samples (10,000) from larger sets, the count over --max-len then also scaled to
the whole set. token_lines prints both sections.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

from dataset import DataError, Formatter
from finetune import batching, rl, sources
from finetune.modeling import is_vision_model, load_config, load_processing, setup_tokens

GREEN, RESET = "\033[1;32m", "\033[0m"
LENGTHS = ("prompt", "answer", "chosen", "rejected", "completion", "total")  # percentile rows, in print order
COLUMNS = ("p50", "p90", "p99", "max")


def load_tokenizer(args):
    """(tokenizer, processor or None) as train.py prepares them: no weights are read."""
    vision = is_vision_model(load_config(args.model, args.trust_remote_code))
    tok, proc = load_processing(args.model, vision, args.trust_remote_code)
    setup_tokens(tok, proc, args.response_template)
    return tok, proc


def percentiles(values) -> dict | None:
    """Nearest-rank percentiles 50 / 90 / 99 and the maximum."""
    v = sorted(values)
    if not v:
        return None
    at = lambda p: v[max(0, math.ceil(p / 100 * len(v)) - 1)]  # noqa: E731
    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": v[-1]}


def draw(samples, limit: int, seed: int):
    """Every sample, or a seeded draw of `limit` (0: all)."""
    n = len(samples)
    if not limit or n <= limit:
        return samples
    picked = sorted(random.Random(f"datacheck:{seed}").sample(range(n), limit))
    return samples.take(picked) if isinstance(samples, sources.Samples) else [samples[i] for i in picked]


def sections(args, s, tok, proc) -> tuple[dict, list[dict]]:
    """(the tokens section, the rendered samples) of the training data, for args.trainer."""
    fmt = Formatter(tok, proc, args.response_template, args.max_len, s.prompts, args.seed)
    drawn, first = draw(s.train, args.token_samples, args.seed), list(s.train[:2])
    if args.trainer in ("dpo", "kto"):
        body, shown = _preferences(args, fmt, tok, drawn, first)
    elif args.trainer == "grpo":
        body, shown = _grpo(fmt, tok, drawn, first)
    else:
        body, shown = _sft(args, fmt, drawn, first)
    out = {"model": args.model, "trainer": args.trainer, "head": args.head, "tokenised": len(drawn),
           "of": len(s.train), "max_len": args.max_len, "format": _format(args), **body, "eos_token": tok.eos_token,
           "pad_token": tok.pad_token}
    if len(drawn) < len(s.train):
        out["over_max_len_estimate"] = round(out["over_max_len"] * len(s.train) / max(1, len(drawn)))
    return out, shown


def _format(args) -> str:
    if args.response_template:
        return f"plain ({args.response_template!r})"
    return "chat template; --lm-text: plain text, the loss on every token" if args.lm_text else "chat template"


# ------------------------------------------------------------------------------------------------ sft
class Tokens(NamedTuple):
    """One training sample through the Formatter train.py tokenises with."""
    prompt: int
    answer: int                # tokens that carry the loss
    total: int                 # untruncated
    trained: int | None        # after --max-len; None: dropped (or an error)
    cut: str | None            # 'truncated', 'dropped' or None
    error: DataError | None    # train.py's (the prompt and answer alone exceed --max-len)


def _tokens(s, free, fmt, with_answer) -> Tokens:
    """Counts from `free` (no --max-len); what --max-len does to a sample over it from the real Formatter, fmt."""
    r = free.encode(s, train=True, with_answer=with_answer)
    total = len(r["input_ids"])
    answer = sum(1 for t in r["labels"] if t != -100) if with_answer else 0
    if total <= fmt.max_len:
        return Tokens(total - answer, answer, total, total, None, None)
    truncated = fmt.truncated
    try:
        cut = fmt.encode(s, train=True, with_answer=with_answer)
    except DataError as e:
        return Tokens(total - answer, answer, total, None, None, e)
    if cut is None:
        return Tokens(total - answer, answer, total, None, "dropped", None)
    return Tokens(total - answer, answer, total, len(cut["input_ids"]),
                  "truncated" if fmt.truncated > truncated else None, None)


def _sft(args, fmt, drawn, first) -> tuple[dict, list[dict]]:
    """Prompt, answer and total tokens, truncation and the padding share at -b (the classifier head: the prompt
    alone, the loss on the class index)."""
    with_answer = args.head != "classifier"
    free = Formatter(fmt.tokenizer, fmt.processor, fmt.response_template, None, fmt.prompts, fmt.seed)
    counts = [_tokens(x, free, fmt, with_answer) for x in drawn]
    error = next((c.error for c in counts if c.error), None)
    if error:
        raise error  # train.py stops at the first, with this line
    kept = [c.trained for c in counts if c.trained is not None]
    order = batching.LengthBucketSampler(kept, args.batch_size, seed=args.seed).order(0)
    body = {"batch_size": args.batch_size, "prompt": percentiles(c.prompt for c in counts),
            "answer": percentiles(c.answer for c in counts), "total": percentiles(c.total for c in counts),
            "over_max_len": sum(c.total > args.max_len for c in counts),
            "truncated": sum(c.cut == "truncated" for c in counts), "dropped": sum(c.cut == "dropped" for c in counts),
            "padding": round(batching.padding_fraction(kept, order, args.batch_size), 4)}
    shown = []
    for x in first:
        r = fmt.encode(x, train=True, with_answer=with_answer)
        if r is not None:
            flags = [t != -100 for t in r["labels"]]
            shown.append({"id": x.id, "tokens": len(flags), "loss_tokens": sum(flags),
                          "runs": _runs(fmt.tokenizer, r["input_ids"], flags)})
    return body, shown


def _runs(tok, ids, flags) -> list[list]:
    """[text, carries the loss] for each run of tokens alike, special tokens as text."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or flags[i] != flags[start]:
            runs.append([_text(tok, ids[start:i]), flags[start]])
            start = i
    return runs


def _text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ grpo, dpo, kto
def _trl_prompt_ids(tok, prompt: str) -> list:
    """A GRPO prompt's ids as TRL's GRPOTrainer tokenises a text prompt."""
    from trl.data_utils import _tokenize

    return _tokenize(tok, prompt)["input_ids"]


def _grpo(fmt, tok, drawn, first) -> tuple[dict, list[dict]]:
    """The prompts GRPO generates from (the document truncated to --max-len: counted) and the reference answers."""
    prompts = [len(_trl_prompt_ids(tok, row["prompt"])) for row in rl.grpo_dataset(fmt, drawn, None)]
    answers = [len(tok(x.answer, add_special_tokens=False)["input_ids"]) for x in drawn if x.answer is not None]
    body = {"prompt": percentiles(prompts), "answer": percentiles(answers), "over_max_len": fmt.truncated,
            "truncated": fmt.truncated, "dropped": 0}
    shown = []
    for row in rl.grpo_dataset(fmt, first, None):
        ids = _trl_prompt_ids(tok, row["prompt"])
        shown.append({"id": row["id"], "tokens": len(ids), "loss_tokens": 0, "runs": [[_text(tok, ids), False]],
                      "reference": row["answer"]})
    return body, shown


def _preferences(args, fmt, tok, drawn, first) -> tuple[dict, list[dict]]:
    """Prompt and reply tokens of DPO pairs (chosen, rejected) or KTO samples (completion) as rl.dpo_dataset /
    rl.kto_dataset tokenise them, what TRL's collator cuts at --max-len, and the first two rendered with the replies
    that carry the loss."""
    names, rows = (("completion",), rl.kto_dataset) if args.trainer == "kto" else (("chosen", "rejected"),
                                                                                    rl.dpo_dataset)

    def pairs(items):
        ds = rows(fmt, items)
        return list(zip(ds["prompt_ids"], zip(*(ds[f"{n}_ids"] for n in names))))

    ids = pairs(drawn)
    longest = [len(p) + max(map(len, r)) for p, r in ids]
    over = [t > args.max_len for t in longest]
    dropped = [len(p) >= args.max_len for p, _ in ids]
    body = {"prompt": percentiles(len(p) for p, _ in ids),
            **{n: percentiles(len(r[i]) for _, r in ids) for i, n in enumerate(names)},
            "total": percentiles(longest), "over_max_len": sum(over), "dropped": sum(dropped),
            "truncated": sum(o and not d for o, d in zip(over, dropped))}
    shown = []
    for x, (p, replies) in zip(first, pairs(first)):
        room = max(0, args.max_len - len(p))  # keep_start: the prompt first, the reply cut at --max-len
        cut = [r[:room] for r in replies]
        label = [f"{'desirable' if x.label else 'undesirable'} completion"] if args.trainer == "kto" else names
        shown.append({"id": x.id, "tokens": min(len(p), args.max_len), "loss_tokens": sum(map(len, cut)),
                      "runs": [[_text(tok, p[:args.max_len]), False]],
                      "replies": [[n, _text(tok, r), len(r)] for n, r in zip(label, cut)]})
    return body, shown


# ------------------------------------------------------------------------------------------------ printing
def number(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def pct_line(name, p, width=8) -> str:
    return f"  {name:<{width}}" + ("".join(f"{number(p[k]):>8}" for k in COLUMNS) if p else "       -")


def marked(runs, colour: bool) -> str:
    return "".join(text if not loss else f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]" for text, loss in runs)


CUT = {"sft": "{truncated} documents truncated, {dropped} conversations dropped",
       "grpo": "prompts whose documents are truncated to fit",
       "dpo": "{truncated} replies cut there by TRL's collator, {dropped} pairs dropped: the prompt alone fills it",
       "kto": "{truncated} completions cut there by TRL's collator, {dropped} dropped: the prompt alone fills it"}


def token_lines(t: dict, shown: list[dict], colour: bool) -> list[str]:
    """The text of the tokens and rendered sections."""
    drawn = f"{number(t['tokenised'])} of {number(t['of'])} training samples, drawn at random" \
        if t["tokenised"] < t["of"] else "the training samples"
    how = "; classifier head: the loss is on the class" if t["head"] == "classifier" else \
        f"; --trainer {t['trainer']}" if t["trainer"] != "sft" else ""
    names = [name for name in LENGTHS if name in t]
    width = max(8, *(len(name) + 1 for name in names))
    lines = [f"tokens of {drawn} ({t['model']}, {t['format']}{how})",
             " " * (width + 2) + "".join(f"{k:>8}" for k in COLUMNS)]
    lines += [pct_line(name, t[name], width) for name in names]
    lines.append(f"  over --max-len {t['max_len']}: {number(t['over_max_len'])} ("
                 + CUT[t["trainer"]].format(truncated=number(t["truncated"]), dropped=number(t["dropped"])) + ")"
                 + (f"; about {number(t['over_max_len_estimate'])} of all {number(t['of'])} (--token-samples 0 "
                    "counts them all)" if "over_max_len_estimate" in t else ""))
    if "padding" in t:
        lines.append(f"  padding at -b {t['batch_size']} (train.py's length-bucketed batches): "
                     f"{t['padding']:.1%} of the batch tokens")
    mark, special = "in green" if colour else "in [[brackets]]", f"eos {t['eos_token']!r}, pad {t['pad_token']!r}"
    for x in shown:
        if "reference" in x:
            lines.append(f"rendered: train {x['id']}, the prompt GRPO generates from, {number(x['tokens'])} tokens "
                         f"(the loss is on the completions); reference answer {x['reference']!r}; {special}")
        elif "replies" in x:
            lines.append(f"rendered: train {x['id']}, the prompt ({number(x['tokens'])} tokens), then each reply "
                         f"({number(x['loss_tokens'])} tokens carry the loss, {mark}); {special}")
        else:
            lines.append(f"rendered: train {x['id']}, {number(x['tokens'])} tokens, {number(x['loss_tokens'])} "
                         f"carry the loss ({mark}); {special}")
        lines.append(marked(x["runs"], colour))
        lines += [f"{name} ({number(n)} tokens): " + marked([[text, True]], colour) for name, text, n in
                  x.get("replies", [])]
    return lines
