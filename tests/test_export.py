"""export.py (merge, vllm, gguf) and generate.py on one tiny LoRA run trained once for the whole module.

Subprocesses cost ~15-20 s of imports each, so each CLI runs once as a user runs it (train.py, export.py merge,
generate.py --data) and the other checks call the same functions in-process.
"""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from conftest import greedy, run_cli, write_jsonl

QUESTIONS = ["Which colour? red house", "Which colour? blue river tree", "hello", "stone cloud paper"]


@pytest.fixture(scope="module")
def trained(tiny_llm, tmp_path_factory):
    """A LoRA run trained hard enough (lr 1e-2, no warmup) that the adapter changes the greedy outputs; then the
    export.py and generate.py subprocesses start in the background (2 cores: they overlap each other and the
    in-process tests, which saves ~25 s) and the tests at the end of this file read their results."""
    tmp = tmp_path_factory.mktemp("export")
    rows = [{"id": f"s{i}", "text": f"the {'red' if i % 2 else 'blue'} house", "answer": "red" if i % 2 else "blue",
             "question": "Which colour?"} for i in range(16)]
    data = write_jsonl(tmp / "train.jsonl", rows)
    questions = write_jsonl(tmp / "q.jsonl", [{"id": f"q{i}", "question": q, "answer": "red"}
                                              for i, q in enumerate(QUESTIONS[:3])])
    with ThreadPoolExecutor(2) as pool:
        train = pool.submit(run_cli, "train.py", "-m", tiny_llm, "--train-data", data, "--max-steps", "4", "-b", "4",
                            "-r", "8", "--lr", "1e-2", "--warmup", "0", "--name", "x", "--log-dir", tmp / "log",
                            "--mixed-precision", "no")  # float32 weights on any CPU: the merge reproduces them
        import peft  # noqa: F401  (the in-process tests need it: import it while train.py runs)

        r = train.result()
        assert r.returncode == 0, r.stderr[-3000:]
        run = tmp / "log" / "x"
        yield SimpleNamespace(
            run=run, tmp=tmp,
            merge_cli=pool.submit(run_cli, "export.py", "merge", run, "-o", tmp / "m"),  # default: the run's dtype
            generate_cli=pool.submit(run_cli, "generate.py", "-c", run, "--data", questions, "-o", tmp / "a.jsonl",
                                     "--max-new-tokens", "8", "-b", "1"))


@pytest.fixture(scope="module")
def run(trained):
    return trained.run


