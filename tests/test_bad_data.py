"""Bad data, systematically: every layout and mode, one table of malformed inputs.

Each case runs the real CLI and must end in exactly one stderr line naming the file, the sample and the field, with
exit status 2, no traceback and nothing written. Data is checked before a model is loaded, so a case takes about a
second; only the --max-len and chat-template cases load the (tiny) tokenizer. What can be handled (a BOM, a TSV's extra columns,
documents longer than --max-len, paths outside the data folder with --allow-outside-paths) is tested below the table.
"""
import json
import os

import pytest

from conftest import run_cli, write_jsonl
from dataset import DataError, Formatter, load_classes, load_preferences, load_prompts, load_rvl_cdip, load_samples

GOOD = {"text": "a doc", "answer": "red", "question": "Which?"}
PREF = {"prompt": "Which?", "chosen": "red", "rejected": "blue"}


# ------------------------------------------------------------------------------------------------ helpers
def _jsonl(tmp, rows, name="data.jsonl"):
    return write_jsonl(tmp / name, rows)


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(path)
    return path


def _prompts(tmp, data=None):
    (tmp / "p.json").write_text(json.dumps(data or {"question": ["Which?"]}))
    return tmp / "p.json"


def _folder(tmp, files):
    (tmp / "samples").mkdir()
    for name, content in files.items():
        p = tmp / "samples" / name
        p.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return tmp / "samples"


def _run(tmp, llm, classes=None):
    """A run folder as train.py leaves it; eval and generate check the data before they load its weights."""
    run = tmp / "run"
    (run / "best").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": str(llm), "classes": classes, "vision": False, "max_len": 64,
                                              "task": "classification" if classes else "generation"}))
    (run / "best" / "adapter_config.json").write_text("{}")
    (run / "best" / "adapter_model.safetensors").write_bytes(b"")
    return run


def train(*args):
    return "train.py", ["-m", "{llm}", *args]


def evaluate(*args):
    return "eval.py", list(args)


# ------------------------------------------------------------------------------------------------ the table
# case(tmp, llm) -> ((script, args), [substrings the one error line must hold: file, sample, field, what])
def case_broken_json_jsonl(tmp, llm):
    p = tmp / "data.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    return train("--train-data", p), ["data.jsonl", "sample line 2", "invalid JSON"]


def case_broken_json_in_folder(tmp, llm):
    d = _folder(tmp, {"a.json": GOOD, "b.json": b'{"text": "x", "answer": '})
    return train("--train-data", d), ["b.json", "sample b", "invalid JSON"]


def case_json_list_item_not_an_object(tmp, llm):
    (tmp / "data.json").write_text(json.dumps([GOOD, "oops"]))
    return train("--train-data", tmp / "data.json"), ["data.json", "sample #1", "expected a JSON object, got str"]


def case_empty_jsonl(tmp, llm):
    (tmp / "data.jsonl").write_bytes(b"")
    return train("--train-data", tmp / "data.jsonl"), ["data.jsonl", "holds no samples"]


def case_empty_directory(tmp, llm):
    (tmp / "empty").mkdir()
    return train("--train-data", tmp / "empty"), ["empty", "no .json sample files"]


def case_missing_answer(tmp, llm):
    return train("--train-data", _jsonl(tmp, [GOOD, {"text": "x", "question": "q"}])), \
        ["data.jsonl", "sample line 2", "field 'answer'", "missing"]


def case_answer_not_a_string(tmp, llm):
    return train("--train-data", _jsonl(tmp, [GOOD, {**GOOD, "answer": 3}])), \
        ["data.jsonl", "sample line 2", "field 'answer'", "expected a string, got int"]


def case_empty_answer(tmp, llm):
    return train("--train-data", _jsonl(tmp, [GOOD, {**GOOD, "answer": "  "}])), \
        ["data.jsonl", "sample line 2", "field 'answer'", "empty string"]


def case_empty_question(tmp, llm):
    return train("--train-data", _jsonl(tmp, [{**GOOD, "question": ""}])), \
        ["data.jsonl", "sample line 1", "field 'question'", "empty string"]


