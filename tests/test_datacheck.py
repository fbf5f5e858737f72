"""`dataset.py check` (finetune/datacheck.py) run as a user runs it, on small data with planted exact duplicates,
near-duplicates, cross-split leaks and conflicting answers; the tokens section against dataset.Formatter itself."""
import json
import re

import pytest

from conftest import run_cli, write_jsonl

FILLER = ("the river ran past the old stone mill where the miller kept his grain in a paper sack under a small "
          "window facing the garden road").split()


def doc(i: int, n: int = 12) -> str:
    """A distinct document: n words, with numbered words no other document shares."""
    return " ".join(f"{FILLER[(i * 7 + j) % len(FILLER)]}{i}x{j}" for j in range(n))


NEAR = doc(90, 60)
NEAR_COPY = NEAR.replace("90x30", "edited")  # one word of 60 changed: word 3-gram Jaccard 0.9


def rows(ids, prefix):
    return [{"id": f"{prefix}{i}", "text": doc(i), "answer": ["red", "blue"][i % 2], "question": "Which colour?"}
            for i in ids]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datacheck")
    train = rows(range(20), "t")
    train += [
        {"id": "dup-of-t3", "text": doc(3).upper() + " !!", "answer": "blue", "question": "Which colour?"},
        {"id": "conflict-t4", "text": doc(4), "answer": "blue", "question": "Which colour?"},  # t4 says red
        {"id": "near-a", "text": NEAR, "answer": "red", "question": "Which colour?"},
        {"id": "near-b", "text": NEAR_COPY, "answer": "red", "question": "Which colour?"},
    ]
    val = rows(range(100, 106), "v") + [{"id": "v-leak", "text": doc(7), "answer": "blue", "question": "Which colour?"}]
    val.append({"id": "v-near", "text": NEAR.replace("90x45", "changed"), "answer": "red", "question": "Which colour?"})
    test = rows(range(200, 206), "x") + [{"id": "x-leak", "text": "  " + doc(11) + ".", "answer": "blue",
                                          "question": "Which colour?"}]
    return {"train": write_jsonl(tmp / "train.jsonl", train), "val": write_jsonl(tmp / "val.jsonl", val),
            "test": write_jsonl(tmp / "test.jsonl", test), "tmp": tmp}


def check(*args):
    return run_cli("dataset.py", "check", *map(str, args))