@pytest.fixture(scope="module")
def reference(run, tiny_llm):
    """Base + adapter with plain transformers + PEFT (fp32): what the exports must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "best")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32),
                                      run / "best").eval()
    return model, tok, greedy(model, tok, QUESTIONS)


def test_merge_equals_base_plus_adapter(run, tiny_llm, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export

    out = export.merge(run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT
    assert not any("lora" in n for n, _ in merged.named_parameters())
    _, tok, (ref_ids, ref_logits) = reference
    ids, logits = greedy(merged, AutoTokenizer.from_pretrained(out), QUESTIONS)
    assert ids == ref_ids
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    base_ids, base_logits = greedy(AutoModelForCausalLM.from_pretrained(tiny_llm).eval(), tok, QUESTIONS)
    assert base_ids != ref_ids  # the adapter really changes the answers: the equality above means something
    assert not torch.allclose(base_logits[0], ref_logits[0], atol=1e-2)

    # the base moved (--base): the same merge from its new place
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_llm, moved)
    again = export.merge(run, tmp_path / "merged-moved", dtype="float32", base=str(moved))
    a, b = merged.state_dict(), AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "finetune_run.json").read_text())["export"]["base"] == str(moved)

    # bfloat16 rounds every weight: the parity check measures it (the float32 merge above: no difference)
    export.main(["merge", str(run), "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--min-identical", "0"])
    bf16 = json.loads((tmp_path / "bf16" / "parity.json").read_text())
    assert bf16["line"].startswith(f"parity: {bf16['identical']}/16 greedy identical, max |dlogit| ")
    assert "(merge bfloat16, 16 training prompts)" in bf16["line"] and bf16["max_abs_dlogit"] > 1e-3, bf16

    # a QLoRA run's adapter is merged into the unquantised base: same weights as the LoRA merge, no 4-bit config
    qlora = tmp_path / "log" / "q"
    shutil.copytree(run, qlora)
    cfg = json.loads((qlora / "run.json").read_text())
    (qlora / "best" / "run.json").write_text(json.dumps({**cfg, "trainable": "qlora"}))
    out = export.merge(qlora, tmp_path / "merged-q", dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    q = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), b in zip(q.state_dict().items(), merged.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), n


def test_vllm_adapter_holds_only_lora_and_loads(run, tiny_llm, reference, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import export

    src = (run / "best" / "adapter_model.safetensors").read_bytes()
    export.main(["vllm", str(run), "-o", str(tmp_path / "v")])  # the CLI in-process, parity check included
    out = tmp_path / "v"
    assert (run / "best" / "adapter_model.safetensors").read_bytes() == src  # source untouched
    parity = json.loads((out / "parity.json").read_text())
    assert (parity["identical"], parity["prompts"]) == (16, 16) and parity["max_abs_dlogit"] < 1e-4, parity
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), out).eval()
    _, tok, (ref_ids, _) = reference
    assert greedy(model, tok, QUESTIONS[:2])[0] == ref_ids[:2]


def fake_run(tiny_llm, run, folder, grow_vocab=False):
    """A run folder whose best/ adapter has full copies of embed_tokens and lm_head (modules_to_save), the lm_head
    copy changed as training would change it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                      modules_to_save=["embed_tokens", "lm_head"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
        if "lm_head.modules_to_save" in n:
            p.data += torch.randn_like(p) * 0.5
    best = folder / "best"
    model.save_pretrained(best)
    tok = AutoTokenizer.from_pretrained(run / "best")
    if grow_vocab:
        tok.add_tokens(["<new_token>"])
    tok.save_pretrained(best)
    for f in (folder / "run.json", best / "run.json"):
        shutil.copy(run / "run.json", f)
    return folder, model


def test_vllm_drops_modules_to_save_when_vocab_unchanged(run, tiny_llm, tmp_path, capsys):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import export

    folder, trained = fake_run(tiny_llm, run, tmp_path / "log" / "mts")
    with pytest.raises(SystemExit) as e:
        export.main(["vllm", str(folder), "-o", str(tmp_path / "v")])  # the CLI, in-process
    out, err = capsys.readouterr()
    assert "dropped 2 non-LoRA tensors" in out
    # the dropped lm_head copy was trained: the check sees the answers change, and says so (exit 1, export kept)
    parity = json.loads((tmp_path / "v" / "parity.json").read_text())
    assert e.value.code == 1 and "parity below" in err and parity["line"] in out, (out, err)
    assert parity["identical"] < 0.9 * parity["prompts"] and parity["max_abs_dlogit"] > 0.1
    with safe_open(tmp_path / "v" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["target_modules"]
    src_cfg = json.loads((folder / "best" / "adapter_config.json").read_text())
    assert sorted(src_cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]  # source untouched
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), tmp_path / "v")
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    for n, p in trained.named_parameters():
        if "lora_B" in n:
            torch.testing.assert_close(loaded[n], p)

    grown, _ = fake_run(tiny_llm, run, tmp_path / "log" / "grown", grow_vocab=True)
    notes = []
    export.vllm_adapter(grown, tmp_path / "g", say=notes.append)
    assert len(notes) == 1 and "vocabulary grew" in notes[0] and "601" in notes[0]
    with safe_open(tmp_path / "g" / "adapter_model.safetensors", "pt") as f:
        assert any("embed_tokens.weight" in k for k in f.keys())


