"""finetune/sources.py: every source and format gives the samples dataset.py would, bad input is one line naming file, row
and column, and --mix / --validation-split / --train-samples draw what they say. In-process and fast; the CLIs end
to end are in test_sources_e2e.py."""
import argparse
import json

import pytest

from finetune import runs, sources, tokenise
from conftest import write_jsonl
from dataset import DataError, Formatter
from finetune.sources import load_preferences, load_samples
from hub_cache import cache_hub_dataset

ROWS = [{"text": f"doc {i}", "answer": ["red", "blue"][i % 2], "question": "Which?"} for i in range(8)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An HF datasets cache holding org/tiny-task (train, test), read offline (conftest sets HF_HUB_OFFLINE=1)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache_hub_dataset(cache, "org/tiny-task", {"train": ROWS, "test": ROWS[:2]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return "org/tiny-task"


def _table(tmp_path, rows=ROWS, name="t.parquet", **kw):
    from datasets import Dataset

    ds = Dataset.from_list(rows, **kw)
    p = tmp_path / name
    if p.suffix == ".parquet":
        ds.to_parquet(p)
    elif p.suffix in (".csv", ".tsv"):
        ds.to_csv(p, index=False, sep="\t" if p.suffix == ".tsv" else ",")
    else:
        ds.save_to_disk(p)
    return p


def _view(samples):
    return [(s.document, s.turns, s.image) for s in samples]


# ------------------------------------------------------------------------------------------------ sources
def test_every_source_gives_the_same_samples(tmp_path, hub):
    want = _view(load_samples(write_jsonl(tmp_path / "a.jsonl", ROWS)))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": r["question"], "input": r["text"], "output": r["answer"]}
                                  for r in ROWS]))
    arrow = tmp_path / "disk" / "data-00000-of-00001.arrow"
    for spec in (_table(tmp_path), _table(tmp_path, name="t.csv"), _table(tmp_path, name="t.tsv"),
                 _table(tmp_path, name="disk"), arrow, alpaca, hub + "@train"):
        got = load_samples(spec)
        assert _view(got) == want, spec
        assert len(got) == len(ROWS) and _view([got[3], got[-1]]) == [want[3], want[-1]]


def test_ids_name_rows_and_an_id_column_wins(tmp_path):
    assert [s.id for s in load_samples(_table(tmp_path))][:2] == ["row 1", "row 2"]
    rows = [{**r, "id": f"doc-{i}"} for i, r in enumerate(ROWS)]
    assert [s.id for s in load_samples(_table(tmp_path, rows, "ids.parquet"))][:2] == ["doc-0", "doc-1"]


def test_split_syntax_on_every_source(tmp_path, hub):
    assert len(load_samples(f"{_table(tmp_path)}@train[:25%]")) == 2
    assert [s.document for s in load_samples(f"{hub}@test")] == ["doc 0", "doc 1"]
    assert [s.document for s in load_samples(f"{hub}@train[2:4]+test[:1]")] == ["doc 2", "doc 3", "doc 0"]
    assert len(load_samples(f"{write_jsonl(tmp_path / 'a.jsonl', ROWS)}@train[-3:]")) == 3
    with pytest.raises(DataError, match=r"org/tiny-task: has splits train, test: name one, e\.g\. org/tiny-task@train"):
        load_samples(hub)
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "validation": Dataset.from_list(ROWS[:3])}).save_to_disk(
        tmp_path / "dd")
    assert len(load_samples(f"{tmp_path / 'dd'}@validation")) == 3
    with pytest.raises(DataError, match="split 'nope'.*splits: train, validation"):
        load_samples(f"{tmp_path / 'dd'}@nope")


def test_a_hub_id_neither_cached_nor_reachable_is_one_line(hub):
    with pytest.raises(DataError, match="org/missing: not in the local Hugging Face cache and not reachable"):
        load_samples("org/missing")


def test_a_listing_tsv_is_decided_by_content_not_extension(tmp_path):
    (tmp_path / "s0.json").write_text(json.dumps(ROWS[0]))
    (tmp_path / "list.csv").write_text("s0.json\tred\n")  # a CSV that lists sample files: today's layout
    (tmp_path / "head.tsv").write_text("path\tlabel\ns0.json\tred\n")
    assert sources.kind(tmp_path / "list.csv") == sources.kind(tmp_path / "head.tsv") == "records"
    assert [s.document for s in load_samples(tmp_path / "list.csv")] == ["doc 0"]
    assert sources.kind(_table(tmp_path, name="t.tsv")) == "table"