@pytest.fixture(scope="module")
def report(data):
    r = check("--train-data", data["train"], "--validation-data", data["val"], "--test-data", data["test"], "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_json_counts_sources_and_classes(report, data):
    assert report["samples"] == {"train": 24, "validation": 8, "test": 7}
    assert [(s["split"], s["format"], s["samples"]) for s in report["sources"]] == [
        ("train", "ours", 24), ("validation", "ours", 8), ("test", "ours", 7)]
    assert report["answers"]["kind"] == "classes"
    assert report["answers"]["classes"]["red"] == {"train": 12, "validation": 4, "test": 3}
    assert "tokens" not in report  # no -m


def test_json_planted_duplicates_leaks_and_conflicts(report):
    exact, near = report["exact"], report["near"]
    # within train: dup-of-t3 (case and punctuation differ) and conflict-t4 repeat t3 and t4
    assert exact["within train"] == {"count": 2, "ids": ["dup-of-t3 = t3", "conflict-t4 = t4"]}
    assert exact["validation in train"] == {"count": 1, "ids": ["v-leak = train t7"]}
    assert exact["test in train"] == {"count": 1, "ids": ["x-leak = train t11"]}
    assert exact["test in validation"]["count"] == exact["within validation"]["count"] == 0
    assert near["within train"] == {"count": 1, "ids": ["near-b ~ near-a"]}
    assert near["validation in train"] == {"count": 1, "ids": ["v-near ~ train near-a"]}
    assert near["test in train"]["count"] == 0  # x-leak is an exact leak, not counted again as a near one
    assert report["conflicting_answers"] == {"count": 1, "ids": ["train t4 ('red') vs train conflict-t4 ('blue')"]}
    assert "1 validation documents also in train" in report["warnings"]


def test_text_report(data):
    r = check("--train-data", data["train"], "--validation-data", data["val"], "--test-data", data["test"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"train\s+\S+train\.jsonl \(ours\): 24 samples", out), out
    assert re.search(r"within train\s+2 exact \(dup-of-t3 = t3; conflict-t4 = t4\)", out), out
    assert re.search(r"validation in train\s+1 exact \(v-leak = train t7\), 1 near \(v-near ~ train near-a\)", out), out
    assert "different answers: 1 (train t4 ('red') vs train conflict-t4 ('blue'))" in out
    assert "warning: 1 test documents also in train" in out
    assert "give -m MODEL" in out


def test_tokens_and_rendering_match_the_formatter(data, tiny_llm):
    """-m: the tokenizer only; token counts and the marked sample are Formatter.encode's, as train.py trains."""
    from transformers import AutoTokenizer

    from dataset import Formatter, load_samples
    from finetune.modeling import setup_tokens

    r = check("--train-data", data["train"], "-m", tiny_llm, "--max-len", 40, "-b", 4, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    setup_tokens(tok)
    free, fmt = Formatter(tok, max_len=None, seed=42), Formatter(tok, max_len=40, seed=42)
    samples = load_samples(data["train"])
    enc = [free.encode(s, train=True) for s in samples]
    totals = sorted(len(e["input_ids"]) for e in enc)
    t = out["tokens"]
    assert t["total"]["max"] == totals[-1] and t["total"]["p50"] == totals[len(totals) // 2 - 1]
    assert t["answer"]["max"] == max(sum(x != -100 for x in e["labels"]) for e in enc)
    over = sum(n > 40 for n in totals)
    assert over and t["over_max_len"] == over
    for s in samples:
        fmt.encode(s, train=True)
    truncated = fmt.truncated
    assert t["truncated"] == truncated and t["dropped"] == 0
    first = fmt.encode(samples[0], train=True)
    shown = out["rendered"][0]
    assert shown["id"] == "t0" and shown["tokens"] == len(first["input_ids"])
    assert "".join(text for text, _ in shown["runs"]) == tok.decode(first["input_ids"])
    loss = [i for i, x in zip(first["input_ids"], first["labels"]) if x != -100]
    assert [text for text, on in shown["runs"] if on] == [tok.decode(loss)] == ["red<|im_end|>\n"]
    # the text report: special tokens as text, the loss-carrying ones in brackets (not a terminal)
    r = check("--train-data", data["train"], "-m", tiny_llm, "--max-len", 40)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "<|im_start|>user\n" in r.stdout and "[[red<|im_end|>\n]]" in r.stdout
    assert f"over --max-len 40: {over} ({truncated} documents truncated" in r.stdout
    # a seeded draw of the samples to tokenise; the classifier head: the prompt alone, the loss on the class index
    r = check("--train-data", data["train"], "-m", tiny_llm, "--max-len", 40, "--token-samples", 10, "--classifier",
              "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads(r.stdout)["tokens"]
    assert (t["tokenised"], t["of"], t["head"], t["answer"]["max"]) == (10, 24, "classifier", 0)
    assert t["over_max_len_estimate"] == round(t["over_max_len"] * 24 / 10)
    assert json.loads(r.stdout)["rendered"][0]["loss_tokens"] == 0


def test_validation_split_and_free_text(tmp_path):
    rows_ = [{"instruction": f"Write line {i}.", "input": doc(i), "output": f"line {i} " + "word " * (i % 5)}
             for i in range(30)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows_))
    r = check("--train-data", tmp_path / "alpaca.json", "--validation-split", 5, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["samples"] == {"train": 25, "validation": 5}
    assert out["sources"][0]["format"] == "alpaca" and out["sources"][1]["source"].startswith("--validation-split 5")
    assert out["answers"]["kind"] == "free text" and out["answers"]["words"]["train"]["max"] == 6
    assert out["exact"]["validation in train"]["count"] == 0


def test_bad_data_one_line_exit_2(tmp_path, data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "answer": "red", "question": "q"},
                                               {"text": 5, "answer": "red", "question": "q"}])
    line = f"error: {bad}: sample line 2: field 'text': expected a string, got int\n"
    for flag in ("--train-data", "--test-data"):
        r = check("--train-data", data["train"], flag, bad) if flag == "--test-data" else check(flag, bad)
        assert r.returncode == 2 and r.stdout == "" and r.stderr == line, r.stderr
    r = check("--validation-data", bad)
    assert r.returncode == 2 and r.stderr == "error: give --train-data or -d/--data\n"


def test_leakage_line():
    from dataset import Sample
    from finetune.datacheck import leakage_line

    def s(i, text, answer="a"):
        return Sample(id=i, file="f", turns=[("user", "Q?"), ("assistant", answer)], document=text)

    train = [s("1", "One two three."), s("2", "one TWO three"), s("3", "four")]
    assert leakage_line(train, [s("v1", "Four!"), s("v2", "five")]) == (
        "leakage: 1 exact duplicates within train (ids 2); 1 validation documents also in train (ids v1) "
        "(dataset.py check for near-duplicates)")
    assert leakage_line(train[2:], []) == "leakage: 0 exact duplicates within train; no validation data"


def test_rvl_cdip_folder_with_its_test_split():
    """-d: train_*, validation_* and test_* files of one folder, the class from the file name."""
    r = check("-d", "data/topics", "--classes", "data/topics/classes.txt", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["samples"] == {"train": 150, "validation": 30, "test": 80}
    assert {s["format"] for s in out["sources"]} == {"rvl-cdip"}
    assert out["answers"]["classes"]["sports"] == {"train": 30, "validation": 6, "test": 16}


def test_hashing_in_worker_processes_matches_one_process(monkeypatch, data):
    from dataset import load_samples
    from finetune import datacheck

    splits = {"train": load_samples(data["train"]), "test": load_samples(data["test"], require_answer=False)}
    serial = datacheck.hash_splits(splits, workers=1)()
    monkeypatch.setattr(datacheck, "PARALLEL_FROM", 1)
    monkeypatch.setattr(datacheck, "HASH_CHUNK", 5)
    assert datacheck.hash_splits(splits, workers=2)() == serial
    assert [r.id for r in serial["train"]][:2] == ["t0", "t1"] and len(serial["test"]) == 7
