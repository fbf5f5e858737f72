"""Duplicates, leakage and noise in the data (`dataset.py check`, finetune/datacheck.py), and train.py's start-up line.

A sample's document is what the model reads, less the answer: its text (or OCR), the user turns and earlier replies,
and its image (hashed by content); system prompts and prompts.json questions are left out (shared by many samples).
For preference data (DPO, KTO) that is the prompt.
    exact        hashes of the normalised document (NFKC, case-folded, words only): within each split, and documents
                 of validation / test also in train (and test in validation)
    near         datasketch MinHash LSH over word 3-grams, estimated Jaccard >= NEAR_THRESHOLD, exact ones left out
    conflicts    documents that appear with different answers
    preference_noise   DPO pairs whose chosen and rejected replies are the same text, pairs repeated whole, pairs
                 that contradict another; KTO replies given both labels for one prompt
Hashing runs in worker processes (hash_splits) while the caller loads the tokenizer. `leakage_line` is train.py's
start-up line: exact hashes only.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import re
import unicodedata
import zlib
from collections import Counter
from typing import NamedTuple

NEAR_THRESHOLD = 0.7   # estimated Jaccard similarity of word 3-gram sets from which two documents are near-duplicates
NUM_PERM = 64          # MinHash permutations: the estimate's standard error at 0.7 is about 0.06
SHINGLE = 3            # words per shingle
SHOW = 5               # ids shown per finding
PARALLEL_FROM = 5000   # samples from which they are hashed in worker processes
HASH_CHUNK = 2000      # samples a worker hashes at a time
WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------------------------ hashing
def words(text: str) -> list[str]:
    """The normalised words of a text: NFKC, case-folded, punctuation and spacing dropped."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def document_words(sample) -> list[str]:
    """What the model reads, less the reference answer and the system prompt (shared by many samples); the whole
    text of language-modelling samples (--lm-text), which are all answer."""
    if getattr(sample, "lm", False):
        return words(sample.answer)
    turns = sample.turns[:-1] if sample.turns and sample.turns[-1][0] == "assistant" else sample.turns
    parts = [getattr(sample, "document", None) or ""] + [t for r, t in turns if r != "system"]
    return words("\n".join(parts))


def _image_digest(path, memo: dict) -> bytes:
    if path not in memo:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(str(path).encode())
        memo[path] = h.digest()
    return memo[path]


def document_key(sample, ws: list[str], memo: dict) -> int | None:
    """A 64-bit hash of the normalised document (and the image's bytes); None for an empty document."""
    image = getattr(sample, "image", None)
    if not ws and not image:
        return None
    h = hashlib.blake2b(" ".join(ws).encode(), digest_size=8)
    if image:
        h.update(b"\0image:" + _image_digest(image, memo))
    return int.from_bytes(h.digest(), "little")


def _template():
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32)


def minhash_values(ws: list[str], m) -> bytes | None:
    """The MinHash signature of a document's word 3-grams (its words as one shingle when shorter), as bytes; `m`
    (_template()) is cleared and reused: one object for all documents."""
    if not ws:
        return None
    m.clear()
    m.update_batch({" ".join(ws[i:i + SHINGLE]).encode() for i in range(max(1, len(ws) - SHINGLE + 1))})
    return m.hashvalues.tobytes()



# ------------------------------------------------------------------------------------------------ one pass
class Row(NamedTuple):
    """What the check keeps of one sample."""
    id: str
    key: int | None            # document_key: None for an empty document
    answer: str | None         # the reference answer (a class name for a closed set)
    signature: bytes | None    # minhash_values


_SPLITS: dict = {}  # {split: samples} for the worker processes, which fork after it is set


def _hash(job) -> list[Row]:
    split, a, b = job
    template, memo = _template(), {}
    return [Row(s.id, document_key(s, ws, memo), getattr(s, "answer", None), minhash_values(ws, template))
            for s in _SPLITS[split][a:b] for ws in [document_words(s)]]