def test_columns_map_a_csv_and_integer_labels_are_text(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars,note\ngreat food,5,\nawful,1,x\n")
    got = load_samples(csv, prompts={"question": ["Stars?"]}, columns="text=review,answer=stars")
    assert [(s.document, s.answer) for s in got] == [("great food", "5"), ("awful", "1")]
    ints = _table(tmp_path, [{"text": "a", "answer": 0}, {"text": "b", "answer": 1}], "ints.parquet")
    assert [s.answer for s in load_samples(ints, prompts={"question": ["Q"]})] == ["0", "1"]


def test_columns_errors_list_the_columns(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,label\ngreat,pos\n")
    with pytest.raises(DataError, match="reviews.csv: no column to read samples from; the table has columns: "
                                        "review, label; name them with --columns"):
        load_samples(csv)
    with pytest.raises(DataError, match="--columns text=body: no column 'body'; the table has columns: review, label"):
        load_samples(csv, columns="text=body,answer=label")
    with pytest.raises(DataError, match="no 'answer' column; the table has columns: text, label; map one with "
                                        "--columns answer=COLUMN"):
        load_samples(csv, columns="text=review")
    with pytest.raises(DataError, match="expected FIELD=COLUMN"):
        load_samples(csv, columns="txt=review")


# ------------------------------------------------------------------------------------------------ formats
def test_sharegpt_table_with_extra_columns(tmp_path):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    got = load_samples(_table(tmp_path, [{"conversations": conv, "source": "x", "score": 4.5}] * 2))
    assert [s.turns for s in got] == [[("user", "hi"), ("assistant", "hello")]] * 2


def test_openai_messages_with_images_as_paths_and_as_bytes(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    msgs = [{"role": "system", "content": "Be short."},
            {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    s = load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))[0]
    assert (s.turns, s.images) == ([("system", "Be short."), ("user", "<image>Colour?"), ("assistant", "red")],
                                   (str(tmp_path / "red.png"),))  # the image part where it stood
    import datasets

    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}],
             "images": [{"bytes": (tmp_path / "red.png").read_bytes(), "path": None}]}]
    feats = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": [
        {"type": datasets.Value("string"), "text": datasets.Value("string")}]}], "images": [datasets.Image()]})
    rows[0]["messages"][1]["content"] = [{"type": "text", "text": "red"}]
    t = load_samples(_table(tmp_path, rows, "vlm.parquet", features=feats))[0]
    assert t.answer == "red" and t.images[0].endswith(".img") and open(t.images[0], "rb").read() == \
        (tmp_path / "red.png").read_bytes()


def test_image_feature_column(tmp_path):
    import datasets
    from PIL import Image

    Image.new("RGB", (4, 4), "blue").save(tmp_path / "blue.png")
    feats = datasets.Features({"image": datasets.Image(), "answer": datasets.Value("string"),
                               "question": datasets.Value("string")})
    rows = [{"image": str(tmp_path / "blue.png"), "answer": "blue", "question": "Colour?"}]
    s = load_samples(_table(tmp_path, rows, "img.parquet", features=feats))[0]
    assert s.image and open(s.image, "rb").read() == (tmp_path / "blue.png").read_bytes()


def test_dpo_tables_plain_and_conversational(tmp_path):
    plain = _table(tmp_path, [{"prompt": "Which?", "chosen": "red", "rejected": "blue"}] * 2)
    conv = _table(tmp_path, [{"prompt": [{"role": "user", "content": "Which?"}],
                              "chosen": [{"role": "assistant", "content": "red"}],
                              "rejected": [{"role": "assistant", "content": "blue"}]}], "conv.parquet")
    for p in (plain, conv):
        pref = load_preferences(p)[0]
        assert (pref.turns, pref.chosen, pref.rejected) == ([("user", "Which?")], "red", "blue")


# ------------------------------------------------------------------------------------------------ bad rows
@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "disk"])
def test_a_bad_row_names_file_row_and_column(tmp_path, name):
    rows = [dict(ROWS[0]), {**ROWS[1], "answer": None}]
    if name == "t.csv":
        rows[1]["answer"] = ""  # an empty CSV cell is an absent field
    path = _table(tmp_path, rows, name)
    with pytest.raises(DataError, match=rf"{name}: sample row 2: column 'answer': missing"):
        load_samples(path)


