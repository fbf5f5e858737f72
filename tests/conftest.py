"""Shared fixtures: tiny random-weight models built once per test session (nothing is downloaded).

run_cli runs our CLIs in a process of their own, forked from a warm interpreter that has imported torch,
transformers, TRL, PEFT and datasets once per pytest worker (tests/warm_cli.py): importing them is most of a tiny
run's cost. `-m` launches (torchrun, accelerate launch) and runs whose environment differs in a variable that
libraries read at import time get a fresh interpreter. FINETUNE_TEST_COLD=1 gives every run a fresh interpreter,
as a user's `python train.py ...` (compare with it when a test fails only in the suite).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# the tokenisation cache (finetune/tokenise.py) goes to a per-session folder, never the user's ~/.cache
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-cache-"))
# pytest-xdist workers share the cores: each worker's torch (and its CLIs') gets its share of threads, so two
# workers on two cores do not spin against each other
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                      // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_xdist_auto_num_workers(config):
    """-n auto (pyproject's addopts): a worker per core, at most 4 (each holds torch and its models: ~1-5 GB)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from tiny_models import build_tokenizer

    return build_tokenizer(words=["computers", "food", "law", "love", "red", "blue"])


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, tokenizer):
    from tiny_models import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), tokenizer)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    from tiny_models import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-vlm"))


def cli_env(extra=None):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


_warm = []  # this worker's warm_cli.Zygote, started by the first run_cli call


def run_cli(script, *args, cwd=None, timeout=900, env=None):
    """Runs one of our CLIs as a user would (uv's interpreter, a process of its own); returns CompletedProcess."""
    env = cli_env(env)
    cmd = [sys.executable, *(["-m"] if script == "-m" else [str(ROOT / script)]), *map(str, args)]
    if script != "-m" and os.environ.get("FINETUNE_TEST_COLD") != "1" and (ROOT / script).is_file():
        import warm_cli

        with warm_cli.STARTING:
            if not _warm:
                _warm.append(warm_cli.Zygote(cli_env(), ROOT))
        if _warm[0].accepts(env):
            return _warm[0].run(cmd, ROOT / script, map(str, args), cwd or ROOT, env, timeout)
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def pytest_sessionfinish(session):
    while _warm:
        _warm.pop().close()


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy(model, tok, prompts, n=8):
    """Greedy continuations (token ids) and prompt logits: what the export / vocabulary tests compare."""
    import torch

    from dataset import Formatter, Sample

    fmt = Formatter(tok, max_len=256)
    outs, logits = [], []
    with torch.inference_mode():
        for i, q in enumerate(prompts):
            ids = torch.tensor([fmt.prompt_ids(Sample(id=str(i), file="t", turns=[("user", q)]))])
            logits.append(model(ids).logits)
            out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            outs.append(out[0, ids.shape[1]:].tolist())
    return outs, logits


@pytest.fixture(scope="module")
def converter(request):
    """llama.cpp's converter in pytest's cache (kept between sessions); the CLIs find it via FINETUNE_LLAMACPP_DIR."""
    import os

    from finetune import llamacpp
    from finetune.errors import ModelError

    folder = request.config.cache.mkdir(f"llama-cpp-python-{llamacpp.LLAMA_CPP_PYTHON[0]}")
    os.environ["FINETUNE_LLAMACPP_DIR"] = str(folder)
    try:
        llamacpp.converter_dir()
    except ModelError as e:
        del os.environ["FINETUNE_LLAMACPP_DIR"]
        pytest.skip(str(e))
    yield folder
    del os.environ["FINETUNE_LLAMACPP_DIR"]


# The longest modules first (seconds each in a 2-worker run): pytest-xdist's loadscope gives each module
# to one worker, in collection order (--no-loadscope-reorder in pyproject.toml), so a long module collected last
# would leave the other worker idle at the end. Modules not listed keep their order after these.
LONG_FIRST = ("test_distributed", "test_seed_commands", "test_monitor", "test_smollm2", "test_reliability",
              "test_sources_e2e", "test_e2e", "test_batching", "test_export", "test_promises", "test_gpu_bench",
              "test_sources", "test_export_gguf", "test_cli", "test_rl")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module is kept
