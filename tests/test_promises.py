"""What the docs promise and no other module checks: each test fails if the behaviour a page states breaks.

End to end through the CLIs where a run is cheap (tiny models, a few steps), a unit check where it is not (GPU-only
paths, DDP, PyPI). Promises covered elsewhere: Ctrl-C's exit and message (test_reliability.py), --check-prompts and
--check-data (test_export.py), --help without ML imports (test_cli.py).
"""
import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_cli
from test_e2e import color_task


def _cli(name):
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    import gen_options

    return gen_options.load_cli(name)


def _cpu_has_bf16() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


# ------------------------------------------------------------------------------------------------ one tuned run
@pytest.fixture(scope="module")
def tuned(tiny_llm, tmp_path_factory):
    """A 2-step LoRA run with closed-set validation, -b 4 and --auto-batch-size (on this CPU: a warning)."""
    tmp = tmp_path_factory.mktemp("promises")
    train, val, test = color_task(tmp, 16, 0), color_task(tmp, 8, 1), color_task(tmp, 12, 2)
    (tmp / "classes.txt").write_text("red\nblue\n")
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "--validation-data", val, "-b", "4",
                "--auto-batch-size", "--max-steps", "2", "-r", "4", "--name", "tuned", "--log-dir", tmp / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, run=tmp / "log" / "tuned", test=test, result=r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the promise is about a machine without a GPU")