def test_a_mapped_column_is_named_in_errors(tmp_path):
    path = _table(tmp_path, [{"body": "x", "label": "red", "question": "Q"}, {"body": "y", "label": None,
                                                                              "question": "Q"}])
    with pytest.raises(DataError, match=r"t.parquet: sample row 2: column 'label': missing"):
        load_samples(path, columns="text=body,answer=label")


def test_alpaca_errors_name_alpaca_keys(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([{"instruction": "Q", "input": "", "output": "red"},
                             {"instruction": "Q", "input": "", "output": ["red"]}]))
    with pytest.raises(DataError, match=r"alpaca.json: sample #1: field 'output': expected a string, got list"):
        load_samples(p)


def test_duplicate_ids_in_a_table(tmp_path):
    path = _table(tmp_path, [{**ROWS[0], "id": "a"}, {**ROWS[1], "id": "b"}, {**ROWS[2], "id": "a"}])
    with pytest.raises(DataError, match=r"sample row 3: column 'id': duplicate sample id 'a': also row 1"):
        load_samples(path)


def test_an_image_path_outside_the_table_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "out.png")
    (tmp_path / "data").mkdir()
    path = _table(tmp_path / "data", [{**ROWS[0], "image": "../out.png"}])
    with pytest.raises(DataError, match=r"sample row 1: column 'image': path outside the data folder"):
        load_samples(path)
    assert load_samples(path, allow_outside=True)[0].image == str(tmp_path / "out.png")


def test_an_unknown_content_part(tmp_path):
    msgs = [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "red"}]
    with pytest.raises(DataError, match=r"m.jsonl: sample line 1: field 'messages\[0\].content\[0\].type': "
                                        "expected 'text' or 'image', got 'audio'"):
        load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))


