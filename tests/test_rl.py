"""GRPO and DPO through train.py on tiny models, and the CPU stand-in for TRL's Triton kernel."""
import json

import pytest
import torch

from conftest import ROOT, run_cli, write_jsonl

BREVITY = '''
def brevity(completions, **kw):
    """Shorter replies score higher: a dense signal a random-init model can follow within a few steps."""
    return [-len(c) / 40 for c in completions]
'''


def _log(path):
    return [json.loads(l) for l in path.read_text(errors="replace").splitlines() if l.strip()]


def test_grpo_scores_what_it_generated_and_the_reward_rises(tiny_llm, tmp_path):
    rows = [json.loads(l) for l in (ROOT / "data/fortunes/train.jsonl").read_text().splitlines()][:16]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "my_rewards.py").write_text(BREVITY)
    r = run_cli("train.py", "--trainer", "grpo", "-m", tiny_llm, "--train-data", train, "-p", ROOT / "prompts.json",
                "--num-generations", "8", "-b", "16", "--max-completion-len", "8", "--max-steps", "16",
                "--rewards", f"structure,correct,{tmp_path / 'my_rewards.py'}:brevity", "--reward-weights", "0,0,1",
                "--prefill", "<reasoning>", "--trainable", "full", "--lr", "1e-2", "--warmup", "0",
                "--name", "grpo", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "grpo"
    steps = [x for x in _log(run / "train_log.jsonl") if "reward" in x]
    assert len(steps) == 16 and all("rewards/structure/mean" in x and "rewards/correct/mean" in x for x in steps)
    # the weighted total is brevity alone (weights 0, 0, 1), and it rises as the policy learns to be brief
    assert all(x["reward"] == pytest.approx(x["rewards/brevity/mean"], abs=1e-5) for x in steps)
    first, last = [sum(x["reward"] for x in s) / 4 for s in (steps[:4], steps[-4:])]
    assert last > first + 0.05, [x["reward"] for x in steps]
    # every logged reward is what the function gives for the completion that was generated (prefill included)
    import rewards

    logged = _log(run / "completions.jsonl")
    assert {x["reward"] for x in logged} == {"structure", "correct", "brevity"}
    for x in logged:
        if x["reward"] == "brevity":
            assert x["value"] == pytest.approx(-len(x["completion"]) / 40)
        else:
            fn = rewards.REWARDS[x["reward"]]
            kw = {"answer": [x["answer"]]} if x["reward"] == "correct" else {}
            assert fn([x["completion"]], prefill=[x["prefill"]], **kw) == [x["value"]]
        assert x["prefill"] == "<reasoning>"
    assert (run / "best" / "model.safetensors").is_file()

    # eval.py scores the run on the prompts it was trained on: its --prefill comes from run.json
    e = run_cli("eval.py", "-c", run, "--test-data", train, "--limit", "4", "--predict", "generate",
                "--max-new-tokens", "2", "-o", tmp_path / "res")
    assert e.returncode == 0, e.stderr[-3000:]
    assert json.loads((tmp_path / "res/1024-max-len/grpo/metrics.json").read_text())["prefill"] == "<reasoning>"


def _preferences(tmp_path):
    prefs = [{"question": f"Name a colour ({i}).", "chosen": "red", "rejected": "the big old stone house"}
             for i in range(12)]
    msgs = [{"prompt_messages": [{"role": "user", "content": "Pick one."}],
             "chosen_messages": [{"role": "assistant", "content": "blue"}],
             "rejected_messages": [{"role": "assistant", "content": "window garden road"}]}] * 4
    return write_jsonl(tmp_path / "prefs.jsonl", prefs + [dict(m, id=f"m{i}") for i, m in enumerate(msgs)])


def test_dpo_margin_grows(tiny_llm, tmp_path):
    train = _preferences(tmp_path)
    r = run_cli("train.py", "--trainer", "dpo", "-m", tiny_llm, "--train-data", train, "-b", "4", "--max-steps", "8",
                "--lr", "5e-3", "--beta", "0.1", "--dpo-loss", "sigmoid", "--name", "dpo", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "dpo"
    margins = [x["rewards/margins"] for x in _log(run / "train_log.jsonl") if "rewards/margins" in x]
    assert len(margins) == 8 and margins[-1] > margins[0] + 0.3, margins
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["trainer"] == "dpo"


def test_preference_rows_are_the_tokens_trl_makes_from_the_texts(tiny_llm, tmp_path):
    """rl.dpo_dataset / kto_dataset tokenise the prompt and replies as SFT's segments: on a chat template they are
    the ids TRL's own _prepare_dataset makes from the rendered texts, and preference_trainer_class keeps TRL's
    steps after tokenising (a prompt that fills max_length dropped; KTO's KL completions)."""
    import types

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from dataset import Formatter
    from finetune import rl, sources
    from finetune.modeling import setup_tokens

    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi."},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Your colour?"}]
    pairs = [{"id": f"p{i}", "question": "Name a colour. " + "word " * (3 * i), "chosen": "red", "rejected": "a house"}
             for i in range(6)] + [{"id": "turns", "prompt_messages": turns,
                                    "chosen_messages": [{"role": "assistant", "content": "blue"}],
                                    "rejected_messages": [{"role": "assistant", "content": "window"}]}]
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    setup_tokens(tok)
    fmt = Formatter(tok, max_len=512, seed=42)
    prefs = sources.load_preferences(write_jsonl(tmp_path / "prefs.jsonl", pairs))
    texts = Dataset.from_list([{"prompt": fmt.prompt_text(p), "chosen": fmt.answer_text(p.chosen),
                                "rejected": fmt.answer_text(p.rejected)} for p in prefs])
    me = types.SimpleNamespace(_tokenizer=tok)
    longest = max(len(tok(t)["input_ids"]) for t in texts["prompt"])
    cfg = DPOConfig(output_dir=str(tmp_path), max_length=longest, report_to=[], use_cpu=True)
    trl_rows = DPOTrainer._prepare_dataset(me, texts, tok, cfg, "train")
    ours = rl.preference_trainer_class(DPOTrainer)._prepare_dataset(me, rl.dpo_dataset(fmt, prefs), tok, cfg, "train")
    assert len(ours) == len(trl_rows) == len(pairs) - 1  # the longest prompt fills max_length: dropped by both
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[col] == trl_rows[col], col
    assert "Hello." in tok.decode(ours["prompt_ids"][-1])  # a multi-turn prompt keeps its earlier assistant turn

    feedback = [{"id": f"k{i}", "prompt": f"Colour {i}?", "completion": "red" if i % 2 else "a house",
                 "label": bool(i % 2)} for i in range(6)]
    fb = sources.load_preferences(write_jsonl(tmp_path / "kto.jsonl", feedback), unpaired=True)
    texts = Dataset.from_list([{"prompt": fmt.prompt_text(f), "completion": fmt.answer_text(f.completion),
                                "label": f.label} for f in fb])
    me = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    cfg = KTOConfig(output_dir=str(tmp_path), max_length=512, per_device_train_batch_size=2, report_to=[],
                    use_cpu=True)
    trl_rows = KTOTrainer._prepare_dataset(me, texts, tok, cfg, "train")
    ours = rl.preference_trainer_class(KTOTrainer)._prepare_dataset(me, rl.kto_dataset(fmt, fb), tok, cfg, "train")
    for col in ("prompt_ids", "completion_ids", "KL_completion_ids", "label"):
        assert ours[col] == trl_rows[col], col


