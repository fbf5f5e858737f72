"""Where a run executes: the distributed launch (torchrun / accelerate launch / one process) and the batch plan.

torch.distributed, accelerate and the Trainer do the actual work; this module only answers the questions our
flags raise before they start: how many processes are there, is --split-model allowed, and which per-device
batch and gradient accumulation give the --total-batch-size the user asked for.
"""
from __future__ import annotations

import os


def world_size() -> int:
    """Processes in the job: torchrun and accelerate launch both set WORLD_SIZE (1 for a plain `python`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 logs, prints, writes run.json and saves; set by torchrun / accelerate launch before we start."""
    return int(os.environ.get("RANK", "0")) == 0


def split_model_error(split_model: bool) -> str | None:
    """--split-model (one process, layers over all its GPUs) under a distributed launch gives every process all
    the GPUs: the libraries then either place N copies on the same devices or crash much later."""
    if split_model and world_size() > 1:
        return (f"--split-model spreads one model over the GPUs of a single process; it cannot be combined with "
                f"torchrun / accelerate launch (WORLD_SIZE={world_size()}): run `uv run train.py --split-model ...` "
                f"without the launcher, or drop --split-model for data parallelism")
    return None


def plan_batch(total: int, max_per_device: int, world: int, multiple_of: int = 1) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) with world x per-device x accumulation == total exactly, using
    the largest per-device batch <= max_per_device (fewer, larger steps are faster).

    >>> plan_batch(64, 8, 2)
    (8, 4)
    >>> plan_batch(24, 16, 1)
    (12, 2)

    `multiple_of`: GRPO needs each per-device batch to hold whole groups of --num-generations completions.
    Raises ValueError, with the nearest totals that work, when no exact split exists."""
    if total < 1 or max_per_device < 1:
        raise ValueError("--total-batch-size and --max-batch-size-per-device must be positive")
    options = batch_candidates(total, max_per_device, world, multiple_of)
    if options:
        return options[0], total // (world * options[0])
    unit = world * multiple_of  # every total that works is a multiple of this
    lower, upper = (total // unit) * unit, (total // unit + 1) * unit
    nearest = " or ".join(str(t) for t in (lower, upper) if t > 0)
    why = f"{world} processes" + (f" x groups of {multiple_of} generations" if multiple_of > 1 else "")
    raise ValueError(f"--total-batch-size {total} cannot be split evenly over {why}: use {nearest}")


def batch_candidates(total: int, max_per_device: int, world: int, multiple_of: int = 1) -> list[int]:
    """Every per-device batch that keeps `total` exact, largest first: what --auto-batch-size tries."""
    return [p for p in range(min(max_per_device, total), 0, -1)
            if p % multiple_of == 0 and total % (world * p) == 0]


def largest_fitting(candidates: list[int], fits) -> int:
    """The first (largest) candidate for which fits(p) is True; fits raises nothing, it answers.

    >>> largest_fitting([8, 4, 2, 1], lambda p: p <= 3)
    2
    """
    for p in candidates:
        if fits(p):
            return p
    raise ValueError(f"not even a per-device batch of {candidates[-1]} fits in memory: lower --max-len, use "
                     f"--trainable qlora or --gradient-checkpointing")


def memory_probe(model, collate, dataset, device):
    """fits(p) for --auto-batch-size on CUDA: one forward + backward + AdamW step (lr 0: the weights do not move)
    on the p longest training rows (a datasets.Dataset with a "length" column), the worst batch the length-sorted
    sampler will build. The optimiser state is freed again; the Trainer allocates its own."""
    import torch

    lengths = list(dataset["length"])
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)

    def fits(p: int) -> bool:
        params = [x for x in model.parameters() if x.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.0)
        try:
            batch = collate([dataset[i] for i in order[:p]])
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            model.train()
            model(**batch).loss.backward()
            opt.step()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            del opt
            torch.cuda.empty_cache()

    return fits


def across_ranks(value: int, op: str) -> int:
    """`value` reduced over every process ("min" or "max"); the value itself in one process. The few decisions
    all ranks must share (a batch size, a stop step) go through here: one rank deciding alone hangs the others."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    import torch

    t = torch.tensor([int(value)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


def pin_to_local_gpu() -> dict:
    """THE place the unsloth path is made safe under torchrun / accelerate launch: unsloth assumes it runs on
    cuda:0 (its kernels and its loader's default placement), so each process selects its own GPU (LOCAL_RANK)
    *before* unsloth is imported and loads the whole model onto it. Returns the device_map for the loader."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local)
    return {"": local}


def device_kind() -> str:
    """'cuda', 'mps' or 'cpu': where this process computes."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
