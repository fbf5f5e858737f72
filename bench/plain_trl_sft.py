"""The baseline of train_bench.py: a plain TRL SFT script with the library's defaults.

    uv run bench/plain_trl_sft.py -m MODEL --train-data train.jsonl --max-steps 32 -b 8 --lr 2e-4 \\
        --max-len 1024 --output-dir /tmp/plain [--set gradient_checkpointing=false --set bf16=false]

Samples {"text", "question", "system", "answer"} become a conversational prompt/completion dataset (the document,
a blank line and the question in the user turn, as train.py renders them), so the loss is on the completion only.
SFTTrainer runs with SFTConfig's defaults: padding to the longest sequence of each randomly drawn batch, no
packing, gradient checkpointing on, bf16 mixed precision; LoRA r=16, alpha 32 on every linear layer. `--set`
overrides an SFTConfig field (to isolate one difference). Prints nothing of its own: bench/probe.py measures it.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
from finetune import trl_cpu  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--train-data", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override an SFTConfig field")
    args = p.parse_args()

    # The one deviation from plain TRL: its Triton log-prob kernel cannot run without a GPU ("0 active drivers"),
    # so off GPU it is swapped for the same computation in torch, exactly as our train.py does. Nothing on a GPU.
    trl_cpu.install()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from finetune.modeling import load_base, load_processing  # loading only: hub ids, folders and GGUF files alike

    rows = [json.loads(line) for line in open(args.train_data) if line.strip()]
    dataset = Dataset.from_list([{
        "prompt": [{"role": "system", "content": r["system"]},
                   {"role": "user", "content": f"{r['text']}\n\n{r['question']}"}],
        "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
    tokenizer = load_processing(args.model, vision=False)[0]
    model = load_base(args.model, vision=False, dtype=torch.float32)  # TRL's dtype for a model it loads itself
    overrides = {k: json.loads(v.lower()) if v.lower() in ("true", "false") or v[:1].isdigit() else v
                 for k, v in (s.split("=", 1) for s in args.set)}
    config = SFTConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.lr, max_length=args.max_len, report_to="none",
        use_cpu=not torch.cuda.is_available(),  # SFTConfig() refuses to start on a CPU-only machine without it
        **overrides)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer.train()


if __name__ == "__main__":
    main()
