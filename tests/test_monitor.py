"""Runs you can watch: free-text validation metrics, --metric, --early-stopping, curves.png, the plan in run.json,
the console line, the progress lines of validation, eval, tokenising and loading, GRPO reward health (train.py run as
a user runs it, on the tiny model)."""
import io
import json
import math
import random
import re

import pytest

from conftest import ROOT, run_cli, write_jsonl

WORDS = "the a small big old new house tree river stone cloud paper window garden road light".split()


def copy_task(path, n, seed):
    """Free text: the answer is the document's first two words (not a closed set: the pairs rarely repeat)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 5)
        rows.append({"id": f"{seed}-{i}", "text": " ".join(words), "question": "Repeat the first two words.",
                     "answer": " ".join(words[:2])})
    return write_jsonl(path, rows)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def free_text_run(tiny_llm, tmp_path_factory):
    """Full fine-tuning on free text, validated every 2 steps, with a minimum delta no change can pass: the first
    validation in training sets the best, the next one cannot improve on it, so --early-stopping 1 stops at step 4
    of 36."""
    tmp = tmp_path_factory.mktemp("free")
    train, val = copy_task(tmp / "train.jsonl", 24, 0), copy_task(tmp / "val.jsonl", 6, 1)
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--validation-data", val, "--trainable", "full",
                "--lr", "3e-3", "--epochs", "12", "-b", "8", "--eval-steps", "2", "--early-stopping", "1",
                "--early-stopping-delta", "1000", "--val-samples", "4", "--name", "free", "--log-dir", tmp / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "log" / "free", r


def test_free_text_validation_metric_and_early_stopping(free_text_run):
    run, r = free_text_run
    log = records(run / "train_log.jsonl")
    evals = [x for x in log if "eval_loss" in x]
    assert [x["step"] for x in evals] == [0, 2, 4]  # the baseline, then two validations: the second stops
    assert all(0 <= x["eval_chrf"] <= 100 and 0 <= x["eval_exact_match"] <= 1 for x in evals)
    assert max(x["step"] for x in log) == 4
    assert "early stopping: no improvement of chrf by more than 1000 in 1 evaluations; stopped at step 4 of 36" \
        in r.stdout
    # every validation's progress, without a terminal: one line as it starts, one as it ends, before its result line
    for step in (0, 2, 4):
        assert f"step {step}/36  validation 0/4 samples" in r.stdout
        assert re.search(rf"step {step}/36  validation 4/4 samples  [\d.,]+ samples/s  elapsed \d+:\d\d\n", r.stdout)
    assert r.stdout.index("step 0/36  validation 4/4 samples") < r.stdout.index("step 0/36  validation: loss")
    # loading the model: our line at its start and at its end
    assert re.search(r"loading model \S+ \.\.\.\nloading model \S+: done in \d+:\d\d\n", r.stdout)
    best = json.loads((run / "best" / "run.json").read_text())["checkpoint"]
    top = max(evals, key=lambda x: x["eval_chrf"])  # chrF chose best/, by default (the baseline counts)
    assert (best["step"], best["eval_chrf"]) == (top["step"], top["eval_chrf"])
    assert "validation chrf:" in r.stdout


def test_eval_scores_a_free_text_run_with_its_own_metrics(free_text_run):
    """eval.py on a free-text run generates (no classes) and reports chrF, BLEU and exact match of what it wrote."""
    import csv

    import sacrebleu

    from finetune.predict import normalize

    run, _ = free_text_run
    out = run.parent.parent / "results"
    e = run_cli("eval.py", "-c", run, "--test-data", run.parent.parent / "val.jsonl", "-o", out)
    assert e.returncode == 0, e.stderr[-3000:]
    folder = out / "1024-max-len" / "free"
    m = json.loads((folder / "metrics.json").read_text())
    rows = list(csv.DictReader(open(folder / "predictions.tsv"), delimiter="\t"))
    assert m["predict"] == "generate" and m["samples"] == len(rows) == 6 and "accuracy" not in m
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert m["exact_match"] == sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / 6
    assert f"chrF {m['chrf']:.2f}" in e.stdout
    # free text: the largest default batch that fits (all 6 samples in one), with the run's budget
    assert m["batch_size"] == 32 and m["max_new_tokens"] == json.loads((run / "run.json").read_text())["plan"][
        "validation"]["max_new_tokens"]
    # a progress line at the start and one at the end (no terminal), and no library bars or warnings
    assert "eval 0/6 samples" in e.stdout and re.search(r"eval 6/6 samples  [\d.,]+ samples/s  elapsed", e.stdout)
    assert not [n for n in ("gemm_4bit_forward", "Loading weights", "clean_up_tokenization", "%|") if n in
                e.stdout + e.stderr], e.stderr


def test_console_is_one_line_per_step(free_text_run):
    _, r = free_text_run
    assert "{'loss'" not in r.stdout and "'eval_loss'" not in r.stdout  # no raw dicts
    lines = [l for l in r.stdout.splitlines() if l.startswith("step ")]
    train = [l for l in lines if " loss " in l and "validation" not in l]
    assert len(train) == 4 and train[0].startswith("step 1/36  loss ")
    assert all("tok/s" in l and "elapsed" in l and " lr " in l for l in train)
    assert "ETA" in train[-1]  # from the second step on
    assert re.search(r"step 2/36  validation: loss [\d.]+  chrf [\d.]+  exact_match [\d.]+", r.stdout), lines
    assert "precision no" not in r.stdout and "float32 (no mixed precision)" in r.stdout  # short batches: float32
    assert "gemm_4bit_forward" not in r.stderr and "Writing model shards" not in r.stderr


def test_plan_counts_the_height_of_loading_the_weights(tiny_llm):
    """On a CPU, loading a checkpoint into another dtype holds the file's tensors and their copy at once (a
    float32 checkpoint under a bfloat16 base: 6 bytes a weight); in its own dtype the weights once."""
    import torch

    from finetune import monitor

    assert monitor.loading_bytes(str(tiny_llm), 1000, 2, torch.float32) == 6000
    assert monitor.loading_bytes(str(tiny_llm), 1000, 4, torch.float32) == 4000
    assert monitor.loading_bytes(str(tiny_llm), 1000, 2, "bfloat16") == 2000
    assert monitor.loading_bytes(str(tiny_llm), 1000, 2, None) == 6000  # no dtype named: float32


def test_plan_in_run_json_matches_the_model(free_text_run):
    run, r = free_text_run
    plan = json.loads((run / "run.json").read_text())["plan"]
    # the plan counts parameters on the meta device before loading; the model line counts the loaded model
    loaded = re.search(r"full, ([\d.]+)M of ([\d.]+)M parameters trainable", r.stdout)
    assert f"{plan['trainable_parameters'] / 1e6:.2f}" == loaded.group(1)
    assert f"{plan['parameters'] / 1e6:.1f}" == loaded.group(2)
    assert plan["steps"] == 36 and plan["samples_per_step"] == 8 and plan["train_samples"] == 24
    assert plan["tokens_per_epoch"] > 24 * 10
    assert plan["memory_gib"]["peak"] > plan["memory_gib"]["process_before_model"] > 0
    # time, measured on the loaded model: 19 validations (the baseline, then every 2 of 36 steps), generating on the
    # 4 samples --val-samples keeps, with the budget rule's tokens
    t, v = plan["time"], plan["validation"]
    assert t["validations"] == 19 and v["generate_samples"] == 4 and t["seconds"] > 0
    longest = json.loads((run / "run.json").read_text())["longest_answer_tokens"]
    assert v["max_new_tokens"] == math.ceil(1.5 * longest) + 16
    assert t["measured"]["forward_s_per_token"] > 0 and t["measured"]["decode_s_per_step"] >= 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("plan: about "))
    assert re.search(r"in all: 36 steps of about .+, 19 validations of about .+ \(loss on 4 samples, generation on 4 "
                     r"x \d+ new tokens at most, 8 a batch\); validation \d+% of the run$", line), line
    assert f"validation {t['validation_share']:.0%} of the run" in line
    assert ("more than a fifth of the run" in r.stdout) == (t["validation_share"] > 0.2)
    assert re.search(r"time: \d+ s in all, \d+ s of it validation \(\d+%\); the plan estimated \d+ s", r.stdout)
    eta = plan["eta"]  # measured over the first two steps, as the console's ETA
    assert eta["at_step"] == 2 and eta["seconds_left"] >= 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT.*", eta["expected_end"])
    assert "plan: peak memory about" in r.stdout and "the plan estimated" in r.stdout


def test_curves_png_is_written(free_text_run):
    run, r = free_text_run
    png = (run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert f"curves: {run / 'curves.png'}" in r.stdout


def test_lora_plan_counts_what_peft_trains(tiny_llm, tmp_path):
    train = copy_task(tmp_path / "train.jsonl", 8, 0)
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "-r", "4", "--max-steps", "1", "-b", "4",
                "--name", "lora", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((tmp_path / "log" / "lora" / "run.json").read_text())["plan"]
    loaded = re.search(r"lora, ([\d.]+)M of", r.stdout).group(1)
    assert f"{plan['trainable_parameters'] / 1e6:.2f}" == loaded and plan["steps"] == 1
    assert "gemm_4bit_forward" not in r.stderr
    # no validation data: no time plan, so no forward pass measured before the first step
    assert "time" not in plan and "plan: about" not in r.stdout


@pytest.mark.parametrize("extra, message", [
    (["--metric", "accuracy"], "--metric accuracy: sft validation on this data measures chrf, exact_match, loss"),
    (["--no-val", "--early-stopping", "2"], "--early-stopping needs validation data"),
    (["--early-stopping-delta", "0.1"], "--early-stopping-delta only applies to --early-stopping"),
    (["--early-stopping", "0"], "--early-stopping must be at least 1"),
])
def test_bad_monitoring_options_are_one_line(tiny_llm, tmp_path, extra, message):
    data = copy_task(tmp_path / "d.jsonl", 4, 0)
    val = [] if "--no-val" in extra else ["--validation-data", data]
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", data, *val, *[e for e in extra if e != "--no-val"],
                "--name", "bad", "--log-dir", tmp_path / "log")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "log" / "bad").exists()


def test_grpo_reward_health_warns_and_the_summary_counts_signal(tiny_llm, tmp_path):
    """A random model never names the fortune's class: `correct` is 0 for every completion, no group has variance,
    and with 4 new tokens every completion is cut off. Each problem is warned at its first step, then every 10."""
    rows = [json.loads(l) for l in (ROOT / "data/fortunes/train.jsonl").read_text().splitlines()][:8]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    r = run_cli("train.py", "--trainer", "grpo", "-m", tiny_llm, "--train-data", train, "-p", ROOT / "prompts.json",
                "--num-generations", "4", "-b", "4", "--max-completion-len", "4", "--max-steps", "11",
                "--rewards", "correct", "--name", "grpo", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: step")]
    for text in ("no learning signal", "reward correct returned one value (0) for every completion",
                 "100% of completions hit --max-completion-len 4"):
        hits = [l for l in warnings if text in l]
        assert [l.split(":")[1] for l in hits] == [" step 1", " step 11"], warnings
    assert "GRPO signal: 0% of groups had reward variance (learning signal) over 11 steps" in r.stdout
    assert re.search(r"step 3/11  loss \S+  reward 0 ", r.stdout)
    assert (tmp_path / "log" / "grpo" / "curves.png").stat().st_size > 10_000


def test_progress_lines_without_a_terminal():
    """A phase in a log file: one line at its start (with the planned ETA) and one at its end; nothing between."""
    from finetune.progress import Progress

    out = io.StringIO()
    with Progress("step 0/40  validation", total=10, estimate=70.0, file=out, live=False) as bar:
        for _ in range(5):
            bar.update(2)
    start, end = out.getvalue().splitlines()
    assert start == "step 0/40  validation 0/10 samples  ETA 1:10 (planned)"
    assert re.fullmatch(r"step 0/40  validation 10/10 samples  [\d.,]+ samples/s  elapsed 0:00", end), end
    out = io.StringIO()
    with Progress("loading model x", file=out, live=False):
        pass
    assert out.getvalue().splitlines() == ["loading model x ...", "loading model x: done in 0:00"]
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("eval", total=4, file=out, live=False) as bar:
        bar.update(1)
        raise KeyboardInterrupt
    assert out.getvalue().splitlines()[-1].endswith("(stopped)")


def test_progress_live_line_counts_rate_and_eta():
    """On a terminal the line is redrawn: the count, the rate, the elapsed time and the ETA, from the plan's
    estimate before the first sample and from the rate after it."""
    from finetune.progress import Progress

    bar = Progress("step 2/40  validation", total=8, estimate=30.0, live=False, show=False)
    bar.start()
    assert bar.text().endswith("ETA 0:30") and "0/8 samples" in bar.text()
    bar.start_time -= 10  # 10 s in, 2 done: 0.2 samples/s, 30 s to go
    bar.update(2)
    assert re.fullmatch(r"step 2/40  validation 2/8 samples  0.20 samples/s  elapsed 0:10  ETA 0:30", bar.text())
    bar.close()


def test_tokenising_a_large_set_shows_its_progress(tokenizer, monkeypatch, capsys):
    from dataset import Formatter, Sample
    from finetune import tokenise

    monkeypatch.setattr(tokenise, "SHOW_FROM", 3)  # "large" from 3 samples, so that the test stays small
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    samples = [Sample(id=str(i), file="t", turns=[("user", f"red blue {i}"), ("assistant", "red")]) for i in range(5)]
    assert len(tokenise.encode_cached(Formatter(tokenizer, max_len=64), samples, True)) == 5
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tokenising 0/5 samples" and re.match(r"tokenising 5/5 samples  [\d.,]+ samples/s  elapsed",
                                                           out[1])
    assert out[2].startswith("tokenised: 5 samples in ")


@pytest.mark.parametrize("train_s, vals, loss_s, batch_s, batch, available, metric, expected", [
    (400, 2, 0, 10, 8, 100, None, 32),     # validations may take 100 s: 5 batches, capped at FREE_TEXT_SAMPLES
    (400, 2, 0, 10, 4, 100, None, 20),     # 50 s each: 5 batches of 4
    (400, 2, 20, 10, 4, 100, None, 12),    # the loss pass takes its share first: 3 batches
    (400, 2, 0, 10, 8, 6, None, 6),        # no more than there are
    (40, 3, 0, 10, 8, 10, None, 0),        # one batch would take 30 of 50 s: none, the loss alone
    (40, 3, 0, 10, 8, 10, "chrf", 8),      # unless chrF is asked for: one batch
    (0, 1, 0, 0, 8, 10, None, 10),         # no decoding cost measured: every sample there is
])
def test_free_text_default_samples_keep_validation_under_a_fifth(train_s, vals, loss_s, batch_s, batch, available,
                                                                 metric, expected):
    from finetune import timeplan

    n = timeplan.free_text_samples(train_s, vals, loss_s, batch_s, batch, available, metric)
    assert n == expected
    if n and metric is None:
        val_total = vals * (loss_s + math.ceil(n / batch) * batch_s)
        assert val_total <= timeplan.VALIDATION_SHARE * (train_s + val_total) + 1e-9


def test_validations_counted_as_the_trainer_runs_them():
    from argparse import Namespace

    from finetune.timeplan import validations_in

    assert validations_in(Namespace(eval_steps=2, resume=False), 36, 3) == 19   # baseline + 18
    assert validations_in(Namespace(eval_steps=5, resume=False), 12, 3) == 4    # 5, 10, and the last step 12
    assert validations_in(Namespace(eval_steps=None, resume=False), 7, 3) == 4  # baseline + 3 epochs begun
    assert validations_in(Namespace(eval_steps=None, resume=True), 7, 3) == 3   # no baseline on --resume


def test_free_text_validation_is_bounded_by_default(tiny_llm, tmp_path):
    """Without --val-samples, free-text validation generates on the first samples that keep all validations within
    a fifth of the run's planned time: a short run with many validation samples generates on fewer than it has, the
    plan line says how many, and every validation does what the plan says (none: the loss alone, which then chooses
    best/)."""
    train, val = copy_task(tmp_path / "train.jsonl", 16, 0), copy_task(tmp_path / "val.jsonl", 40, 1)
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--validation-data", val, "--max-steps", "2",
                "-b", "8", "--name", "bounded", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "log" / "bounded" / "run.json").read_text())
    n = cfg["plan"]["validation"]["generate_samples"]
    assert 0 <= n < 40 and n % 8 == 0  # whole batches of -b
    assert f"plan: free-text validation generates on {n or 'none'} of the 40 samples" in r.stdout
    evals = [x for x in records(tmp_path / "log" / "bounded" / "train_log.jsonl") if "eval_loss" in x]
    assert [x["step"] for x in evals] == [0, 2] and all(("eval_chrf" in x) == (n > 0) for x in evals)
    assert (f"step 0/2  validation 0/{n} samples" in r.stdout) == (n > 0)
    assert ("validation chrf:" if n else "validation loss:") in r.stdout