def hash_splits(splits: dict, workers: int):
    """Starts the Rows of every split ({split: samples}) in worker processes (fork), so that loading the tokenizer
    overlaps them, and returns the function that waits for them: {split: [Row]}. Small sets, one worker or no
    fork: computed here, at once."""
    _SPLITS.clear()
    _SPLITS.update(splits)
    jobs = [(split, a, min(len(d), a + HASH_CHUNK)) for split, d in splits.items()
            for a in range(0, len(d), HASH_CHUNK)]

    def by_split(chunks):
        out = {split: [] for split in splits}
        for (split, _, _), chunk in zip(jobs, chunks):
            out[split] += chunk
        return out

    if workers < 2 or sum(map(len, splits.values())) < PARALLEL_FROM or \
            "fork" not in multiprocessing.get_all_start_methods():
        done = by_split(map(_hash, jobs))
        return lambda: done
    pool = multiprocessing.get_context("fork").Pool(workers)
    pending = pool.map_async(_hash, jobs)

    def finish():
        try:
            return by_split(pending.get())
        finally:
            pool.close()
            pool.join()
    return finish


# ------------------------------------------------------------------------------------------------ findings
def exact_findings(rows: dict) -> dict:
    """Exact duplicates within each split and documents of validation / test also in train (and test in
    validation): {name: {"count", "ids"}}; ids name the duplicate and the sample it repeats."""
    first = {split: {} for split in rows}  # key -> first id in that split
    out = {}
    for split, items in rows.items():
        dup = []
        for r in items:
            if r.key is None:
                continue
            if r.key in first[split]:
                dup.append(f"{r.id} = {first[split][r.key]}")
            else:
                first[split][r.key] = r.id
        out[f"within {split}"] = {"count": len(dup), "ids": dup[:SHOW]}
    for later, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        if later in rows and earlier in rows:
            hits = [f"{r.id} = {earlier} {first[earlier][r.key]}" for r in rows[later]
                    if r.key is not None and r.key in first[earlier]]
            out[f"{later} in {earlier}"] = {"count": len(hits), "ids": hits[:SHOW]}
    return out


def near_findings(rows: dict) -> dict:
    """Near-duplicates (MinHash LSH) that are not exact duplicates: within each split, pairs of distinct documents;
    across splits, documents of the later split with a near-duplicate in the earlier one."""
    import numpy as np
    from datasketch import MinHashLSH

    carrier = _template()  # one MinHash whose signature is set to each document's in turn (LSH keeps band hashes)
    keys, where, signatures = {}, {}, []  # key -> row in signatures; key -> {split: (position, id) there first}
    for split, items in rows.items():
        for pos, r in enumerate(items):
            if r.key is None or r.signature is None:
                continue
            where.setdefault(r.key, {}).setdefault(split, (pos, r.id))
            if r.key not in keys:
                keys[r.key] = len(signatures)
                signatures.append(r.signature)
    sig = np.frombuffer(b"".join(signatures), dtype=carrier.hashvalues.dtype).reshape(len(signatures), NUM_PERM)
    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    with lsh.insertion_session() as session:
        for i in range(len(sig)):
            carrier.hashvalues = sig[i]
            session.insert(i, carrier, check_duplication=False)
    near, checked = {}, set()  # row -> near rows: sharing a band in an LSH table, estimated Jaccard checked
    for table in lsh.hashtables:  # every bucket once: cheaper than a query per document
        for band in table.keys():
            members = sorted(table.get(band))
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if (a, b) not in checked:
                        checked.add((a, b))
                        if np.count_nonzero(sig[a] == sig[b]) >= NEAR_THRESHOLD * NUM_PERM:  # MinHash.jaccard
                            near.setdefault(a, []).append(b)
                            near.setdefault(b, []).append(a)
    where = {keys[k]: v for k, v in where.items()}
    out = {}
    for split in rows:  # pairs of distinct documents, the later one first, in the order of the later one
        pairs = sorted((max(where[k][split], where[o][split]), min(where[k][split], where[o][split]))
                       for k, others in near.items() if split in where[k] for o in others
                       if o > k and split in where[o])
        out[f"within {split}"] = {"count": len(pairs), "ids": [f"{a[1]} ~ {b[1]}" for a, b in pairs[:SHOW]]}
    for later, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        if later in rows and earlier in rows:
            hits = sorted((where[k][later], min(where[o][earlier] for o in others if earlier in where[o]))
                          for k, others in near.items() if later in where[k] and earlier not in where[k]
                          and any(earlier in where[o] for o in others))
            out[f"{later} in {earlier}"] = {"count": len(hits),
                                            "ids": [f"{a[1]} ~ {earlier} {b[1]}" for a, b in hits[:SHOW]]}
    return out


