"""Data as the rest of the ecosystem writes it (docs/data.md, formats): TRL's prompt-completion and language-modelling
forms, images inside conversations, preference pairs and unpaired preferences, long samples dropped and counted.
In-process on the tiny tokenizer; the CLIs end to end are at the bottom."""
import json
import re

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


# ------------------------------------------------------------------------------------------------ images
def _image_forms(tmp_path):
    """Every form that carries images, each with the number of images it shows."""
    from tiny_models import make_images

    (a, _), (b, _) = make_images(tmp_path / "img", 2)
    a, b = f"img/{a}", f"img/{b}"
    two_turns = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "red"},
                 {"role": "user", "content": "And <image>this?"}, {"role": "assistant", "content": "blue"}]
    return {
        "ours": ({"image": a, "question": "Which colour?", "answer": "red"}, 1),
        "openai parts with paths": ({"messages": [
            {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": b}]},
            {"role": "assistant", "content": "blue"}]}, 2),
        "openai parts and images": ({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": [a]}, 1),
        "placeholders and images": ({"messages": two_turns, "images": [a, b]}, 2),
        "sharegpt placeholders": ({"conversations": [{"from": "human", "value": "<image><image>Compare."},
                                                     {"from": "gpt", "value": "red, blue"}], "images": [a, b]}, 2),
        "trl prompt-completion": ({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "Which?"}]}],
                                   "completion": [{"role": "assistant", "content": "red"}], "images": [a]}, 1),
    }


@pytest.fixture(scope="module")
def vlm_fmt(tiny_vlm):
    from finetune.modeling import load_processing

    tok, proc = load_processing(tiny_vlm, True)
    return Formatter(tok, proc)


def test_every_image_form_reaches_the_vision_tokens(tmp_path, vlm_fmt):
    """Training batches (VisionCollator) and inference prompts (eval, generate) hold one expanded image per image the
    data names: no form drops one."""
    import torch

    from finetune.batching import VisionCollator

    proc = vlm_fmt.processor
    pad = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    collate = VisionCollator(proc, proc.tokenizer.pad_token_id or 0)
    for name, (row, n) in _image_forms(tmp_path).items():
        s = load_samples(write_jsonl(tmp_path / f"{name}.jsonl", [row]))[0]
        assert len(s.all_images) == n, name
        batch = collate([vlm_fmt.encode(s, train=True)])
        assert batch["image_grid_thw"].shape[0] == n, name
        per_image = int(batch["image_grid_thw"][0].prod()) // 4  # the processor merges 2x2 patches into one token
        assert int((batch["input_ids"] == pad).sum()) == n * per_image, name
        assert int((batch["labels"] == pad).sum()) == 0, name  # no loss on image tokens
        prompt = vlm_fmt.encode(s, with_answer=False)
        assert prompt["prompt_text"].count(proc.image_token) == n and "<image>" not in prompt["prompt_text"], name
        enc = proc(text=[prompt["prompt_text"]], images=[__import__("PIL.Image").Image.open(p) for p in s.all_images],
                   return_tensors="pt")
        assert int((enc["input_ids"] == pad).sum()) == n * per_image and torch.is_tensor(enc["pixel_values"]), name


def test_images_a_text_model_cannot_see_are_an_error(tmp_path, tokenizer):
    for name, (row, _) in _image_forms(tmp_path).items():
        s = load_samples(write_jsonl(tmp_path / f"{name}.jsonl", [row]))[0]
        with pytest.raises(DataError, match="text-only and cannot see images"):
            Formatter(tokenizer).encode(s, train=True)


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "red"}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "red"}],
      "images": ["img/x.png"]}, "images"),
    ({"conversations": [{"from": "human", "value": "<image>Which?"}, {"from": "gpt", "value": "red"}]}, "images"),
], ids=["placeholder without image", "image without placeholder", "sharegpt placeholder without image"])
def test_a_count_mismatch_names_the_sample(tmp_path, row, field):
    with pytest.raises(DataError, match=rf"sample line 1: field '{re.escape(field)}'.*image"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", [row]))


# ------------------------------------------------------------------------------------------------ preferences
def test_sharegpt_pairs_and_unpaired_feedback_parse(tmp_path):
    from finetune.sources import load_preferences

    pair = {"conversations": [{"from": "human", "value": "Pick one."}],
            "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "house"}}
    p = load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [pair]))[0]
    assert (p.turns, p.chosen, p.rejected) == ([("user", "Pick one.")], "red", "house")
    rows = [{"prompt": "Pick one.", "completion": "red", "label": True},
            {"messages": [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "house"}],
             "label": False}]
    fb = load_preferences(write_jsonl(tmp_path / "kto.jsonl", rows[:1]), unpaired=True)[0]
    assert (fb.turns, fb.completion, fb.label) == ([("user", "Pick one.")], "red", True)
    fb = load_preferences(write_jsonl(tmp_path / "kto2.jsonl", rows[1:]), unpaired=True)[0]
    assert (fb.completion, fb.label) == ("house", False)
    with pytest.raises(DataError, match="sample line 1: field 'label': expected true or false, got 'yes'"):
        load_preferences(write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "label": "yes"}]), unpaired=True)


