"""dataset.py: every layout, prompts, and the loss mask checked token by token."""
import gc
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trl
from jinja2 import TemplateError

import dataset
from conftest import write_jsonl
from dataset import (DataError, Formatter, SKELETON_CHECKS, Sample, classes_of, load_classes, load_prompts,
                     load_rvl_cdip, load_samples, infer_classes, normalize, parse_sample, RVL_CDIP_CLASSES, to_classes)
from finetune import sources, tokenise
from tiny_models import build_tokenizer


def _sample_files(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"s{i}.json").write_text(json.dumps({"text": f"doc {i}", "answer": "food", "question": "Q?"}))
    return folder


def test_layouts_give_the_same_samples(tmp_path):
    folder = _sample_files(tmp_path / "samples")
    tsv = tmp_path / "list.tsv"
    tsv.write_text("file\tlabel\n" + "".join(f"samples/s{i}.json\tfood\n" for i in range(3)))
    jsonl = write_jsonl(tmp_path / "s.jsonl", [{"id": f"s{i}", "text": f"doc {i}", "answer": "food",
                                                "question": "Q?"} for i in range(3)])
    js = tmp_path / "s.json"
    js.write_text(json.dumps([{"id": f"s{i}", "text": f"doc {i}", "answer": "food", "question": "Q?"}
                              for i in range(3)]))
    for path in (folder, tsv, jsonl, js):
        samples = load_samples(path)
        assert [s.id for s in samples] == ["s0", "s1", "s2"], path
        assert [s.document for s in samples] == ["doc 0", "doc 1", "doc 2"]
        assert all(s.answer == "food" for s in samples)


def test_rvl_cdip_layout(tmp_path):
    for name, idx in [("train_0000_13_aws", 13), ("train_0001_2_aws", 2), ("validation_0000_0_aws", 0),
                      ("test_0003_15_aws", 15)]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"ocr": f"text of {name}"}))
    train = load_rvl_cdip(tmp_path, "train", RVL_CDIP_CLASSES, "_aws", {"question": ["Class?"]})
    assert [(s.id, s.answer) for s in train] == [("train_0000_13_aws", "questionnaire"), ("train_0001_2_aws", "email")]
    assert [s.answer for s in load_rvl_cdip(tmp_path, "test", RVL_CDIP_CLASSES, "_aws", {"question": ["Q"]})] == \
        ["memo"]
    with pytest.raises(DataError, match="class index.*13 but only 4 classes"):
        load_rvl_cdip(tmp_path, "train", ["a", "b", "c", "d"], "_aws", {"question": ["Q"]})


def test_conversations_and_sharegpt(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    a, b = load_samples(path)
    assert a.turns == [("user", "hi"), ("assistant", "hello")]
    assert b.turns == [("user", "hi"), ("assistant", "yo")]


def test_prompts_and_classes_files(tmp_path):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps({"system": ["S1", "S2"], "question": ["Q1"]}))
    assert load_prompts(p) == {"system": ["S1", "S2"], "question": ["Q1"]}
    c = tmp_path / "classes.txt"
    c.write_text("food\nlaw\n\n")
    assert load_classes(c) == ["food", "law"]
    assert infer_classes(load_samples(write_jsonl(tmp_path / "x.jsonl", [
        {"text": "a", "answer": "x", "question": "q"}, {"text": "b", "answer": "y", "question": "q"},
        {"text": "c", "answer": "x", "question": "q"}, {"text": "d", "answer": "y", "question": "q"}]))) == ["x", "y"]
    assert normalize("  Food. ") == "food"


SPELLINGS = ["food", "Food.", "FOOD", " food ", "law", "Law!", "law", "food"]


def test_one_class_matching_rule(tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "v.jsonl", [{"text": f"t{i}", "answer": a, "question": "q"}
                                                              for i, a in enumerate(SPELLINGS)]))
    classes = infer_classes(samples)  # variants merge; each class is named by its most frequent spelling
    assert classes == ["food", "law"]
    mapped = to_classes(samples, classes)
    assert [s.answer for s in mapped] == ["food", "food", "food", "food", "law", "law", "law", "food"]
    assert [s.answer for s in samples] == SPELLINGS  # the loaded samples themselves are not changed in place
    assert to_classes(samples, ["Food", "LAW"])[1].answer == "Food"  # a --classes file names the classes
    with pytest.raises(DataError, match=r"v.jsonl: sample line 1: field 'answer': 'food' is not one of the classes"):
        to_classes(samples, ["law", "love"])


