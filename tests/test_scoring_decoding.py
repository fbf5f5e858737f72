"""Scoring rules of --predict score (calibration included), decoding options and the one generation budget rule
(finetune/decoding.py) that validation, eval.py, generate.py and the parity check share, checked against direct
computations and through the CLIs."""
import copy
import json
import math

import pytest
import torch

from conftest import ROOT, run_cli, write_jsonl
from dataset import Formatter, Sample
from finetune.decoding import Decoding, generate, generation_budget, resolve
from finetune.predict import CONTENT_FREE, content_free, content_free_ll, predict, rule_scores, score_text


def test_rule_scores_exact_values():
    ll = torch.tensor([[-2.0, -3.0]])          # class 0: 1 token, class 1: 4 tokens
    n = [1, 4]
    assert rule_scores(ll, n, "sum").tolist() == [[-2.0, -3.0]]
    assert rule_scores(ll, n, "mean").tolist() == [[-2.0, -0.75]]
    # the content-free prompt gives class 0 probability 0.8: calibration takes that head start away
    free = torch.log(torch.tensor([[[0.8, 0.2], [0.8, 0.2], [0.8, 0.2]]]))
    got = rule_scores(ll, n, "calibrated", free)
    assert got[0].tolist() == pytest.approx([-2.0 - math.log(0.8), -3.0 - math.log(0.2)])
    assert got.argmax(-1).item() == 1                                 # sum alone picks class 0
    # the prior is the mean of the K content-free distributions, not of their logs
    mixed = torch.log(torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.7, 0.3]]]))
    assert rule_scores(ll, n, "calibrated", mixed)[0, 0].item() == pytest.approx(-2.0 - math.log(0.7))
    # calibrated-mean: the per-token content-free scores log(0.8)/1 and log(0.2)/4, softmaxed, are the prior
    prior = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in [(math.log(0.8), math.log(0.2) / 4)]][0]
    assert rule_scores(ll, n, "calibrated-mean", free)[0].tolist() == pytest.approx(
        [-2.0 - math.log(prior), -0.75 - math.log(1 - prior)])


