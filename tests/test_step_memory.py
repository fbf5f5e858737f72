"""No tensor outlives its training step: train.py's run (its trainer class, collator, callbacks, monitor, stop
guard) holds the same tensors, of the same total size, after every step once the optimizer has its state. A tensor
kept with its graph, or a history that grows by a tensor a step, shows here as a count that climbs; timings and
peak memory stay in bench/ (bench/step_growth.py measures RSS a step)."""
import gc
import json

import train
from finetune import training


def live_tensors():
    """(count, bytes) of the torch tensors reachable by the garbage collector (parameters and optimizer state
    included)."""
    import torch

    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def test_no_tensor_is_retained_across_steps(tiny_llm, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    seen = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(live_tensors())

    make_callbacks = training.make_callbacks
    monkeypatch.setattr(training, "make_callbacks", lambda *a, **k: [*make_callbacks(*a, **k), Count()])
    words = "food law love computers red blue".split()
    rows = [{"id": f"s{i}", "text": " ".join(words[j % 6] for j in range(3 + (i * 7) % 40)), "question": "Topic?",
             "answer": words[i % 2]} for i in range(48)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["-m", str(tiny_llm), "--train-data", str(data), "-b", "4", "--max-steps", "8", "--lr", "1e-3",
                "--gradient-checkpointing", "--log-dir", str(tmp_path / "log"), "--name", "steps"])
    assert len(seen) == 8
    # steps 1-2 create the optimizer's moments and the scheduler's state; from step 3 on nothing may accumulate.
    # The bytes move by the size of the current batch, which the trainer's loop still holds when on_step_end runs
    # (a few KB here): a tensor kept per step would add its size at every step instead.
    counts, sizes = zip(*seen[2:])
    assert len(set(counts)) == 1, seen
    assert max(sizes) - min(sizes) < 64 * 1024, seen
