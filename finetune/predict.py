"""Predictions and metrics, shared by train.py (validation) and eval.py (test sets).

    --predict score     closed-set tasks: the log-likelihood of every class name (end-of-turn included) as the
                        reply, conditioned on the prompt; the prompt runs once and its KV cache is shared by all
                        classes. Never invalid; the softmax over classes is the confidence. --score-rule picks
                        how the class log-likelihoods are compared (SCORE_RULES below).
    --predict generate  batched generation (finetune/decoding.py: its defaults, budget rule and the one
                        model.generate call); the answer is taken from <answer>...</answer> when present,
                        normalised, and matched to a class (else invalid).

Batches are formed from samples sorted by length (finetune/batching.py), so nothing is padded far past its own length.
"""
from __future__ import annotations

import re

from dataset import normalize
from finetune.batching import length_batches, pad_batch
from finetune.decoding import Decoding, generate, resolve

# How --predict score compares classes (bench/zero_shot.py measures each; figures in docs/benchmarks.md):
#   sum              the summed log-probability of the class tokens: favours classes of few tokens
#   mean             per token (length-normalised): the sum divided by the class's token count
#   calibrated       contextual calibration (Zhao et al. 2021, "Calibrate before use"): the sum minus the log of
#                    the class probabilities the model gives when the document is replaced by content-free texts
#                    (CONTENT_FREE, averaged), so a class the prompt alone favours loses that head start. One extra
#                    pass per distinct prompt (system + question), not per sample.
#   calibrated-mean  the same on the per-token scores
SCORE_RULES = ("sum", "mean", "calibrated", "calibrated-mean")
DEFAULT_SCORE_RULE = "calibrated-mean"  # best with prompt ensembling on both tasks of bench/zero_shot.py
CONTENT_FREE = ("N/A", "[MASK]", "")
# --score-prompts: "first" question of the prompts file, or "all" of them with the class log-probabilities averaged
# (prompt ensembling: K passes for K questions). eval.py defaults to "all" zero-shot (docs/benchmarks.md);
# predict() itself, and so train.py's validation, to "first": one pass, run after run.
PROMPT_SETS = ("first", "all")
DEFAULT_PROMPT_SET, EVAL_PROMPT_SET = "first", "all"
# A fine-tuned model is scored as it was trained, in train.py's validation and in eval.py alike: the summed
# likelihood of the answer it learned to write, under the first question. Calibration and prompt ensembles are
# zero-shot remedies; on the quickstart's checkpoint sum + first gave 0.84 against 0.80 for calibrated-mean + all.
TUNED_SCORE_RULE, TUNED_PROMPT_SET = "sum", "first"
ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)


def extract_answer(text: str) -> str:
    """The last <answer>...</answer> when present, else the whole text, stripped.

    >>> extract_answer("<reasoning>x</reasoning>\\n<answer>\\nFood\\n</answer>")
    'Food'
    """
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else text.strip()


def completion_text(completion) -> str:
    """The reply as text: a string as is; conversational format joins the assistant messages' contents.

    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    """
    if isinstance(completion, str):
        return completion
    texts = []
    for message in completion:  # tool-calling replies interleave assistant and tool messages: score the model's part
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if not isinstance(content, str):  # multimodal content: a list of typed parts
            content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
        texts.append(content)
    return "\n".join(texts)


def match_class(text: str, classes: list[str]) -> int | None:
    """Index of the class the answer names after normalisation, or None (an invalid output)."""
    key = normalize(extract_answer(text))
    for i, c in enumerate(classes):
        if normalize(c) == key:
            return i
    return None


def score_text(model, prompts: list[list[int]], class_ids: list[list[int]], pad_id: int):
    """(B, C) log-likelihoods of each class continuation after each prompt, prompt computed once.

    The prompt batch (left padded) runs with use_cache=True and keeps the logits of its last position only (the
    (B, L, vocab) logits of a 1024-token batch of 8 took 1.6 GB with SmolLM2's 49k vocabulary). Then each class's
    tokens run after the same cache, one class at a time, and the cache is cropped back to the prompt: C times
    less memory than repeating the cache for every class (6 GB for 16 classes at that size). The first class token
    is scored from the prompt's last logits.
    """
    import torch

    dev = next(model.parameters()).device
    ids, mask = pad_batch(prompts, pad_id, left=True)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    B = len(prompts)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)
    total = torch.stack([first[:, cid[0]] for cid in class_ids], 1)  # (B, C)
    cache, start = out.past_key_values, mask.sum(-1)[:, None]
    for c, cid in enumerate(class_ids):
        if len(cid) < 2:
            continue
        inp = torch.tensor(cid[:-1], device=dev)[None].expand(B, -1)
        att = torch.cat([mask, torch.ones_like(inp)], 1)
        logits = model(input_ids=inp, attention_mask=att, position_ids=start + torch.arange(len(cid) - 1, device=dev),
                       past_key_values=cache, use_cache=True).logits.float()
        target = torch.tensor(cid[1:], device=dev)[None, :, None].expand(B, -1, 1)
        total[:, c] += torch.log_softmax(logits, -1).gather(-1, target)[..., 0].sum(-1)
        cache.crop(-(len(cid) - 1))  # back to the prompt for the next class
    return total.cpu()


