"""A warm interpreter ("zygote") for conftest.run_cli. Importing torch, transformers, TRL, PEFT and datasets costs a
CLI 7-20 s of CPU, more than the work itself on the tiny test models, and the suite runs ~170 CLIs. One helper per
pytest worker imports those libraries once and forks for every run: each CLI still runs in a process of its own as
`__main__`, with its own environment, cwd, argv, stdout/stderr and exit status, and imports our modules (train,
finetune.*) afresh, as `python train.py ...` would. The helper forks a waiter per run, which forks the run and
reports how it ended, so run_cli calls from a test's threads overlap as before.
"""
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

# Variables that the preloaded libraries read when called, never at import: a run whose environment differs from the
# helper's in any other (HF_*, TRANSFORMERS_*, XDG_*, PYTHON*, LD_*, RANK, ...) gets a fresh interpreter (conftest).
CALL_TIME = {"PYTEST_CURRENT_TEST", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}  # huggingface_hub reads tokens per request
CALL_TIME_PREFIXES = ("FINETUNE_", "WANDB_", "MLFLOW_")  # ours (imported afresh); the trackers read theirs at init
STARTING = threading.Lock()  # run_cli calls from a test's threads start one helper


def _preload():
    """Imports only: no torch computation may have run, nor a thread started, when the helper forks."""
    import matplotlib
    matplotlib.use("Agg")  # what eval.py and finetune/monitor.py select before pyplot
    import matplotlib.pyplot  # noqa: F401
    import accelerate, datasets.fingerprint, peft, safetensors.torch, sklearn.metrics, tokenizers, torch  # noqa
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, Trainer  # noqa: F401
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: F401
    assert not {"train", "eval", "dataset", "finetune"} & set(sys.modules), "the helper imported our own modules"


def _exec_script(req):
    """The forked run becomes `python SCRIPT ARGS`. It ends through a normal interpreter exit (atexit handlers, non-
    daemon threads, flushes): SystemExit leaves the helper's loop for the top level."""
    import builtins

    import numpy
    import torch
    from datasets import fingerprint

    script = req["script"]
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):  # sys.stdout/err wrap fds 1 and 2
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    sys.argv, sys.path[0] = [script, *req["args"]], os.path.dirname(script)
    if "OMP_NUM_THREADS" in req["env"]:  # OpenMP read it when the helper loaded torch
        torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
    # RNGs seeded at import would be the same in every run (Python's `random` reseeds itself after a fork)
    numpy.random.seed()
    fingerprint.fingerprint_rng.seed()  # datasets' random cache-file names: two runs must not collide
    # a fresh __main__ for the rest of the process, as `python script.py` has (runpy.run_path would put the helper
    # back as __main__ once the script returns or raises, before atexit handlers run, and drop the script's globals)
    main = type(sys)("__main__")
    main.__dict__.update(__file__=script, __builtins__=builtins, __cached__=None)
    sys.modules["__main__"] = main
    try:
        exec(compile(Path(script).read_bytes(), script, "exec"), main.__dict__)
    except Exception as e:  # as Python reports it: the traceback from the script's frame on, exit status 1
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        raise SystemExit(1)
    raise SystemExit(0)


def _wait_one(conn):
    """The waiter: forks the run, sends its pid (for timeouts), then its exit status; never returns."""
    try:
        req = conn.recv()
        sys.stdout.flush(), sys.stderr.flush()  # nothing of the helper's may end up in the run's output
        pid = os.fork()
    except BaseException:
        os._exit(1)
    if pid == 0:
        conn.close()
        _exec_script(req)
    try:
        conn.send(pid)
        conn.send(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))  # -N when killed by signal N, as subprocess
    finally:
        os._exit(0)


def serve(ctl_fd):
    """The helper: preloads, then forks a waiter for each socket the pytest worker sends; ends when it hangs up."""
    import gc

    ctl = socket.socket(fileno=ctl_fd)
    _preload()
    gc.freeze()  # the runs' collections need not walk (and so copy) the helper's million objects
    ctl.sendall(b"ready")
    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 1, 1)
        if not msg:
            return
        with contextlib.suppress(ChildProcessError):  # reap the waiters that have finished
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if os.fork() == 0:
            ctl.close()
            _wait_one(Connection(fds[0]))
        os.close(fds[0])


class Zygote:
    """The pytest worker's side: a helper started with `env`, the environment of a plain run_cli call."""

    def __init__(self, env, cwd):
        self.env, self.lock = env, threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="warm-cli-"))
        self.ctl, theirs = socket.socketpair()
        with open(self.tmp / "helper.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], env=env, cwd=cwd,
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        theirs.close()
        if self.ctl.recv(5) != b"ready":
            raise RuntimeError("the warm CLI helper did not start:\n" + self.log())

    def log(self):
        return (self.tmp / "helper.log").read_text()[-3000:]

    def accepts(self, env):
        """Whether `env` differs from the helper's only in variables read at call time."""
        return all(env.get(k) == self.env.get(k) or k in CALL_TIME or k.startswith(CALL_TIME_PREFIXES)
                   or k == "OMP_NUM_THREADS" and env.get(k, "").isdigit()  # applied with torch.set_num_threads
                   for k in env.keys() | self.env.keys())

    def run(self, cmd, script, args, cwd, env, timeout):
        """subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), forked."""
        out = Path(tempfile.mkdtemp(dir=self.tmp))
        ours, theirs = socket.socketpair()
        with self.lock:
            socket.send_fds(self.ctl, [b"r"], [theirs.fileno()])
        theirs.close()
        with Connection(ours.detach()) as conn:
            try:
                conn.send(dict(script=str(script), args=list(args), cwd=str(cwd), env=env,
                               stdout=str(out / "stdout"), stderr=str(out / "stderr")))
                pid = conn.recv()
                timed_out = not conn.poll(timeout)
                if timed_out:  # killed as subprocess.run does: the run, not the processes it started
                    with contextlib.suppress(ProcessLookupError):  # it ended just now
                        os.kill(pid, signal.SIGKILL)
                code = conn.recv()
            except EOFError:
                raise RuntimeError("the warm CLI helper died:\n" + self.log()) from None
        outs = [(out / n).read_bytes() if (out / n).exists() else b"" for n in ("stdout", "stderr")]
        shutil.rmtree(out)
        if timed_out:  # as subprocess.run: the bytes read so far, or None
            raise subprocess.TimeoutExpired(cmd, timeout, output=outs[0] or None, stderr=outs[1] or None)
        # decoded as text=True does: the locale's encoding, universal newlines
        stdout, stderr = (io.TextIOWrapper(io.BytesIO(b)).read() for b in outs)
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)

    def close(self):
        self.ctl.close()  # the helper reads end-of-file and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
