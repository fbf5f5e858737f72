"""finetune/predict.py: score mode against a direct computation, metrics on a hand-made set, answer extraction."""
import copy
import pytest
import torch

from dataset import Formatter, Sample
from finetune.predict import classification_metrics, extract_answer, match_class, score_text, text_metrics


@pytest.mark.parametrize("text,expected", [
    ("food", "food"),
    ("  Food.\n", "Food."),
    ("<reasoning>\nhmm\n</reasoning>\n<answer>\nlaw\n</answer>", "law"),
    ("<answer>a</answer> then <answer>b</answer>", "b"),
    ("no tags at all", "no tags at all"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,index", [("Food.", 0), ("<answer> LAW </answer>", 1), ("pizza", None), ("", None)])
def test_match_class(text, index):
    assert match_class(text, ["food", "law"]) == index


def test_classification_metrics_exact_values():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", None, "c"]
    m = classification_metrics(refs, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["invalid"] == 1 and m["invalid_rate"] == pytest.approx(1 / 6)
    # a: P 2/2 R 2/3; b: P 1/2 R 1/2; c: P 1 R 1
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert m["weighted"]["f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 1.0) / 6)
    assert m["confusion_matrix"]["counts"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_text_metrics():
    m = text_metrics(["The cat sat.", "Everyone has rights."], ["the cat sat", "Everyone has duties."])
    assert m["exact_match"] == 0.5
    assert 0 < m["chrf"] < 100 and 0 <= m["bleu"] < 100


def test_score_mode_matches_direct_likelihood(tiny_llm, tokenizer):
    """The cached, batched class scoring equals summing log-probs of prompt + class run from scratch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as built
    tokenizer.pad_token = "<|endoftext|>"
    fmt = Formatter(tokenizer)
    classes = ["red", "blue", "computers"]
    class_ids = [fmt.answer_ids(c) for c in classes]
    assert tokenizer.decode(class_ids[0]) == "red<|im_end|>"
    prompts = [fmt.prompt_ids(Sample(id=str(i), file="", turns=[("user", q)]))
               for i, q in enumerate(["a small house", "the river is long and old and the stone is big", "x"])]
    with torch.inference_mode():
        got = score_text(model, prompts, class_ids, tokenizer.pad_token_id)
        for b, p in enumerate(prompts):
            for c, cid in enumerate(class_ids):
                ids = torch.tensor([p + cid])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                direct = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(cid))
                assert got[b, c].item() == pytest.approx(direct, abs=1e-4)
    assert got.argmax(1).tolist() == [max(range(3), key=lambda c: got[b, c]) for b in range(3)]
