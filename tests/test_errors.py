"""Bad input: one line naming file, sample and field; exit status 2; no traceback; nothing written."""
import json

import pytest

from conftest import run_cli, write_jsonl

GOOD = {"text": "a doc", "answer": "red", "question": "Which?"}


def _jsonl(tmp, rows):
    return write_jsonl(tmp / "data.jsonl", rows)


def case_invalid_json(tmp):
    p = tmp / "data.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    return ["--train-data", p], ["data.jsonl", "line 2", "invalid JSON"]


def case_missing_answer(tmp):
    return ["--train-data", _jsonl(tmp, [GOOD, {"text": "x", "question": "q"}])], ["line 2", "'answer'", "missing"]


def case_answer_not_a_string(tmp):
    return ["--train-data", _jsonl(tmp, [GOOD, {**GOOD, "answer": 3}])], ["line 2", "'answer'", "expected a string"]


def case_empty_answer(tmp):
    return ["--train-data", _jsonl(tmp, [GOOD, {**GOOD, "answer": "  "}])], ["line 2", "'answer'", "empty"]


def case_missing_image(tmp):
    return ["--train-data", _jsonl(tmp, [{**GOOD, "image": "nope.png"}])], ["line 1", "'image'", "nope.png"]


def case_empty_directory(tmp):
    (tmp / "empty").mkdir()
    return ["--train-data", tmp / "empty"], ["empty", "no .json sample files"]


def case_tsv_missing_file(tmp):
    (tmp / "a.json").write_text(json.dumps(GOOD))
    (tmp / "list.tsv").write_text("a.json\nmissing.json\n")
    return ["--train-data", tmp / "list.tsv"], ["list.tsv", "row 2", "'file'", "missing.json"]


def case_prompts_wrong_shape(tmp):
    (tmp / "prompts.json").write_text(json.dumps({"question": "ok", "system": [1, 2]}))
    return ["--train-data", _jsonl(tmp, [GOOD]), "-p", tmp / "prompts.json"], ["prompts.json", "'system'",
                                                                               "list of non-empty strings"]


def case_no_question_anywhere(tmp):
    return ["--train-data", _jsonl(tmp, [{"text": "doc", "answer": "x"}])], ["line 1", "'question'", "prompts.json"]


def case_unknown_class_index(tmp):
    (tmp / "rvl").mkdir()
    (tmp / "rvl" / "train_0001_99_aws.json").write_text(json.dumps({"ocr": "text"}))
    return ["-d", tmp / "rvl", "-p", _prompts(tmp)], ["train_0001_99_aws", "'class index'", "99"]


def case_non_utf8(tmp):
    p = tmp / "data.jsonl"
    p.write_bytes(b'{"text": "caf\xe9", "answer": "x", "question": "q"}\n')
    return ["--train-data", p], ["data.jsonl", "not UTF-8"]


def case_duplicate_ids(tmp):
    return ["--train-data", _jsonl(tmp, [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])], ["sample a", "'id'",
                                                                                     "duplicate"]


def case_unknown_model(tmp):
    return ["--train-data", _jsonl(tmp, [GOOD]), "-m", tmp / "no-such-model"], ["no-such-model", "no such model"]


def case_unknown_role(tmp):
    rows = [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    return ["--train-data", _jsonl(tmp, rows)], ["line 1", "'messages[0].role'", "robot"]


def _prompts(tmp):
    (tmp / "p.json").write_text(json.dumps({"question": ["Which?"]}))
    return tmp / "p.json"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_llm):
    args, expected = case(tmp_path)
    if "-m" not in args:
        args = ["-m", tiny_llm, *args]
    r = run_cli("train.py", *args, "--name", "bad", "--log-dir", tmp_path / "log")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for part in expected:
        assert part in last, (part, last)
    assert not (tmp_path / "log").exists()  # nothing half-written


def test_eval_rejects_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "weights").mkdir()
    r = run_cli("eval.py", "-c", tmp_path / "weights", "--test-data", tmp_path / "x.jsonl")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a run of train.py" in r.stderr.strip().splitlines()[-1]


def test_eval_rejects_classes_training_never_saw(tmp_path, tiny_llm):
    run = tmp_path / "log" / "run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": str(tiny_llm), "classes": ["red", "blue"], "vision": False,
                                              "max_len": 64, "task": "classification"}))
    (run / "best").mkdir()  # weights are never loaded: the data is checked first
    (run / "best" / "adapter_config.json").write_text("{}")
    (run / "best" / "adapter_model.safetensors").write_bytes(b"")
    test = _jsonl(tmp_path, [GOOD, {**GOOD, "answer": "green"}])
    r = run_cli("eval.py", "-c", run, "--test-data", test, "-o", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "line 2" in r.stderr and "'green' is not one of the classes" in r.stderr
