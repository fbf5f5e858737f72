"""Scale out, on CPU: train.py under torchrun and accelerate launch with two processes (gloo), on the tiny Llama.

Every run is the real train.py in fresh processes, full fine-tuning (no dropout anywhere) or LoRA with
--lora-dropout 0, fixed seed, a few steps. What is checked:
  * 2 processes x -b 2 train exactly like 1 process x -b 4: the same loss and gradient norm at every step (the
    logged DDP loss is token-weighted over both ranks) and the same saved weights; each rank ends with the same
    weights, read from the live parameters of every rank (a wrapper around the Trainer, see RANK_DIGEST), which are
    also those saved in latest/;
  * rank 0 alone writes: one run.json, one latest/ and best/, one train_log.jsonl line per step, one summary;
  * a 2-process run stopped after its checkpoint-2 resumes with 1 process (--total-batch-size keeps the optimiser
    step the same) and continues the very same trajectory;
  * a two-"node" job (two torchrun launches, --nnodes 2, c10d rendezvous on 127.0.0.1) trains and saves once;
  * --split-model under a launcher stops at once with one clear line; so does a launch without --name;
  * accelerate launch with configs/accelerate/ddp.yaml (2 CPU processes) and with configs/accelerate/fsdp2.yaml.
    accelerate 1.15 turns FSDP on only for GPU process groups (on CPU it silently runs DDP), so the FSDP test lifts
    that one check (FSDP_ON_CPU below) and then runs torch's FSDP2 on gloo for real: sharded checkpoints, the
    gathered best/ and latest/ adapters, and the same losses and adapter as DDP.
  * configs/accelerate/zero3.yaml through DeepSpeed's CPU backend, where the deepspeed extra is installed (skipped
    otherwise): the same losses and adapter as DDP.
Not covered here: NCCL and FSDP / ZeRO-3 on GPUs, QLoRA, unsloth (no GPU); ZeRO-3 offload was run by hand only.
"""
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from test_e2e import color_task

ENV = {"OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
STEPS = 4
REL = 1e-4  # float tolerance between process counts: the sums run in a different order
LR = 1e-3

# Runs train.py (argv[1:]) with a hook after Trainer.train: each rank writes a digest of its own live weights.
RANK_DIGEST = '''
import hashlib, json, os, runpy, sys
sys.path.insert(0, {root!r})
import transformers

def digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

train = transformers.Trainer.train
def train_and_digest(self, *a, **k):
    out = train(self, *a, **k)
    state = self.accelerator.unwrap_model(self.model).state_dict()
    with open(os.path.join(os.environ["DIGEST_DIR"], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
        json.dump({{"digest": digest(state), "names": sorted(state)}}, f)
    return out
transformers.Trainer.train = train_and_digest
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
'''

# accelerate.state.AcceleratorState decides FSDP only for GPU-type process groups; this makes it answer FSDP for a
# CPU (gloo) group launched with an FSDP config, and nothing else. Everything after that is the libraries' own code.
FSDP_ON_CPU = '''
import os, runpy, sys
sys.path.insert(0, {root!r})
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

plugin = []

def distributed_type(self):
    kind = self.__dict__.get("distributed_type")
    if kind == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        return DistributedType.FSDP
    return kind

def fsdp_plugin(self):
    p = self.__dict__.get("fsdp_plugin")
    if p is None and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        plugin[:] = plugin or [FullyShardedDataParallelPlugin()]
        p = plugin[0]
    return p

AcceleratorState.distributed_type = property(distributed_type, lambda s, v: s.__dict__.__setitem__("distributed_type", v))
AcceleratorState.fsdp_plugin = property(fsdp_plugin, lambda s, v: s.__dict__.__setitem__("fsdp_plugin", v))
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
'''


def wrapper(tmp: Path, name: str, template: str) -> Path:
    path = tmp / name
    path.write_text(template.format(root=str(ROOT), train=str(ROOT / "train.py")))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, env=None):
    return run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc, script, *args,
                   env={**ENV, **(env or {})})


def accelerate(config, script, *args):
    return run_cli("-m", "accelerate.commands.launch", "--config_file", ROOT / "configs" / "accelerate" / config,
                   "--num_processes", 2, "--main_process_port", free_port(), script, *args, env=ENV)


def log_rows(run: Path):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def step_rows(run: Path):
    return [r for r in log_rows(run) if "loss" in r]


def weights(folder: Path):
    from safetensors.torch import load_file

    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def assert_close_weights(a: dict, b: dict, atol=1e-5):
    assert sorted(a) == sorted(b)
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff <= atol * max(1.0, a[k].abs().max().item()), (k, diff)


def assert_close_steps(got, want, keys=("loss", "grad_norm")):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=REL), (g["step"], k, g[k], w[k])


