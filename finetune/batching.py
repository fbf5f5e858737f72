"""No compute on padding: the collators, length-bucketed batches (training and inference), the padding-free choice per device, and the count of
real tokens (tokenising and its cache: finetune/tokenise.py).

Length-bucketed batches (`LengthBucketSampler`, hooked into train.py's trainer for SFT and the classifier head):
indices sorted by length (ties broken at random, seeded per epoch), cut into groups of one optimiser step's samples
(batch x world size x accumulation steps), the longest group first (an out-of-memory error shows at the first step,
not hours in), the others in a random order drawn from seed + epoch. Each batch then holds near-equal lengths, with
less padding than transformers' LengthGroupedSampler, which sorts only inside random mega-batches of 50 batches
(docs/benchmarks.md, batching and padding).
transformers' Trainer puts the sampler under a BatchSampler of the per-device batch size; under DDP accelerate deals
those batches out in turn (BatchSamplerShard: batch j to rank j mod world size), so a group is one optimiser step on
every rank, all ranks see similar lengths at the same step (no rank waits on a longer batch), and the samples of a
step do not depend on how the total batch is split into ranks, per-device batches and accumulation steps. Every rank
computes the same order from the seed; every index is yielded once per epoch. The epoch comes from the trainer's state
(`epoch_source`): accelerate's set_epoch does not reach a sampler under a resumed DDP dataloader (SkipBatchSampler over
BatchSamplerShard), and a resumed run must replay the very order of the epoch it stopped in (the Trainer skips the
batches already trained).

Padding-free (`padding_free`): flattening a batch into one row needs attention that keeps the samples apart by their
position ids. flash-attention's varlen kernels (CUDA) do it at no cost; through SDPA transformers builds a
block-diagonal mask over the whole row, which on a CPU is slower than padded sorted batches
(bench/padding_free_probe.py; figures in docs/benchmarks.md). So padding-free only on CUDA with a
flash-attention implementation loaded; everything else pads.

Inference batches (`length_batches`, `pad_batch`): scoring, generation and the classifier head's predictions take
samples sorted by length, longest first, so nothing is padded far past its own length.
"""
from __future__ import annotations

import json
import random

RL_TRAINERS = ("GRPOTrainer", "DPOTrainer", "KTOTrainer", "RLOOTrainer", "OnlineDPOTrainer")  # their own samplers matter


# ------------------------------------------------------------------------------------------------ collation
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


class VisionCollator:
    """Pads rows for vision-language models: the processor expands each image into its tokens, so this tokenises
    image rows at batch time, segment by segment as dataset.Formatter cut them (a segment that shows images
    through the processor with those images, in order; the others through the tokenizer), so the loss mask stays
    exact over any number of images and turns. Text-only rows use their pre-computed ids."""

    def __init__(self, processor, pad_id):
        self.processor, self.pad_id = processor, pad_id

    def encode(self, segments, paths):
        """(ids, labels, {key: tensors}) of one row: token-aligned keys as one tensor over the row."""
        import torch
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in paths]
        token = getattr(self.processor, "image_token", None) or "<|image_pad|>"
        ids, labels, extra, aligned, used = [], [], {}, {}, 0
        for text, trainable in segments:
            n = text.count(token)
            if n:
                enc = self.processor(text=[text], images=images[used:used + n], return_tensors="pt",
                                     add_special_tokens=False)
                t = enc["input_ids"][0].tolist()
                for k, v in enc.items():
                    if k in TOKEN_ALIGNED:  # one value per token: placed at this segment's tokens
                        aligned.setdefault(k, []).append((len(ids), v[0]))
                    elif k not in ("input_ids", "attention_mask"):
                        extra.setdefault(k, []).append(v)
                used += n
            else:
                t = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if trainable else [-100] * len(t)
        if used != len(images):  # dataset.py matched them: a template that drops an image part must not pass
            raise ValueError(f"the chat template shows {used} of a sample's {len(images)} images")
        for k, pieces in aligned.items():
            row = pieces[0][1].new_zeros(len(ids))
            for start, v in pieces:
                row[start:start + len(v)] = v
            extra[k] = [row]
        return ids, labels, {k: v if k in TOKEN_ALIGNED else [torch.cat(v)] for k, v in extra.items()}

    def __call__(self, rows):
        import torch

        ids, labels, extra = [], [], {}
        for r in rows:
            if r.get("images"):
                x, y, more = self.encode(json.loads(r["segments"]), json.loads(r["images"]))
                for k, v in more.items():
                    extra.setdefault(k, []).extend(v)
            else:
                x, y = r["input_ids"], r["labels"]
            ids.append(x)
            labels.append(y)
        width = max(len(x) for x in ids)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_id), "labels": torch.full((len(ids), width), -100),
                 "attention_mask": torch.zeros((len(ids), width), dtype=torch.long)}
        for i, (x, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][i, : len(x)] = torch.tensor(x)
            batch["labels"][i, : len(y)] = torch.tensor(y)
            batch["attention_mask"][i, : len(x)] = 1
        for k, v in extra.items():
            if k in TOKEN_ALIGNED:
                batch[k] = torch.stack([torch.cat([x, x.new_zeros(width - len(x))]) for x in v])
            else:
                batch[k] = torch.cat(v)
        return batch