def _answers(answers):
    return [Sample(id=str(i), file="f", turns=[("user", "q"), ("assistant", a)]) for i, a in enumerate(answers)]


def test_classes_of_tells_when_every_answer_is_its_class_name_already():
    """classes_of is infer_classes plus whether to_classes would change anything (train.py then skips that pass)."""
    spelled = _answers(["food", "law", "food", "law"])
    assert classes_of(spelled) == (["food", "law"], True) and infer_classes(spelled) == ["food", "law"]
    for variant in ("Food.", " food", "food "):  # a variant of a class name, surrounding whitespace included
        samples = spelled + _answers([variant])
        classes, spelled_already = classes_of(samples)
        assert classes == ["food", "law"] and not spelled_already
        assert [s.answer for s in to_classes(samples, classes)][-1] == "food"  # the variant is renamed
    assert classes_of(_answers(["one answer", "another one"])) == (None, False)  # free text: no classes


def _labels(tokenizer, enc):
    """The text of the positions that carry labels."""
    return tokenizer.decode([t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100])


def test_chat_format_labels_only_the_answer(tokenizer, tmp_path):
    s = load_samples(write_jsonl(tmp_path / "a.jsonl", [{"text": "the doc", "answer": "food", "question": "Which?",
                                                          "system": "Be brief."}]))[0]
    fmt = Formatter(tokenizer)
    enc = fmt.encode(s)
    text = tokenizer.decode(enc["input_ids"])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nthe doc\n\nWhich?<|im_end|>\n"
                    "<|im_start|>assistant\nfood<|im_end|>\n")
    assert _labels(tokenizer, enc) == "food<|im_end|>\n"
    # token by token: every position before the answer is masked, every one from it on is labelled
    n_prompt = len(fmt.prompt_ids(s))
    assert enc["input_ids"][:n_prompt] == fmt.prompt_ids(s)
    assert all(l == -100 for l in enc["labels"][:n_prompt])
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tokenizer.convert_ids_to_tokens(enc["labels"][n_prompt + len(tokenizer("food", add_special_tokens=False)
                                                                         ["input_ids"])]) == "<|im_end|>"


def test_plain_format_labels(tokenizer, tmp_path):
    s = load_samples(write_jsonl(tmp_path / "a.jsonl", [{"text": "the doc", "answer": "law"}]),
                           require_question=False)
    fmt = Formatter(tokenizer, response_template="### Classification:")
    enc = fmt.encode(s[0])
    assert tokenizer.decode(enc["input_ids"]) == "the doc\n\n### Classification: law<|im_end|>"
    assert _labels(tokenizer, enc) == " law<|im_end|>"