def test_init_adapter_starts_from_the_sft_policy_and_eval_loads_it_so(tiny_llm, tmp_path):
    """--init-adapter: LoRA merges the SFT adapter under a fresh one (the KL reference, adapter disabled, is the SFT
    policy), and eval / generate / export load the run the same way; QLoRA trains the SFT adapter itself further."""
    from safetensors.torch import load_file

    from finetune.modeling import load_for_inference

    log = tmp_path / "log"
    sft_rows = [{"id": f"s{i}", "question": f"Name a colour ({i}).", "answer": "red"} for i in range(8)]
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", write_jsonl(tmp_path / "sft.jsonl", sft_rows), "-r", "8",
                "--max-steps", "3", "-b", "4", "--lr", "5e-2", "--warmup", "0", "--name", "sft", "--log-dir", log,
                "--mixed-precision", "no")  # float32 on any CPU: a bfloat16 base would round the merge below
    assert r.returncode == 0, r.stderr[-3000:]
    prefs, sft = _preferences(tmp_path), log / "sft" / "best"
    dpo = ["--trainer", "dpo", "-m", tiny_llm, "--train-data", prefs, "--init-adapter", sft, "-b", "4", "-r", "8",
           "--warmup", "0", "--log-dir", log, "--mixed-precision", "no"]
    r = run_cli("train.py", *dpo, "--max-steps", "2", "--lr", "5e-3", "--name", "dpo")
    assert r.returncode == 0, r.stderr[-3000:]
    q = run_cli("train.py", *dpo, "--trainable", "qlora", "--max-steps", "1", "--lr", "1e-9", "--name", "dpo-q")
    assert q.returncode == 0, q.stderr[-3000:]

    def loaded(name):
        return load_for_inference(json.loads((log / name / "run.json").read_text()), str(log / name / "best"))

    sft_model, tok, _ = loaded("sft")
    dpo_model, _, _ = loaded("dpo")
    ids = tok(["Name a colour (3)."], return_tensors="pt")
    with torch.no_grad():
        want, got = sft_model(**ids).logits, dpo_model(**ids).logits
        with dpo_model.disable_adapter():
            reference = dpo_model(**ids).logits
    assert torch.allclose(reference, want, atol=1e-5)  # base + SFT merged: the policy DPO started from
    assert (got - reference).abs().max() > 1e-6  # and its own adapter on top moved it
    a, b = load_file(sft / "adapter_model.safetensors"), load_file(log / "dpo-q" / "best" / "adapter_model.safetensors")
    # lr 1e-9: the QLoRA run saved the SFT adapter back, to within its bf16 compute dtype (a fresh LoRA has B = 0)
    assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-2 for k in a if "lora_B" in k)
    assert all(torch.allclose(b[k].float(), a[k].float(), rtol=1e-2, atol=1e-3) for k in a)


