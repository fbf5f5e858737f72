"""End to end: train.py and eval.py run as a user runs them (subprocesses) on tiny models built here."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, write_jsonl

WORDS = "the a small big old new house tree river stone cloud paper window garden road light".split()


def color_task(folder: Path, n: int, seed: int):
    """A separable closed-set task: the document names its colour among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["red", "blue"][i % 2]
        words = rng.sample(WORDS, 6)
        words.insert(rng.randrange(7), label)
        rows.append({"id": f"{seed}-{i}", "text": " ".join(words), "answer": label,
                     "question": "Which colour?"})
    return write_jsonl(folder / f"data-{seed}.jsonl", rows)


def losses(run: Path):
    return [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tiny_llm, tmp_path_factory):
    """Full fine-tuning of a random-init model: it learns the task within a minute on CPU. 8 epochs (96 steps,
    a few seconds): at 4, validation accuracy ended between 0.5 and 1.0 depending on the seed's batch order."""
    tmp = tmp_path_factory.mktemp("full")
    train, val, test = color_task(tmp, 96, 0), color_task(tmp, 16, 1), color_task(tmp, 24, 2)
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--validation-data", val, "--trainable", "full",
                "--lr", "3e-3", "--epochs", "8", "-b", "8", "--warmup", "0", "--predict", "generate", "--name", "full",
                "--log-dir", tmp / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, test, r


def test_full_run_folder_and_learning(full_run):
    tmp, _, r = full_run
    run = tmp / "log" / "full"
    assert (run / "run.json").is_file() and (run / "best" / "run.json").is_file()
    assert (run / "latest" / "model.safetensors").is_file() and list(run.glob("checkpoint-*"))
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["classes"] == ["red", "blue"] and cfg["task"] == "classification"
    assert cfg["tokens"]["pad_token"] != cfg["tokens"]["eos_token"] == "<|im_end|>"
    ls = losses(run)
    assert sum(ls[-4:]) / 4 < 0.5 * sum(ls[:4]) / 4, ls
    assert "validation accuracy" in r.stdout and "real tokens/s" in r.stdout


def test_eval_scores_the_trained_run(full_run):
    tmp, test, _ = full_run
    r = run_cli("eval.py", "-c", tmp / "log" / "full", "--test-data", test, "-o", tmp / "results")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp / "results" / "1024-max-len" / "full"
    m = json.loads((out / "metrics.json").read_text())
    assert m["predict"] == "score" and m["samples"] == 24
    assert m["accuracy"] >= 0.9, m  # chance is 0.5
    rows = list(csv.DictReader(open(out / "predictions.tsv"), delimiter="\t"))
    assert len(rows) == 24 and {r["id"] for r in rows} == {f"2-{i}" for i in range(24)}
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    matrix = list(csv.reader(open(out / "confusion_matrix.csv")))
    assert matrix[0][1:] == ["red", "blue", "invalid"]
    assert sum(int(x) for row in matrix[1:] for x in row[1:]) == 24
    assert "accuracy" in r.stdout

    # two processes (torchrun, gloo on CPU): each scores a shard, rank 0 merges: the same metrics and predictions
    d = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", ROOT / "eval.py",
                "-c", tmp / "log" / "full", "--test-data", test, "-o", tmp / "results-ddp")
    assert d.returncode == 0, d.stderr[-3000:]
    dout = tmp / "results-ddp" / "1024-max-len" / "full"
    dm = json.loads((dout / "metrics.json").read_text())
    assert (dm["accuracy"], dm["confusion_matrix"]) == (m["accuracy"], m["confusion_matrix"])
    assert [r.split("\t")[:3] for r in (dout / "predictions.tsv").read_text().splitlines()] == \
        sorted([r.split("\t")[:3] for r in (out / "predictions.tsv").read_text().splitlines()],
               key=lambda r: (r[0] != "id", int(r[0].split("-")[1]) if r[0] != "id" else 0))
    conf = {r["id"]: float(r["confidence"]) for r in rows}
    for r in csv.DictReader(open(dout / "predictions.tsv"), delimiter="\t"):
        assert abs(float(r["confidence"]) - conf[r["id"]]) < 1e-3  # the same scores, whatever the shard
    assert not list(dout.glob("predictions.rank*"))

    # the run validated with --predict generate: eval.py generating on the validation file gives its last figure
    val = tmp / "data-1.jsonl"
    g = run_cli("eval.py", "-c", tmp / "log" / "full" / "latest", "--test-data", val, "-o", tmp / "results",
                "--predict", "generate")
    assert g.returncode == 0, g.stderr[-3000:]
    gm = json.loads((out / "metrics.json").read_text())
    grows = list(csv.DictReader(open(out / "predictions.tsv"), delimiter="\t"))
    assert gm["predict"] == "generate" and gm["invalid"] == sum(r["prediction"] == "" for r in grows)
    assert gm["accuracy"] == sum(r["prediction"] == r["reference"] for r in grows) / 16
    last = [x for x in map(json.loads, (tmp / "log" / "full" / "train_log.jsonl").read_text().splitlines())
            if "eval_accuracy" in x][-1]
    assert gm["accuracy"] == last["eval_accuracy"] and gm["accuracy"] >= 0.75, (gm, last)


