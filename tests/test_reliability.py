"""Nothing lost: a SIGKILLed run resumes to the same weights and loss as an uninterrupted one, Ctrl-C (SIGINT) and
SIGTERM save and exit 130 (a second signal stops at once), a NaN loss stops the run with a clear message. Real
subprocesses, real signals."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, write_jsonl


def _data(tmp_path):
    rows = [{"text": f"document {i} " + "word " * (i % 7), "answer": ["red", "blue"][i % 2], "question": "Which?"}
            for i in range(64)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _args(tiny_llm, data, tmp_path, name, steps):
    # LoRA with its default dropout: resuming must restore the RNG, not only weights and optimiser
    return ["-m", tiny_llm, "--train-data", data, "-b", "2", "--max-steps", steps, "--save-steps", "5",
            "--lr", "1e-3", "--name", name, "--log-dir", tmp_path / "log"]


def _start(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=600):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() - t < timeout
        time.sleep(0.02)


def _final_loss(run, step):
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in logs if x.get("step") == step and "loss" in x][-1]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tiny_llm, tmp_path):
    data, steps = _data(tmp_path), 40
    ref = run_cli("train.py", *_args(tiny_llm, data, tmp_path, "ref", steps), env={"OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = _start(_args(tiny_llm, data, tmp_path, "killed", steps))
    run = tmp_path / "log" / "killed"
    _wait_for(run / "checkpoint-10" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the hardest way to die
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # the newest complete checkpoint (the kill may have come while the next one was being written)
    last = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert last < steps, "the run finished before it was killed: the test proved nothing"
    # what a kill in the middle of the next save leaves behind: the files but not trainer_state.json, written last
    cut = run / f"checkpoint-{last + 5}"
    if not cut.exists():  # else the kill itself left it so
        shutil.copytree(run / f"checkpoint-{last}", cut)
    (cut / "trainer_state.json").unlink(missing_ok=True)

    resumed = run_cli("train.py", *_args(tiny_llm, data, tmp_path, "killed", steps), "--resume",
                      env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / f'checkpoint-{last}'}" in resumed.stdout
    assert "cut off while saving" in resumed.stderr and (run / f"incomplete-checkpoint-{last + 5}").is_dir()
    ref_run = tmp_path / "log" / "ref"
    assert abs(_final_loss(run, steps) - _final_loss(ref_run, steps)) <= 1e-6
    a, b = _weights(ref_run / "latest"), _weights(run / "latest")
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_llm, tmp_path):
    """A cluster's preemption notice (SIGTERM; Ctrl-C's SIGINT takes the same path): the step ends, a checkpoint is
    saved, exit 130, and --resume goes on from there."""
    data = _data(tmp_path)
    run = tmp_path / "log" / "int"
    proc = _start(_args(tiny_llm, data, tmp_path, "int", 10_000))
    _wait_for(run / "checkpoint-5" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: stopped at step " in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert stopped >= 5 and (run / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert json.loads((run / "latest" / "run.json").read_text())["checkpoint"]["step"] == stopped

    more = run_cli("train.py", *_args(tiny_llm, data, tmp_path, "int", stopped + 2), "--resume",
                   env={"OMP_NUM_THREADS": "1"})
    assert more.returncode == 0, more.stderr[-3000:]
    steps = [x["step"] for x in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in x]
    assert steps[-2:] == [stopped + 1, stopped + 2]


@pytest.mark.parametrize("early_stopping", [False, True], ids=["plain", "early-stopping"])
def test_ctrl_c_stops_at_the_step_with_a_checkpoint_and_exits_130(tiny_llm, tmp_path, early_stopping):
    """A real SIGINT (Ctrl-C) to a running train.py: the line docs/training.md promises, exit status 130, the
    checkpoint of the step it names, and the summary, which reports no early stop: none happened, whether
    --early-stopping was given (with a validation at every step, so one falls on the step Ctrl-C stops) or not."""
    run = tmp_path / "log" / "ctrl-c"
    data = _data(tmp_path)
    extra = ["--validation-data", data, "--val-samples", "2", "--eval-steps", "1", "--early-stopping", "1000"] \
        if early_stopping else []
    proc = _start([*_args(tiny_llm, data, tmp_path, "ctrl-c", 10_000), *extra])
    _wait_for(run / "checkpoint-5" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(x for x in out.splitlines() if x.startswith("SIGINT: stopped at step "))
    stopped = int(line.split("stopped at step ")[1].split()[0])
    assert line == (f"SIGINT: stopped at step {stopped} with a checkpoint saved; continue with the same command and "
                    "--resume")
    assert stopped >= 5 and (run / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert "train loss:" in out and "throughput:" in out and "early stopping" not in out + err, out[-3000:]


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_llm, tmp_path):
    # a learning rate of 1e12 on full fine-tuning sends the weights to inf within two steps
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", _data(tmp_path), "--trainable", "full", "--lr", "1e12",
                "--warmup", "0", "--max-steps", "20", "--save-steps", "1", "-b", "4", "--name", "nan",
                "--log-dir", tmp_path / "log", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: loss became nan at step") and "--lr 1e+12" in line, line
    step = int(line.split("at step ")[1].split(";")[0])
    run = tmp_path / "log" / "nan"
    assert not (run / f"checkpoint-{step}").exists()  # the diverged weights were not saved
    assert (run / f"diverged-checkpoint-{step - 1}").is_dir()  # the weights that produced the NaN, set aside


def _eval_args(tiny_llm, tmp_path, test, out):
    return ["-m", tiny_llm, "--test-data", test, "--classes", tmp_path / "classes.txt", "-b", "4", "-o", out]


def test_killed_eval_resumes_from_its_predictions(tiny_llm, tmp_path):
    rows = [{"text": f"document {i} " + "word " * (i % 9), "answer": ["red", "blue"][i % 2], "question": "Which?"}
            for i in range(1500)]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    ref = run_cli("eval.py", *_eval_args(tiny_llm, tmp_path, test, tmp_path / "ref"), env={"OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr[-3000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval.py"),
                             *map(str, _eval_args(tiny_llm, tmp_path, test, tmp_path / "res"))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = next((tmp_path / "ref").glob("*/*")).relative_to(tmp_path / "ref")  # 1024-max-len/<model name>
    tsv = tmp_path / "res" / out / "predictions.tsv"
    t = time.time()
    while not (tsv.exists() and len(tsv.read_text().splitlines()) > 40):
        assert proc.poll() is None and time.time() - t < 600, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = len(tsv.read_text().splitlines()) - 1
    assert 40 <= kept < len(rows) and not (tmp_path / "res" / out / "metrics.json").exists()

    again = run_cli("eval.py", *_eval_args(tiny_llm, tmp_path, test, tmp_path / "res"), "--resume",
                    env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {kept} predictions kept" in again.stdout
    a = (tmp_path / "ref" / out / "predictions.tsv").read_text().splitlines()
    b = tsv.read_text().splitlines()
    assert len(b) == len(rows) + 1 and [x.split("\t")[:3] for x in a] == [x.split("\t")[:3] for x in b]
    m_ref = json.loads((tmp_path / "ref" / out / "metrics.json").read_text())
    m = json.loads((tmp_path / "res" / out / "metrics.json").read_text())
    assert m["accuracy"] == m_ref["accuracy"] and m["resumed_with"] == kept


SECOND_SIGNAL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from finetune.guards import StopGuard

guard = StopGuard()
guard.install()
sig = getattr(signal, sys.argv[1])
os.kill(os.getpid(), sig)
time.sleep(0.2)
print("asked:", guard.requested, flush=True)
os.kill(os.getpid(), sig)  # the second one: no waiting for the step to end
time.sleep(5)
print("still running", flush=True)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once(tmp_path, name):
    script = tmp_path / "guard.py"
    script.write_text(SECOND_SIGNAL.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, script, name], capture_output=True, text=True, timeout=120)
    assert r.returncode == -getattr(signal, name), (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines()[-2:] == [f"{name}: finishing this step, saving a checkpoint, then stopping (send it "
                                          "again to stop at once)", f"asked: {name}"], r.stdout


def test_a_kill_between_the_two_renames_of_a_save_loses_nothing(tmp_path):
    """save_atomic writes best.tmp, renames best -> best.old, then best.tmp -> best: killed in between, best.old is
    the whole previous save. eval / generate / export find it (find_run puts it back), and the next save goes on."""
    from finetune.runs import find_run, save_atomic

    run = tmp_path / "log" / "r"
    (run / "best.old").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": "m"}))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "best.old" / f).write_text("previous")
    (run / "best.tmp").mkdir()
    (run / "best.tmp" / "adapter_config.json").write_text("half")  # the new save, cut off
    cfg, weights = find_run(run)
    assert weights == run / "best" and (weights / "adapter_model.safetensors").read_text() == "previous"
    assert cfg == {"model": "m"} and not (run / "best.old").exists()

    def write(tmp):
        tmp.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp / f).write_text("new")

    save_atomic(run / "best", write)
    assert (run / "best" / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in run.iterdir()) == ["best", "run.json"]
