"""Classifier-head mode: it learns, reads the last real token under either padding side, and reloads exactly."""
import copy
import json

import pytest
import torch

from conftest import run_cli


def test_classifier_head_trains_and_evals(tiny_llm, tmp_path):
    from test_e2e import color_task

    train, val, test = color_task(tmp_path, 96, 0), color_task(tmp_path, 16, 1), color_task(tmp_path, 24, 2)
    r = run_cli("train.py", "--classifier", "-m", tiny_llm, "--train-data", train, "--validation-data", val,
                "-r", "8", "--lr", "5e-3", "--epochs", "3", "--name", "head", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "head"
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["head"] == "classifier" and cfg["classes"] == ["red", "blue"]
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"] and adapter["task_type"] == "SEQ_CLS"
    evals = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    accs = [e["eval_accuracy"] for e in evals if "eval_accuracy" in e]
    assert len(accs) >= 2 and accs[-1] >= 0.9 > accs[0] - 0.01  # from chance to learned
    best_step = json.loads((run / "best" / "run.json").read_text())["checkpoint"]
    assert best_step["eval_accuracy"] == max(accs)  # best/ is chosen by validation accuracy

    e = run_cli("eval.py", "-c", run, "--test-data", test, "-o", tmp_path / "res")
    assert e.returncode == 0, e.stderr[-3000:]
    out = tmp_path / "res" / "1024-max-len" / "head"
    m = json.loads((out / "metrics.json").read_text())
    assert m["predict"] == "head" and m["accuracy"] >= 0.9
    rows = [r.split("\t") for r in (out / "predictions.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 24
    assert m["accuracy"] == sum(r[1] == r[2] for r in rows) / 24
    assert (out / "confusion_matrix.png").is_file()


@pytest.fixture()
def seq_cls(tiny_llm, tokenizer):
    from transformers import AutoModelForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as built
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llm, num_labels=3,
                                                               pad_token_id=tokenizer.pad_token_id).eval()
    return model, tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_reads_the_last_real_token(seq_cls, side):
    from finetune.batching import pad_batch

    model, tok = seq_cls
    seqs = [tok(t)["input_ids"] for t in ["red house", "the big old stone river is long", "blue"]]
    ids, mask = pad_batch(seqs, tok.pad_token_id, left=side == "left")
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        single = torch.cat([model(input_ids=torch.tensor([s])).logits for s in seqs])
    assert torch.allclose(batched, single, atol=1e-5)


def test_saved_head_reloads_with_identical_logits(tiny_llm, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finetune.modeling import load_for_inference

    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as built
    tokenizer.pad_token = "<|endoftext|>"
    classes = ["a", "b", "c"]
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llm, num_labels=3,
                                                               pad_token_id=tokenizer.pad_token_id)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    with torch.no_grad():  # as if trained: head and LoRA B away from their initial values
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "best")
    tokenizer.save_pretrained(tmp_path / "best")
    cfg = {"model": str(tiny_llm), "vision": False, "head": "classifier", "classes": classes}
    reloaded, tok, _ = load_for_inference(cfg, str(tmp_path / "best"))
    ids = torch.tensor([tokenizer("a small house")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert reloaded.config.id2label == {0: "a", 1: "b", 2: "c"} and reloaded.config.pad_token_id == tok.pad_token_id