# ------------------------------------------------------------------------------------------------ sampling
class LengthBucketSampler:
    """Indices in batches of near-equal length (see the module docstring). `lengths`: one per sample;
    `batch_size`: per device; `world_size`: data-parallel ranks; `accumulation`: gradient accumulation steps;
    `epoch_source`: callable giving the current epoch (else set_epoch's value).

    A group is one optimiser step's samples (batch x ranks x accumulation), so which samples make up a step depends
    on that total alone, however it is split: 2 processes x -b 2 train on what 1 x -b 4 or 1 x -b 2 x 2
    accumulation steps train on, and a run resumes on another process count with the same steps."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, world_size: int = 1, accumulation: int = 1,
                 epoch_source=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.world_size, self.accumulation = batch_size, max(1, int(world_size)), max(1, accumulation)
        self.seed, self.epoch, self.epoch_source = seed, 0, epoch_source

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        """The indices of one epoch: a function of seed, epoch and lengths alone (every rank, every resume)."""
        n, group = len(self.lengths), self.batch_size * self.world_size * self.accumulation
        if n == 0:
            return []
        rng = random.Random(f"length-buckets:{self.seed}:{epoch}")
        tie = list(range(n))
        rng.shuffle(tie)
        idx = sorted(range(n), key=lambda i: (-self.lengths[i], tie[i]))  # longest first
        groups = [idx[i:i + group] for i in range(0, n, group)]
        # a short last group (the shortest samples) stays last: a BatchSampler cuts the flat list every batch_size
        # indices, so a short group anywhere else would make every later batch straddle two groups
        short = [groups.pop()] if len(groups[-1]) < group else []
        rest = groups[1:]
        rng.shuffle(rest)
        return [i for g in groups[:1] + rest + short for i in g]

    def current_epoch(self) -> int:
        return int(self.epoch_source()) if self.epoch_source is not None else self.epoch

    def __iter__(self):
        return iter(self.order(self.current_epoch()))


class LengthSortedSampler:
    """Evaluation: the longest samples first, no randomness (each batch near-uniform; memory peaks at once)."""

    def __init__(self, lengths):
        self.lengths = [int(n) for n in lengths]

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        return iter(sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i)))


def _lengths(trainer, dataset):
    try:
        import datasets
    except ImportError:
        return None
    column = getattr(trainer.args, "length_column_name", None) or "length"
    if isinstance(dataset, datasets.Dataset) and column in dataset.column_names:
        return dataset[column]
    return None


def _is_rl(trainer) -> bool:
    return any(c.__name__ in RL_TRAINERS for c in type(trainer).__mro__)


def train_sampler(trainer, dataset, fallback):
    """For FinetuneTrainer._get_train_sampler: length buckets for SFT and classifier datasets with a length column;
    `fallback(dataset)` (the base trainer's sampler) for TRL's GRPO/DPO trainers and anything else."""
    dataset = trainer.train_dataset if dataset is None else dataset
    lengths = None if _is_rl(trainer) else _lengths(trainer, dataset)
    if lengths is None:
        return fallback(dataset)
    args = trainer.args
    seed = args.data_seed if args.data_seed is not None else args.seed
    return LengthBucketSampler(
        lengths, args.train_batch_size, seed=seed, world_size=args.world_size,
        accumulation=args.gradient_accumulation_steps,
        # the trainer's epoch: exact on a resume, whichever dataloader wrapper accelerate put in between
        epoch_source=lambda: int(trainer.state.epoch or 0) if getattr(trainer, "state", None) else 0)


def eval_sampler(trainer, dataset, fallback):
    """For FinetuneTrainer._get_eval_sampler: longest first for datasets with a length column, else the fallback."""
    lengths = None if _is_rl(trainer) else _lengths(trainer, dataset)
    return fallback(dataset) if lengths is None else LengthSortedSampler(lengths)


def padding_fraction(lengths, order, batch_size: int) -> float:
    """Share of padded positions when `order` is cut into batches padded to their longest sample."""
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


# ------------------------------------------------------------------------------------------------ padding-free
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                   "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def padding_free(model, vision: bool) -> bool:
    """Flatten each batch into one sequence (no padding at all) or pad it (sorted batches keep that small)?

    Padding-free needs a kernel that keeps the flattened sequences apart by their position ids: flash-attention's
    varlen kernels, on CUDA. Through SDPA (CPU, or a GPU without flash-attention) transformers builds a block-diagonal
    mask over the whole flattened batch: measured on this project's 2-core CPU (bench/padding_free_probe.py: tiny
    Llama, LoRA, 256 samples of 60..840 tokens, -b 8), padded sorted batches ran 2640 real tokens/s, padding-free
    782 (3.4x slower; random padded batches 1063), so CPU keeps padding.
    The CUDA branch is untested here (no GPU on the development machine). Vision batches are never flattened (TRL
    does not support it). Unsloth makes its own choice."""
    import torch

    if vision or not torch.cuda.is_available():
        return False
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return impl.split("@")[0].split(":")[0] in FLASH_ATTENTION


def real_tokens(inputs) -> int | None:
    """Non-pad tokens of a training batch: the attention mask (SFT, classifier), the completion mask (GRPO), or
    every position of a padding-free batch (position_ids, no mask); None when none of those is there."""
    for key in ("attention_mask", "completion_mask"):
        if key in inputs:
            return int(inputs[key].sum())
    if "position_ids" in inputs:
        return int(inputs["position_ids"].numel())
    return None


# ------------------------------------------------------------------------------------------------ inference batches
def length_batches(lengths: list[int], batch_size: int):
    """Index batches of similar lengths, longest first (an out-of-memory shows at once, not at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs, value, left):
    """(ids, attention mask) of token-id lists padded to one width, on the left (generation, scoring) or right."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    side = "left" if left else "right"
    ids = pad_sequence([torch.tensor(x, dtype=torch.long) for x in seqs], True, value, side)
    mask = pad_sequence([torch.ones(len(x), dtype=torch.long) for x in seqs], True, 0, side)
    return ids, mask