# ------------------------------------------------------------------------------------------------ tool calling
WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _tool_forms():
    """One exchange (a call, its result, the answer) in every form that carries tool calls: (row, --columns)."""
    args = {"city": "Paris"}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}, "id": "c1"}
    openai = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"},
              {"role": "assistant", "content": "It is sunny."}]
    dict_args = [*openai[:1], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}, *openai[2:]]
    sharegpt = [{"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": args})},
                {"from": "observation", "value": "sunny, 21 C"}, {"from": "gpt", "value": "It is sunny."}]
    return {
        "openai, arguments a JSON string": ({"messages": openai, "tools": [WEATHER]}, None),
        "openai, arguments an object, OpenAI's tool schema": (
            {"messages": dict_args, "tools": [{"type": "function", "function": WEATHER}]}, None),
        "sharegpt, tools a JSON string": ({"conversations": sharegpt, "tools": json.dumps([WEATHER])}, None),
        "trl prompt-completion": ({"prompt": openai[:1], "completion": openai[1:], "tools": [WEATHER]}, None),
        "another column name": ({"messages": openai, "functions": [WEATHER]}, "tools=functions"),
    }


@pytest.fixture(scope="module")
def qwen_tok():
    """The tiny tokenizer with Qwen2.5's chat template (as TRL ships it), which renders tools, calls and results."""
    from pathlib import Path

    import trl
    from tiny_models import build_tokenizer

    tok = build_tokenizer(words=["get_weather", "Paris", "sunny"])
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    return tok


def test_tool_calls_carry_the_loss_and_tool_results_none(tmp_path, qwen_tok):
    """Every tool-calling form encodes to the same tokens: the schema in the system prompt, the loss on the call and
    the final answer, none on the tool's result. A table (parquet) reads the same as JSON."""
    import datasets

    encoded = {}
    for name, (row, columns) in _tool_forms().items():
        data = write_jsonl(tmp_path / "tools.jsonl", [row])
        s = load_samples(data, columns=columns)[0]
        learned, prompt = _masked(Formatter(qwen_tok), s)
        assert learned == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                           '<|im_end|>\nIt is sunny.<|im_end|>\n'), name
        assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt and "The weather of a city" in prompt, name
        encoded[name] = Formatter(qwen_tok).encode(s, train=True)["input_ids"]
    for name in ("sharegpt, tools a JSON string", "openai, arguments a JSON string"):  # a table: nulls fill structs
        datasets.Dataset.from_list([_tool_forms()[name][0]]).to_parquet(tmp_path / "tools.parquet")
        s = load_samples(str(tmp_path / "tools.parquet"))[0]
        encoded[f"parquet, {name}"] = Formatter(qwen_tok).encode(s, train=True)["input_ids"]
    assert len({tuple(ids) for ids in encoded.values()}) == 1, list(encoded)


def test_tools_beside_a_plain_question_reach_the_prompt(tmp_path, qwen_tok):
    row = {"instruction": "Weather in Paris?", "input": "", "output": "Ask get_weather.", "tools": json.dumps([WEATHER])}
    s = load_samples(write_jsonl(tmp_path / "alpaca.jsonl", [row]))[0]
    learned, prompt = _masked(Formatter(qwen_tok), s)
    assert learned == "Ask get_weather.<|im_end|>\n" and "The weather of a city" in prompt


def test_a_template_without_tool_support_is_named(tmp_path, tokenizer):
    row, _ = _tool_forms()["openai, arguments a JSON string"]
    s = load_samples(write_jsonl(tmp_path / "tools.jsonl", [row]))[0]
    with pytest.raises(DataError, match="sample line 1: field 'tools': the chat template of .* cannot render tool "
                                        r"calls and results: train a model whose template does \(Qwen2.5"):
        Formatter(tokenizer).encode(s, train=True)


def test_tool_data_as_preference_pairs_is_refused(tmp_path):
    from finetune.sources import load_preferences

    row, _ = _tool_forms()["sharegpt, tools a JSON string"]
    pair = {"conversations": row["conversations"][:3], "chosen": row["conversations"][3],
            "rejected": {"from": "gpt", "value": "No idea."}}
    with pytest.raises(DataError, match=r"sample line 1: field 'conversations\[1\]': tool calls.* are for SFT"):
        load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [pair]))
    with pytest.raises(DataError, match="sample line 1: field 'tools': tool calls.* are for SFT"):
        load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [{**pair, "tools": row["tools"]}]))