def test_a_damaged_table(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: cannot read as a table"):
        load_samples(tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------------------ training only
def _args(tmp_path, **kw):
    base = dict(train_data="x", mix=None, train_samples=None, validation_split=None, seed=42, classes=None,
                resume=False, name=None, log_dir=str(tmp_path / "log"))
    return argparse.Namespace(**{**base, **kw})


def _colours(tmp_path, n, name, split=0.5):
    rows = [{"text": f"{name} {i}", "answer": "red" if i < n * split else "blue", "question": "Q"} for i in range(n)]
    return _table(tmp_path, rows, f"{name}.parquet")


def test_training_answers_become_class_names_and_a_spelled_table_stays_lazy(tmp_path):
    """SFT's load_data names every training answer by its class; a table whose answers are class names already is
    kept as the lazy Samples (memory-mapped rows), not read into a list to rename nothing."""
    from finetune import modes

    def load(rows, name):
        args = _args(tmp_path, train_data=str(_table(tmp_path, rows, name)), prompts=None, response_template=None,
                     head=None, data=None, validation_data=None, allow_outside_paths=False, columns=None,
                     lm_text=False)
        s = modes.Setup(args)
        modes.SFT().load_data(s)
        return s

    spelled = load(ROWS, "spelled.parquet")
    assert isinstance(spelled.train, sources.Samples) and spelled.classes == ["red", "blue"]
    variants = load([{**r, "answer": " Red." if i == 2 else r["answer"]} for i, r in enumerate(ROWS)], "v.parquet")
    assert variants.classes == ["red", "blue"]
    assert [s.answer for s in variants.train] == [r["answer"] for r in ROWS]


def test_validation_split_is_seeded_and_stratified(tmp_path):
    data = _colours(tmp_path, 40, "c", split=0.75)  # 30 red, 10 blue
    args = _args(tmp_path, validation_split="0.2")
    train, val, used = sources.prepare(args, load_samples(data), [])
    assert (len(train), len(val)) == (32, 8)
    assert sorted(s.answer for s in val) == ["blue"] * 2 + ["red"] * 6  # the classes' shares
    assert not {s.id for s in val} & {s.id for s in train}
    assert used["validation_split_ids"] == [[0, s.id] for s in val]
    again = sources.prepare(_args(tmp_path, validation_split="0.2"), load_samples(data), [])[1]
    assert [s.id for s in again] == [s.id for s in val]
    other = sources.prepare(_args(tmp_path, validation_split="0.2", seed=1), load_samples(data), [])[1]
    assert [s.id for s in other] != [s.id for s in val]
    assert len(sources.prepare(_args(tmp_path, validation_split="5"), load_samples(data), [])[1]) == 5
    with pytest.raises(DataError, match="--validation-split: '40' leaves 0 of 40"):
        sources.prepare(_args(tmp_path, validation_split="40"), load_samples(data), [])
    with pytest.raises(DataError, match="not both"):
        sources.prepare(_args(tmp_path, validation_split="0.2"), load_samples(data), val)


def test_a_resumed_run_validates_on_the_ids_it_stored(tmp_path):
    data = _colours(tmp_path, 40, "c")
    (tmp_path / "log" / "run").mkdir(parents=True)
    (tmp_path / "log" / "run" / "run.json").write_text(json.dumps({"validation_split_ids": [[0, "row 3"],
                                                                                             [0, "row 7"]]}))
    args = _args(tmp_path, validation_split="0.5", resume=True, name="run")
    train, val, _ = sources.prepare(args, load_samples(data), [], runs.stored_split_ids(args))
    assert [s.id for s in val] == ["row 3", "row 7"] and len(train) == 38


def test_mix_ratios_and_train_samples(tmp_path):
    a, b = _colours(tmp_path, 40, "a"), write_jsonl(tmp_path / "b.jsonl", ROWS)  # 40 and 8 samples
    args = _args(tmp_path, train_data=f"{a},{b}", mix="0.75,0.25")
    train, _, used = sources.prepare(args, load_samples(f"{a},{b}"), [])
    assert used["data_sources"] == [{"source": str(a), "samples": 24}, {"source": str(b), "samples": 8}]
    assert len({s.document for s in train}) == 32  # no sample twice while the sources suffice
    args = _args(tmp_path, mix="1,1", train_samples=20)
    train, _, used = sources.prepare(args, load_samples(f"{a},{b}"), [])
    assert [x["samples"] for x in used["data_sources"]] == [10, 10]  # b (8 samples) repeated to give its 10
    assert len(train) == 20
    with pytest.raises(DataError, match="--mix: 3 ratios for 2 training sources"):
        sources.prepare(_args(tmp_path, mix="1,1,1"), load_samples(f"{a},{b}"), [])
    args = _args(tmp_path, train_samples=5)
    train, _, used = sources.prepare(args, load_samples(a), [])
    assert len(train) == 5 and used["data_sources"][0]["samples"] == 5


# ------------------------------------------------------------------------------------------------ tokenising tables
def test_a_table_is_tokenised_through_map_and_cached_on_its_fingerprint(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    fmt = Formatter(tokenizer, max_len=64)
    want = [(r["input_ids"], r["labels"]) for r in (fmt.encode(s, train=True) for s in load_samples(
        write_jsonl(tmp_path / "a.jsonl", ROWS))) if r is not None]
    table = _table(tmp_path)
    ds = tokenise.encode_cached(fmt, load_samples(table), train=True)
    assert list(zip(ds["input_ids"], ds["labels"])) == want
    assert "cached for the next run" in capsys.readouterr().out
    tokenise.encode_cached(fmt, load_samples(table), train=True)
    assert "from cache" in capsys.readouterr().out
    _table(tmp_path, [{**r, "text": r["text"] + "!"} for r in ROWS])  # the same file, new content: a miss
    ds = tokenise.encode_cached(fmt, load_samples(table), train=True)
    assert "from cache" not in capsys.readouterr().out and ds["input_ids"] != [w[0] for w in want]


# ------------------------------------------------------------------------------------------------ the CLIs
# case(tmp, llm) -> (script args, env, [what the one error line must hold: file, row, column, what])
def case_parquet_null_answer(tmp, llm):
    return ["train.py", "-m", llm, "--train-data", _table(tmp, [ROWS[0], {**ROWS[1], "answer": None}])], {}, \
        ["t.parquet", "sample row 2", "column 'answer'", "missing"]


def case_csv_mapped_column_missing(tmp, llm):
    (tmp / "r.csv").write_text("review,stars\ngood,5\n")
    return ["train.py", "-m", llm, "--train-data", tmp / "r.csv", "--columns", "text=review,answer=label"], {}, \
        ["r.csv", "--columns answer=label", "no column 'label'", "columns: review, stars"]


def case_tsv_table_wrong_type_of_cell(tmp, llm):
    (tmp / "r.tsv").write_text("text\tanswer\tquestion\ngood\tred\tQ\nbad\tred\t\n")
    return ["train.py", "-m", llm, "--train-data", tmp / "r.tsv"], {}, \
        ["r.tsv", "sample row 2", "column 'question'", "missing: put a 'question' in the sample or pass -p"]


def case_save_to_disk_image_missing(tmp, llm):
    return ["train.py", "-m", llm, "--train-data", _table(tmp, [{**ROWS[0], "image": "gone.png"}], "disk")], {}, \
        ["disk", "sample row 1", "column 'image'", "disk/gone.png' not found"]


def case_hub_id_not_cached(tmp, llm):
    return ["train.py", "-m", llm, "--train-data", "org/not-cached"], {"HF_DATASETS_CACHE": str(tmp / "hf")}, \
        ["org/not-cached", "not in the local Hugging Face cache and not reachable"]


def case_alpaca_output_missing(tmp, llm):
    (tmp / "a.json").write_text(json.dumps([{"instruction": "Q", "input": "x", "output": "red"},
                                            {"instruction": "Q", "input": "y", "output": None}]))
    return ["train.py", "-m", llm, "--train-data", tmp / "a.json"], {}, \
        ["a.json", "sample #1", "field 'output'", "missing"]


def case_dpo_table_missing_rejected(tmp, llm):
    p = _table(tmp, [{"prompt": "Q", "chosen": "red", "rejected": "blue"}, {"prompt": "Q", "chosen": "red",
                                                                            "rejected": None}])
    return ["train.py", "-m", llm, "--trainer", "dpo", "--train-data", p], {}, \
        ["t.parquet", "sample row 2", "column 'rejected'", "missing"]


def case_eval_split_without_one(tmp, llm):
    run = tmp / "run"
    (run / "best").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": str(llm), "classes": ["red", "blue"], "vision": False}))
    (run / "best" / "adapter_config.json").write_text("{}")
    (run / "best" / "adapter_model.safetensors").write_bytes(b"")
    return ["eval.py", "-c", run, "--split", "validation"], {}, \
        ["--split validation", "the run was not trained with --validation-split"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_in_a_new_source_is_one_clear_line(case, tmp_path, tiny_llm):
    from conftest import run_cli

    (script, *args), env, expected = case(tmp_path, tiny_llm)
    out = tmp_path / "out"
    r = run_cli(script, *args, *(["--name", "bad", "--log-dir"] if script == "train.py" else ["-o"]), out, env=env,
                timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert (r.returncode, len(lines), r.stdout) == (2, 1, ""), r.stderr[-2000:]
    assert lines[0].startswith("error: ") and all(part in lines[0] for part in expected), (expected, lines[0])
    assert not out.exists()  # nothing half-written


def test_a_table_tokenised_in_worker_processes_gives_the_same_rows(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    fmt = Formatter(tokenizer, max_len=64)
    one = tokenise.encode_cached(fmt, load_samples(_table(tmp_path)), train=True, workers=1)
    monkeypatch.setattr(tokenise, "MAP_PROCESSES_FROM", 1)
    two = tokenise.encode_cached(fmt, load_samples(_table(tmp_path)), train=True, workers=2)
    assert two.to_list() == one.to_list() and len(one) == len(ROWS)


@pytest.mark.parametrize("answers", ["closed set", "variants", "one class", "free text", "long names"])
def test_a_tables_classes_come_from_its_validation_pass(tmp_path, monkeypatch, answers):
    """classes_of on a table reads the answers its validation pass kept, not the rows again, and finds what it finds on
    the same samples in a list: the whole table, a subset of it (--train-samples), and a mix with a list."""
    from dataset import classes_of

    make = {"closed set": lambda i: ["red", "blue", "green"][i % 3], "variants": lambda i: ["Red", "red.", " blue"][i % 3],
            "one class": lambda i: "red", "free text": lambda i: f"answer number {i}",
            "long names": lambda i: ["x" * 61, "y"][i % 2]}[answers]
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": make(i)}]}
            for i in range(150)]
    table = load_samples(_table(tmp_path, rows))
    listed = list(table)
    subset = sorted(range(0, 150, 7))
    expected = [classes_of(listed), classes_of([listed[i] for i in subset]),
                classes_of(listed[:10] + [listed[i] for i in subset])]
    assert (expected[0][0] is not None) == (answers in ("closed set", "variants"))
    reads = []
    monkeypatch.setattr(sources.Table, "parse", lambda self, row, n: reads.append(n))
    assert classes_of(table) == expected[0] and not reads
    if answers in ("free text", "long names"):
        return  # past a closed set the codes are dropped: a part of the table is read again (its answers may be fewer)
    assert classes_of(table.take(subset)) == expected[1] and not reads
    mix = sources.Samples([("list", listed[:10], None)] + [(n, b, subset) for n, b, _ in table.parts])
    assert classes_of(mix) == expected[2] and not reads
