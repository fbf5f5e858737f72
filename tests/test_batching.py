"""finetune/batching.py: length-bucketed batches (every index once, near-uniform lengths, seeded per epoch, DDP shards and
resumes through accelerate as the Trainer drives them) and the tokenisation cache (a hit never calls the tokenizer,
keeps the truncation counts, and misses when data, tokenizer or format change; train.py re-runs from it)."""
import copy
import dataclasses
import json
import math
import random
from types import SimpleNamespace

import pytest

from finetune import batching, tokenise
from conftest import run_cli, write_jsonl
from dataset import DataError, Formatter, load_samples


def realistic_lengths(n, seed=0):
    """Like bench/train_bench.py's data: documents of 20..800 tokens (log-uniform) plus ~40 tokens of prompt."""
    rng = random.Random(seed)
    return [40 + round(math.exp(rng.uniform(math.log(20), math.log(800)))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the sampler
def test_every_index_once_per_epoch_and_near_uniform_batches():
    lengths = realistic_lengths(1000)
    s = batching.LengthBucketSampler(lengths, batch_size=8, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(1000)) and len(s) == 1000
        assert batching.padding_fraction(lengths, order, 8) < 0.05
    # transformers' LengthGroupedSampler (sorting inside random mega-batches of 50 batches) pads far more
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    theirs = list(LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    assert batching.padding_fraction(lengths, theirs, 8) > 2 * batching.padding_fraction(lengths, order, 8)


def test_padding_share_on_the_benchmark_length_mix_is_pinned():
    """bench/train_bench.py's length mix (256 samples, batches of 8): the share of padded positions in every epoch,
    against a random order's (plain TRL's). A sampler change that moves it shows here, not only in a timing."""
    lengths = realistic_lengths(256)
    s = batching.LengthBucketSampler(lengths, batch_size=8, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert batching.padding_fraction(lengths, list(s), 8) == pytest.approx(0.0403, abs=5e-4)
    shuffled = list(range(256))
    random.Random(0).shuffle(shuffled)
    assert batching.padding_fraction(lengths, shuffled, 8) == pytest.approx(0.581, abs=5e-4)


def test_order_is_a_function_of_seed_and_epoch():
    lengths = realistic_lengths(300) + [100] * 40  # ties too: their order is drawn per epoch
    a, b = (batching.LengthBucketSampler(lengths, 8, seed=5) for _ in range(2))
    assert a.order(0) == b.order(0) and a.order(3) == b.order(3)
    assert a.order(0) != a.order(1)
    assert a.order(0) != batching.LengthBucketSampler(lengths, 8, seed=6).order(0)
    batches = [tuple(a.order(0)[i:i + 8]) for i in range(0, 340, 8)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first: an OOM shows at once
    a.set_epoch(2)
    assert list(a) == a.order(2)
    ep = SimpleNamespace(value=1)
    c = batching.LengthBucketSampler(lengths, 8, seed=5, epoch_source=lambda: ep.value)
    c.set_epoch(7)  # the trainer's epoch wins over set_epoch when given
    assert list(c) == a.order(1)


def test_short_last_batch_stays_last_so_batches_never_straddle_groups():
    lengths = realistic_lengths(103)
    order = batching.LengthBucketSampler(lengths, 8, seed=0).order(0)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert [len(b) for b in batches] == [8] * 12 + [7]
    desc = sorted(lengths, reverse=True)
    slices = [sorted(desc[i:i + 8]) for i in range(0, 103, 8)]  # 8 neighbours in length order, 7 shortest last
    assert sorted(sorted(lengths[i] for i in b) for b in batches[:-1]) == sorted(slices[:-1])
    assert sorted(lengths[i] for i in batches[-1]) == slices[-1]


def _prepared(sampler, n, batch, num_processes=1, rank=0):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(n)), batch_size=batch, sampler=sampler, collate_fn=list)
    return prepare_data_loader(loader, num_processes=num_processes, process_index=rank, put_on_device=False)


def test_ddp_shards_cover_everything_with_matched_lengths():
    """accelerate (as Trainer uses it under torchrun) deals batches out in turn: batch j to rank j mod world size."""
    n, batch, world = 200, 4, 2
    lengths = realistic_lengths(n, seed=3)
    per_rank = []
    for rank in range(world):
        sampler = batching.LengthBucketSampler(lengths, batch, seed=0, world_size=world)
        dl = _prepared(sampler, n, batch, world, rank)
        dl.set_epoch(1)
        per_rank.append(list(dl))
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(n))
    for step, (b0, b1) in enumerate(zip(*per_rank)):  # the same step on both ranks: similar lengths, no waiting
        assert len(b0) == len(b1) == batch
        hi, lo = max(lengths[i] for i in b0 + b1), min(lengths[i] for i in b0 + b1)
        assert hi - lo <= max(0.25 * hi, 30), step
    both = [i for pair in zip(*per_rank) for b in pair for i in b]
    assert batching.padding_fraction(lengths, both, batch) < 0.05
    # one process with the total batch takes the same samples at each step (so a run can resume on another count)
    one = _prepared(batching.LengthBucketSampler(lengths, batch * world, seed=0), n, batch * world)
    one.set_epoch(1)
    one = list(one)  # (a second pass would be the next epoch: accelerate counts passes)
    assert [sorted(b) for b in one] == [sorted(b0 + b1) for b0, b1 in zip(*per_rank)]
    # and so does one process with half the batch and 2 accumulation steps, each micro-batch near-uniform
    acc = _prepared(batching.LengthBucketSampler(lengths, batch, seed=0, accumulation=world), n, batch)
    acc.set_epoch(1)
    acc = list(acc)
    assert [sorted(acc[k] + acc[k + 1]) for k in range(0, len(acc), 2)] == [sorted(b) for b in one]
    assert batching.padding_fraction(lengths, [i for b in acc for i in b], batch) < 0.05


@pytest.mark.parametrize("world", [1, 2])
def test_resume_replays_the_epoch_it_stopped_in(world):
    """The Trainer resumes by skipping the trained batches of the same sampler (accelerate's skip_first_batches);
    under DDP its set_epoch does not reach the sampler there, so the epoch comes from the trainer's state."""
    from accelerate import skip_first_batches

    n, batch, skip = 96, 4, 5
    lengths = realistic_lengths(n, seed=4)
    state = SimpleNamespace(epoch=1.0)  # the trainer's state: its epoch, as _run_epoch leaves it

    def sampler():
        return batching.LengthBucketSampler(lengths, batch, 9, world, epoch_source=lambda: int(state.epoch))

    full = []
    for rank in range(world):
        dl = _prepared(sampler(), n, batch, world, rank)
        dl.set_epoch(1)
        full.append(list(dl))
    for rank in range(world):  # a fresh process: a new sampler, the state loaded from the checkpoint (epoch 1.4)
        state = SimpleNamespace(epoch=1.4)
        dl = _prepared(sampler(), n, batch, world, rank)
        resumed = skip_first_batches(dl, skip)
        resumed.set_epoch(1)
        assert list(resumed) == full[rank][skip:]


def _trainer(base, tmp_path, ds):
    import torch
    from transformers import TrainingArguments

    from finetune.training import make_trainer_class

    return make_trainer_class(base)(
        model=torch.nn.Linear(1, 1), train_dataset=ds, eval_dataset=ds,
        data_collator=lambda rows: [r["idx"] for r in rows],
        args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                               use_cpu=True, report_to=[], remove_unused_columns=False, data_seed=11))


def test_trainer_hook_train_and_eval_order(tmp_path):
    """train.py's trainer class (here over transformers' Trainer, as for the classifier head; SFTTrainer inherits
    the same methods) batches by length, per the trainer's epoch; GRPO/DPO trainers keep their own samplers."""
    from datasets import Dataset
    from transformers import Trainer

    lengths = realistic_lengths(64, seed=2)
    ds = Dataset.from_dict({"length": lengths, "idx": list(range(64))})
    trainer = _trainer(Trainer, tmp_path, ds)
    expected = batching.LengthBucketSampler(lengths, 8, seed=11)
    dl = trainer.get_train_dataloader()
    assert [i for b in dl for i in b] == expected.order(0)
    trainer.state.epoch = 2.0  # as _run_epoch leaves it at the end of epoch 1
    assert [i for b in dl for i in b] == expected.order(2)
    evaluated = [i for b in trainer.get_eval_dataloader() for i in b]
    assert evaluated == sorted(range(64), key=lambda i: (-lengths[i], i))

    rl = _trainer(type("DPOTrainer", (Trainer,), {}), tmp_path, ds)
    assert not isinstance(rl._get_train_sampler(ds), batching.LengthBucketSampler)
    no_lengths = Dataset.from_dict({"idx": list(range(64))})
    assert not isinstance(_trainer(Trainer, tmp_path, no_lengths)._get_train_sampler(no_lengths),
                          batching.LengthBucketSampler)


# ------------------------------------------------------------------------------------------------ the cache
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenised"


def _samples(tmp_path, n=30, name="train.jsonl", change=None):
    rows = [{"id": f"s{i}", "text": " ".join(["food law love"] * (1 + i % 9)), "answer": ["food", "law"][i % 2],
             "question": "Which topic?"} for i in range(n)]
    if change:
        rows[change]["text"] += " changed"
    return load_samples(write_jsonl(tmp_path / name, rows))


def _fmt(tokenizer, max_len=60):
    return Formatter(tokenizer, None, None, max_len, {"system": ["S1", "S2"], "question": ["Q"]}, 7)


def test_cache_hit_never_calls_the_tokenizer_and_keeps_the_counts(tmp_path, cache, tokenizer, monkeypatch):
    samples = _samples(tmp_path)
    fmt = _fmt(tokenizer)
    first = tokenise.encode_cached(fmt, samples, train=True)
    assert fmt.truncated > 0 and len(list(cache.iterdir())) == 1
    lines = []

    def boom(*a, **k):
        raise AssertionError("the tokenizer was called on a cache hit")

    encode = Formatter.encode
    monkeypatch.setattr(Formatter, "encode", boom)
    fmt2 = _fmt(tokenizer)
    again = tokenise.encode_cached(fmt2, samples, train=True, log=lines.append)
    assert again.to_list() == first.to_list()
    assert (fmt2.truncated, fmt2.dropped) == (fmt.truncated, fmt.dropped)
    assert lines == [f"tokenised: {len(samples)} samples from cache ({next(cache.iterdir())})"]
    assert first.column_names == ["id", "input_ids", "labels", "length", "prompt_text", "segments", "images"]
    monkeypatch.setattr(Formatter, "encode", encode)
    entry = next(cache.iterdir())
    (entry / "meta.json").write_text(json.dumps({**json.loads((entry / "meta.json").read_text()), "rows": 1}))
    lines.clear()
    fmt3 = _fmt(tokenizer)  # a damaged entry: tokenised again and replaced
    assert tokenise.encode_cached(fmt3, samples, train=True, log=lines.append).to_list() == first.to_list()
    assert "from cache" not in lines[0] and json.loads((entry / "meta.json").read_text())["rows"] == len(first)
    assert fmt3.truncated == fmt.truncated


def test_cache_misses_on_changed_data_tokenizer_or_format(tmp_path, cache, tokenizer):
    samples = _samples(tmp_path)
    tokenise.encode_cached(_fmt(tokenizer), samples, train=True)
    keys = {tokenise.cache_key(_fmt(tokenizer), samples, True)}
    variants = [
        (_fmt(tokenizer), _samples(tmp_path, change=3, name="b.jsonl"), True),  # one document changed
        (_fmt(tokenizer, max_len=50), samples, True),                             # --max-len
        (_fmt(tokenizer), samples, False),                                        # validation: first prompt
        (Formatter(tokenizer, None, "### Answer:", 60, None, 7), samples, True),  # plain format
        (Formatter(tokenizer, None, None, 60, {"system": ["S1"], "question": ["Q"]}, 7), samples, True),  # prompts
        (Formatter(tokenizer, None, None, 60, {"system": ["S1", "S2"], "question": ["Q"]}, 8), samples, True),
    ]
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    variants.append((_fmt(other), samples, True))                               # chat template
    added = copy.deepcopy(tokenizer)
    added.add_tokens(["<extra_token>"])
    variants.append((_fmt(added), samples, True))                               # vocabulary (tokenizer.json)
    for fmt, s, train in variants:
        keys.add(tokenise.cache_key(fmt, s, train))
    assert len(keys) == len(variants) + 1
    moved = load_samples(write_jsonl(tmp_path / "elsewhere" / "t.jsonl",
                                     [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]))
    assert tokenise.cache_key(_fmt(tokenizer), moved, True) in keys  # the same content elsewhere: a hit


def test_cache_off(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lines = []
    tokenise.encode_cached(_fmt(tokenizer), _samples(tmp_path), train=True, log=lines.append)
    assert not (tmp_path / "xdg").exists() and "cached" not in lines[0]
    monkeypatch.delenv("FINETUNE_CACHE")
    assert tokenise.cache_root() == tmp_path / "xdg" / "finetune"


def test_worker_processes_give_the_serial_result(tmp_path, tokenizer, monkeypatch):
    """datasets.map in two processes gives the rows, counts and errors of one process, and of Formatter.encode."""
    monkeypatch.setattr(tokenise, "MAP_PROCESSES_FROM", 1)
    samples = _samples(tmp_path, n=40)
    serial, par, direct = _fmt(tokenizer), _fmt(tokenizer), _fmt(tokenizer)
    ds, used = tokenise.encode_source(tokenise.SampleList(samples), None, serial, True, 1, "serial")
    pds, pused = tokenise.encode_source(tokenise.SampleList(samples), None, par, True, 2, "workers")
    want = [r for r in (direct.encode(s, train=True) for s in samples) if r is not None]
    assert (used, pused) == (1, 2)
    assert pds.to_list() == ds.to_list() and [r["input_ids"] for r in ds] == [r["input_ids"] for r in want]
    assert (par.truncated, par.dropped) == (serial.truncated, serial.dropped) == (direct.truncated, direct.dropped)
    assert serial.truncated > 0
    long = _samples(tmp_path, n=40, name="long.jsonl")
    long[30].turns[-1] = ("assistant", "law " * 200)  # prompt + answer longer than --max-len: dropped and named
    one, two = _fmt(tokenizer), _fmt(tokenizer)
    a, _ = tokenise.encode_source(tokenise.SampleList(long), None, one, True, 1, "long1")
    b, _ = tokenise.encode_source(tokenise.SampleList(long), None, two, True, 2, "long2")
    assert a.to_list() == b.to_list() and len(a) == 39 and one.dropped_ids == two.dropped_ids == ["s30"]
    bad = _samples(tmp_path, n=40, name="bad.jsonl")
    bad[30] = dataclasses.replace(bad[30], images=("x.png",))  # images a text model cannot see: a DataError
    with pytest.raises(DataError) as serial_err:
        tokenise.encode_source(tokenise.SampleList(bad), None, _fmt(tokenizer), True, 1, "bad1")
    with pytest.raises(DataError) as worker_err:  # raised in a worker, the same one line in the parent
        tokenise.encode_source(tokenise.SampleList(bad), None, _fmt(tokenizer), True, 2, "bad2")
    assert str(worker_err.value) == str(serial_err.value) and "sample s30" in str(serial_err.value)


def test_train_rerun_starts_from_the_cache(tiny_llm, tmp_path):
    rows = [{"id": f"s{i}", "text": " ".join(["food law love"] * (1 + i % 30)), "answer": ["food", "law"][i % 2],
             "question": "Which topic?"} for i in range(24)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    env = {"FINETUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["-m", tiny_llm, "--train-data", data, "--max-steps", "1", "-b", "4", "--max-len", "64",
              "--log-dir", tmp_path / "log"]
    outs = []
    for name in ("first", "second"):
        r = run_cli("train.py", *common, "--name", name, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        loss = [json.loads(x)["loss"] for x in (tmp_path / "log" / name / "train_log.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]
        outs.append((r, loss))
    (first, loss1), (second, loss2) = outs
    assert "tokenised: 24 samples in" in first.stdout and "from cache" not in first.stdout
    assert "tokenised: 24 samples from cache" in second.stdout
    warning = [x for x in first.stderr.splitlines() if "truncated to --max-len" in x]
    assert warning and warning[0] in second.stderr  # the counts come back with the rows
    assert loss1 == loss2  # the same batches, the same step (a changed file or --max-len: see the tests above)