def content_free(sample, text: str):
    """The sample with its content replaced by `text`: the document when it has one, else the last user turn.
    System prompt and question stay, so the calibration sees the same prompt as the sample."""
    from dataclasses import replace

    turns = sample.turns[:-1] if sample.turns[-1][0] == "assistant" else list(sample.turns)  # no reference
    if sample.document is not None:
        return replace(sample, turns=turns, document=text, image=None)
    last = max(i for i, (role, _) in enumerate(turns) if role == "user")
    return replace(sample, turns=turns[:last] + [("user", text)] + turns[last + 1:], image=None)


def content_free_ll(model, fmt, samples, class_ids, batch_size=8, make=content_free):
    """(N, K, C) summed class log-likelihoods after each sample's prompt with its content replaced by each of the
    K CONTENT_FREE texts. Samples that share a prompt share the pass: one batch per distinct prompt."""
    import torch

    keys, unique = [], {}
    for s in samples:
        ids = tuple(tuple(fmt.encode(make(s, t), with_answer=False)["input_ids"]) for t in CONTENT_FREE)
        keys.append(unique.setdefault(ids, len(unique)))
    rows = [list(r) for prompt in unique for r in prompt]
    ll = torch.cat([score_text(model, rows[i:i + batch_size], class_ids, fmt.tokenizer.pad_token_id)
                    for i in range(0, len(rows), batch_size)])
    per_prompt = ll.view(len(unique), len(CONTENT_FREE), len(class_ids))
    return per_prompt[torch.tensor(keys)]


def rule_scores(ll, n_tokens, rule: str, free_ll=None):
    """(B, C) class scores under a SCORE_RULES rule, from summed log-likelihoods ll (B, C), the class token counts
    n_tokens (C,) and, for the calibrated rules, content_free_ll's rows for the same samples (B, K, C)."""
    import torch

    n = torch.as_tensor(n_tokens, dtype=ll.dtype)
    per_token = rule.endswith("mean")
    scores = ll / n if per_token else ll
    if rule.startswith("calibrated"):
        free = free_ll / n if per_token else free_ll
        prior = torch.softmax(free, -1).mean(1)  # the class probabilities without content, averaged over K
        scores = scores - prior.log()
    return scores


def score_vision(model, processor, prompt_texts, images, class_texts, class_ids):
    """(B, C) log-likelihoods for image prompts: one batched forward per sample over its C continuations.

    Vision-language models compute their own (multi-dimensional) positions, so the prompt is not cached here.
    """
    import torch
    from PIL import Image

    dev = next(model.parameters()).device
    rows = []
    for text, paths in zip(prompt_texts, images):
        shown = [Image.open(p).convert("RGB") for p in paths]  # every image of the sample, once per class
        enc = processor(text=[text + c for c in class_texts], images=shown * len(class_texts),
                        return_tensors="pt", padding=True, padding_side="right").to(dev)
        logp = torch.log_softmax(model(**enc).logits.float(), -1)
        lens = enc["attention_mask"].sum(-1)
        row = []
        for c, cid in enumerate(class_ids):
            n, end = len(cid), int(lens[c])
            tgt = torch.tensor(cid, device=dev)
            row.append(logp[c, end - n - 1:end - 1].gather(-1, tgt[:, None]).sum().item())
        rows.append(row)
    return torch.tensor(rows)


INVALID = "\x00invalid"  # an answer matching no class, as a label of its own for scikit-learn