def assert_written_once(run: Path, out: str, steps=STEPS):
    """Rank 0 alone logged, printed and saved."""
    assert [r["step"] for r in step_rows(run)] == list(range(1, steps + 1))
    assert out.count("saved: ") == 1 and out.count("train loss: ") == 1, out[-2000:]
    assert (run / "run.json").is_file() and (run / "latest" / "run.json").is_file() and (run / "best").is_dir()
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 samples of different lengths (filler words around the label): 8 steps of 4 per epoch."""
    tmp = tmp_path_factory.mktemp("ddp-data")
    return color_task(tmp, 32, 0)


# float32 throughout (--mixed-precision no): the comparisons across process counts are to REL, and a CPU with bf16
# instructions would otherwise autocast to bf16, whose rounding differs with the order of the sums
def full_args(tiny_llm, data, log, name, *more):
    return ["-m", tiny_llm, "--train-data", data, "--trainable", "full", "--lr", LR, "--warmup", "0",
            "--max-steps", STEPS, "--save-steps", 2, "--seed", 0, "--mixed-precision", "no", "--log-dir", log,
            "--name", name, *more]


def lora_args(tiny_llm, data, log, name):
    return ["-m", tiny_llm, "--train-data", data, "-r", 4, "--lora-dropout", 0, "--lr", "1e-3", "--warmup", "0",
            "--max-steps", STEPS, "--save-steps", 2, "--seed", 0, "-b", 2, "--mixed-precision", "no",
            "--log-dir", log, "--name", name]


@pytest.fixture(scope="module")
def runs(tiny_llm, data, tmp_path_factory):
    """The same full fine-tuning: 1 process x -b 4, and torchrun 2 processes x -b 2 (each rank digesting its weights)."""
    tmp = tmp_path_factory.mktemp("ddp")
    log, digests = tmp / "log", tmp / "digests"
    digests.mkdir()
    one = run_cli("train.py", *full_args(tiny_llm, data, log, "one", "-b", 4), env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(wrapper(tmp, "digest.py", RANK_DIGEST), *full_args(tiny_llm, data, log, "two", "-b", 2),
                   env={"DIGEST_DIR": str(digests)})
    assert two.returncode == 0, two.stderr[-3000:]
    return {"tmp": tmp, "log": log, "one": log / "one", "two": log / "two", "two_out": two.stdout,
            "digests": digests}


def test_two_processes_train_like_one_with_twice_the_batch(runs):
    one, two = step_rows(runs["one"]), step_rows(runs["two"])
    assert len(one) == STEPS and one[0]["num_tokens"] == two[0]["num_tokens"]  # the same samples per step
    assert_close_steps(two, one)
    # Adam moves a weight by up to --lr a step whatever its gradient's size, so where a gradient is near zero the
    # sums' order across processes shows in the weight at a share of --lr, not at float rounding (1.5e-5 seen on
    # one CPU); a rank that trained on other samples or skipped the averaging would differ by the order of --lr
    assert_close_weights(weights(runs["two"] / "latest"), weights(runs["one"] / "latest"), atol=0.01 * LR * STEPS)


def digest(tensors):  # the same as RANK_DIGEST's
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_every_rank_ends_with_the_weights_rank_0_saved(runs):
    ranks = [json.loads((runs["digests"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # bit for bit
    saved = weights(runs["two"] / "latest")
    assert ranks[0]["names"] == sorted(saved) and ranks[0]["digest"] == digest(saved)


def test_two_processes_write_once(runs):
    run = runs["two"]
    assert_written_once(run, runs["two_out"])
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        files = sorted(p.name for p in (run / ckpt).iterdir())
        assert files.count("model.safetensors") == 1 and {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)
    assert json.loads((run / "run.json").read_text())["batch_size"] == 2


def test_resume_with_a_different_process_count(runs, tiny_llm, data):
    """A 2-process run stopped after checkpoint-2 (copied as it was then) resumes with 1 process."""
    stopped = runs["log"] / "resumed"
    shutil.copytree(runs["two"], stopped)
    for later in ("checkpoint-4", "latest", "best"):
        shutil.rmtree(stopped / later)
    (stopped / "train_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in log_rows(stopped) if r["step"] <= 2 and "loss" in r))
    r = run_cli("train.py", *full_args(tiny_llm, data, runs["log"], "resumed", "--total-batch-size", 4, "--resume"),
                env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_steps(step_rows(stopped), step_rows(runs["two"]))  # steps 3, 4: as if never stopped
    assert_close_weights(weights(stopped / "latest"), weights(runs["two"] / "latest"))


def _predictions(folder: Path):
    return [line.split("\t") for line in next(folder.glob("*/*/predictions.tsv")).read_text().splitlines()[1:]]


def test_an_eval_killed_under_torchrun_resumes_from_its_rank_parts(runs, data):
    """eval.py --resume picks up the predictions.rank*.tsv parts a killed torchrun eval left, with any process count
    (test_e2e checks that a torchrun eval scores like one process)."""
    tmp, run = runs["tmp"], runs["one"]
    one = run_cli("eval.py", "-c", run, "--test-data", data, "-b", 4, "-o", tmp / "eval-one", env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    rows1 = _predictions(tmp / "eval-one")
    assert len(rows1) == 32
    max_len = json.loads((run / "run.json").read_text())["max_len"] or 1024
    out = tmp / "eval-resume" / f"{max_len}-max-len" / "one"  # as if killed: two rank parts, no predictions.tsv
    out.mkdir(parents=True)
    header = "id\tprediction\treference\traw\tconfidence\n"
    (out / "predictions.rank0.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in rows1[:10]))
    (out / "predictions.rank1.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in rows1[16:22]))
    r = run_cli("eval.py", "-c", run, "--test-data", data, "-b", 4, "-o", tmp / "eval-resume", "--resume", env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming: 16 predictions kept" in r.stdout and not list(out.glob("predictions.rank*"))
    assert [x[:4] for x in _predictions(tmp / "eval-resume")] == [x[:4] for x in rows1]
    assert json.loads((out / "metrics.json").read_text())["resumed_with"] == 16


def test_two_nodes_rendezvous_train_and_save_once(runs, tiny_llm, data):
    """Two torchrun launches as two nodes of one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    import os

    port, log = free_port(), runs["log"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", **ENV}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-id", "test-nodes",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", str(ROOT / "train.py"),
                               *map(str, full_args(tiny_llm, data, log, "nodes", "-b", 2))],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=900) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    run = log / "nodes"
    assert_written_once(run, "".join(o for o, _ in outs))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run / "checkpoint-4").iterdir()}
    assert_close_steps(step_rows(run), step_rows(runs["two"]))  # two nodes x 1 = one node x 2


