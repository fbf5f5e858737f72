"""Verifiable rewards for GRPO: plain functions with TRL's signature `fn(completions, **columns) -> list[float]`.

    structure     <reasoning>/<answer> blocks, each on its own lines: 1.0 per block present once (max 2.0)
    think         <think>...</think><answer>...</answer>: 2.0 less 0.5 per missing/duplicated tag or stray text
    correct       1.0 when the (last) <answer> equals the dataset's `answer` column after normalisation, else 0.0

GRPOTrainer calls every function with `completions` (strings, or lists of message dicts in conversational
datasets), every dataset column as a per-sample list (`answer=[...]`, `prefill=[...]`) and its own extras
(prompts, completion_ids, trainer_state, log_extra, log_metric, ...), which all go into `**kw`. It sums the
rewards with `reward_weights` and logs each function under its `__name__`: `rewards/structure/mean`,
`rewards/think_format/mean`, `rewards/correct/mean`. The prompt's prefill (text the reply starts with that the
model did not generate) comes as the `prefill` column that finetune/rl.py's grpo_dataset writes from --prefill.
`correct` returns None where `answer` is None, which TRL leaves out of that sample's reward.

train.py turns its flags into TRL arguments with `load_rewards`:
    --rewards structure,correct        names from REWARDS, comma-separated
    --reward-weights 1,2               one number per reward (default: all 1)
    --rewards my_module:my_fn          a function of your own: a module importable from the working directory
    --rewards path/to/file.py:my_fn    ... or a file; mix freely: --rewards structure,my_rewards.py:brevity

>>> funcs, weights = load_rewards("structure,correct", "1,2")
>>> [f.__name__ for f in funcs], weights
(['structure', 'correct'], [1.0, 2.0])
>>> [f(["<reasoning>\\nred is warm\\n</reasoning>\\n<answer>\\nRed\\n</answer>"], answer=["red"]) for f in funcs]
[[2.0], [1.0]]
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path

from dataset import normalize
from finetune.predict import ANSWER_TAG, completion_text, extract_answer


# ------------------------------------------------------------------------------------------------- helpers
def _replies(completions, prefill) -> list[str]:
    """prefill + completion per sample: prefill may be a str (from train.py) or a per-sample column (a list)."""
    if prefill is None or isinstance(prefill, str):
        prefill = [prefill] * len(completions)
    if len(prefill) != len(completions):
        raise ValueError(f"prefill has {len(prefill)} entries for {len(completions)} completions")
    return [(p or "") + completion_text(c) for p, c in zip(prefill, completions)]


# ------------------------------------------------------------------------------------------------- rewards
def _block(tag: str) -> re.Pattern:
    # Own lines: only horizontal whitespace (\r included) may share a line with either tag; the content between must
    # hold something, so an empty block earns nothing.
    h = r"[^\S\n]*"
    return re.compile(rf"(?:^|\n){h}<{tag}>{h}\n(.*?)\n{h}</{tag}>{h}(?=\n|$)", re.S)


BLOCKS = {"reasoning": _block("reasoning"), "answer": _block("answer")}


def structure(completions, prefill="", **kw) -> list[float]:
    """1.0 per <reasoning>/<answer> block present once; 0.5 less per extra occurrence, never below 0 per block.

    Present: `<tag>` and `</tag>` each alone on a line (surrounding spaces, tabs, \\r and blank lines are fine)
    with non-blank text between them. Occurrences: the number of `<tag>` or `</tag>` strings, whichever is larger, so
    a stray or half-written second block costs as much as a whole one. Order and text outside the blocks are free.

    >>> structure(["<reasoning>\\nwarm\\n</reasoning>\\n<answer>\\nred\\n</answer>", "<answer>\\nred\\n</answer>"])
    [2.0, 1.0]
    >>> structure(["\\nwarm\\n</reasoning>\\n<answer>\\nred\\n</answer>"], prefill="<reasoning>")
    [2.0]
    """
    scores = []
    for reply in _replies(completions, prefill):
        score = 0.0
        for tag, pattern in BLOCKS.items():
            if any(content.strip() for content in pattern.findall(reply)):
                n = max(reply.count(f"<{tag}>"), reply.count(f"</{tag}>"))  # every whole block adds one of each
                score += max(0.0, 1.0 - 0.5 * (n - 1))
        scores.append(score)
    return scores


THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
THINK_SPLIT = re.compile(r"(</?think>|</?answer>)")


def think_format(completions, prefill="", **kw) -> list[float]:
    """2.0, less 0.5 per missing tag, 0.5 per extra copy of a tag, and 0.5 once for text outside the tags; floor 0.

    Tags may sit anywhere (no line rules). Outside text: non-whitespace met while no block is open, reading left to
    right, where an opening tag opens its block and any closing tag closes it; so text before <think>, between
    </think> and <answer>, or after </answer> counts, and text after an unclosed opening tag does not (the missing
    closing tag is already paid for). Order is not checked.

    >>> think_format(["<think>warm</think>\\n<answer>red</answer>", "so: <answer>red</answer>"])
    [2.0, 0.5]
    >>> think_format(["warm</think><answer>red</answer>"], prefill="<think>")
    [2.0]
    """
    scores = []
    for reply in _replies(completions, prefill):
        score = 2.0
        for tag in THINK_TAGS:
            n = reply.count(tag)
            score -= 0.5 if n == 0 else 0.5 * (n - 1)
        inside = outside = False
        for piece in THINK_SPLIT.split(reply):
            if piece in THINK_TAGS:
                inside = not piece.startswith("</")
            elif not inside and piece.strip():
                outside = True
        scores.append(max(0.0, score - 0.5 * outside))
    return scores


def correct(completions, answer, prefill="", **kw) -> list[float | None]:
    """1.0 when the last <answer>...</answer> (else the whole reply) matches `answer` after `dataset.normalize`.

    The prefill counts only when it helps close an answer tag (a prefill of "<answer>"): otherwise the completion
    alone is read, exactly as eval.py's generate mode reads it. A missing reference (None) gives None, which TRL
    leaves out of that sample's reward (multi-task data where only some rows have an answer).

    >>> correct(["<answer>\\n Red.\\n</answer>", "blue", "<answer>red</answer> <answer>blue</answer>"],
    ...         answer=["red", "red", "red"])
    [1.0, 0.0, 0.0]
    """
    scores = []
    for reply, c, ref in zip(_replies(completions, prefill), completions, answer, strict=True):
        got = extract_answer(reply if ANSWER_TAG.search(reply) else completion_text(c))
        scores.append(None if ref is None else float(normalize(got) == normalize(str(ref))))
    return scores


REWARDS = {"structure": structure, "think": think_format, "correct": correct}


# ------------------------------------------------------------------------------------------------- loading
def _load_function(entry: str):
    """`module:function` or `file.py:function` (split at the last colon, so a Windows drive letter survives)."""
    where, _, name = entry.rpartition(":")
    if not where or not name:
        raise ValueError(f"--rewards entry {entry!r}: expected module:function or file.py:function")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {str(path)!r}")
            # a private module name, so the file never shadows an importable module of the same stem
            spec = importlib.util.spec_from_file_location(f"_rewards_file_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # registered before running it: dataclasses and pickle look it up
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `python train.py` puts the script's folder on sys.path, not the cwd
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except Exception as e:  # a one-line reason naming the entry; the cause stays chained for the traceback
        reason = " ".join(str(e).split())  # one line, even for exceptions with multi-line messages
        raise ValueError(f"--rewards entry {entry!r}: cannot load {where!r} ({type(e).__name__}: {reason})") from e
    if not hasattr(module, name):
        raise ValueError(f"--rewards entry {entry!r}: {where!r} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"--rewards entry {entry!r}: {name!r} is a {type(fn).__name__}, not a function")
    if not hasattr(fn, "__name__"):  # a callable instance: TRL would log it under its class name, not the entry's
        fn.__name__ = name
    return fn


def load_rewards(spec: str, weights: str | None = None) -> tuple[list, list[float] | None]:
    """`--rewards` and `--reward-weights` as GRPOTrainer's reward_funcs and GRPOConfig.reward_weights (None: all 1).

    >>> load_rewards("think", None)[0][0].__name__
    'think_format'
    """
    entries = [e.strip() for e in (spec or "").split(",")]
    if not any(entries) or not all(entries):
        raise ValueError(f"--rewards {spec!r}: expected comma-separated names ({', '.join(REWARDS)}) or module:fn")
    funcs = []
    for entry in entries:
        if entry in REWARDS:
            funcs.append(REWARDS[entry])
        elif ":" in entry:
            funcs.append(_load_function(entry))
        else:
            raise ValueError(f"--rewards entry {entry!r}: unknown reward (known: {', '.join(REWARDS)}, or module:fn)")
    names = [f.__name__ for f in funcs]
    for name in names:  # TRL keys its logs by name: two rewards under one name would mix their columns and means
        if names.count(name) > 1:
            raise ValueError(f"--rewards {spec!r}: two rewards named {name!r}; TRL logs rewards by function name")
    if weights is None or not weights.strip():
        return funcs, None
    values = []
    for w in weights.split(","):
        try:
            values.append(float(w))
        except ValueError:
            values.append(math.nan)
        if not math.isfinite(values[-1]):  # nan/inf would silently poison every advantage
            raise ValueError(f"--reward-weights entry {w.strip()!r} is not a finite number")
    if len(values) != len(funcs):
        raise ValueError(f"--reward-weights {weights!r}: {len(values)} weights for {len(funcs)} rewards ({spec})")
    return funcs, values