def test_calibrated_predict_matches_direct_computation(tiny_llm, tokenizer):
    """predict(rule="calibrated") picks argmax(ll(sample) - log mean_k softmax(ll(content-free k))), the prompt
    (system + question) kept and only the document replaced; samples sharing a prompt share the content-free rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as built
    tokenizer.pad_token = "<|endoftext|>"
    fmt = Formatter(tokenizer, max_len=128, prompts={"system": ["Sort it."], "question": ["Which colour?"]})
    classes = ["red", "blue", "computers"]
    samples = [Sample(id=str(i), file="t", turns=[("user", ""), ("assistant", c)], document=d, needs_prompt=True)
               for i, (d, c) in enumerate([("a small house", "red"), ("the river is long", "blue"), ("x", "red"),
                                           ("old stone and big law", "computers")])]
    class_ids = [fmt.answer_ids(c) for c in classes]
    free_sample = content_free(samples[0], "N/A")
    assert free_sample.document == "N/A" and free_sample.answer is None
    assert "Which colour?" in fmt.encode(free_sample, with_answer=False)["text"]
    with torch.inference_mode():
        ll = score_text(model, [fmt.prompt_ids(s) for s in samples], class_ids, tokenizer.pad_token_id)
        free_rows = score_text(model, [fmt.prompt_ids(content_free(samples[0], t)) for t in CONTENT_FREE],
                               class_ids, tokenizer.pad_token_id)
        free = content_free_ll(model, fmt, samples, class_ids)
        results = predict(model, fmt, samples, classes, "score", batch_size=3, rule="calibrated")
    assert free.shape == (4, len(CONTENT_FREE), 3)
    assert torch.allclose(free[0], free_rows, atol=1e-4) and torch.equal(free[0], free[3])
    direct = ll - torch.softmax(free_rows, -1).mean(0).log()
    assert [r["prediction"] for r in results] == [classes[i] for i in direct.argmax(-1).tolist()]
    conf = torch.softmax(direct, -1).max(-1).values
    assert [r["confidence"] for r in results] == pytest.approx(conf.tolist(), abs=1e-4)

    # --score-prompts all: the class log-probabilities averaged over the prompts file's questions
    two = Formatter(tokenizer, max_len=128, prompts={"system": ["Sort it."], "question": ["Which colour?", "Name it."]})
    second = Formatter(tokenizer, max_len=128, prompts={"system": ["Sort it."], "question": ["Name it."]})
    with torch.inference_mode():
        ensemble = predict(model, two, samples, classes, "score", batch_size=3, rule="mean", prompt_set="all")
        per_q = [torch.log_softmax(score_text(model, [f.prompt_ids(s) for s in samples], class_ids,
                                              tokenizer.pad_token_id) / torch.tensor([len(c) for c in class_ids]), -1)
                 for f in (two, second)]
    mean = torch.stack(per_q).mean(0)
    assert [r["prediction"] for r in ensemble] == [classes[i] for i in mean.argmax(-1).tolist()]
    assert [r["confidence"] for r in ensemble] == pytest.approx(torch.softmax(mean, -1).max(-1).values.tolist(),
                                                               abs=1e-4)


def test_decoding_options_reach_generate(tiny_llm, tokenizer):
    """A random tiny model repeats itself under greedy decoding; --no-repeat-ngram-size 1 forbids any repeated
    token, and a repetition penalty changes the output (the options are passed to transformers' generate)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as built
    tokenizer.pad_token = "<|endoftext|>"
    fmt = Formatter(tokenizer)
    prompts = [fmt.prompt_ids(Sample(id=str(i), file="", turns=[("user", q)]))
               for i, q in enumerate(["red blue red", "computers and food"])]
    with torch.inference_mode():
        greedy = generate(model, tokenizer, prompts, Decoding(24))
        blocked = generate(model, tokenizer, prompts, Decoding(24, no_repeat_ngram_size=1))
        beams = generate(model, tokenizer, prompts, Decoding(24, num_beams=3))
        for text, blocked_text, p in zip(greedy, blocked, prompts):
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 no_repeat_ngram_size=1, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
            assert len(set(out)) == len(out)  # no token twice
            assert blocked_text == tokenizer.decode(out, skip_special_tokens=True)
            greedy_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                        do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
            assert len(set(greedy_ids)) < len(greedy_ids) and text != blocked_text  # the premise: greedy loops
    assert len(beams) == 2 and beams != greedy


@pytest.mark.parametrize("classes, given, expected", [
    (None, {}, 1.2),                               # free text: the penalty that stopped the loops (bench/decoding.py)
    (["red", "blue"], {}, 1.0),                    # closed set: plain greedy (the prompt lists the class names)
    (None, {"repetition_penalty": 1.0}, 1.0),      # a flag always wins
    (["red", "blue"], {"repetition_penalty": 1.3}, 1.3),
])
def test_default_decoding_depends_on_the_task(classes, given, expected):
    from argparse import Namespace

    args = Namespace(**{"num_beams": None, "repetition_penalty": None, "no_repeat_ngram_size": None, **given})
    assert resolve({}, classes, args).options() == {"num_beams": 1, "repetition_penalty": expected,
                                                    "no_repeat_ngram_size": 0}


@pytest.mark.parametrize("cfg, classes, given, expected", [
    ({"longest_answer_tokens": 40}, None, None, 76),                          # ceil(1.5 x 40) + 16
    ({"longest_answer_tokens": 7}, ["red", "blue"], None, 27),                # ceil(10.5) + 16: closed sets alike
    ({"longest_answer_tokens": 40, "max_new_tokens": 100}, None, None, 100),  # the run's own --max-new-tokens
    ({"longest_answer_tokens": 40, "max_new_tokens": 100}, None, 12, 12),     # a flag wins over everything
    ({"longest_answer_tokens": None, "max_new_tokens": None}, None, None, 256),  # no record: free text
    ({}, ["red", "blue"], None, 32),                                          # zero-shot closed set
    ({}, None, 5, 5),
])
def test_one_budget_rule(cfg, classes, given, expected):
    from argparse import Namespace

    assert generation_budget(cfg, classes, given) == expected
    assert resolve(cfg, classes, Namespace(max_new_tokens=given)).max_new_tokens == expected


def test_only_decoding_calls_model_generate():
    """Every generation of ours goes through finetune/decoding.py (its defaults, budget and kwargs): no other module
    of the library or CLI calls .generate( itself or sets greedy's switches."""
    files = [*sorted((ROOT / "finetune").glob("*.py")), *(ROOT / f for f in ("train.py", "eval.py", "generate.py",
                                                                               "export.py"))]
    offenders = [(f.name, owned) for f in files if f.name != "decoding.py"
                 for owned in (".generate(", "do_sample", "repetition_penalty=", "BUDGET_MARGIN")
                 if owned in f.read_text()]
    assert offenders == []


def test_validation_eval_generate_and_parity_share_one_budget(tiny_llm, tokenizer, tmp_path, monkeypatch):
    """train.py records the longest training answer, and the same run gets the budget rule's tokens everywhere:
    train.py's validation (run.json's plan), eval.py (metrics.json, with its decoding options), generate.py (what
    reaches model.generate) and export.py's parity check (parity.json); a bad option is one error line, exit 2,
    nothing written."""
    import generate as generate_cli
    from finetune import decoding

    answers = ["a short one", "a much longer answer with many more words in it than the others"]
    rows = [{"id": f"s{i}", "question": f"say something {i}", "answer": f"{answers[i % 2]} {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run = tmp_path / "log" / "run"
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", data, "--validation-data", data, "--val-samples", "2",
                "--max-steps", "1", "-b", "4", "--max-len", "64", "--name", "run", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "run.json").read_text())
    longest = 1 + len(tokenizer(rows[1]["answer"], add_special_tokens=False)["input_ids"])
    budget = math.ceil(1.5 * longest) + 16
    assert cfg["longest_answer_tokens"] == longest and generation_budget(cfg) == budget
    assert cfg["plan"]["validation"]["max_new_tokens"] == budget
    r = run_cli("eval.py", "-c", run, "--test-data", data, "--limit", "2", "-o", tmp_path / "res",
                "--num-beams", "2", "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "res/64-max-len/run/metrics.json").read_text())
    assert m["max_new_tokens"] == budget and m["samples"] == 2
    assert (m["num_beams"], m["repetition_penalty"], m["no_repeat_ngram_size"]) == (2, 1.3, 3)
    r = run_cli("export.py", "merge", run, "-o", tmp_path / "merged", "--check-prompts", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "merged" / "parity.json").read_text())["max_new_tokens"] == budget
    seen, real = [], decoding.generate_ids
    monkeypatch.setattr(decoding, "generate_ids", lambda m, t, enc, dec, *a: seen.append(dec) or real(m, t, enc, dec,
                                                                                                      *a))
    generate_cli.main(["-c", str(run), "--data", str(data), "-o", str(tmp_path / "answers.jsonl")])
    assert seen and {d.max_new_tokens for d in seen} == {budget} and seen[0].repetition_penalty == 1.2
    r = run_cli("eval.py", "-c", run, "--test-data", data, "-o", tmp_path / "bad", "--num-beams", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --num-beams must be at least 1, got 0"
    assert not (tmp_path / "bad").exists()


GIB = 2**30


@pytest.mark.parametrize("flag, peak, free, on", [
    (None, 3 * GIB, 20 * GIB, False),     # fits: speed is kept (no recomputation, float32)
    (None, 17 * GIB, 20 * GIB, True),     # over 80% of what is free: memory is bought with speed
    (None, 16 * GIB, 20 * GIB, False),    # exactly the share: still fits
    (None, 30 * GIB, None, False),        # free memory unknown (not Linux): off, as on a GPU
    (None, None, 20 * GIB, False),        # no plan (a model that will not build empty): off
    (True, 1 * GIB, 20 * GIB, True),      # an explicit flag always wins
    (False, 30 * GIB, 20 * GIB, False),
])
def test_checkpointing_default_follows_the_plan(monkeypatch, capsys, flag, peak, free, on):
    """Unset --gradient-checkpointing turns on (CPU) only when the plan's peak without it exceeds MEMORY_SHARE of
    the free memory: memory is traded for speed only when the run would not fit otherwise."""
    from argparse import Namespace

    from finetune import launch
    from finetune import training as train  # the library module, not the entry script

    monkeypatch.setattr(launch, "device_kind", lambda: "cpu")
    assert train.MEMORY_SHARE == 0.8
    assert train.checkpointing_default(Namespace(gradient_checkpointing=flag), peak, free) is on
    if flag is None and peak and free:
        assert ("on" if on else "off") in capsys.readouterr().out.split("(")[0]


def test_checkpointing_keeps_a_small_part_of_the_activations():
    from argparse import Namespace

    from finetune import monitor

    args = Namespace(mixed_precision="no", trainable="lora", lora_dropout=0.05)
    tokens = 8 * 1024
    full = monitor.activation_bytes(args, (30, 576, 1536), tokens, checkpointing=False)
    assert monitor.activation_bytes(args, (30, 576, 1536), tokens, checkpointing=True) < full / 3