def test_multi_turn_labels_every_assistant_turn(tokenizer, tmp_path):
    s = load_samples(write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "red"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": "blue"}]}]))[0]
    enc = Formatter(tokenizer).encode(s)
    labelled = [(tokenizer.decode([t]), l != -100) for t, l in zip(enc["input_ids"], enc["labels"])]
    spans, cur = [], ""
    for tok, on in labelled:
        if on:
            cur += tok
        elif cur:
            spans.append(cur)
            cur = ""
    spans.append(cur) if cur else None
    assert spans == ["red<|im_end|>\n", "blue<|im_end|>\n"]
    assert "two" not in "".join(spans) and "one" not in "".join(spans)


def test_prompts_drawn_per_sample_reproducibly(tokenizer, tmp_path):
    rows = [{"id": f"s{i}", "text": f"doc {i}", "answer": "food"} for i in range(20)]
    prompts = {"system": ["SA", "SB"], "question": ["QA", "QB", "QC"]}
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", rows), prompts)
    fmt = Formatter(tokenizer, prompts=prompts, seed=1)
    train_texts = [tokenizer.decode(fmt.encode(s, train=True)["input_ids"]) for s in samples]
    assert train_texts == [tokenizer.decode(fmt.encode(s, train=True)["input_ids"]) for s in samples]
    assert len({t.split("user\n")[1].split("<|im_end|>")[0].split("\n\n")[1] for t in train_texts}) > 1
    eval_texts = [tokenizer.decode(fmt.encode(s)["input_ids"]) for s in samples]
    assert all("SA" in t and "QA" in t for t in eval_texts)


def test_max_len_truncates_the_document_not_the_answer(tokenizer, tmp_path):
    long = " ".join(["computers food law love"] * 200)
    s = load_samples(write_jsonl(tmp_path / "a.jsonl", [{"text": long, "answer": "love", "question": "Which?"}]))[0]
    fmt = Formatter(tokenizer, max_len=64)
    enc = fmt.encode(s)
    assert len(enc["input_ids"]) <= 64
    assert _labels(tokenizer, enc) == "love<|im_end|>\n"
    assert "Which?" in tokenizer.decode(enc["input_ids"])
    assert fmt.truncated == 1
    short = Formatter(tokenizer, max_len=8)
    assert short.encode(s) is None and short.dropped_ids == [s.id]  # no room even for the answer: dropped, named


def _bos_tokenizer(adds_bos: bool):
    """The tiny tokenizer with a BOS token written by its chat template, and (adds_bos) put in front of every text by
    the tokenizer itself too, as Llama-style tokenizers do."""
    from tokenizers import processors

    tok = build_tokenizer(words=["red", "blue"])
    tok.bos_token = "<|endoftext|>"
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                     special_tokens=[("<|endoftext|>", 0)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_segments_tokenise_as_each_would_alone(tmp_path):
    """encode tokenises a sample's segments in one call: the ids are still each segment's own, the tokenizer's BOS
    only in front of the first (plain format), the loss on the answers only."""
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", [
        {"text": "the doc", "answer": "red", "question": "Which?", "system": "S"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
                      {"role": "assistant", "content": "red"}, {"role": "user", "content": "two"},
                      {"role": "assistant", "content": "blue"}]}]))
    tok = _bos_tokenizer(adds_bos=True)
    for fmt in (Formatter(tok), Formatter(tok, response_template="### Answer:")):
        plain = fmt.response_template is not None
        for s in samples:
            ids, labels = [], []
            for i, (text, trainable) in enumerate(fmt.segments(s, s.turns, s.document)):
                t = tok(text, add_special_tokens=plain and i == 0)["input_ids"]
                ids, labels = ids + t, labels + (t if trainable else [-100] * len(t))
            enc = fmt.encode(s)
            assert (enc["input_ids"], enc["labels"]) == (ids, labels)
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's or the tokenizer's
            assert _labels(tok, enc).endswith(f"{s.answer}<|im_end|>" + ("" if plain else "\n"))


def _segment_by_segment(tok, fmt, s):
    """A sample's ids and labels from a tokenizer call per segment, the way encode must match."""
    ids, labels = [], []
    for text, trainable in fmt.segments(s, s.turns, s.document):
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids, labels = ids + t, labels + (t if trainable else [-100] * len(t))
    return ids, labels