def test_split_model_under_a_launcher_stops_at_once(tiny_llm, data, tmp_path):
    args = ["-m", tiny_llm, "--train-data", data, "--split-model", "--name", "split", "--log-dir", tmp_path / "log"]
    # what each process does: exit status 2, one line
    r = run_cli("train.py", *args, env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --split-model") and "torchrun" in r.stderr
    # under torchrun itself (which exits 1 and names the child's status 2)
    t = torchrun(ROOT / "train.py", *args)
    assert t.returncode != 0 and "error: --split-model" in t.stderr and "exitcode  : 2" in t.stderr, t.stderr[-3000:]
    assert not (tmp_path / "log").exists()


def test_a_launch_needs_a_run_name(tiny_llm, data, tmp_path):
    """Each process would name the run after its own clock: a launch must say --name."""
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", data, "--log-dir", tmp_path / "log",
                env={**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: give --name under torchrun")
    assert not (tmp_path / "log").exists()


@pytest.fixture(scope="module")
def accelerate_ddp(tiny_llm, data, tmp_path_factory):
    """LoRA through accelerate launch with the shipped DDP config: 2 CPU processes."""
    log = tmp_path_factory.mktemp("accelerate") / "log"
    r = accelerate("ddp.yaml", ROOT / "train.py", *lora_args(tiny_llm, data, log, "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    return log / "ddp", r.stdout


def test_accelerate_launch_with_the_ddp_config(accelerate_ddp):
    run, out = accelerate_ddp
    assert_written_once(run, out)
    ckpt = {p.name for p in (run / "checkpoint-4").iterdir()}
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= ckpt  # two processes, one writer


def test_fsdp2_config_on_cpu(accelerate_ddp, tiny_llm, data, tmp_path):
    """configs/accelerate/fsdp2.yaml with FSDP2 running on gloo: sharded checkpoints, gathered best/ and latest/,
    and the same training as DDP."""
    ddp, _ = accelerate_ddp
    r = accelerate("fsdp2.yaml", wrapper(tmp_path, "fsdp_on_cpu.py", FSDP_ON_CPU),
                   *lora_args(tiny_llm, data, tmp_path / "log", "fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "fsdp"
    assert_written_once(run, r.stdout)
    ckpt = {p.name for p in (run / "checkpoint-4").iterdir()}
    assert "pytorch_model_fsdp_0" in ckpt and "adapter_model.safetensors" not in ckpt  # really sharded
    assert_close_steps(step_rows(run), step_rows(ddp))
    for folder in ("latest", "best"):
        assert_close_weights(weights(run / folder), weights(ddp / folder), atol=1e-6)
        assert (run / folder / "adapter_config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
def test_zero3_config_on_cpu(accelerate_ddp, tiny_llm, data, tmp_path):
    """configs/accelerate/zero3.yaml through DeepSpeed's CPU backend (where `uv sync --extra deepspeed` put it):
    partitioned checkpoints, gathered best/ and latest/, and the same training as DDP."""
    ddp, _ = accelerate_ddp
    r = accelerate("zero3.yaml", ROOT / "train.py", *lora_args(tiny_llm, data, tmp_path / "log", "zero3"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "zero3"
    assert_written_once(run, r.stdout)
    assert (run / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's partitioned states
    assert_close_steps(step_rows(run), step_rows(ddp))
    for folder in ("latest", "best"):
        assert_close_weights(weights(run / folder), weights(ddp / folder), atol=1e-6)
