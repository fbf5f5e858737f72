"""train.py --add-special-tokens: new tokens get one id each, grown embeddings, trained rows saved in the adapter;
eval/generate/export reload them (export merge: a plain transformers model with the larger vocabulary; export vllm:
the rows kept, with the reason, when the vocabulary grew, LoRA tensors only when it did not).

Two LoRA runs train at once (2 cores) as a user runs them: NEW adds two tokens the tiny (untied) model lacks; OLD
names two it already has ("<|im_start|>,<|im_end|>", the issue's example) on a tied copy of the model. The other
checks run in-process.
"""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from conftest import greedy, run_cli, write_jsonl

NEW = ["<|x_a|>", "<|x_b|>"]
QUESTIONS = ["Which colour? the red house", "Which colour? a blue river", "hello"]


def tied_copy(tiny_llm, folder):
    """The tiny Llama with tie_word_embeddings=True (SmolLM2-like): lm_head shares the embedding matrix."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llm)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_llm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("special")
    rows = [{"id": f"s{i}", "text": f"the {'red' if i % 2 else 'blue'} house", "question": "Which colour?",
             "answer": f"{NEW[0]}{'red' if i % 2 else 'blue'}{NEW[1]}"} for i in range(16)]
    data = write_jsonl(tmp / "train.jsonl", rows)
    tied = tied_copy(tiny_llm, tmp / "tied")
    common = ["--train-data", data, "--max-steps", "6", "-b", "4", "-r", "8", "--lr", "1e-2", "--warmup", "0",
              "--log-dir", tmp / "log"]
    with ThreadPoolExecutor(2) as pool:
        new = pool.submit(run_cli, "train.py", "-m", tiny_llm, *common, "--name", "new",
                          "--add-special-tokens", f" {NEW[0]}, {NEW[1]},")  # spaces and a trailing comma: ignored
        old = pool.submit(run_cli, "train.py", "-m", tied, *common, "--name", "old",
                          "--add-special-tokens", "<|im_start|>,<|im_end|>")
        for r in (new.result(), old.result()):
            assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, new=tmp / "log" / "new", old=tmp / "log" / "old", tied=tied)


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(runs, tiny_llm):
    """Base grown to the tokenizer's length + the adapter, with plain transformers + PEFT (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs.new / "best")
    base = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, runs.new / "best").eval()
    return model, tok, greedy(model, tok, QUESTIONS)


def test_tokens_single_ids_saved_and_in_run_json(runs):
    from transformers import AutoTokenizer

    cfg = json.loads((runs.new / "run.json").read_text())
    assert cfg["add_special_tokens"] == f" {NEW[0]}, {NEW[1]},"  # eval/generate/export re-read it
    assert cfg["tokens"]["added_tokens"] == NEW
    for sub in ("best", "latest"):
        tok = AutoTokenizer.from_pretrained(runs.new / sub)
        assert len(tok) == 602
        for t, i in zip(NEW, (600, 601)):
            assert tok(t, add_special_tokens=False)["input_ids"] == [i]
        ids = tok(f"x{NEW[0]}red{NEW[1]}", add_special_tokens=False)["input_ids"]
        assert 600 in ids and 601 in ids  # inside text too: the Formatter's answers hold them as single ids
    old = json.loads((runs.old / "run.json").read_text())
    assert old["tokens"]["added_tokens"] == [] and len(AutoTokenizer.from_pretrained(runs.old / "best")) == 600