@pytest.mark.parametrize("case", ["pieces", "a special token strips the space before it", "pieces that differ"])
def test_many_samples_tokenise_as_each_would_alone(tmp_path, monkeypatch, case):
    """encode_many tokenises a batch of samples at once, text that repeats from row to row (the system prompt, the
    tool schema) once: every row's ids are still each segment's own. A special token that strips the whitespace in
    front of it joins text across a piece's end, so the Formatter tokenises whole segments there; so it does when
    its check finds pieces whose ids differ from the whole text's (here: pieces cut inside words)."""
    from tokenizers import AddedToken

    tok = build_tokenizer(words=["get_weather", "red", "blue"])
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    strips = case == "a special token strips the space before it"
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|mark|>", lstrip=strips, special=True)]})
    if case == "pieces that differ":
        monkeypatch.setattr(Formatter, "_special_split", lambda self: re.compile("(?=o)").split)
    tools = [{"name": "get_weather", "description": "The weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    rows = [{"messages": [{"role": "user", "content": f"Weather in town {i}?  <|mark|> now"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather",
                                                                "arguments": json.dumps({"city": f"town {i}"})}}]},
                          {"role": "tool", "content": ["red", "blue"][i % 2]},
                          {"role": "assistant", "content": f"It is {['red', 'blue'][i % 2]}."}], "tools": tools}
            for i in range(40)] + [{"text": f"doc {i}", "answer": "red", "question": "Which?"} for i in range(40)]
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", rows))
    fmt = Formatter(tok)
    for first, rest in ((0, 40), (40, 80)):  # the first call checks the pieces against whole segments; later ones use them
        encoded = fmt.encode_many(samples[first:rest])
        for s, enc in zip(samples[first:rest], encoded):
            assert (enc["input_ids"], enc["labels"]) == _segment_by_segment(tok, fmt, s), s.id
    pieces = fmt.__dict__["_pieces"]
    assert (pieces["split"] is None) == (case != "pieces")
    if case == "pieces":
        assert pieces["checked"] >= 64 and any("get_weather" in p and len(p) > 200 for p in pieces["ids"])  # the schema


def test_encoding_rows_leaves_no_reference_cycles(tmp_path):
    """Validating and tokenising run with Python's cyclic garbage collector paused (tokenise.collection_paused):
    rows read from a table and encoded, tool calls and documents alike, must leave nothing only it would free."""
    tok = build_tokenizer(words=["get_weather", "red", "blue"])
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "town"})}}]
    tools = json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])
    shapes = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                                         "tool_calls": call},
                            {"role": "tool", "content": "red"}, {"role": "assistant", "content": "It is red."}],
               "tools": tools},
              {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"},
                            {"role": "assistant", "content": "blue"}], "tools": None}]
    rows = [json.loads(json.dumps(shapes[i % 2]).replace("red", f"red {i}")) for i in range(120)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    samples = sources.load_samples(str(tmp_path / "t.parquet"))  # a table: each row parsed as it is read
    fmt = Formatter(tok)
    fmt.encode_many([samples[i] for i in range(8)], train=True)  # the caches filled first
    gc.collect()
    with tokenise.collection_paused():
        for start in range(8, 120, 16):
            fmt.encode_many([samples[i] for i in range(start, min(120, start + 16))], train=True)
        assert not gc.isenabled()
        assert gc.collect() == 0
    assert gc.isenabled()


CHAT_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SCHEMAS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {}}}}}]


