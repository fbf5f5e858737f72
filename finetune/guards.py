"""What keeps a long run from being lost: Ctrl-C / SIGTERM save a checkpoint and stop, a NaN or infinite loss
stops the run before it trains on garbage, and CUDA out-of-memory ends with advice instead of a stack.

The Trainer already checkpoints (model, optimiser, scheduler, RNG states, data position) and resumes exactly;
these hooks only decide *when* it stops, through its own `control` flags, so every save goes through the same
code path as a scheduled one.
"""
from __future__ import annotations

import math
import signal

from finetune import launch

EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C: the run did not finish, but nothing was lost
EXIT_FAILED = 1


class StopGuard:
    """SIGINT / SIGTERM (Ctrl-C, `kill`, a cluster's preemption notice) ask for a stop; at the end of the current
    optimiser step the Trainer saves a checkpoint and returns. A second signal stops at once (default handler).
    Under torchrun every rank must stop at the same step or the others hang in the next all-reduce: the flag is
    agreed on with one tiny all-reduce per step (only when there are several processes).

    trainer.add_callback(guard.callback()) connects it; the guard itself holds the outcome (requested, stopped_at,
    bad_loss) for train.py's summary."""

    def __init__(self):
        self.requested = None  # the signal's name once one arrived
        self.stopped_at = None
        self.bad_loss = None   # (step, value) of the first NaN / inf loss
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills without waiting for the step to end
        print(f"\n{self.requested}: finishing this step, saving a checkpoint, then stopping "
              f"(send it again to stop at once)", flush=True)

    def callback(self):
        """The TrainerCallback that reports each step and log to this guard (transformers is imported here, not
        when train.py starts: --help stays fast)."""
        from transformers import TrainerCallback

        guard = self

        class GuardCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                guard.on_step_end(state, control)

            def on_log(self, args, state, control, logs=None, **kw):
                guard.on_log(state, control, logs)

        return GuardCallback()

    def on_step_end(self, state, control):
        if launch.across_ranks(self.requested is not None, "max"):  # any rank signalled: all stop here
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, state, control, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad_loss is None:
            self.bad_loss = (state.global_step, loss)
            control.should_save = False  # never overwrite a good checkpoint with diverged weights
            control.should_training_stop = True
            control.should_evaluate = False


def bad_loss_message(step: int, value: float, good_checkpoint: str | None, args) -> str:
    where = (f"last good checkpoint: {good_checkpoint} (--resume continues from it once the cause is changed)"
             if good_checkpoint else "no good checkpoint yet: start again")
    return (f"loss became {value} at step {step}; stopped without saving those weights; {where}. Likely "
            f"causes: a learning rate too high (--lr {args.lr:g}: try 10x lower), fp16 overflow (--mixed-precision "
            f"bf16 or no), or a sample with no answer tokens left after truncation (--max-len {args.max_len})")


def oom_message(args, shape) -> str:
    batch = f"a batch of shape {tuple(shape)} (samples x tokens)" if shape is not None else "the current batch"
    return (f"CUDA out of memory on {batch} with -b {args.batch_size}, --max-len {args.max_len}, --trainable "
            f"{args.trainable}. What helps: --auto-batch-size (largest batch that fits, same total), a smaller "
            f"--max-len, --trainable qlora, --gradient-checkpointing"
            + (", --split-model (one model over several GPUs)" if not args.split_model else ""))