def case_id_of_the_wrong_type(tmp, llm):
    return train("--train-data", _jsonl(tmp, [{**GOOD, "id": ["a"]}])), \
        ["data.jsonl", "sample line 1", "field 'id'", "expected a string or an integer, got list"]


def case_no_question_anywhere(tmp, llm):
    return train("--train-data", _jsonl(tmp, [{"text": "doc", "answer": "x"}])), \
        ["data.jsonl", "sample line 1", "field 'question'", "prompts.json"]


def case_duplicate_ids_jsonl(tmp, llm):
    return train("--train-data", _jsonl(tmp, [{**GOOD, "id": "a"}, GOOD, {**GOOD, "id": "a"}])), \
        ["data.jsonl", "sample line 3", "field 'id'", "duplicate sample id 'a': also sample line 1"]


def case_duplicate_ids_across_a_folder(tmp, llm):
    d = _folder(tmp, {"a.json": {**GOOD, "id": 7}, "b.json": {**GOOD, "id": "7"}})
    return train("--train-data", d), ["b.json", "sample b", "field 'id'", "duplicate sample id '7'", "a.json: sample a"]


def case_non_utf8_jsonl(tmp, llm):
    p = tmp / "data.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9", "answer": "x", "question": "q"}\n')
    return train("--train-data", p), ["data.jsonl", "sample line 2", "field 'text'", "not UTF-8"]


def case_non_utf8_in_a_message(tmp, llm):
    msgs = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\xff\xfe"}]}'
    d = _folder(tmp, {"a.json": msgs})
    return train("--train-data", d), ["a.json", "sample a", "field 'messages[1].content'", "not UTF-8"]


def case_unknown_role(tmp, llm):
    rows = [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    return train("--train-data", _jsonl(tmp, rows)), \
        ["data.jsonl", "sample line 1", "field 'messages[0].role'", "unknown role 'robot'"]


def case_sharegpt_value_not_a_string(tmp, llm):
    rows = [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 5}]}]
    return train("--train-data", _jsonl(tmp, rows)), \
        ["data.jsonl", "sample line 1", "field 'conversations[1].value'", "expected a string, got int"]