def test_generate_prompt_and_chat_in_process(run, reference, monkeypatch, capsys):
    import generate

    _, tok, (ref_ids, _) = reference
    generate.main(["-c", str(run), "--prompt", QUESTIONS[0], "--max-new-tokens", "8"])
    assert capsys.readouterr().out == tok.decode(ref_ids[0], skip_special_tokens=True) + "\n"

    seen, real = [], generate.generate_one
    monkeypatch.setattr(generate, "generate_one", lambda m, f, s, *a: seen.append(list(s.turns)) or real(m, f, s, *a))
    lines = iter([QUESTIONS[0], QUESTIONS[1], ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    generate.main(["-c", str(run / "latest"), "--max-new-tokens", "8"])
    first = tok.decode(ref_ids[0], skip_special_tokens=True)
    assert seen == [[("user", QUESTIONS[0])], [("user", QUESTIONS[0]), ("assistant", first), ("user", QUESTIONS[1])]]
    assert capsys.readouterr().out.count("model> ") == 2


def test_errors_are_one_line_exit_2(run, tmp_path, capsys):
    import export
    import generate

    bad = tmp_path / "log" / "empty"
    (bad / "best").mkdir(parents=True)
    shutil.copy(run / "run.json", bad / "run.json")
    shutil.copy(run / "best" / "tokenizer.json", bad / "best" / "tokenizer.json")  # a tokenizer but no adapter
    cases = [(export.main, ["merge", str(bad), "-o", str(tmp_path / "o")], "no adapter"),
             (export.main, ["vllm", str(tmp_path), "-o", str(tmp_path / "o")], "not a run"),
             (generate.main, ["-c", str(bad / "best"), "--prompt", "hi"], "no adapter"),
             (export.main, ["merge", str(run), "-o", str(run)], "not empty")]
    if not torch.cuda.is_available():
        cases.append((export.main, ["gguf", str(run), "-o", str(tmp_path / "o"), "--quant", "q4_k_m"],
                      "llama-quantize"))
    cases += [(export.main, ["merge", str(run), "-o", str(tmp_path / "o"), "--check-prompts", "0"], "--check-prompts"),
              (export.main, ["check", str(run)], "not an export")]
    for main, argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and words in err, (argv, err)
        assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


# ------------------------------------------------ the subprocesses started by `trained`, last: they had time to run
def test_merge_cli_keeps_training_dtype_checks_parity_and_tokenizer(trained, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import export

    r = trained.merge_cli.result()  # export.py merge RUN -o OUT, default dtype: the run trained in float32
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("error") == 0 and "wrote " + str(trained.tmp / "m") in r.stdout
    assert "parity: 16/16 greedy identical, max |dlogit| " in r.stdout and "(merge float32, 16 training prompts)" \
        in r.stdout, r.stdout
    run, out = trained.run, trained.tmp / "m"
    saved = json.loads((out / "parity.json").read_text())
    assert saved["identical"] == 16 and saved["max_abs_dlogit"] < 1e-4 and saved["line"] in r.stdout
    export.main(["check", str(out)])  # the same check on the export made earlier: the same line
    lines = capsys.readouterr().out.strip().splitlines()  # after our lines of loading the two models
    assert lines[-1] == saved["line"] and all(line.startswith("loading model ") for line in lines[:-1]), lines
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert not getattr(tok, "add_eos_token", False)
    assert tok("red house")["input_ids"][-1] != tok.eos_token_id  # no EOS appended to prompts
    gc = GenerationConfig.from_pretrained(out)
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and gc.pad_token_id == tok.pad_token_id
    prov = json.loads((out / "finetune_run.json").read_text())
    run_json = json.loads((run / "run.json").read_text())
    assert {k: prov[k] for k in run_json} == run_json and prov["export"]["dtype"] == "float32"
    assert not (trained.tmp / "m.tmp").exists()


def test_generate_cli_data_jsonl(trained, reference):
    r = trained.generate_cli.result()  # generate.py -c RUN --data q.jsonl -o a.jsonl, greedy
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in (trained.tmp / "a.jsonl").read_text().splitlines()]
    assert sorted(o["id"] for o in out) == ["q0", "q1", "q2"]
    _, tok, (ref_ids, _) = reference
    for o in out:
        i = int(o["id"][1:])
        assert set(o) == {"id", "prompt", "answer", "reference"} and o["reference"] == "red"
        assert o["prompt"].endswith("<|im_start|>assistant\n") and QUESTIONS[i] in o["prompt"]
        assert o["answer"] == tok.decode(ref_ids[i], skip_special_tokens=True)


def test_check_prompts_and_check_data_choose_the_prompts(trained, capsys):
    """export.py check OUT --check-prompts N / --check-data FILE: how many prompts, and from where (the line says)."""
    import export

    assert trained.merge_cli.result().returncode == 0
    out = trained.tmp / "m"
    export.main(["check", str(out), "--check-prompts", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]  # after our lines of loading the two models
    assert line.startswith("parity: 2/2 greedy identical") and line.endswith("(merge float32, 2 training prompts)")
    export.main(["check", str(out), "--check-data", str(trained.tmp / "q.jsonl")])  # 3 questions, not 16
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("parity: 3/3 greedy identical") and line.endswith("(merge float32, 3 check prompts)")
    assert json.loads((out / "parity.json").read_text())["line"] == line
