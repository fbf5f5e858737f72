"""End to end (train.py and eval.py as subprocesses, the tiny Llama, full fine-tuning, seeded): one task kept as
JSONL, parquet, CSV (other column names, --columns), alpaca JSON, a save_to_disk folder and a cached Hub dataset id
trains and evaluates to the same numbers whichever source it comes from; --mix and --validation-split through the
CLIs, the held-out split scored again by eval.py."""
import json
import random

import pytest

from conftest import run_cli, write_jsonl
from hub_cache import cache_hub_dataset

WORDS = "the a small big old new house tree river stone cloud paper window garden road light".split()
TRAIN = ["--trainable", "full", "--lr", "3e-3", "--epochs", "6", "-b", "8", "--warmup", "0"]


def colour_rows(n, seed):
    """A separable closed-set task: the document names its colour among filler words of its own (half the vocabulary
    each): a 2-layer random-init model learns it in 48 steps, which the colour word alone did not give it reliably."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        label = ["red", "blue"][i % 2]
        words = rng.sample(WORDS[:8] if label == "red" else WORDS[8:], 6)
        words.insert(rng.randrange(7), label)
        rows.append({"text": " ".join(words), "answer": label, "question": "Which colour?"})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Each split in the six sources: SPLIT.jsonl, .parquet, .csv (review, label), -alpaca.json, -disk/, and the
    Hub id org/colours@SPLIT in the HF cache tmp/hf."""
    from datasets import Dataset

    tmp = tmp_path_factory.mktemp("sources")
    splits = {"train": colour_rows(64, 0), "validation": colour_rows(16, 1), "test": colour_rows(24, 2)}
    for split, rows in splits.items():
        write_jsonl(tmp / f"{split}.jsonl", rows)
        Dataset.from_list(rows).to_parquet(tmp / f"{split}.parquet")
        Dataset.from_list(rows).save_to_disk(tmp / f"{split}-disk")
        Dataset.from_list([{"review": r["text"], "label": r["answer"], "question": r["question"]} for r in rows]) \
            .to_csv(tmp / f"{split}.csv", index=False)
        (tmp / f"{split}-alpaca.json").write_text(json.dumps(
            [{"instruction": r["question"], "input": r["text"], "output": r["answer"]} for r in rows]))
    cache_hub_dataset(tmp / "hf", "org/colours", splits)
    return tmp


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def _accuracies(run):
    return [r["eval_accuracy"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
            if "eval_accuracy" in r]


def test_the_same_task_from_six_sources(task, tiny_llm):
    """Three runs, each training on two sources (half the rows from each, joined with a comma), validating on a
    third kind and scored by eval.py on a fourth: every source trains, validates and evaluates somewhere."""
    t, env = task, {"HF_DATASETS_CACHE": str(task / "hf")}
    runs = {
        "a": ([f"{t}/train.jsonl@train[:50%],{t}/train.parquet@train[50%:]", "org/colours@validation"],
              f"{t}/test.csv"),
        "b": ([f"{t}/train.csv@train[:50%],{t}/train-alpaca.json@train[50%:]", f"{t}/validation-disk"],
              "org/colours@test"),
        "c": ([f"{t}/train-disk@train[:50%],org/colours@train[50%:]", f"{t}/validation.parquet"],
              f"{t}/test-alpaca.json"),
    }
    metrics = {}
    for name, ((train, val), test) in runs.items():
        r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--validation-data", val, *TRAIN,
                    "--columns", "text=review,answer=label", "--name", name, "--log-dir", t / "log", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "data used: " in r.stdout and ": 32" in r.stdout  # each source's count in the start-up report
        e = run_cli("eval.py", "-c", t / "log" / name, "--test-data", test, "-o", t / "results", env=env)
        assert e.returncode == 0, e.stderr[-3000:]
        metrics[name] = json.loads((t / "results" / "1024-max-len" / name / "metrics.json").read_text())
    a = t / "log" / "a"
    for name in "bc":
        assert _losses(t / "log" / name) == _losses(a), name  # the same tokens in the same order: the same steps
        assert _accuracies(t / "log" / name) == _accuracies(a), name
        assert (metrics[name]["accuracy"], metrics[name]["confusion_matrix"]) == \
            (metrics["a"]["accuracy"], metrics["a"]["confusion_matrix"]), name
    assert metrics["a"]["accuracy"] >= 0.75, metrics["a"]  # it learned (chance 0.5)
    cfg = json.loads((a / "run.json").read_text())
    assert cfg["train_data"].startswith(str(t)) and cfg["validation_data"] == "org/colours@validation"


def test_mix_and_validation_split_end_to_end(task, tiny_llm):
    t = task
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", f"{t}/train.parquet,{t}/test.jsonl", "--mix", "3,1",
                "--validation-split", "0.2", *TRAIN, "--name", "mix", "--log-dir", t / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((t / "log" / "mix" / "run.json").read_text())
    # the mix: as large as the sources allow at 3:1 without repeats (64 of the parquet, 21 of the jsonl), then
    # 17 of those 85 held out for validation, stratified (the two colours alternate: 8 or 9 of each)
    held = cfg["validation_split_ids"]
    assert len(held) == 17 and cfg["validation_samples"] == 17
    assert sum(x["samples"] for x in cfg["data_sources"]) == cfg["train_samples"] == 68
    assert f"data used: {t}/train.parquet: " in r.stdout and "validation split: 17 held out" in r.stdout
    e = run_cli("eval.py", "-c", t / "log" / "mix", "--split", "validation", "-o", t / "results")
    assert e.returncode == 0, e.stderr[-3000:]
    m = json.loads((t / "results" / "1024-max-len" / "mix" / "metrics.json").read_text())
    assert m["samples"] == 17
    assert m["accuracy"] == pytest.approx(_accuracies(t / "log" / "mix")[-1])  # the very samples validation saw