def test_tool_calls_train_through_the_cli(tmp_path, qwen_tok):
    """train.py on a tiny model whose template renders tools; the ChatML template without tool support stops with
    one line before anything is written (tests/test_bad_data.py)."""
    from conftest import run_cli
    from tiny_models import build_tiny_llm

    model = build_tiny_llm(tmp_path / "tiny-qwen-template", qwen_tok)
    row, _ = _tool_forms()["sharegpt, tools a JSON string"]
    data = write_jsonl(tmp_path / "tools.jsonl", [{**row, "id": str(i)} for i in range(4)])
    r = run_cli("train.py", "-m", model, "--train-data", data, "-b", "2", "--max-steps", "1", "--name", "tools",
                "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "log" / "tools" / "best" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ the CLIs
def _kto_rows(n=12):
    return [{"prompt": f"Name a colour ({i}).", "completion": "red" if i % 2 else "the old stone house",
             "label": bool(i % 2)} for i in range(n)]


def test_kto_and_sharegpt_pairs_train_through_the_cli(tiny_llm, tmp_path):
    from conftest import run_cli

    kto = write_jsonl(tmp_path / "kto.jsonl", _kto_rows())
    r = run_cli("train.py", "--trainer", "kto", "-m", tiny_llm, "--train-data", kto, "-b", "4", "--max-steps", "2",
                "--lr", "5e-3", "--name", "kto", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "kto"
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["trainer"] == "kto"
    pairs = [{"conversations": [{"from": "human", "value": f"Pick one ({i})."}],
              "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "house"}}
             for i in range(8)]
    r = run_cli("train.py", "--trainer", "dpo", "-m", tiny_llm, "--train-data",
                write_jsonl(tmp_path / "pairs.jsonl", pairs), "-b", "4", "--max-steps", "1", "--name", "dpo",
                "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]


def test_trl_forms_and_a_long_sample_train_through_the_cli(tiny_llm, tmp_path):
    """Prompt-completion (strings and messages) and --lm-text train; one alpaca row too long for --max-len is
    dropped and named (stderr, run.json), the rest trains."""
    from conftest import run_cli

    log = tmp_path / "log"
    pc = [{"prompt": f"Colour {i}?", "completion": "red"} for i in range(8)]
    conv = [{"prompt": [{"role": "user", "content": f"Colour {i}?"}],
             "completion": [{"role": "assistant", "content": "blue"}]} for i in range(8)]
    alpaca = [{"instruction": "Say a colour.", "input": "", "output": "red"} for _ in range(19)]
    alpaca.insert(5, {"instruction": "Say a colour.", "input": "", "output": "word " * 999})
    cases = {"pc": [write_jsonl(tmp_path / "pc.jsonl", pc)], "conv": [write_jsonl(tmp_path / "conv.jsonl", conv)],
             "lm": [write_jsonl(tmp_path / "lm.jsonl", [{"text": "the quick brown fox"}] * 8), "--lm-text"],
             "long": [tmp_path / "alpaca.json", "--max-len", "256"]}
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    for name, (data, *extra) in cases.items():
        r = run_cli("train.py", "-m", tiny_llm, "--train-data", data, *extra, "-b", "4", "--max-steps", "1",
                    "--name", name, "--log-dir", log)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    assert "1 training samples longer than --max-len 256 dropped (first: #5;" in r.stderr
    assert json.loads((log / "long" / "run.json").read_text())["dropped_ids"]["train"] == ["#5"]


def test_a_multi_image_conversation_trains_evaluates_and_generates(tiny_vlm, tmp_path):
    from conftest import run_cli
    from tiny_models import make_images

    images = make_images(tmp_path / "img", 8)
    rows = [{"id": f"c{i}", "messages": [
        {"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": images[i][1]},
        {"role": "user", "content": "And <image>this one?"}, {"role": "assistant", "content": images[i + 1][1]}],
        "images": [f"img/{images[i][0]}", f"img/{images[i + 1][0]}"]} for i in range(0, 8, 2)]
    data = write_jsonl(tmp_path / "convs.jsonl", rows)
    r = run_cli("train.py", "-m", tiny_vlm, "--train-data", data, "-b", "2", "--max-steps", "2", "--name", "vlm",
                "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "vlm"
    e = run_cli("eval.py", "-c", run, "--test-data", data, "-o", tmp_path / "results", "--max-new-tokens", "2")
    assert e.returncode == 0, e.stderr[-3000:]
    g = run_cli("generate.py", "-c", run, "--data", data, "-o", tmp_path / "a.jsonl", "--max-new-tokens", "2")
    assert g.returncode == 0, g.stderr[-3000:]
    prompts = [json.loads(x).get("prompt", "") for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(p.count("<|vision_start|>") == 2 and "<image>" not in p for p in prompts), prompts