def test_generate_a_document_a_prompt_sampling_and_a_long_chat(full_run, tmp_path):
    """generate.py on the trained run: --text answers as the same document in --data does, a near-zero temperature
    samples what greedy decoding picks; the chat drops its oldest exchange when the history outgrows max_len."""
    tmp, test, _ = full_run
    run, row = tmp / "log" / "full", json.loads(test.read_text().splitlines()[0])
    common = ["-c", run, "--max-new-tokens", "4"]
    data = run_cli("generate.py", *common, "--data", test, "-o", tmp_path / "a.jsonl")
    text = run_cli("generate.py", *common, "--text", row["text"])
    hot = run_cli("generate.py", *common, "--text", row["text"], "--temperature", "1e-4")
    prompt = run_cli("generate.py", *common, "--prompt", f"{row['text']}\n\nWhich colour?")
    for r in (data, text, hot, prompt):
        assert r.returncode == 0, r.stderr[-2000:]
    answers = {a["id"]: a["answer"] for a in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    assert len(answers) == 24 and text.stdout == hot.stdout == answers[row["id"]] + "\n"
    assert prompt.stdout.strip()

    # the chat, fed on stdin, by a copy of the run whose max length holds one exchange of these lines, not two
    import shutil

    from dataset import Formatter, Sample
    from transformers import AutoTokenizer

    fmt, line = Formatter(AutoTokenizer.from_pretrained(run / "best")), "red house " * 20

    def length(turns):
        return fmt.encode(Sample("c", "chat", turns, needs_prompt=True), with_answer=False)["length"]

    short = tmp_path / "short"
    shutil.copytree(run / "best", short / "best")
    cfg = json.loads((short / "best" / "run.json").read_text())  # what generate.py reads for best/
    cfg["max_len"] = (length([("user", line)]) + length([("user", line), ("assistant", "red"), ("user", line)])) // 2
    for f in (short / "run.json", short / "best" / "run.json"):
        f.write_text(json.dumps(cfg))
    chat = subprocess.run([sys.executable, ROOT / "generate.py", "-c", short, "--max-new-tokens", "2"],
                          input=f"{line}\n{line}\n{line}\n\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    # three answers; the 2nd and 3rd first tried with the whole history, then without the oldest exchange
    assert chat.stdout.count("model> ") == 5 and "error" not in chat.stderr, (chat.stdout, chat.stderr)


def test_lora_adapter_reloads_with_peft(tiny_llm, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = color_task(tmp_path, 16, 0)
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--max-steps", "3", "-b", "4", "--name", "lora",
                "--log-dir", tmp_path / "log", "-r", "4", "--set-pad-token")
    assert r.returncode == 0, r.stderr[-3000:]
    best = tmp_path / "log" / "lora" / "best"
    assert (best / "adapter_config.json").is_file() and (best / "adapter_model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(best)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), best)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: LoRA B starts at zero
    ids = torch.tensor([tok("red house")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    assert not torch.allclose(model(ids).logits, base(ids).logits)


def test_vision_language_model_trains_and_evals(tiny_vlm, tmp_path):
    from tiny_models import make_images

    images = make_images(tmp_path / "img", 24)
    rows = [{"id": f"i{i}", "image": f"img/{name}", "answer": label, "question": "Which colour is the square?"}
            for i, (name, label) in enumerate(images)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    test = write_jsonl(tmp_path / "test.jsonl", rows[16:])
    r = run_cli("train.py", "-m", tiny_vlm, "--train-data", train, "--validation-data", test, "--max-steps", "4",
                "-b", "4", "--name", "vlm", "--log-dir", tmp_path / "log", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "vlm"
    assert "vision-language" in r.stdout
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert (run / "best" / "processor_config.json").is_file() or (run / "best" / "preprocessor_config.json").is_file()
    assert len(losses(run)) == 4
    e = run_cli("eval.py", "-c", run, "--test-data", test, "-o", tmp_path / "results")
    assert e.returncode == 0, e.stderr[-3000:]
    m = json.loads((tmp_path / "results" / "1024-max-len" / "vlm" / "metrics.json").read_text())
    assert m["samples"] == 8
    # generate.py --image with the data's own question answers as --data does for that sample
    data = run_cli("generate.py", "-c", run, "--data", test, "-o", tmp_path / "a.jsonl", "--max-new-tokens", "4")
    one = run_cli("generate.py", "-c", run, "--prompt", rows[16]["question"], "--image", tmp_path / rows[16]["image"],
                  "--max-new-tokens", "4")
    assert data.returncode == 0 and one.returncode == 0, (data.stderr[-2000:], one.stderr[-2000:])
    answers = {a["id"]: a["answer"] for a in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    assert one.stdout == answers[rows[16]["id"]] + "\n", (one.stdout, answers)