def test_adapter_holds_trained_rows_only(runs, tiny_llm):
    from transformers import AutoModelForCausalLM

    acfg = json.loads((runs.new / "best" / "adapter_config.json").read_text())
    tti = acfg["trainable_token_indices"]
    assert sorted(tti) == ["lm_head", "model.embed_tokens"] and all(v == [600, 601] for v in tti.values())
    assert not acfg["modules_to_save"]
    t = adapter_tensors(runs.new / "best")
    assert not any("base_layer" in k for k in t)  # no full embedding copies: the rows alone
    emb = t["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    head = t["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert emb.shape == head.shape == (2, 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    for rows, old in ((emb, base.model.embed_tokens.weight), (head, base.lm_head.weight)):
        init = old.mean(0, keepdim=True).expand_as(rows)  # mean resizing
        assert (rows - init).abs().max() > 1e-2, "the new rows did not train"

    # tied model, tokens it already had: one set of rows (PEFT ties lm_head to it), no resize
    acfg = json.loads((runs.old / "best" / "adapter_config.json").read_text())
    assert acfg["trainable_token_indices"] == [1, 2]
    assert [k for k in adapter_tensors(runs.old / "best") if "lora" not in k] == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]


def test_reload_generate_and_merge(runs, tiny_llm, reference, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export
    import generate

    _, tok, (ref_ids, ref_logits) = reference
    assert any(600 in ids or 601 in ids for ids in ref_ids), ref_ids  # the trained model emits the new tokens
    generate.main(["-c", str(runs.new), "--prompt", QUESTIONS[0], "--max-new-tokens", "8"])
    assert capsys.readouterr().out == tok.decode(ref_ids[0], skip_special_tokens=True) + "\n"

    export.main(["merge", str(runs.new), "-o", str(tmp_path / "m"), "--dtype", "float32"])
    assert any(line.startswith("wrote ") for line in capsys.readouterr().out.splitlines())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # plain transformers, no PEFT
    mtok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert merged.config.vocab_size == len(mtok) == 602 and mtok.convert_tokens_to_ids(NEW) == [600, 601]
    assert merged.get_input_embeddings().weight.shape[0] == merged.lm_head.weight.shape[0] == 602
    t = adapter_tensors(runs.new / "best")
    torch.testing.assert_close(merged.model.embed_tokens.weight[600:],
                               t["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"])
    ids, logits = greedy(merged, mtok, QUESTIONS)
    assert ids == ref_ids
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    # the merged export reloads through find_run/load_for_inference too (generate.py -c MERGED)
    generate.main(["-c", str(tmp_path / "m"), "--prompt", QUESTIONS[0], "--max-new-tokens", "8"])
    assert capsys.readouterr().out == tok.decode(ref_ids[0], skip_special_tokens=True) + "\n"


def test_vllm_export_keeps_new_rows_and_says_why(runs, tmp_path):
    import export

    notes = []
    src = (runs.new / "best" / "adapter_model.safetensors").read_bytes()
    out = export.vllm_adapter(runs.new, tmp_path / "v", say=notes.append)
    assert (runs.new / "best" / "adapter_model.safetensors").read_bytes() == src
    assert len(notes) == 1 and "vocabulary grew" in notes[0] and "602 in the tokenizer" in notes[0]
    assert "vLLM cannot load this adapter" in notes[0] and "export.py merge" in notes[0]
    kept = adapter_tensors(out)
    assert sum("trainable_tokens_delta" in k for k in kept) == 2
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"]

    # no new token: the trained rows of existing tokens are dropped, only LoRA tensors remain (vLLM loads it)
    notes = []
    out = export.vllm_adapter(runs.old, tmp_path / "o", say=notes.append)
    assert len(notes) == 1 and notes[0].startswith("dropped 1 non-LoRA tensors (embed_tokens)")
    keys = list(adapter_tensors(out))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["trainable_token_indices"] is None and acfg["modules_to_save"] is None


def test_padded_vocabulary_reuses_rows_and_vllm_keeps_them(runs, tmp_path):
    """A base whose matrix has spare rows (Qwen pads its vocabulary): no resize, but the rows are still new."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    import export

    big = tmp_path / "big"  # the tiny model with 40 spare rows (640), the same 600-token tokenizer
    config = AutoConfig.from_pretrained(runs.tied)
    config.vocab_size, config.tie_word_embeddings = 640, False
    LlamaForCausalLM(config).save_pretrained(big)
    AutoTokenizer.from_pretrained(runs.tied).save_pretrained(big)
    fake = tmp_path / "log" / "padded"
    shutil.copytree(runs.new, fake)
    for f in (fake / "run.json", fake / "best" / "run.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "model": str(big)}))
    notes = []
    export.vllm_adapter(fake, tmp_path / "v", say=notes.append)
    assert len(notes) == 1 and "640 tokens in the base config" in notes[0] and "added <|x_a|>, <|x_b|>" in notes[0]