def test_preference_pairs_are_validated(tmp_path, tiny_llm):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a"}])
    r = run_cli("train.py", "--trainer", "dpo", "-m", tiny_llm, "--train-data", bad, "--log-dir", tmp_path / "log")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "line 1" in r.stderr and "'rejected'" in r.stderr and not (tmp_path / "log").exists()


@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (30.0, 0.5, 0.7)])
def test_torch_logprob_matches_a_direct_log_softmax(softcap, scale, temperature, monkeypatch):
    """Values and gradients of the CPU stand-in (blocks of 16 tokens, recomputed in backward) against one direct
    log-softmax over all 50 tokens."""
    from finetune import trl_cpu

    monkeypatch.setattr(trl_cpu, "ROWS_PER_CHUNK", 16)
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    logp, entropy, _, mean, top1 = trl_cpu.TorchChunkedLogProb.apply(
        hidden, weight, None, targets, temperature, 256, softcap, scale, ("entropy", "mean_logits", "is_top1"))
    (logp.sum() + 0.1 * entropy.sum()).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    z = (hidden @ weight.T) * scale
    z = softcap * torch.tanh(z / softcap) if softcap else z
    ref = torch.log_softmax(z / temperature, -1)
    want_logp, want_entropy = ref.gather(-1, targets[:, None])[:, 0], -(ref.exp() * ref).sum(-1)
    assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-4)
    assert torch.allclose(mean, (z / temperature).mean(-1), atol=1e-5)
    assert torch.equal(top1, ref.argmax(-1) == targets)
    (want_logp.sum() + 0.1 * want_entropy.sum()).backward()
    assert torch.allclose(got[0], hidden.grad, atol=1e-4) and torch.allclose(got[1], weight.grad, atol=1e-4)


def test_grpo_generation_keeps_the_kv_cache_under_gradient_checkpointing(tiny_llm):
    """TRL generates in training mode, where a checkpointed layer drops the cache while generate still feeds one new
    token a step: the model would see the last token alone. GRPOValidating turns checkpointing off for generation:
    the same tokens as without checkpointing, the cache used (one token a step after the prompt), and on again."""
    from transformers import AutoModelForCausalLM

    from finetune import rl

    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    class Base:  # stands in for GRPOTrainer: its generation, called as TRL calls it
        def __init__(self, model):
            self.model = model

        def _generate_single_turn(self, ids):
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                      do_sample=False, pad_token_id=0)

    want = Base(model)._generate_single_turn(ids)
    model.gradient_checkpointing_enable()
    model.train()
    lengths = []
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    got = rl.grpo_trainer_class(Base)(model)._generate_single_turn(ids)
    assert torch.equal(got, want) and lengths == [6, 1, 1, 1]
    assert model.is_gradient_checkpointing and model.model.layers[0].gradient_checkpointing
    assert not torch.equal(Base(model)._generate_single_turn(ids), want)  # what TRL's own call would generate