def classification_metrics(refs: list[str], preds: list[str | None], classes: list[str]) -> dict:
    """Accuracy, macro/weighted P/R/F1, per class, invalid rate and confusion matrix (rows: reference).

    An invalid prediction (None) counts as wrong for every metric; the matrix has an extra 'invalid' column.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    n = len(refs)
    labels = list(classes)
    y_true = list(refs)
    y_pred = [p if p is not None else INVALID for p in preds]
    out = {"samples": n, "accuracy": float(accuracy_score(y_true, y_pred)) if n else 0.0,
           "invalid": sum(p is None for p in preds), "invalid_rate": sum(p is None for p in preds) / n if n else 0.0}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[avg] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(labels)}
    # rows: the classes (a reference is always one); columns: the classes and the invalid answers
    matrix = confusion_matrix(y_true, y_pred, labels=labels + [INVALID])[: len(labels)].tolist() if n else \
        [[0] * (len(labels) + 1) for _ in labels]
    out["confusion_matrix"] = {"rows": labels, "columns": labels + ["invalid"], "counts": matrix}
    return out


def text_metrics(refs: list[str], preds: list[str]) -> dict:
    """chrF, BLEU (sacrebleu) and exact match (after normalisation) for free-text answers."""
    import sacrebleu

    n = len(refs)
    return {"samples": n,
            "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
            "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
            "exact_match": sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / n if n else 0.0}


def predict(model, fmt, samples, classes=None, mode="score", batch_size=8, decoding: Decoding | None = None,
            on_batch=None, progress=None, rule=DEFAULT_SCORE_RULE, prompt_set=DEFAULT_PROMPT_SET):
    """One result dict per sample: id, prediction, reference, raw output, confidence.

    `on_batch(results)` is called as each batch completes (eval.py appends to predictions.tsv there, so a crash
    keeps what was done). Classification when `classes` is given, free text otherwise (always generated). `rule`
    is the SCORE_RULES rule of --predict score; image prompts are not calibrated (the uncalibrated rule is used).
    `decoding` is how to generate (decoding.resolve; None: the task's defaults without a run). `prompt_set` "all"
    averages the class log-probabilities over every question of the prompts file (samples that bring their own
    question get it every time), "first" uses the first (text prompts only).
    """
    import torch

    decoding = decoding or resolve({}, classes)
    encoded = fmt.encode_many(samples, with_answer=False)
    vision = fmt.processor is not None and any(s.all_images for s in samples)
    if classes and mode == "score":
        class_texts = [fmt.answer_text(c) for c in classes]
        class_ids = [fmt.answer_ids(c) for c in classes]
        if vision:
            rule = rule.removeprefix("calibrated").lstrip("-") or "sum"
        else:
            scorer = TextScorer(model, fmt, samples, encoded, class_ids, rule, prompt_set, batch_size)
    results = [None] * len(samples)
    with torch.inference_mode():
        for batch in length_batches([e["length"] for e in encoded], batch_size):
            prompts = [encoded[i]["input_ids"] for i in batch]
            texts = [encoded[i].get("prompt_text") for i in batch]
            images = [samples[i].all_images for i in batch]
            if classes and mode == "score":
                if vision:
                    ll = rule_scores(score_vision(model, fmt.processor, texts, images, class_texts, class_ids),
                                     [len(c) for c in class_ids], rule)
                else:
                    ll = scorer(batch)
                raws = [None] * len(batch)
            else:
                raws = generate(model, fmt.tokenizer, prompts, decoding, fmt.processor if vision else None, texts,
                                images)
            done = []
            for k, i in enumerate(batch):
                s = samples[i]
                if classes and mode == "score":
                    probs = torch.softmax(ll[k].float(), -1).tolist()
                    best = max(range(len(classes)), key=lambda c: probs[c])
                    pred, conf, raw = classes[best], probs[best], classes[best]
                elif classes:
                    idx = match_class(raws[k], classes)
                    pred, conf, raw = (classes[idx] if idx is not None else None), None, raws[k]
                else:
                    pred, conf, raw = extract_answer(raws[k]), None, raws[k]
                results[i] = {"id": s.id, "prediction": pred, "reference": s.answer, "raw": raw, "confidence": conf}
                done.append(results[i])
            batch_done(done, on_batch, progress)
    return results


class TextScorer:
    """(B, C) class scores of a batch of text samples under a rule, averaged over a prompt set (see predict)."""

    def __init__(self, model, fmt, samples, encoded, class_ids, rule, prompt_set, batch_size):
        from dataclasses import replace

        import torch

        questions = (fmt.prompts or {}).get("question") or []
        fmts = [fmt] + ([replace(fmt, prompts={**fmt.prompts, "question": [q]}) for q in questions[1:]]
                        if prompt_set == "all" and any(s.needs_prompt for s in samples) else [])
        self.model, self.fmts, self.class_ids, self.rule = model, fmts, class_ids, rule
        self.n_tokens = [len(c) for c in class_ids]
        self.encoded = [encoded] + [f.encode_many(samples, with_answer=False) for f in fmts[1:]]
        self.free = [None] * len(fmts)
        if rule.startswith("calibrated") and samples:
            with torch.inference_mode():
                self.free = [content_free_ll(model, f, samples, class_ids, batch_size) for f in fmts]

    def __call__(self, batch):
        import torch

        pad = self.fmts[0].tokenizer.pad_token_id
        if len(self.fmts) == 1:  # the rule's own scores: eval's confidences stay what the rule gives
            ll = score_text(self.model, [self.encoded[0][i]["input_ids"] for i in batch], self.class_ids, pad)
            return rule_scores(ll, self.n_tokens, self.rule, None if self.free[0] is None else self.free[0][batch])
        logp = []
        for enc, free in zip(self.encoded, self.free):
            ll = score_text(self.model, [enc[i]["input_ids"] for i in batch], self.class_ids, pad)
            scores = rule_scores(ll, self.n_tokens, self.rule, None if free is None else free[batch])
            logp.append(torch.log_softmax(scores, -1))
        return torch.stack(logp).mean(0)


def batch_done(rows, on_batch=None, progress=None):
    """Hands a finished batch to the caller's writer and progress bar (predict and classifier.predict)."""
    if on_batch:
        on_batch(rows)
    if progress:
        progress(len(rows))
