"""Tokenising, once: every sample through dataset.py's Formatter by datasets.map (in worker processes for large
sets), and an on-disk cache of the result.

Tokenisation cache (`encode_cached`): the encoded rows of a dataset are stored under
$FINETUNE_CACHE (else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune) /tokenised/<key>/, keyed on a hash of the
samples (what was read from the data files, prompts included), the tokenizer (its saved files: vocabulary, merges,
added tokens, chat template, special tokens), the processor's chat template, the Formatter's options (response
template, max_len, prompts, seed, prefill, train/validation), dataset.py's source (the formatting code itself), the
transformers and tokenizers versions, and CACHE_VERSION. A run with the same inputs loads the rows (memory-mapped
Arrow) instead of tokenising; the Formatter's truncated / dropped counts (and the dropped ids) are stored with them. FINETUNE_CACHE=off
disables it. Sets of MAP_PROCESSES_FROM samples or more are tokenised in --num-preprocess-workers processes
(datasets.map's num_proc); below that, starting the workers costs more than it saves. From SHOW_FROM samples the
tokenising shows its progress line (finetune/progress.py; datasets' own bars stay off): samples done batch by batch
in one process, part by part with worker processes.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dataset
from dataset import DataError
from finetune.progress import Progress

CACHE_VERSION = 2  # bump when the cached rows change meaning
MAP_PROCESSES_FROM = 20000  # samples from which datasets.map tokenises in --num-preprocess-workers processes
SHOW_FROM = 10000  # samples from which tokenising shows a progress line
ENCODED_COLUMNS = ("id", "input_ids", "labels", "length", "prompt_text", "segments", "images", "truncated",
                   "dropped")


def default_workers() -> int:
    """min(4, cores), shared among the ranks torchrun starts on this node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(4, (os.cpu_count() or 1) // max(1, per_node)))


class SampleList:
    """Samples already in memory (dataset.py's layouts) as a source for encode_source: a table of their positions."""

    def __init__(self, samples):
        from datasets import Dataset

        self.samples = samples
        self.ds = Dataset.from_dict({"n": list(range(len(samples)))})
        # names map's output only (a fresh scratch file per call): no need to hash the samples a second time, as
        # cache_key already did
        self.fingerprint = uuid.uuid4().hex

    def parse(self, row: dict, n: int):
        return self.samples[n]


class _Carried(Exception):
    """A DataError's message across datasets.map's worker processes (DataError's constructor takes four args)."""


def _encode_batch(batch, positions, source, fmt, train, idx, progress=None):
    """One datasets.map batch: its rows parsed into samples, then encoded in one Formatter.encode_many call."""
    keys = list(batch)
    truncated, dropped, named = fmt.truncated, fmt.dropped, len(fmt.dropped_ids)
    try:
        samples = [source.parse(dict(zip(keys, values)), j if idx is None else int(idx[j]))
                   for j, values in zip(positions, zip(*batch.values()))]
        rows = fmt.encode_many(samples, train=train)
    except DataError as e:
        raise _Carried(str(e)) from None
    # counted from the rows afterwards (encode_source), the same in one process or in map's workers
    fmt.truncated, fmt.dropped = truncated, dropped
    del fmt.dropped_ids[named:]
    out = {k: [] for k in ENCODED_COLUMNS}
    for s, r in zip(samples, rows):
        # too long for --max-len: a row that says so, so its id survives map's worker processes
        r = r if r is not None else {"id": s.id, "input_ids": [], "labels": [], "length": 0, "truncated": False,
                                     "dropped": True}
        r["dropped"] = r.get("dropped", False)
        for k in ENCODED_COLUMNS:
            out[k].append(r.get(k))
    if progress is not None:
        progress(len(positions))
    return out


def encode_source(source, idx, fmt, train: bool, workers: int, name: str, progress: Progress | None = None):
    """(datasets.Dataset of encoded rows, processes used) for the rows `idx` (None: all) of a source with .ds,
    .parse(row, n) and .fingerprint (a sources.Table, or a SampleList). Samples too long for --max-len are dropped
    and counted in fmt.dropped, truncated documents in fmt.truncated; a DataError stops it, as in one process.
    `progress` counts the rows done."""
    import datasets

    ds = source.ds if idx is None else source.ds.select(idx)
    procs = workers if workers > 1 and len(ds) >= MAP_PROCESSES_FROM else None
    kinds = {"input_ids": datasets.List(datasets.Value("int64")), "labels": datasets.List(datasets.Value("int64")),
             "length": datasets.Value("int64"), "truncated": datasets.Value("bool"), "dropped": datasets.Value("bool")}
    features = datasets.Features({k: kinds.get(k, datasets.Value("string")) for k in ENCODED_COLUMNS})
    update = progress.update if progress is not None and procs is None else None  # workers: counted per part
    try:
        with quiet_datasets(), collection_paused():  # our progress line, not datasets' bars
            out = ds.map(_encode_batch, batched=True, batch_size=256, with_indices=True, num_proc=procs,
                         fn_kwargs={"source": source, "fmt": fmt, "train": train, "idx": idx, "progress": update},
                         remove_columns=ds.column_names, features=features,
                         cache_file_name=str(scratch_folder() / f"{name}.arrow"), desc="tokenising",
                         new_fingerprint=hashlib.sha256(f"{source.fingerprint}/{name}/{idx}".encode()).hexdigest()[:32])
    except _Carried as e:
        err = DataError.__new__(DataError)  # the finished one-line message, as raised in the worker
        Exception.__init__(err, str(e))
        raise err from None
    if progress is not None and procs is not None:
        progress.update(len(ds))
    fmt.truncated += sum(out["truncated"])
    gone = [i for i, d in enumerate(out["dropped"]) if d]
    if gone:
        fmt.dropped += len(gone)
        fmt.dropped_ids += out.select(gone)["id"]
        keep = sorted(set(range(len(out))) - set(gone))
        out = out.select(keep).flatten_indices()  # the kept rows written out: later maps and the cache see no holes
    return out.remove_columns(["truncated", "dropped"]), procs or 1


@contextlib.contextmanager
def collection_paused():
    """Python's cyclic garbage collector off for a pass over the rows (validating, tokenising). The rows' objects
    form no reference cycles, so reference counting frees each row as before, while the collector's full passes
    walk every object the ML libraries imported (about half a million) and took about a tenth of the time on
    tool-call rows, with the same peak memory (docs/benchmarks.md, every data form)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def scratch_folder() -> Path:
    """A fresh folder for one Arrow file (a map's output, DPO's rows), removed when the process ends (the cache keeps its own copy)."""
    folder = Path(tempfile.mkdtemp(prefix="finetune-encode-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


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
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="finetune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if not f.is_file():
                continue
            data = f.read_bytes()
            # tokenizer.json (megabytes: the vocabulary and merges) is written by the Rust backend in a fixed order
            # and names no path: hashed as written, as parsing and re-writing it took 0.3-0.6 s of start-up
            if f.suffix == ".json" and f.name != "tokenizer.json":
                try:
                    obj = json.loads(data)
                    if isinstance(obj, dict):
                        obj = {k: v for k, v in obj.items() if k not in LOADING_KEYS}
                    data = json.dumps(obj, sort_keys=True).encode()
                except ValueError:
                    pass
            h.update(f.relative_to(tmp).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


NOT_KEYED = {"file", "tokenizer", "processor", "truncated", "dropped", "dropped_ids"}  # error-message paths, hashed apart, counters


def _fields(obj) -> dict:
    """A dataclass's fields (every field, so one added later is keyed too) less NOT_KEYED."""
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


def encode_cached(fmt, samples, train: bool, workers: int = 1, log=print):
    """The datasets.Dataset of encoded rows, from the cache when the same samples, tokenizer and format were
    tokenised before (fmt.truncated / fmt.dropped restored from it), else tokenised and stored."""
    from datasets import load_from_disk

    root = cache_root()
    entry = None
    if root is not None:
        try:
            entry = root / "tokenised" / cache_key(fmt, samples, train)
        except (TypeError, ValueError) as e:  # an unhashable tokenizer or processor: tokenise as without a cache
            _warn(f"tokenisation cache off for this run ({type(e).__name__}: {e})")
        if entry is not None and (entry / "meta.json").is_file():
            try:
                meta = json.loads((entry / "meta.json").read_text())
                with quiet_datasets():
                    ds = load_from_disk(str(entry / "data"))
                if len(ds) == meta["rows"]:
                    fmt.truncated += meta["truncated"]
                    fmt.dropped += meta["dropped"]
                    fmt.dropped_ids += meta.get("dropped_ids", [])
                    log(f"tokenised: {meta['samples']} samples from cache ({entry})")
                    return ds
            except (OSError, ValueError, KeyError) as e:  # a file missing, cut off or unreadable (pyarrow's errors
                # are OSErrors or ValueErrors)
                _warn(f"ignoring a damaged tokenisation cache entry {entry} ({type(e).__name__})")
            shutil.rmtree(entry, ignore_errors=True)  # damaged: tokenise again and store it anew
    truncated, dropped, start = fmt.truncated, fmt.dropped, time.perf_counter()
    first_dropped = len(fmt.dropped_ids)
    with Progress("tokenising", len(samples), show=len(samples) >= SHOW_FROM) as bar:
        if hasattr(samples, "encode"):  # sources.Samples: its parts, tables read from their Arrow files
            ds, used = samples.encode(fmt, train, workers, bar)
        else:
            ds, used = encode_source(SampleList(samples), None, fmt, train, workers, "list", bar)
    seconds = time.perf_counter() - start
    stored = entry is not None and len(ds) > 0 and _store(entry, ds, {
        "rows": len(ds), "samples": len(samples), "truncated": fmt.truncated - truncated,
        "dropped": fmt.dropped - dropped, "dropped_ids": fmt.dropped_ids[first_dropped:], "train": bool(train),
        "created": time.time()})
    log(f"tokenised: {len(samples)} samples in {seconds:.1f} s" + (f" ({used} worker processes)" if used > 1 else "")
        + ("; cached for the next run" if stored else ""))
    return ds


@contextlib.contextmanager
def quiet_datasets():
    """datasets' info logs and progress bars ('Saving the dataset', 'Generating train split') off while it works
    for us (our own lines say what was read), then put back as they were: the library's settings belong to the
    process, not to us."""
    from datasets.utils import logging as ds_logging

    level, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
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
        with quiet_datasets():
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
