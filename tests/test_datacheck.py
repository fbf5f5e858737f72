"""`dataset.py check` (finetune/datacheck.py) run as a user runs it, on small data with planted exact duplicates,
near-duplicates, cross-split leaks and conflicting answers; the tokens section against dataset.Formatter itself.
Preference and RL data: DPO pairs with planted noise and cross-split prompt leaks, their tokens against TRL's
DPOTrainer preparing the same rows; KTO labels; GRPO prompts and reference answers."""
import json
import re
import shlex

import pytest

from conftest import ROOT, run_cli, write_jsonl

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


def test_language_modelling_text_is_its_own_document(tmp_path):
    """--lm-text: the text is all answer and all document; a paragraph repeated is a duplicate."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join([doc(1, 30), doc(2, 30), doc(1, 30).upper(), doc(3, 30)]) + "\n")
    r = check("--train-data", text, "--lm-text", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["empty_documents"] == {"train": 0}
    assert out["exact"]["within train"] == {"count": 1, "ids": ["line 5 = line 1"]}


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
    from finetune.leakage import leakage_line

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
    from finetune import leakage

    splits = {"train": load_samples(data["train"]), "test": load_samples(data["test"], require_answer=False)}
    serial = leakage.hash_splits(splits, workers=1)()
    monkeypatch.setattr(leakage, "PARALLEL_FROM", 1)
    monkeypatch.setattr(leakage, "HASH_CHUNK", 5)
    assert leakage.hash_splits(splits, workers=2)() == serial
    assert [r.id for r in serial["train"]][:2] == ["t0", "t1"] and len(serial["test"]) == 7


# ------------------------------------------------------------------------------------------------ dpo, kto, grpo
def pair(i, prefix, chosen="red", rejected="blue"):
    return {"id": f"{prefix}{i}", "prompt": "Which colour? " + doc(i), "chosen": chosen, "rejected": rejected}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """DPO pairs with planted noise (chosen == rejected, a pair repeated, a pair reversed) and planted cross-split
    leaks of prompts; a second pair for one prompt, which is the usual form and no finding."""
    tmp = tmp_path_factory.mktemp("prefs")
    train = [pair(i, "p") for i in range(12)] + [
        {"id": "same", "prompt": "Which colour? " + doc(40), "chosen": "Red.", "rejected": "red"},
        {**pair(2, "p"), "id": "again-p2"}, {**pair(4, "p", "blue", "red"), "id": "flip-p4"},
        {**pair(5, "p", "red", "green"), "id": "second-p5"}]
    val = [pair(i, "v") for i in range(100, 104)] + [{**pair(7, "p", "blue", "green"), "id": "v-leak"}]
    test = [pair(i, "x") for i in range(200, 203)] + [{**pair(9, "p"), "id": "x-leak",
                                                       "prompt": pair(9, "p")["prompt"].upper()}]
    return {"train": write_jsonl(tmp / "train.jsonl", train), "val": write_jsonl(tmp / "val.jsonl", val),
            "test": write_jsonl(tmp / "test.jsonl", test)}


def test_dpo_pairs_noise_and_prompt_leaks(prefs):
    r = check("--train-data", prefs["train"], "--validation-data", prefs["val"], "--test-data", prefs["test"], "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert (out["trainer"], out["trainer_from"]) == ("dpo", "the data")  # detected from the records' fields
    assert [(s["split"], s["format"], s["samples"]) for s in out["sources"]] == [
        ("train", "dpo", 16), ("validation", "dpo", 5), ("test", "dpo", 4)]
    assert out["answers"]["words"]["train"]["chosen"]["max"] == 1
    assert out["noise"] == {"chosen equals rejected": {"count": 1, "ids": ["train same"]},
                            "repeated pairs": {"count": 1, "ids": ["train again-p2 = train p2"]},
                            "contradicting pairs": {"count": 1, "ids": ["train flip-p4 vs train p4"]}}
    assert out["exact"]["within train"]["count"] == 3  # again-p2, flip-p4, second-p5: prompts asked again
    assert out["exact"]["validation in train"] == {"count": 1, "ids": ["v-leak = train p7"]}
    assert out["exact"]["test in train"] == {"count": 1, "ids": ["x-leak = train p9"]}
    assert out["warnings"] == ["1 validation prompts also in train", "1 test prompts also in train",
                               "1 DPO pairs whose chosen and rejected replies are the same text",
                               "1 DPO pairs repeated whole", "1 DPO pairs that contradict another"]
    r = check("--train-data", prefs["train"], "--trainer", "dpo")
    assert r.returncode == 0 and r.stdout.startswith("trainer: dpo (from --trainer)\n"), r.stderr[-3000:]
    assert "  chosen equals rejected: 1 (train same)\n" in r.stdout and "duplicates and leakage of prompts" in r.stdout


def test_dpo_tokens_are_trls_own(prefs, tiny_llm, tmp_path):
    """Prompt and reply tokens, and what --max-len cuts or drops, as TRL's DPOTrainer prepares the same rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dataset import Formatter
    from finetune import rl, sources
    from finetune.modeling import setup_tokens

    r = check("--train-data", prefs["train"], "-m", tiny_llm, "--max-len", 512, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    longest = json.loads(r.stdout)["tokens"]["prompt"]["max"]  # --max-len this: that prompt fills it, others fit
    r = check("--train-data", prefs["train"], "-m", tiny_llm, "--max-len", longest, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    t, shown = out["tokens"], out["rendered"]
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    setup_tokens(tok)
    rows = rl.dpo_dataset(Formatter(tok, max_len=longest, seed=42), sources.load_preferences(prefs["train"]))
    trainer = rl.preference_trainer_class(DPOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_llm), train_dataset=rows, processing_class=tok,
        args=DPOConfig(output_dir=str(tmp_path), max_length=longest, report_to=[], use_cpu=True))
    kept = trainer.train_dataset
    assert t["dropped"] == len(rows) - len(kept) > 0
    assert t["prompt"]["max"] == longest
    assert t["chosen"]["max"] == max(map(len, kept["chosen_ids"]))
    assert t["rejected"]["max"] == max(map(len, kept["rejected_ids"]))
    assert t["truncated"] == sum(len(p) + max(len(c), len(x)) > longest for p, c, x in
                                 zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"])) > 0
    assert t["over_max_len"] == t["truncated"] + t["dropped"]
    first = kept[0]
    assert shown[0]["id"] == "p0" and shown[0]["tokens"] == len(first["prompt_ids"])
    assert shown[0]["runs"] == [[tok.decode(first["prompt_ids"]), False]]
    assert shown[0]["replies"] == [["chosen", "red<|im_end|>", len(first["chosen_ids"])],
                                   ["rejected", "blue<|im_end|>", len(first["rejected_ids"])]]
    r = check("--train-data", prefs["train"], "-m", tiny_llm, "--max-len", 512)
    assert "chosen (2 tokens): [[red<|im_end|>]]\nrejected (2 tokens): [[blue<|im_end|>]]" in r.stdout, r.stdout


def test_kto_labels_and_contradictions(tmp_path, tiny_llm):
    def fb(i, label=True, prefix="k", completion=None):
        return {"id": f"{prefix}{i}", "prompt": "Which colour? " + doc(i), "completion": completion or "red",
                "label": label}

    train = [fb(i) for i in range(6)] + [fb(i, False) for i in range(6, 9)] + [{**fb(0, False), "id": "flip-k0"}]
    val = [fb(50, prefix="kv"), {**fb(3), "id": "kv-leak"}]
    r = check("--train-data", write_jsonl(tmp_path / "t.jsonl", train), "--validation-data",
              write_jsonl(tmp_path / "v.jsonl", val), "-m", tiny_llm, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["trainer"] == "kto" and out["sources"][0]["format"] == "kto"
    assert out["answers"]["labels"] == {"train": {"desirable": 6, "undesirable": 4},
                                        "validation": {"desirable": 2, "undesirable": 0}}
    assert out["noise"]["contradicting labels"] == {"count": 1, "ids": ["train flip-k0 vs train k0"]}
    assert out["exact"]["validation in train"] == {"count": 1, "ids": ["kv-leak = train k3"]}
    assert "6 desirable and 4 undesirable training samples: TRL's KTO loss weights (1 and 1) suit 1:1 to 4:3" \
        in out["warnings"]
    t = out["tokens"]
    assert t["completion"]["max"] == 2 and t["over_max_len"] == 0 and out["rendered"][0]["replies"] == [
        ["desirable completion", "red<|im_end|>", 2]]


def test_grpo_prompts_and_reference_answers(data, tmp_path, tiny_llm):
    from transformers import AutoTokenizer

    from dataset import Formatter, load_samples
    from finetune.modeling import setup_tokens

    rows_ = [json.loads(line) for line in data["train"].read_text().splitlines()]
    for r in rows_[::4]:
        del r["answer"]  # a reward that needs no reference scores these (rl.check_rewards)
    train = write_jsonl(tmp_path / "grpo.jsonl", rows_)
    r = check("--train-data", train, "--trainer", "grpo", "-m", tiny_llm, "--max-len", 40, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["answers"]["with_answer"] == {"train": 18} and out["answers"]["kind"] == "classes"
    assert "6 of 24 training samples have no answer: rewards that compare with a reference (correct) score them None" \
        in out["warnings"]
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    setup_tokens(tok)
    fmt = Formatter(tok, max_len=40, seed=42)
    prompts = [len(tok(fmt.prompt_text(s, train=True))["input_ids"]) for s in load_samples(train, require_answer=False)]
    t = out["tokens"]
    assert t["prompt"]["max"] == max(prompts) <= 40 and t["truncated"] == fmt.truncated > 0
    assert t["answer"]["max"] == 1 and out["rendered"][0]["reference"] is None  # t0 lost its answer
    assert out["rendered"][1]["reference"] == "blue" and out["rendered"][1]["loss_tokens"] == 0


def test_preference_options_and_bad_pairs_refused_as_train_py_does(prefs, tmp_path):
    for args, line in (
            (("-d", "data/topics", "--trainer", "dpo"), "error: --trainer dpo reads preferences from --train-data, "
                                                        "not -d\n"),
            (("--train-data", prefs["train"], "--validation-split", "2"), "error: --trainer dpo: --mix, "
             "--validation-split and --train-samples are not supported for preference pairs yet\n"),
            (("--train-data", prefs["train"], "--trainer", "dpo", "--classifier"), "error: --classifier trains a "
             "classification head with SFT; it cannot be combined with --trainer dpo\n")):
        r = check(*args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr == line, r.stderr
    bad = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a"}])
    r = check("--train-data", bad, "--trainer", "dpo")
    assert r.returncode == 2 and r.stderr == f"error: {bad}: sample line 1: field 'rejected': missing\n", r.stderr


def test_the_docs_commands_print_what_the_docs_show():
    """docs/data.md's `dataset.py check` commands, run as written, print the report shown under each."""
    page = (ROOT / "docs/data.md").read_text()
    shown = re.findall(r"```bash\n(uv run dataset\.py check .*?)```\n\n```\n(.*?)```", page, re.S)
    assert len(shown) == 2
    for command, report in shown:
        r = run_cli("dataset.py", *shlex.split(command.replace("\\\n", " "))[3:])
        assert r.returncode == 0 and r.stdout == report, (command, r.stdout, r.stderr[-2000:])
