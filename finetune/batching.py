"""No compute on padding, and tokenise once: length-bucketed batches, the padding-free choice per device, and an
on-disk cache of tokenised training data.

Length-bucketed batches (`LengthBucketSampler`, hooked into train.py's trainer for SFT and the classifier head):
indices sorted by length (ties broken at random, seeded per epoch), cut into groups of one optimiser step's samples
(batch x world size x accumulation steps), the longest group first (an out-of-memory error shows at the first step,
not hours in), the others in a random order drawn from seed + epoch. Each batch then holds near-equal lengths: on the
benchmark's spread (20..800-token documents, log-uniform) padding falls from 13% (transformers' LengthGroupedSampler,
which sorts only inside random mega-batches of 50 batches) to ~1-4% (README, Benchmarks).
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
block-diagonal mask over the whole row, which on the 2-core CPU benchmark was 3.4x slower than padded sorted batches
(bench/padding_free_probe.py; figures in the README, Benchmarks). So padding-free only on CUDA with a
flash-attention implementation loaded; everything else pads.

Tokenisation cache (`encode_cached`): the encoded rows of a dataset are stored under
$FINETUNE_CACHE (else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune) /tokenised/<key>/, keyed on a hash of the
samples (what was read from the data files, prompts included), the tokenizer (its saved files: vocabulary, merges,
added tokens, chat template, special tokens), the processor's chat template, the Formatter's options (response
template, max_len, prompts, seed, prefill, train/validation), dataset.py's source (the formatting code itself), the
transformers and tokenizers versions, and CACHE_VERSION. A run with the same inputs loads the rows (memory-mapped
Arrow) instead of tokenising; the Formatter's truncated / dropped counts are stored with them. FINETUNE_CACHE=off
disables it. Large sets are tokenised in worker processes (--num-preprocess-workers) when a first serial slice
predicts that it pays.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

CACHE_VERSION = 1         # bump when the cached rows change meaning
SERIAL_PROBE = 200        # samples tokenised serially first, to time one sample
PARALLEL_MIN_SECONDS = 3  # workers are started only when the rest would take longer than this serially
RL_TRAINERS = ("GRPOTrainer", "DPOTrainer", "RLOOTrainer", "OnlineDPOTrainer")  # their own samplers matter


# ------------------------------------------------------------------------------------------------ collation
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


class VisionCollator:
    """Pads prompt + answer for vision-language models: the processor expands each image into its tokens, so
    this tokenises at batch time (prompt through the processor, answer through the tokenizer: the loss mask is
    exact). Text-only rows use their pre-computed ids."""

    def __init__(self, processor, pad_id):
        self.processor, self.pad_id = processor, pad_id

    def __call__(self, rows):
        import torch
        from PIL import Image

        ids, labels, extra = [], [], {}
        for r in rows:
            if r.get("image"):
                enc = self.processor(text=[r["prompt_text"]], images=[Image.open(r["image"]).convert("RGB")],
                                     return_tensors="pt")
                p = enc["input_ids"][0].tolist()
                a = self.processor.tokenizer(r["answer_text"], add_special_tokens=False)["input_ids"]
                ids.append(p + a)
                labels.append([-100] * len(p) + a)
                for k, v in enc.items():
                    if k in TOKEN_ALIGNED:  # one value per token: extended over the answer, padded below
                        v = torch.cat([v[0], v.new_zeros(len(a))])
                    if k != "input_ids" and k != "attention_mask":
                        extra.setdefault(k, []).append(v)
            else:
                ids.append(r["input_ids"])
                labels.append(r["labels"])
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


# ------------------------------------------------------------------------------------------------ tokenisation cache
def cache_root() -> Path | None:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune; None when FINETUNE_CACHE=off."""
    env = os.environ.get("FINETUNE_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "no", "false", "none"):
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finetune"


LOADING_KEYS = {"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "token", "revision",
                "trust_remote_code", "_from_pipeline", "subfolder"}  # how a tokenizer was found, not what it does


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything the tokenizer does: its saved files (tokenizer.json with vocabulary, merges, normalizer,
    pre-tokenizer, post-processor and added tokens; tokenizer_config.json with special tokens and decode options;
    the chat template), less the keys that only say where it was loaded from."""
    import tempfile

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="finetune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if not f.is_file():
                continue
            data = f.read_bytes()
            if f.suffix == ".json":
                try:
                    obj = json.loads(data)
                    if isinstance(obj, dict):
                        obj = {k: v for k, v in obj.items() if k not in LOADING_KEYS}
                    data = json.dumps(obj, sort_keys=True).encode()
                except ValueError:
                    pass
            h.update(f.relative_to(tmp).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


NOT_KEYED = {"file", "tokenizer", "processor", "truncated", "dropped"}  # error-message paths, hashed apart, counters


def _fields(obj) -> dict:
    """A dataclass's fields (every field, so one added later is keyed too) less NOT_KEYED."""
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in NOT_KEYED}


