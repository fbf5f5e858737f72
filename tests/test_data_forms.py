"""Data as the rest of the ecosystem writes it (docs/data.md, formats): TRL's prompt-completion and language-modelling
forms, images inside conversations, preference pairs and unpaired preferences, long samples dropped and counted.
In-process on the tiny tokenizer; the CLIs end to end are at the bottom."""
import json

import pytest

from conftest import write_jsonl
from dataset import DataError, Formatter
from finetune.sources import load_samples


def _masked(fmt, sample):
    """(the text with the loss, the text without) of one encoded sample."""
    e = fmt.encode(sample, train=True)
    tok = fmt.tokenizer
    return (tok.decode([i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]),
            tok.decode([i for i, lab in zip(e["input_ids"], e["labels"]) if lab == -100]))


# ------------------------------------------------------------------------------------------------ TRL's forms
def test_prompt_completion_strings_are_question_and_answer(tmp_path, tokenizer):
    rows = [{"prompt": "What colour is the sky?", "completion": "blue"}]
    s = load_samples(write_jsonl(tmp_path / "pc.jsonl", rows))[0]
    assert s.turns == [("user", "What colour is the sky?"), ("assistant", "blue")]
    learned, prompt = _masked(Formatter(tokenizer), s)
    assert "blue" in learned and "sky" in prompt and "sky" not in learned


def test_conversational_prompt_completion_learns_the_completion_only(tmp_path, tokenizer):
    """An assistant turn inside the prompt (a few-shot example) carries no loss; the completion does."""
    rows = [{"prompt": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                        {"role": "user", "content": "two"}],
             "completion": [{"role": "assistant", "content": "dos"}]}]
    s = load_samples(write_jsonl(tmp_path / "pc.jsonl", rows))[0]
    assert s.context == 3 and s.answer == "dos"
    learned, prompt = _masked(Formatter(tokenizer), s)
    assert "dos" in learned and "uno" not in learned and "uno" in prompt


def test_language_modelling_text_is_opt_in(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the quick brown fox"}, {"text": "jumps over"}])
    with pytest.raises(DataError, match="field 'answer': missing; for language-modelling text .* --lm-text"):
        load_samples(data)
    s = load_samples(data, lm=True)[0]
    e = Formatter(tokenizer, max_len=4).encode(s, train=True)
    assert e["labels"] == e["input_ids"] and len(e["input_ids"]) == 4  # the loss on every token, cut at --max-len
    txt = tmp_path / "book.txt"
    txt.write_text("First paragraph\nstill the first.\n\nSecond one.\n")
    samples = load_samples(txt, lm=True)
    assert [(x.id, x.answer) for x in samples] == [("line 1", "First paragraph\nstill the first."),
                                                   ("line 4", "Second one.")]
    full = Formatter(tokenizer).encode(samples[1], train=True)
    assert full["input_ids"][-1] == tokenizer.eos_token_id and full["labels"] == full["input_ids"]


# ------------------------------------------------------------------------------------------------ long samples
def test_a_sample_too_long_is_dropped_counted_and_named(tmp_path, tokenizer):
    rows = [{"instruction": "Say it.", "input": "", "output": "word " * 300, "id": "long"},
            {"instruction": "Say it.", "input": "", "output": "short", "id": "ok"}]
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", rows))
    fmt = Formatter(tokenizer, max_len=64)
    assert fmt.encode(samples[0], train=True) is None and fmt.encode(samples[1], train=True) is not None
    assert (fmt.dropped, fmt.dropped_ids) == (1, ["long"])