def _shapes(i, text):
    """Rows of each conversation shape, their strings text(i, part)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": text(i, "c")})}}
    return [{"messages": [{"role": "user", "content": text(i, "u")}, {"role": "assistant", "content": text(i, "a")}]},
            {"messages": [{"role": "system", "content": text(i, "s")}, {"role": "user", "content": text(i, "u")},
                          {"role": "assistant", "content": text(i, "a")}, {"role": "user", "content": text(i, "v")},
                          {"role": "assistant", "content": text(i, "b")}]},
            {"messages": [{"role": "user", "content": text(i, "u")},
                          {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "content": text(i, "t")}, {"role": "assistant", "content": text(i, "a")}],
             "tools": SCHEMAS},
            {"messages": [{"role": "user", "content": text(i, "u")}]}]  # a prompt to answer


# strings that templates treat by their text: trimmed, split at </think>, escaped by tojson, tested for a tag
ODD_STRINGS = [lambda i, part: f"  {part} {i}  \n", lambda i, part: f"<think>why {i}</think>{part}",
               lambda i, part: "", lambda i, part: f'{part} "{i}" \\ \u00e9', lambda i, part: f"<tool_call>{part}"]


def _segments_or_error(fmt, rec):
    try:
        s = parse_sample(rec, Path("a.jsonl"), "x", require_answer=False)
        return fmt.segments(s, s.turns, s.document)
    except (DataError, TemplateError, TypeError) as e:  # TypeError: a template's tojson of a field it lacks
        return type(e).__name__, str(e)


@pytest.mark.parametrize("template", sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
def test_skeletons_render_as_each_prefix_would(template, monkeypatch):
    """A conversation's prefixes filled into its shape's skeleton are what rendering each prefix gives, on every
    chat template TRL ships: rows of one shape after the first (the skeleton serves them), and rows whose strings a
    template treats by their text (the whole render differs from the filled skeleton: each prefix is rendered).
    Where a template cannot render a row, the error is the same either way."""
    tok = build_tokenizer(words=["red", "blue"])
    tok.chat_template = (CHAT_TEMPLATES / f"{template}.jinja").read_text()
    rows = [r for i in range(SKELETON_CHECKS + 2) for r in _shapes(i, lambda i, part: f"{part} {i} red blue")]
    rows += [r for k, odd in enumerate(ODD_STRINGS) for r in _shapes(k, odd)]
    fmt = Formatter(tok)
    filled = [_segments_or_error(fmt, r) for r in rows]
    assert any(p["parts"] and p["rows"] > SKELETON_CHECKS for p in fmt.__dict__["_skeletons"].plans.values()) \
        or template.startswith(("deepseek", "llama3", "llava", "nemotron"))  # prefixes that do not nest here
    monkeypatch.setattr(dataset, "SKELETONS", 0)
    each = Formatter(tok)
    for row, got in zip(rows, filled):
        assert got == _segments_or_error(each, row), row


def _chatml_using(use):
    """A ChatML template that writes each message's content (c) and then does `use` with it."""
    return ("{%- macro echo(x) -%}{{ x }}{%- endmacro -%}"
            "{%- for message in messages -%}{%- set c = message['content'] -%}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + c -}}" + use + "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


# what a template does with a message's string -> whether its shapes are trusted (their rows get no render)
STRING_USES = {
    "": True, "{{- c | tojson -}}": True, "{{- ' ' ~ c ~ ' ' -}}": True,
    # recorded by the probe
    "{{- c | trim -}}": False, "{%- if '</think>' in c -%}T{%- endif -%}": False, "{{- c[:3] -}}": False,
    "{%- set t = '<' + c -%}{{- t.split('</think>')[0] -}}": False, "{{- c | length -}}": False,
    "{%- if c == 'red' -%}T{%- endif -%}": False, "{{- c | upper -}}": False, "{{- c | e -}}": False,
    "{%- for ch in c -%}.{%- endfor -%}": False, "{{- '%5s' % c -}}": False,
    "{{- c | tojson(ensure_ascii=True) -}}": False,  # the canary's \u00e9 is escaped: not the JSON mode
    # what the probe cannot see, refused by reading the template
    "{%- if c in 'red blue' -%}T{%- endif -%}": False, "{%- set t = '<' ~ c -%}{{- t.split('</think>')[0] -}}": False,
    "{{- c | int -}}": False, "{{- c | wordcount -}}": False, "{%- set t -%}{{ c }}{%- endset -%}{{- t | trim -}}": False,
    "{{- '{:>30}'.format(c) -}}": False, "{%- set t = echo(c) -%}{{- t | trim -}}": False,
    "{{- [c] | join(' ') | trim -}}": False, "{%- set t = c | tojson -%}{{- t[:4] -}}": False,
    "{{- [c] | map('wordcount') | first -}}": False, "{{- [c] | select('in', 'red blue') | list | length -}}": False,
}


@pytest.mark.parametrize("use", STRING_USES)
def test_trusted_shapes_are_those_whose_strings_are_only_written(use, monkeypatch):
    """A shape is trusted only when its template writes each string without looking at it; every other use, whether
    the probe records it or only the template's text shows it, keeps the per-row render. Rows whose strings change
    what such a use writes (trimmed, a tag, a number, a word count, padding, quotes) come out as one-by-one rendering."""
    tok = build_tokenizer(words=["red", "blue"])
    tok.chat_template = _chatml_using(use)
    odd = ["red", "12", '  a </think> b "q" \\ \u00e9  ', "x" * 40]
    rows = [{"messages": [{"role": "user", "content": f"u{i} blue"}, {"role": "assistant", "content": f"a{i} red"}]}
            for i in range(SKELETON_CHECKS + 2)]
    rows += [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u in odd for a in odd]
    fmt = Formatter(tok)
    filled = [_segments_or_error(fmt, r) for r in rows]
    assert [p["modes"] is not None for p in fmt.__dict__["_skeletons"].plans.values()] == [STRING_USES[use]]
    monkeypatch.setattr(dataset, "SKELETONS", 0)
    each = Formatter(tok)
    for row, got in zip(rows, filled):
        assert got == _segments_or_error(each, row), row


@pytest.mark.parametrize("extra", [[], ["[INST]", "[/INST]", "<<SYS>>"]])
def test_text_pieces_start_where_each_special_token_starts(extra):
    """Formatter.text_ids cuts a text into pieces where each special token starts: the same cuts as a split at every
    such position, whether the special tokens share their first character (matched whole) or not."""
    tok = build_tokenizer(extra_special_tokens=extra)
    names = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    at_each = re.compile("(?=" + "|".join(map(re.escape, names)) + ")")
    split = Formatter(tok)._special_split()
    rng = random.Random(0)
    fragments = names + ["<", "|", "<|im", "_end|>", "[", "/INST", "a b", "\n", "<<", " <|x|> ", "\u00e9"]
    texts = ["", "<", "<<|im_end|>", "<|im_start|><|im_start|>"] + \
        ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))) for _ in range(500)]
    for text in texts:
        assert split(text) == [p for p in at_each.split(text) if p], text


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_pieces_match_a_sentencepiece_style_tokenizer(tmp_path, scheme):
    """A Metaspace tokenizer (Llama 2, Mistral, Gemma) marks a word's start, and with prepend_scheme "first" only the
    text's first word: a piece that starts at a special token must still tokenise as it does inside the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the weather in town is red blue sunny what which colour answer question of a".split()
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    corpus = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}" for i in range(300)]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    rows = [{"messages": [{"role": "system", "content": "Answer the question of the town."},
                          {"role": "user", "content": f"what colour is town {i}?"},
                          {"role": "assistant", "content": ["red", "blue"][i % 2]},
                          {"role": "user", "content": "and the weather?"},
                          {"role": "assistant", "content": " sunny"}]} for i in range(80)]
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", rows))
    fmt = Formatter(tok)
    encoded = fmt.encode_many(samples[:40]) + fmt.encode_many(samples[40:])
    for s, enc in zip(samples, encoded):
        assert (enc["input_ids"], enc["labels"]) == _segment_by_segment(tok, fmt, s), s.id
    assert fmt.__dict__["_pieces"]["split"] is not None and fmt.__dict__["_pieces"]["checked"] >= 64


def test_prompt_text_drops_the_templates_bos_only_when_the_tokenizer_adds_its_own(tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}", "answer": "red",
                                                                "question": "Which?", "system": "S"} for i in range(3)]))
    for adds in (True, False):
        fmt = Formatter(_bos_tokenizer(adds))
        texts = [fmt.prompt_text(s) for s in samples]
        assert all(t.startswith("<|endoftext|>") != adds and t.endswith("<|im_start|>assistant\n") for t in texts)
        assert [len(fmt.tokenizer(t)["input_ids"]) for t in texts] == [len(fmt.prompt_ids(s)) for s in samples]


def test_a_reply_text_is_its_answer_segment_in_a_conversation(tokenizer):
    """answer_text (DPO's replies, --predict score's class texts) renders the prompt before a reply once per Formatter:
    each reply's text is still the one a conversation ending in it gives, whatever was asked before."""
    def in_conversation(fmt, answer):
        s = Sample(id="s", file="f", turns=[("user", "q"), ("assistant", answer)])
        return fmt.segments(s, s.turns, None)[-1][0].rstrip("\n")

    answers = ["red", "blue and more", "", "red"]
    first, second = Formatter(tokenizer), Formatter(tokenizer)
    assert [first.answer_text(a) for a in answers] == [in_conversation(first, a) for a in answers]
    assert [second.answer_text(a) for a in reversed(answers)] == [in_conversation(first, a) for a in reversed(answers)]
    assert first.answer_text("red") == "red<|im_end|>"