def conflicts(rows: dict) -> dict:
    """Documents that appear with different answers (normalised as documents are), over all splits."""
    repeated = Counter(r.key for items in rows.values() for r in items if r.answer is not None)
    seen: dict = {}  # key -> {normalised answer: its first sample}, for documents that occur more than once
    for split, items in rows.items():
        for r in items:
            if r.key is not None and r.answer is not None and repeated[r.key] > 1:
                seen.setdefault(r.key, {}).setdefault(" ".join(words(r.answer)), f"{split} {r.id} ({r.answer!r})")
    return _finding([" vs ".join(first.values()) for first in seen.values() if len(first) > 1])


def _finding(found: list) -> dict:
    return {"count": len(found), "ids": found[:SHOW]}


def preference_noise(rows: dict, splits: dict, unpaired: bool) -> dict:
    """Over all splits ({split: [Row]} and {split: samples}, in the same order), replies compared as normalised text
    (words only): DPO pairs whose chosen and rejected replies are the same, pairs repeated whole within a split (same
    prompt, same replies), pairs that contradict an earlier one (its rejected reply chosen over its chosen one); KTO
    samples repeated whole within a split, and replies labelled desirable for a prompt in one sample and undesirable
    in another."""
    same, repeated, contradicting, seen = [], [], [], {}
    for split, items in rows.items():
        for r, s in zip(items, splits[split]):
            where = f"{split} {s.id}"
            if unpaired:
                reply = " ".join(words(s.completion))
                item, other = (r.key, reply, s.label), (r.key, reply, not s.label)
            else:
                chosen, rejected = " ".join(words(s.chosen)), " ".join(words(s.rejected))
                if chosen == rejected:
                    same.append(where)
                    continue
                item, other = (r.key, chosen, rejected), (r.key, rejected, chosen)
            if item in seen:
                if seen[item][0] == split:  # in another split it is leakage, reported as that
                    repeated.append(f"{where} = {seen[item][1]}")
            elif other in seen:
                contradicting.append(f"{where} vs {seen[other][1]}")
            seen.setdefault(item, (split, where))
    if unpaired:
        return {"repeated samples": _finding(repeated), "contradicting labels": _finding(contradicting)}
    return {"chosen equals rejected": _finding(same), "repeated pairs": _finding(repeated),
            "contradicting pairs": _finding(contradicting)}


# ------------------------------------------------------------------------------------------------ train.py
def leakage_line(train, val) -> str:
    """train.py's start-up line: exact duplicates within train, validation documents also in train."""
    memo, first, dup = {}, {}, []
    for s in train:
        k = document_key(s, document_words(s), memo)
        if k is not None:
            if k in first:
                dup.append(s.id)
            else:
                first[k] = s.id
    line = f"leakage: {len(dup)} exact duplicates within train" + _ids(dup)
    if not val:
        return line + "; no validation data"
    hits = [s.id for s in val if (k := document_key(s, document_words(s), memo)) is not None and k in first]
    return line + f"; {len(hits)} validation documents also in train" + _ids(hits) + \
        (" (dataset.py check for near-duplicates)" if dup or hits else "")


def _ids(ids) -> str:
    return f" (ids {', '.join(map(str, ids[:SHOW]))}{', ...' if len(ids) > SHOW else ''})" if ids else ""