def case_missing_image(tmp, llm):
    return train("--train-data", _jsonl(tmp, [{**GOOD, "image": "nope.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "'nope.png' not found"]


def case_zero_byte_image(tmp, llm):
    (tmp / "blank.png").write_bytes(b"")
    return train("--train-data", _jsonl(tmp, [{**GOOD, "image": "blank.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "empty (0 bytes)"]


def case_corrupt_image(tmp, llm):
    bad = bytearray(_png(tmp / "good.png").read_bytes())
    bad[bad.index(b"IDAT") + 6] ^= 0xFF  # a damaged pixel chunk: the header still opens, its checksum fails
    (tmp / "bad.png").write_bytes(bad)
    return train("--train-data", _jsonl(tmp, [{**GOOD, "image": "good.png"}, {**GOOD, "image": "bad.png"}])), \
        ["data.jsonl", "sample line 2", "field 'image'", "'bad.png' cannot be read", "checksum"]


def case_truncated_jpeg(tmp, llm):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp / "full.jpg")
    (tmp / "half.jpg").write_bytes((tmp / "full.jpg").read_bytes()[:300])  # an interrupted download
    return train("--train-data", _jsonl(tmp, [{**GOOD, "image": "half.jpg"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "'half.jpg' cannot be read"]


def case_not_an_image(tmp, llm):
    (tmp / "notes.png").write_text("not a picture")
    return train("--train-data", _jsonl(tmp, [{**GOOD, "image": "notes.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "cannot be read"]


def case_image_outside_the_data_folder(tmp, llm):
    _png(tmp / "elsewhere.png")
    return train("--train-data", _jsonl(tmp / "data", [{**GOOD, "image": "../elsewhere.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "path outside the data folder", "--allow-outside-paths"]


def case_absolute_image_path_outside(tmp, llm):
    img = _png(tmp / "elsewhere.png")
    return train("--train-data", _jsonl(tmp / "data", [{**GOOD, "image": str(img)}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "path outside the data folder"]


def case_image_symlink_pointing_outside(tmp, llm):
    (tmp / "data").mkdir()
    os.symlink(_png(tmp / "elsewhere.png"), tmp / "data" / "link.png")
    return train("--train-data", _jsonl(tmp / "data", [{**GOOD, "image": "link.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "path outside the data folder"]


def case_tsv_missing_file(tmp, llm):
    (tmp / "a.json").write_text(json.dumps(GOOD))
    (tmp / "list.tsv").write_text("file\tlabel\na.json\tred\nmissing.json\tred\n")
    return train("--train-data", tmp / "list.tsv"), ["list.tsv", "sample line 3", "field 'file'", "'missing.json'"]


def case_tsv_empty_first_column(tmp, llm):
    (tmp / "a.json").write_text(json.dumps(GOOD))
    (tmp / "list.tsv").write_text("a.json\tred\n\n\tblue\n")
    return train("--train-data", tmp / "list.tsv"), ["list.tsv", "sample line 3", "field 'file'", "empty first column"]


def case_tsv_entry_outside_the_data_folder(tmp, llm):
    (tmp / "a.json").write_text(json.dumps(GOOD))
    (tmp / "data").mkdir()
    (tmp / "data" / "list.tsv").write_text("../a.json\n")
    return train("--train-data", tmp / "data" / "list.tsv"), \
        ["list.tsv", "sample line 1", "field 'file'", "path outside the data folder", "--allow-outside-paths"]


def case_tsv_lists_a_file_twice(tmp, llm):
    (tmp / "a.json").write_text(json.dumps(GOOD))
    (tmp / "list.tsv").write_text("a.json\n./a.json\n")
    return train("--train-data", tmp / "list.tsv"), ["list.tsv", "sample line 2", "field 'file'", "also line 1"]


def case_prompts_wrong_type(tmp, llm):
    return train("--train-data", _jsonl(tmp, [GOOD]), "-p", _prompts(tmp, {"question": "ok", "system": [1, 2]})), \
        ["p.json", "field 'system[0]'", "list of non-empty strings"]


def case_prompts_empty_list(tmp, llm):
    return train("--train-data", _jsonl(tmp, [GOOD]), "-p", _prompts(tmp, {"question": []})), \
        ["p.json", "field 'question'", "empty list"]


def case_classes_file_with_duplicates(tmp, llm):
    (tmp / "classes.txt").write_text("red\nblue\n\nRed.\n")
    return train("--train-data", _jsonl(tmp, [GOOD]), "--classes", tmp / "classes.txt"), \
        ["classes.txt", "sample line 4", "duplicate class name 'Red.'", "also line 1"]


def case_classifier_answer_outside_the_classes(tmp, llm):
    (tmp / "classes.txt").write_text("red\nblue\n")
    return train("--classifier", "--classes", tmp / "classes.txt",
                 "--train-data", _jsonl(tmp, [GOOD, {**GOOD, "answer": "green"}])), \
        ["data.jsonl", "sample line 2", "field 'answer'", "'green' is not one of the classes"]


def case_validation_class_training_never_saw(tmp, llm):
    train_rows = [GOOD, GOOD | {"id": "2"}, {**GOOD, "answer": "blue"}, {**GOOD, "answer": "blue", "id": "4"}]
    return train("--train-data", _jsonl(tmp, train_rows), "--validation-data",
                 _jsonl(tmp, [{**GOOD, "answer": "green"}], "val.jsonl")), \
        ["val.jsonl", "sample line 1", "field 'answer'", "'green' is not one of the classes"]


def case_rvl_class_index_out_of_range(tmp, llm):
    (tmp / "rvl").mkdir()
    (tmp / "rvl" / "train_0001_99_aws.json").write_text(json.dumps({"ocr": "text"}))
    return train("-d", tmp / "rvl", "-p", _prompts(tmp)), \
        ["train_0001_99_aws.json", "sample train_0001_99_aws", "field 'class index'", "99"]


def case_rvl_missing_ocr(tmp, llm):
    (tmp / "rvl").mkdir()
    (tmp / "rvl" / "train_0001_2_aws.json").write_text(json.dumps({"text": "the text is under another key"}))
    return train("-d", tmp / "rvl", "-p", _prompts(tmp)), \
        ["train_0001_2_aws.json", "sample train_0001_2_aws", "field 'ocr'", "missing"]


def case_most_samples_too_long_for_max_len(tmp, llm):
    long_answer = " ".join(["computers food law love"] * 10)
    return train("--train-data", _jsonl(tmp, [{**GOOD, "answer": long_answer}, GOOD]), "--max-len", 8), \
        ["--train-data", "2 of 2 samples do not fit --max-len 8", "first: line 1, line 2", "raise --max-len"]


def case_kto_label_not_a_boolean(tmp, llm):
    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "yes"}]
    return train("--trainer", "kto", "-b", "2", "--train-data", _jsonl(tmp, rows)), \
        ["data.jsonl", "sample line 2", "field 'label'", "expected true or false"]


def case_image_placeholder_without_an_image(tmp, llm):
    row = {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "red"}]}
    return train("--train-data", _jsonl(tmp, [row])), \
        ["data.jsonl", "sample line 1", "field 'messages[0].content'", "placeholder without an image"]


def _tool_conv(call=None, first=None, tools=None):
    """A ShareGPT tool-calling conversation (LLaMA-Factory's form), with one turn or the tools replaced."""
    turns = [first or {"from": "human", "value": "Weather in Paris?"},
             {"from": "function_call", "value": call or '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]
    return {"conversations": turns, "tools": tools or '[{"name": "get_weather", "parameters": {"type": "object"}}]'}


def case_tool_call_not_valid_json(tmp, llm):
    return train("--train-data", _jsonl(tmp, [_tool_conv(), _tool_conv(call='{"name": "get_weather", ')])), \
        ["data.jsonl", "sample line 2", "field 'conversations[1].value'", "tool call is not valid JSON"]


def case_tool_call_without_a_name(tmp, llm):
    row = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}, {"role": "tool", "content": "sunny"}]}
    return train("--train-data", _jsonl(tmp, [row])), \
        ["data.jsonl", "sample line 1", "field 'messages[1].tool_calls[0]'", "a tool call without a 'name'"]


def case_tools_not_a_list_of_schemas(tmp, llm):
    return train("--train-data", _jsonl(tmp, [_tool_conv(tools='["get_weather"]')])), \
        ["data.jsonl", "sample line 1", "field 'tools[0]'", "expected a function schema"]


def case_tool_result_before_any_call(tmp, llm):
    return train("--train-data", _jsonl(tmp, [_tool_conv(first={"from": "observation", "value": "sunny"})])), \
        ["data.jsonl", "sample line 1", "field 'conversations[0]'", "a tool result before any tool call"]


def case_chat_template_without_tool_support(tmp, llm):
    return train("--train-data", _jsonl(tmp, [_tool_conv()])), \
        ["data.jsonl", "sample line 1", "field 'tools'", f"the chat template of {llm} cannot render tool calls"]


def case_dpo_missing_rejected(tmp, llm):
    return train("--trainer", "dpo", "--train-data", _jsonl(tmp, [PREF, {"prompt": "q", "chosen": "a"}])), \
        ["data.jsonl", "sample line 2", "field 'rejected'", "missing"]


def case_dpo_missing_rejected_messages(tmp, llm):
    row = {"prompt_messages": [{"role": "user", "content": "q"}],
           "chosen_messages": [{"role": "assistant", "content": "a"}]}
    return train("--trainer", "dpo", "--train-data", _jsonl(tmp, [row])), \
        ["data.jsonl", "sample line 1", "field 'rejected_messages'", "missing"]


def case_dpo_image_outside_the_data_folder(tmp, llm):
    _png(tmp / "elsewhere.png")
    return train("--trainer", "dpo", "--train-data", _jsonl(tmp / "data", [{**PREF, "image": "../elsewhere.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "path outside the data folder"]


def case_grpo_empty_message_list(tmp, llm):
    return train("--trainer", "grpo", "--train-data", _jsonl(tmp, [GOOD, {"messages": []}])), \
        ["data.jsonl", "sample line 2", "field 'messages'", "non-empty list"]


def case_eval_zero_shot_broken_json(tmp, llm):
    (tmp / "test.json").write_text('[{"text": "a", "answer": "red"},]')
    return evaluate("-m", llm, "--test-data", tmp / "test.json"), ["test.json", "invalid JSON", "line 1"]


def case_eval_zero_shot_image_outside(tmp, llm):
    _png(tmp / "elsewhere.png")
    return evaluate("-m", llm, "--test-data", _jsonl(tmp / "data", [{**GOOD, "image": "../elsewhere.png"}])), \
        ["data.jsonl", "sample line 1", "field 'image'", "path outside the data folder"]


def case_eval_rvl_ocr_not_a_string(tmp, llm):
    (tmp / "rvl").mkdir()
    (tmp / "rvl" / "test_0001_1_aws.json").write_text(json.dumps({"ocr": ["page 1"]}))
    return evaluate("-m", llm, "-d", tmp / "rvl", "-p", _prompts(tmp)), \
        ["test_0001_1_aws.json", "sample test_0001_1_aws", "field 'ocr'", "expected a string, got list"]


def case_eval_class_training_never_saw(tmp, llm):
    test = _jsonl(tmp, [GOOD, {**GOOD, "answer": "green"}])
    return evaluate("-c", _run(tmp, llm, ["red", "blue"]), "--test-data", test), \
        ["data.jsonl", "sample line 2", "field 'answer'", "'green' is not one of the classes the model was trained on"]


def case_generate_data_non_utf8(tmp, llm):
    p = tmp / "in.jsonl"
    p.write_bytes(b'{"question": "ok"}\n{"question": "\x80"}\n')
    return ("generate.py", ["-c", _run(tmp, llm), "--data", p]), \
        ["in.jsonl", "sample line 2", "field 'question'", "not UTF-8"]


def case_unknown_model(tmp, llm):
    return ("train.py", ["--train-data", _jsonl(tmp, [GOOD]), "-m", tmp / "no-such-model"]), \
        ["no-such-model", "no such model"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]
OUTPUT = {"train.py": ["--name", "bad", "--log-dir"], "eval.py": ["-o"], "generate.py": ["-o"]}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_llm):
    (script, args), expected = case(tmp_path, tiny_llm)
    out = tmp_path / "out"
    target = out / "answers.jsonl" if script == "generate.py" else out
    args = [tiny_llm if a == "{llm}" else a for a in args]
    r = run_cli(script, *args, *OUTPUT[script], target, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not out.exists()  # nothing half-written
    assert all(line.startswith("tokenised: ") for line in r.stdout.splitlines())  # (the --max-len share case)


# ------------------------------------------------------------------------------------------------ handled, not errors
def test_a_bom_is_accepted_in_every_file(tmp_path):
    bom = b"\xef\xbb\xbf"
    row = json.dumps({**GOOD, "id": "s0"}).encode()
    (tmp_path / "a.jsonl").write_bytes(bom + row + b"\n" + bom + json.dumps({**GOOD, "id": "s1"}).encode() + b"\n")
    (tmp_path / "a.json").write_bytes(bom + b"[" + row + b"]")
    (tmp_path / "s0.json").write_bytes(bom + json.dumps(GOOD).encode())
    (tmp_path / "list.tsv").write_bytes(bom + b"s0.json\tred\r\n")
    (tmp_path / "classes.txt").write_bytes(bom + b"red\r\nblue\r\n")
    (tmp_path / "p.json").write_bytes(bom + b'{"question": ["Which?"]}')
    assert [s.id for s in load_samples(tmp_path / "a.jsonl")] == ["s0", "s1"]  # the second: concatenated files
    assert [s.id for s in load_samples(tmp_path / "a.json")] == ["s0"]
    assert [s.answer for s in load_samples(tmp_path / "list.tsv")] == ["red"]
    assert load_classes(tmp_path / "classes.txt") == ["red", "blue"]
    assert load_prompts(tmp_path / "p.json")["question"] == ["Which?"]


def test_tsv_extra_columns_and_a_header_are_ignored(tmp_path):
    for i in range(2):
        (tmp_path / f"s{i}.json").write_text(json.dumps(GOOD))
    (tmp_path / "list.tsv").write_text("path\tlabel\tnotes\ns0.json\tred\textra\tmore\n\ns1.json\n")
    assert [s.id for s in load_samples(tmp_path / "list.tsv")] == ["s0", "s1"]


def test_a_json_string_may_hold_a_line_separator(tmp_path):
    # U+2028 is legal unescaped inside a JSON string; str.splitlines() would cut the line there
    (tmp_path / "a.jsonl").write_text(json.dumps({**GOOD, "text": "one\u2028two"}, ensure_ascii=False) + "\n")
    assert load_samples(tmp_path / "a.jsonl")[0].document == "one\u2028two"


def test_allow_outside_lets_the_same_data_through(tmp_path):
    img = _png(tmp_path / "elsewhere.png")
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    data = tmp_path / "data"
    rows = [{**GOOD, "id": "rel", "image": "../elsewhere.png"}, {**GOOD, "id": "abs", "image": str(img)}]
    jsonl = _jsonl(data, rows)
    (data / "list.tsv").write_text("../a.json\n")
    (data / "rvl").mkdir()
    (data / "rvl" / "train_0_1_aws.json").write_text(json.dumps({"ocr": "x", "image": "../../elsewhere.png"}))
    prefs = _jsonl(data, [{**PREF, "image": "../elsewhere.png"}], "prefs.jsonl")
    loaders = [lambda **k: load_samples(jsonl, **k), lambda **k: load_samples(data / "list.tsv", **k),
               lambda **k: load_preferences(prefs, **k),
               lambda **k: load_rvl_cdip(data / "rvl", "train", ["a", "b"], prompts={"question": ["Q"]}, **k)]
    for load in loaders:
        with pytest.raises(DataError, match="outside the data folder.*--allow-outside-paths"):
            load()
        assert load(allow_outside=True)
    assert [s.image for s in load_samples(jsonl, allow_outside=True)] == [str(img), str(img)]


def test_the_flag_reaches_the_loaders(tmp_path, tiny_llm):
    """--allow-outside-paths gets past the outside image, so the run stops at the next problem: line 2."""
    _png(tmp_path / "elsewhere.png")
    data = _jsonl(tmp_path / "data", [{**GOOD, "image": "../elsewhere.png"}, {**GOOD, "answer": 3}])
    for script, args in [("train.py", ["-m", tiny_llm, "--train-data", data, "--log-dir", tmp_path / "log"]),
                         ("eval.py", ["-m", tiny_llm, "--test-data", data, "-o", tmp_path / "log"]),
                         ("generate.py", ["-c", _run(tmp_path, tiny_llm), "--data", data])]:
        r = run_cli(script, *args, "--allow-outside-paths")
        assert r.returncode == 2 and "sample line 2: field 'answer'" in r.stderr, (script, r.stderr)


def test_documents_longer_than_max_len_are_a_warning_with_a_count(tokenizer, tmp_path):
    long = " ".join(["computers food law love"] * 50)
    rows = [{**GOOD, "text": long}, GOOD, {**GOOD, "text": long}]
    convo = {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "red"}]}
    samples = load_samples(_jsonl(tmp_path, rows + [convo]))
    fmt = Formatter(tokenizer, max_len=48)
    encoded = [fmt.encode(s, train=True) for s in samples]
    assert all(len(e["input_ids"]) <= 48 for e in encoded[:3])
    assert encoded[3] is None  # a conversation has no document to cut: dropped, counted and named
    assert (fmt.truncated, fmt.dropped, fmt.dropped_ids) == (2, 1, ["line 4"])
    with pytest.raises(DataError, match="sample line 4: field 'question': the prompt alone takes"):
        fmt.encode(samples[3], with_answer=False)  # a prompt to answer is never dropped without a word