def _samples_digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:  # what encode reads; not the file a sample came from (it reaches no row)
        h.update(json.dumps(_fields(s), sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(fmt, samples, train: bool) -> str:
    import tokenizers
    import transformers

    import dataset

    chat = getattr(fmt.processor, "chat_template", None) if fmt.processor is not None else None
    parts = {
        "version": CACHE_VERSION,
        "samples": getattr(samples, "fingerprint", None) or _samples_digest(samples),  # tables: finetune/sources.py
        "tokenizer": tokenizer_fingerprint(fmt.tokenizer),
        "processor": [type(fmt.processor).__name__, chat] if fmt.processor is not None else None,
        "format": [_fields(fmt), bool(train)],  # response template, max_len, prompts, seed, prefill, ...
        "code": hashlib.sha256(Path(dataset.__file__).read_bytes()).hexdigest(),
        "libraries": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _finish_rows(rows):
    for r in rows:
        r.pop("text", None)
    for r in rows:  # uniform columns for datasets: text-only rows in a vision run carry empty image fields
        r.setdefault("prompt_text", None)
        r.setdefault("answer_text", None)
        r.setdefault("image", None)
    return rows


_WORKER_FMT = None


def _init_worker(fmt):
    global _WORKER_FMT
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if fmt is not None:
        _WORKER_FMT = fmt


def _encode_chunk(chunk, train):
    """Worker: (rows, truncated, dropped) of one slice of samples, or ("error", message) for a DataError."""
    from dataset import DataError

    fmt = _WORKER_FMT
    fmt.truncated = fmt.dropped = 0
    try:
        rows = [r for r in (fmt.encode(s, train=train) for s in chunk) if r is not None]
    except DataError as e:  # DataError cannot be unpickled from its message alone: send the text
        return "error", str(e)
    return _finish_rows(rows), fmt.truncated, fmt.dropped


def default_workers() -> int:
    """min(4, cores), shared among the ranks torchrun starts on this node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(4, (os.cpu_count() or 1) // max(1, per_node)))


def encode_rows(fmt, samples, train: bool, workers: int = 1):
    """(rows, workers used): the encoded rows (text dropped, uniform columns) of every sample that fits, in order;
    fmt.truncated / fmt.dropped grow as in a serial run. With workers > 1, the first SERIAL_PROBE samples time one
    sample, and the rest goes to worker processes only if it would take more than PARALLEL_MIN_SECONDS serially."""
    from dataset import DataError

    start = time.perf_counter()
    head = samples[:SERIAL_PROBE]
    rows = [r for r in (fmt.encode(s, train=train) for s in head) if r is not None]
    rest = samples[len(head):]
    per_sample = (time.perf_counter() - start) / max(1, len(head))
    if workers > 1 and rest and per_sample * len(rest) > PARALLEL_MIN_SECONDS:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        fork = sys.platform == "linux"  # workers inherit the Formatter: nothing to pickle, nothing to re-import
        global _WORKER_FMT
        _WORKER_FMT = fmt if fork else None
        n_chunks = workers * 4
        size = -(-len(rest) // n_chunks)
        chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if fork else "spawn"),
                                     initializer=_init_worker, initargs=(None if fork else fmt,)) as pool:
                results = list(pool.map(_encode_chunk, chunks, [train] * len(chunks)))
        finally:
            _WORKER_FMT = None
        for res in results:
            if res[0] == "error":
                err = DataError.__new__(DataError)
                Exception.__init__(err, res[1])
                raise err
            rows += res[0]
            fmt.truncated += res[1]
            fmt.dropped += res[2]
    else:
        workers = 1
        rows += [r for r in (fmt.encode(s, train=train) for s in rest) if r is not None]
    return _finish_rows(rows), workers


def encode_cached(fmt, samples, train: bool, workers: int = 1, log=print):
    """The datasets.Dataset of encoded rows, from the cache when the same samples, tokenizer and format were
    tokenised before (fmt.truncated / fmt.dropped restored from it), else tokenised and stored."""
    from datasets import Dataset, load_from_disk

    root = cache_root()
    entry = None
    if root is not None:
        try:
            entry = root / "tokenised" / cache_key(fmt, samples, train)
        except Exception as e:  # an unhashable tokenizer or processor: tokenise as without a cache
            _warn(f"tokenisation cache off for this run ({type(e).__name__}: {e})")
        if entry is not None and (entry / "meta.json").is_file():
            try:
                meta = json.loads((entry / "meta.json").read_text())
                with _quiet_datasets():
                    ds = load_from_disk(str(entry / "data"))
                if len(ds) == meta["rows"]:
                    fmt.truncated += meta["truncated"]
                    fmt.dropped += meta["dropped"]
                    log(f"tokenised: {meta['samples']} samples from cache ({entry})")
                    return ds
            except Exception as e:
                _warn(f"ignoring a damaged tokenisation cache entry {entry} ({type(e).__name__})")
            shutil.rmtree(entry, ignore_errors=True)  # damaged: tokenise again and store it anew
    truncated, dropped, start = fmt.truncated, fmt.dropped, time.perf_counter()
    if hasattr(samples, "encode"):  # tables (sources.Samples): datasets.map into Arrow files, bounded memory
        ds, used = samples.encode(fmt, train, workers)
    else:
        rows, used = encode_rows(fmt, samples, train, workers)
        ds = Dataset.from_list(rows)
    seconds = time.perf_counter() - start
    stored = entry is not None and len(ds) > 0 and _store(entry, ds, {
        "rows": len(ds), "samples": len(samples), "truncated": fmt.truncated - truncated,
        "dropped": fmt.dropped - dropped, "train": bool(train), "created": time.time()})
    log(f"tokenised: {len(samples)} samples in {seconds:.1f} s" + (f" ({used} worker processes)" if used > 1 else "")
        + ("; cached for the next run" if stored else ""))
    return ds


@contextlib.contextmanager
def _quiet_datasets():
    """No 'Saving the dataset' progress bars in the run's output."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _store(entry: Path, ds, meta: dict) -> bool:
    """Writes the entry next to its place and renames it in: readers never see half an entry, and of ranks or runs
    writing the same entry at once the first rename wins. True when the entry is there afterwards."""
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _quiet_datasets():
            ds.save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        if not (entry / "meta.json").is_file():  # else another rank or run stored it meanwhile
            os.rename(tmp, entry)
    except OSError as e:
        if not (entry / "meta.json").is_file():
            _warn(f"could not store the tokenised data in {entry.parent} ({e.strerror or e})")
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
