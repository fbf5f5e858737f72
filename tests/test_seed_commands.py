"""The command lines users copy from the RVL-CDIP document-classification code (arXiv 2412.13859), run as written
on a small OCR folder of five non-RVL-CDIP classes (so --classes is added), with a local tiny model for -m and
no GPU: -d trains the classifier head by default, --generative alone is the plain '### Classification:' format,
--unsloth / --split-model fall back with a warning, eval.py takes the training flags, and the results land in
OUT/<max-len>-max-len/<run>/ as in that project."""
import csv
import json

import pytest

from conftest import ROOT, run_cli

WORDS = ["alpha", "bravo", "charlie", "delta", "echo"]
LORA = ["--set-pad-token", "--lora-rank", "8", "--lora-alpha", "16", "--max-len", "768"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A working folder (runs go to its log/, as in that project) with a tiny model whose vocabulary has Llama-3's
    <|eot_id|>, an OCR folder and its classes file."""
    from tiny_models import build_tiny_llm, build_tokenizer

    work = tmp_path_factory.mktemp("seed")
    build_tiny_llm(work / "model", build_tokenizer(words=WORDS, extra_special_tokens=["<|eot_id|>"]))
    ocr = work / "ocr"
    ocr.mkdir()
    for split, n in {"train": 15, "validation": 5, "test": 10}.items():
        for i in range(n):
            (ocr / f"{split}_{i:04d}_{i % 5}_aws.json").write_text(json.dumps({"ocr": f"{WORDS[i % 5]} page {i}"}))
    (work / "classes.txt").write_text("\n".join(WORDS) + "\n")
    return work


def train(seed, name, *flags, launcher=()):
    args = ["-d", "ocr/", "--name", name, "-m", "model", *flags, "--classes", "classes.txt"]
    if launcher:
        return run_cli("-m", *launcher, ROOT / "train.py", *args, cwd=seed)
    return run_cli("train.py", *args, cwd=seed)


@pytest.fixture(scope="module")
def head_run(seed):
    r = train(seed, "name-of-experiment", "-b", "3", *LORA)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_d_trains_the_classifier_head_and_eval_writes_where_that_project_did(seed, head_run):
    cfg = json.loads((seed / "log/name-of-experiment/run.json").read_text())
    assert cfg["head"] == "classifier" and cfg["format"] == "chat" and cfg["classes"] == WORDS
    assert cfg["trainable"] == "lora" and "note: -d trains QLoRA by default on an NVIDIA GPU" in head_run.stderr
    assert cfg["lora_rank"] == 8 and cfg["lora_alpha"] == 16 and cfg["max_len"] == 768 and cfg["head_lr"] == 1e-3
    assert "set_pad_token" in cfg and "max_completion_len" in cfg  # only named secret options leave run.json

    e = run_cli("eval.py", "-d", "ocr/", "-c", "log/name-of-experiment/", "-b", "20", "--max-len", "768",
                "-o", "results/", cwd=seed)
    assert e.returncode == 0, e.stderr[-3000:]
    out = seed / "results/768-max-len/name-of-experiment"
    m = json.loads((out / "metrics.json").read_text())
    assert m["predict"] == "head" and m["samples"] == 10
    rows = list(csv.DictReader(open(out / "predictions.tsv"), delimiter="\t"))
    assert len(rows) == 10 and {r["prediction"] for r in rows} <= set(WORDS)

    bad = run_cli("eval.py", "-d", "ocr/", "-c", "log/name-of-experiment/", "--generative", "-o", "r2/", cwd=seed)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --generative: name-of-experiment is a classifier run"]


def test_split_model_without_a_gpu_warns_and_trains(seed):
    r = train(seed, "split", "-b", "3", *LORA, "--split-model")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("--split-model spreads the model over GPUs and there is none here") == 1
    assert (seed / "log/split/best/adapter_config.json").is_file()


def test_accelerate_launch(seed):
    r = train(seed, "launched", "-b", "3", *LORA, launcher=("accelerate.commands.launch",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((seed / "log/launched/run.json").read_text())["head"] == "classifier"


def test_generative_lines_use_the_plain_format_and_eval_takes_their_flags(seed):
    r = train(seed, "gen", "-b", "40", *LORA, "--generative", "--unsloth", "--mixed-precision")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("--unsloth needs an NVIDIA GPU and there is none here") == 1
    cfg = json.loads((seed / "log/gen/run.json").read_text())
    assert cfg["head"] == "generative" and cfg["response_template"] == "### Classification:" and cfg["format"] == "plain"

    flags = ["--generative", "--unsloth", "--set-pad-token", "<|eot_id|>", "--response-template", " ### Classification:"]
    r = run_cli("train.py", "-d", "ocr/", "--name", "llama3", "-m", "model", "-b", "16", "--lora-rank", "8",
                "--lora-alpha", "16", "--max-len", "768", "--mixed-precision", *flags, "--classes", "classes.txt",
                cwd=seed)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((seed / "log/llama3/run.json").read_text())
    assert cfg["tokens"]["pad_token"] == "<|eot_id|>" and cfg["response_template"] == " ### Classification:"

    e = run_cli("eval.py", "-d", "ocr/", "-c", "log/llama3/", "-b", "20", "--max-len", "768", "-o",
                "results-generative/", *flags, cwd=seed)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "note:" not in e.stdout + e.stderr  # the run's own values: nothing overridden
    m = json.loads((seed / "results-generative/768-max-len/llama3/metrics.json").read_text())
    assert m["samples"] == 10 and m["predict"] == "score" and m["response_template"] == " ### Classification:"

    # a different response template overrides the run's, and says so
    e = run_cli("eval.py", "-d", "ocr/", "-c", "log/llama3/", "--response-template", "### Label:", "-o", "r3/",
                "--limit", "2", cwd=seed)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "note: --response-template '### Label:' overrides the run's ' ### Classification:'" in e.stdout


# (extra flags, the one error line): checked before any model loads, nothing written
CLASHES = [
    (["--classifier", "--trainer", "grpo"], "--classifier trains a classification head with SFT; it cannot be "
     "combined with --trainer grpo"),
    (["--generative", "--trainer", "dpo"], "--trainer dpo reads preferences from --train-data, not -d"),
    (["--lr", "-1"], "--lr must be greater than 0.0, got -1.0"),
    (["--epochs", "0"], "--epochs must be greater than 0.0, got 0.0"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be below 1.0, got 1.5"),
    (["--warmup", "-0.1"], "--warmup must be at least 0.0, got -0.1"),
    (["--max-steps", "0"], "--max-steps must be at least 1 (or -1: use --epochs), got 0"),
    (["--num-generations", "4"], "--num-generations only applies to --trainer grpo; drop it (it would be ignored)"),
    (["--generative", "--head-lr", "0.01"], "--head-lr only applies to --classifier; drop it (it would be ignored)"),
    (["--trainable", "full", "--lora-alpha", "8"], "--lora-alpha only applies to LoRA / QLoRA (not --trainable "
     "full); drop it (it would be ignored)"),
    (["--predict", "generate"], "--predict only applies to generative SFT (how closed-set validation is measured); "
     "drop it (it would be ignored)"),
    (["--total-batch-size", "8", "--grad-accum", "2"], "--grad-accum is derived from --total-batch-size (and the "
     "process count); give one of them"),
    (["--epochs", "2", "--max-steps", "5"], "--max-steps ends the run whatever --epochs says; give one of them"),
    (["--trainable", "full", "--init-adapter", "x"], "--init-adapter starts a LoRA run from an SFT adapter; it cannot "
     "be combined with --trainable full"),
]


@pytest.mark.parametrize("extra,message", CLASHES, ids=[" ".join(c[0]) for c in CLASHES])
def test_contradictions_and_ranges_stop_before_loading(seed, tmp_path, extra, message):
    r = run_cli("train.py", "-d", seed / "ocr", "-m", seed / "model", "--classes", seed / "classes.txt", *extra,
                "--name", "clash", "--log-dir", tmp_path / "log")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: {message}", r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "log").exists()


def test_a_config_key_or_tracker_that_is_no_option_is_one_line(seed, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\nlearning_rate: 0.001\n")  # TrainingArguments' name, not ours
    base = ["-d", seed / "ocr", "-m", seed / "model", "--classes", seed / "classes.txt", "--log-dir", tmp_path / "log"]
    r = run_cli("train.py", "--config", config, *base)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {config}: field 'learning_rate': unknown "
                                                                   "option"], r.stderr[-2000:]
    r = run_cli("train.py", *base, "--report-to", "wandb,comet")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "error: argument --report-to: 'comet' is not one of none, wandb, mlflow, tensorboard"), r.stderr[-2000:]
    assert not (tmp_path / "log").exists()