def test_auto_batch_size_without_a_gpu_warns_and_keeps_b(tuned):
    r = tuned.result
    assert "warning: --auto-batch-size probes GPU memory; without a CUDA device -b is kept" in r.stderr
    assert "x 4 per device x 1 accumulation = 4 samples per optimiser step" in r.stdout, r.stdout
    assert "(--auto-batch-size)" not in r.stdout  # no batch was chosen by probing
    assert json.loads((tuned.run / "run.json").read_text())["batch_size"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU precision rule")
def test_cpu_default_lora_run_fits_without_checkpointing_on_a_bf16_base(tuned):
    """--mixed-precision auto on a CPU: a LoRA run that fits in memory trains without gradient checkpointing and says
    why; its frozen base sits in bfloat16 where the CPU has bf16 instructions (float32 elsewhere), its LoRA weights
    in float32, and run.json names the base's dtype (what export.py merges into and eval.py loads)."""
    from safetensors import safe_open

    out = tuned.result.stdout
    assert "gradient checkpointing: off (planned peak without it" in out and "% of the" in out, out
    bf16 = _cpu_has_bf16()
    assert ("bf16 mixed precision (bfloat16 weights)" if bf16 else "float32 (no mixed precision)") in out, out
    assert json.loads((tuned.run / "run.json").read_text())["weights_dtype"] == ("bfloat16" if bf16 else "float32")
    with safe_open(tuned.run / "latest" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU precision rule")
def test_cpu_full_run_that_checkpoints_autocasts_to_bf16_where_the_cpu_has_it(tuned, tiny_llm):
    """--mixed-precision auto on a CPU: a full fine-tuning run that checkpoints gets bf16 autocast over float32
    weights when the CPU has bf16 instructions, float32 otherwise."""
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", color_task(tuned.tmp, 8, 3), "-b", "4", "--max-steps", "1",
                "--trainable", "full", "--gradient-checkpointing", "--name", "ckpt", "--log-dir", tuned.tmp / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    words = "bf16 mixed precision (float32 weights)" if _cpu_has_bf16() else "float32 (no mixed precision)"
    assert words in r.stdout, r.stdout
    assert json.loads((tuned.tmp / "log" / "ckpt" / "run.json").read_text())["weights_dtype"] == "float32"


def test_eval_scores_a_tuned_run_with_sum_and_zero_shot_with_calibrated_mean(tuned, tiny_llm):
    """metrics.json's score_rule / score_prompts: sum + first for a run and for its merged export, calibrated-mean +
    all zero-shot (docs/evaluation.md)."""
    import export

    merged = export.merge(tuned.run, tuned.tmp / "merged", dtype="float32")
    (tuned.tmp / "prompts.json").write_text(json.dumps({"question": ["Which colour?", "What colour is named?"]}))
    runs = {"run": ["-c", tuned.run],
            "merged": ["-m", merged],
            "zero-shot": ["-m", tiny_llm, "-p", tuned.tmp / "prompts.json", "--classes", tuned.tmp / "classes.txt"]}
    with ThreadPoolExecutor(2) as pool:
        done = {k: pool.submit(run_cli, "eval.py", *how, "--test-data", tuned.test, "-o", tuned.tmp / f"res-{k}")
                for k, how in runs.items()}
    got = {}
    for k, future in done.items():
        r = future.result()
        assert r.returncode == 0, (k, r.stderr[-3000:])
        m = json.loads(next((tuned.tmp / f"res-{k}").glob("*/*/metrics.json")).read_text())
        assert m["predict"] == "score" and m["samples"] == 12, m
        got[k] = (m["score_rule"], m["score_prompts"])
    assert got == {"run": ("sum", "first"), "merged": ("sum", "first"), "zero-shot": ("calibrated-mean", "all")}


# ------------------------------------------------------------------------------------------------ option checks
def test_grpo_batch_must_be_a_multiple_of_num_generations(tiny_llm, tmp_path):
    data = color_task(tmp_path, 8, 0)
    r = run_cli("train.py", "--trainer", "grpo", "-m", tiny_llm, "--train-data", data, "-b", "3",
                "--num-generations", "2", "--max-steps", "1", "--name", "g", "--log-dir", tmp_path / "log")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: -b 3 must be a multiple of --num-generations 2 (GRPO "
                                                 "compares each prompt's completions as a group)")
    assert "Traceback" not in r.stderr and not (tmp_path / "log" / "g").exists()


def test_beta_defaults_grpo_zero_dpo_one_tenth(tmp_path):
    from finetune import rl

    parser = _cli("train").build_parser()
    common = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "per_device_train_batch_size": 8,
              "bf16": False, "fp16": False}
    grpo = parser.parse_args(["--trainer", "grpo", "-m", "m", "--train-data", "d"])
    dpo = parser.parse_args(["--trainer", "dpo", "-m", "m", "--train-data", "d"])
    assert grpo.beta is None and dpo.beta is None  # the trainer decides: one default each
    assert rl.grpo_config(grpo, common, None).beta == 0.0
    assert rl.dpo_config(dpo, common).beta == 0.1
    dpo.beta = grpo.beta = 0.25
    assert rl.grpo_config(grpo, common, None).beta == rl.dpo_config(dpo, common).beta == 0.25


def test_trust_remote_code_is_off_unless_given(tmp_path):
    """A model that ships its own code stops before anything loads, without running that code."""
    for cli in ("train", "eval"):
        p = _cli(cli).build_parser()
        action = next(a for a in p._actions if a.dest == "trust_remote_code")
        assert action.default is False and action.option_strings == ["--trust-remote-code"]
    model = tmp_path / "custom-model"
    model.mkdir()
    marker = tmp_path / "REMOTE-CODE-RAN"
    (model / "config.json").write_text(json.dumps({"model_type": "promise-custom",
                                                   "auto_map": {"AutoConfig": "custom.CustomConfig"}}))
    (model / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "from transformers import PretrainedConfig\n"
                                     "class CustomConfig(PretrainedConfig):\n    model_type = 'promise-custom'\n")
    r = run_cli("train.py", "-m", model, "--train-data", color_task(tmp_path, 4, 0), "--name", "rc",
                "--log-dir", tmp_path / "log")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and "trust_remote_code" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"
    assert not (tmp_path / "log" / "rc").exists()


# ------------------------------------------------------------------------------------------------ unit checks
def test_out_of_memory_names_the_shape_the_batch_and_the_flags_that_help(tmp_path, capsys):
    """train.run_training turns CUDA's out-of-memory error into one line and exit 1 (no GPU needed: the error is
    raised by a stand-in trainer)."""
    import signal

    from finetune import guards

    train = _cli("train")
    args = train.build_parser().parse_args(["-m", "m", "--train-data", "d", "-b", "4", "--max-len", "96"])
    args.trainable = "lora"

    class OOMTrainer:
        last_batch_shape = (4, 96)

        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train.run_training(args, OOMTrainer(), guards.StopGuard(), tmp_path, validates=False)
    assert e.value.code == 1
    assert signal.getsignal(signal.SIGINT) is before  # the stop guard was uninstalled
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: CUDA out of memory on a batch of shape (4, 96)"), err
    for words in ("-b 4", "--max-len 96", "--trainable lora", "--auto-batch-size", "--gradient-checkpointing",
                  "--trainable qlora", "--split-model"):
        assert words in err, (words, err)


def _sdist(tmp_path, version):
    """A stand-in llama-cpp-python sdist holding the converter files and one file that must not be extracted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "ggml/src/ggml.c"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sdist = tmp_path / "mirror" / f"llama_cpp_python-{version}.tar.gz"
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(buf.getvalue())
    api = tmp_path / "mirror" / "pypi" / "llama-cpp-python" / "json"
    api.parent.mkdir(parents=True)
    api.write_text(json.dumps({"releases": {version: [{"packagetype": "sdist", "url": sdist.as_uri()}]}}))
    return hashlib.sha256(sdist.read_bytes()).hexdigest(), (tmp_path / "mirror" / "pypi").as_uri()


def test_llamacpp_sdist_is_checked_against_its_sha256(tmp_path, monkeypatch):
    from finetune import llamacpp
    from finetune.modeling import ModelError

    sha, pypi = _sdist(tmp_path, "9.9.9")
    monkeypatch.setattr(llamacpp, "PYPI", pypi)
    monkeypatch.setenv("FINETUNE_LLAMACPP_DIR", str(tmp_path / "converter"))
    monkeypatch.setattr(llamacpp, "LLAMA_CPP_PYTHON", ("9.9.9", "0" * 64))
    with pytest.raises(ModelError, match="sha256 .* is not the pinned 0000"):
        llamacpp.converter_dir()
    assert not (tmp_path / "converter" / "convert_hf_to_gguf.py").exists()

    monkeypatch.setattr(llamacpp, "LLAMA_CPP_PYTHON", ("9.9.9", sha))
    folder = llamacpp.converter_dir()
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (folder / "ggml").exists()  # only the Python converter is extracted


def test_free_text_validation_generates_on_the_plans_samples(tokenizer, monkeypatch):
    """Free-text validation generates on the first samples its plan names (finetune/timeplan.py: at most 32 by
    default), by the run's decoding; none: the loss alone."""
    from dataset import Formatter, Sample
    from finetune import training
    from finetune.decoding import resolve

    seen = []

    def fake_predict(model, fmt, samples, classes, mode, batch_size, decoding=None, **kw):
        seen.append((len(samples), classes, mode, decoding))
        return [{"reference": s.answer, "prediction": s.answer} for s in samples]

    monkeypatch.setattr(training, "predict", fake_predict)
    val = [Sample(id=str(i), file="v", turns=[("user", f"say {i}"), ("assistant", "red " * (1 + i % 3))])
           for i in range(40)]
    model = SimpleNamespace(training=False, eval=lambda: None, train=lambda: None)
    dec = resolve({"longest_answer_tokens": 5}, None)
    validation = training.free_text_validation(model, Formatter(tokenizer, max_len=64), val,
                                               SimpleNamespace(batch_size=8))
    for samples, expected in ((None, 40), (32, 32), (5, 5)):
        metrics = validation("validation", training.ValidationPlan(dec, samples))
        assert metrics["eval_exact_match"] == 1.0
        assert seen[-1][:3] == (expected, None, "generate")
    assert seen[0][3] is dec and dec.max_new_tokens == 24  # the budget rule: ceil(1.5 x 5) + 16
    assert validation("validation", training.ValidationPlan(dec, 0)) == {} and len(seen) == 3


def test_closed_set_validation_scores_the_whole_set_on_every_rank(monkeypatch):
    """Under DDP every rank measures accuracy on all validation samples (not its shard), so every rank gets the same
    number and agrees on best/ (docs/scale-out.md); it scores as eval.py scores a tuned run."""
    from dataset import Sample
    from finetune import predict, training

    calls = []

    def fake_predict(model, fmt, samples, classes, mode, batch_size, decoding=None, **kw):
        calls.append(([s.id for s in samples], kw.get("rule"), kw.get("prompt_set")))
        return [{"reference": s.answer, "prediction": "red"} for s in samples]

    monkeypatch.setattr(training, "predict", fake_predict)
    val = [Sample(id=str(i), file="v", turns=[("user", "q"), ("assistant", ["red", "blue"][i % 2])]) for i in range(10)]
    model = SimpleNamespace(training=False, eval=lambda: None, train=lambda: None)
    args = SimpleNamespace(predict="score", batch_size=4)
    results = []
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        results.append(training.closed_set_validation(model, None, val, ["red", "blue"], args)(
            "validation", training.ValidationPlan(None)))
    assert results[0] == results[1] and results[0]["eval_accuracy"] == 0.5
    assert [c[0] for c in calls] == [[str(i) for i in range(10)]] * 2
    assert {(c[1], c[2]) for c in calls} == {(predict.TUNED_SCORE_RULE, predict.TUNED_PROMPT_SET)} == {("sum", "first")}


def _tied_llm(tiny_llm, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_llm)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_classifier_head_starts_at_the_mean_embedding_of_each_class_name(tiny_llm, tokenizer, tmp_path):
    """The training path (classifier.load_for_training): on a tied model each class's head row is the mean input
    embedding of the tokens its name is written with; an untied model keeps transformers' random start."""
    import copy

    from dataset import Formatter
    from finetune import classifier

    classes = ["red", "blue", "love"]
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<|endoftext|>"
    fmt = Formatter(tok, max_len=64)
    class_ids = classifier.class_token_ids(fmt, classes)
    special = set(tok.all_special_ids)
    assert all(ids and not special & set(ids) for ids in class_ids), class_ids
    assert [tok.decode(ids).strip() for ids in class_ids] == classes

    train = _cli("train")
    for model_path, tied in ((_tied_llm(tiny_llm, tmp_path), True), (tiny_llm, False)):
        args = train.parse_args(["--classifier", "-m", str(model_path), "--train-data", "d", "-r", "4"])
        args = args.derive(use_unsloth=False, gradient_checkpointing=False, mixed_precision="no")
        model = classifier.load_for_training(args, classes, tok, class_ids)
        emb = model.get_input_embeddings().weight
        head = next(p for n, p in model.named_parameters() if "score" in n and p.requires_grad and p.dim() == 2)
        means = torch.stack([emb[ids].float().mean(0) for ids in class_ids])
        assert head.shape == means.shape
        assert torch.allclose(head.float(), means) == tied, (model_path, tied)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU precision rule")
def test_cpu_dtypes_of_training_and_inference():
    """On a CPU: a LoRA run's frozen base in bfloat16 where the CPU has bf16 instructions (the trainable weights
    float32), full fine-tuning and QLoRA in float32; eval.py / generate.py / parity load a run in its base's dtype
    when that is bfloat16 (the weights its validation saw), else float32."""
    from finetune import precision

    bf16 = _cpu_has_bf16()
    assert precision.cpu_choice("auto", False, "lora") == ("bf16" if bf16 else "no")
    assert precision.cpu_choice("auto", False, "full") == "no"
    assert precision.cpu_choice("auto", True, "full") == ("bf16" if bf16 else "no")
    assert precision.training_dtype("lora", "bf16") == torch.bfloat16
    assert precision.training_dtype("full", "bf16") == precision.training_dtype("qlora", "bf16") == torch.float32
    assert precision.inference_dtype(None, {"weights_dtype": "bfloat16"}) == (torch.bfloat16 if bf16 else torch.float32)
    assert precision.inference_dtype(None, {"weights_dtype": "float32"}) == precision.inference_dtype() == torch.float32
    assert precision.inference_dtype("no", {"weights_dtype": "bfloat16"}) == torch.float32


def test_merge_dtype_defaults_to_the_runs_weights_dtype():
    """export.py merge --dtype: run.json's weights_dtype (a CPU run under bf16 autocast trained float32 weights)."""
    import export
    from finetune import precision

    assert precision.export_dtype({"weights_dtype": "float32", "precision": "bf16"}) == "float32"
    assert precision.export_dtype({"weights_dtype": "bfloat16", "precision": "no"}) == "bfloat16"
    action = next(a for a in export.build_parser()._subparsers._group_actions[0].choices["merge"]._actions
                  if a.dest == "dtype")
    assert action.default is None and "weights_dtype" in action.help


def test_default_run_name_and_checkpoint_schedule(tmp_path):
    """--name: MODEL-YYYYMMDD-HHMMSS; checkpoints with each validation (every --eval-steps, else each epoch) unless
    --save-steps says otherwise."""
    import re

    from finetune import runs, training

    train = _cli("train")
    args = train.parse_args(["-m", "some/Model-1B", "--train-data", "d", "--log-dir", str(tmp_path)])
    assert re.fullmatch(r"Model-1B-\d{8}-\d{6}", args.name) and runs.run_dir(args).name == args.name

    def schedule(*flags):
        a = train.parse_args(["-m", "m", "--train-data", "d", *flags])
        a = a.derive(gradient_checkpointing=False, mixed_precision="no")
        t = training.training_arguments(a, tmp_path, validates=True)
        return str(t["eval_strategy"]), str(t["save_strategy"]), t["save_steps"] if t["save_strategy"] == "steps" \
            else None

    assert schedule() == ("epoch", "epoch", None)
    assert schedule("--eval-steps", "7") == ("steps", "steps", 7)
    assert schedule("--eval-steps", "7", "--save-steps", "3") == ("steps", "steps", 3)
    assert schedule("--save-steps", "3") == ("epoch", "steps", 3)


def test_a_gguf_files_configuration_is_read_once_per_file_version(tmp_path, monkeypatch):
    """A run asks for the configuration twice (data preparation, the plan); parsing a GGUF header takes seconds."""
    from finetune import modeling

    reads = []
    monkeypatch.setattr(modeling, "_read_config", lambda spec, folder, gguf, trust: reads.append(gguf) or
                        SimpleNamespace(model_type="llama", hidden_size=len(reads)))
    modeling._gguf_config.cache_clear()
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    first, second = modeling.load_config(str(f)), modeling.load_config(str(f))
    assert reads == ["m.gguf"] and first is not second and first.hidden_size == second.hidden_size == 1
    f.write_bytes(b"GGUF, another version")
    assert modeling.load_config(str(f)).hidden_size == 2 and len(reads) == 2
    modeling._gguf_config.cache_clear()
