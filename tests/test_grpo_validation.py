"""GRPO as users run it: the workflow's command line with --validation-data, validation that scores greedy answers
(each reward's mean, the share of well-formed replies, closed-set accuracy), best/ and early stopping by --metric,
--init-adapter from an SFT run, and rewards that fail named in one line."""
import json

from conftest import run_cli

WORDS = "the a small big old new house tree river stone cloud paper window garden road light".split()


def _listing(folder, name, n, seed, answers=True):
    """The TSV workflow: a listing of sample JSON files (paths relative to it), a closed set red / blue."""
    import random

    rng = random.Random(seed)
    files = folder / name
    files.mkdir(parents=True, exist_ok=True)
    lines = ["file\tlabel"]
    for i in range(n):
        label = ["red", "blue"][i % 2]
        words = rng.sample(WORDS, 5) + [label]
        rec = {"text": " ".join(words), **({"answer": label} if answers else {})}
        (files / f"{name}{i}.json").write_text(json.dumps(rec))
        lines.append(f"{name}/{name}{i}.json\t{label}")
    (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.tsv"


def _prompts(folder):
    p = folder / "prompts.json"
    p.write_text(json.dumps({"system": ["You sort texts by colour."],
                             "question": ["Which colour does the text name: red or blue?"]}))
    return p


def _log(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]


def test_the_workflow_line_with_grpo_validates_saves_best_and_stops_early(tiny_llm, tmp_path):
    train, val, prompts = _listing(tmp_path, "train", 16, 0), _listing(tmp_path, "val", 6, 1), _prompts(tmp_path)
    log = tmp_path / "log"
    line = ["-m", tiny_llm, "--train-data", train, "--validation-data", val, "-p", prompts, "-b", "8",
            "--log-dir", log]
    sft = run_cli("train.py", *line, "--name", "sft", "--max-steps", "2")
    assert sft.returncode == 0, sft.stderr[-3000:]
    grpo = ["--trainer", "grpo", "--prefill", "<reasoning>", "--max-completion-len", "12"]
    # the reply must carry <answer>: the tiny model never writes one, so accuracy stays 0 and --early-stopping 1
    # stops after the second validation without an improvement (the step-0 baseline does not count)
    r = run_cli("train.py", *line, *grpo, "--name", "grpo", "--eval-steps", "1", "--max-steps", "6",
                "--early-stopping", "1", "--rewards", "structure,correct", "--reward-weights", "1,2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = log / "grpo"
    evals = [x for x in _log(run) if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 1, 2], evals
    for x in evals:
        assert x["eval_accuracy"] == 0.0 and x["eval_format"] == 0.0
        assert x["eval_reward"] == x["eval_rewards/structure"] + 2 * x["eval_rewards/correct"]
    shown = [x for x in r.stdout.splitlines() if "validation: " in x]
    assert len(shown) == 3 and shown[0].startswith("step 0/") and "accuracy 0  reward " in shown[0], r.stdout
    assert "format 0" in shown[0] and "rewards/correct 0" in shown[0], shown
    assert "early stopping: no improvement of accuracy" in r.stdout
    best = json.loads((run / "best" / "run.json").read_text())["checkpoint"]
    assert best == {"step": 0, "eval_accuracy": 0.0}
    assert (run / "curves.png").stat().st_size > 10_000

    # from the SFT adapter, best/ by the reward; --validation-split instead of a file
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", train, "-p", prompts, "-b", "8", "--log-dir", log,
                *grpo, "--init-adapter", log / "sft" / "best", "--validation-split", "4", "--metric", "reward",
                "--max-steps", "2", "--eval-steps", "2", "--name", "grpo-sft")
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in _log(log / "grpo-sft") if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 2] and all("eval_accuracy" in x for x in evals)
    assert "eval_reward" in json.loads((log / "grpo-sft" / "best" / "run.json").read_text())["checkpoint"]


PICKY = '''
def picky(completions, answer, **kw):
    """Knows only the two colours: any other reply is a KeyError."""
    return [{"red": 1.0, "blue": 0.5}[c.strip()] for c in completions]


def broken(completions, **kw):
    return [1 / 0 for c in completions]
'''


def test_a_reward_that_crashes_is_named_with_the_sample(tiny_llm, tmp_path):
    train, val, prompts = _listing(tmp_path, "train", 8, 0), _listing(tmp_path, "val", 2, 1), _prompts(tmp_path)
    (tmp_path / "mine.py").write_text(PICKY)
    base = ["--trainer", "grpo", "-m", tiny_llm, "--train-data", train, "-p", prompts, "-b", "8",
            "--max-completion-len", "4", "--max-steps", "1", "--log-dir", tmp_path / "log"]
    # it runs on the reference answers, so only the model's first completion breaks it: at the step-0 validation
    r = run_cli("train.py", *base, "--validation-data", val, "--rewards", f"{tmp_path / 'mine.py'}:picky",
                "--name", "picky")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward 'picky' failed on sample 'val") and "KeyError" in last, last
    # without validation: the first training step's completions
    r = run_cli("train.py", *base, "--rewards", f"{tmp_path / 'mine.py'}:picky", "--name", "picky-train")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: reward 'picky' failed on sample 'train"), r.stderr[-3000:]
    # a reward that fails on anything: before the model loads, nothing written
    r = run_cli("train.py", *base, "--rewards", f"structure,{tmp_path / 'mine.py'}:broken", "--name", "broken")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: --train-data: reward 'broken' failed on sample 'train0' (completion 'red'): ZeroDivisionError")
    assert not (tmp_path / "log" / "broken").exists()


def test_validation_without_answers_for_a_correctness_reward_stops_before_loading(tiny_llm, tmp_path):
    train, prompts = _listing(tmp_path, "train", 8, 0), _prompts(tmp_path)
    val = _listing(tmp_path, "val", 2, 1, answers=False)
    r = run_cli("train.py", "--trainer", "grpo", "-m", tmp_path / "no-model", "--train-data", train,
                "--validation-data", val, "-p", prompts, "-b", "8", "--rewards", "structure,correct",
                "--log-dir", tmp_path / "log")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --validation-data {tmp_path / 'val/val0.json'}: no sample has an answer (field 'answer'; first "
        "sample 'val0'), which the reward 'correct' compares with"], r.stderr
    assert not (tmp_path / "log").exists()
    # a reward that needs no reference is content with such data
    from finetune import rl
    from finetune.sources import load_samples

    import rewards
    samples = load_samples(val, json.loads(prompts.read_text()), require_answer=False)
    rl.check_rewards([rewards.structure], samples, "<reasoning>", "--validation-data")


def test_a_vision_language_model_runs_the_same_line_on_text(tiny_vlm, tmp_path):
    train, val, prompts = _listing(tmp_path, "train", 8, 0), _listing(tmp_path, "val", 2, 1), _prompts(tmp_path)
    r = run_cli("train.py", "-m", tiny_vlm, "--train-data", train, "--validation-data", val, "-p", prompts, "-b", "8",
                "--trainer", "grpo", "--prefill", "<reasoning>", "--max-completion-len", "4", "--max-steps", "1",
                "--name", "vlm", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in _log(tmp_path / "log" / "vlm") if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 1] and all("eval_accuracy" in x for x in evals)


def _pictures(folder, name, n, seed):
    """The TSV workflow on images: a listing of sample JSON files, each an image and its colour (red / blue)."""
    from tiny_models import make_images

    images = make_images(folder / name, n, seed)
    lines = ["file\tlabel"]
    for i, (png, colour) in enumerate(images):
        (folder / name / f"{name}{i}.json").write_text(json.dumps({"image": png, "answer": colour}))
        lines.append(f"{name}/{name}{i}.json\t{colour}")
    (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.tsv"


SEES = '''
def sees(completions, prompts, **kw):
    """1.0 where the reward is handed a chat completion whose prompt shows an image: the form TRL gives them."""
    def shows(prompt):
        return isinstance(prompt, list) and any(isinstance(m["content"], list) and
                                                any(p["type"] == "image" for p in m["content"]) for m in prompt)
    return [float(isinstance(c, list) and c[0]["role"] == "assistant" and shows(p))
            for c, p in zip(completions, prompts)]
'''


def test_the_workflow_line_with_grpo_trains_on_images(tiny_vlm, tmp_path):
    train, val = _pictures(tmp_path, "train", 8, 0), _pictures(tmp_path, "val", 4, 1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"system": ["You sort pictures by colour."],
                                   "question": ["Which colour is the square: red or blue?"]}))
    (tmp_path / "mine.py").write_text(SEES)
    line = ["-m", tiny_vlm, "--train-data", train, "--validation-data", val, "-p", prompts, "-b", "4",
            "--log-dir", tmp_path / "log"]
    # the SFT line with GRPO's options added
    r = run_cli("train.py", *line, "--trainer", "grpo", "--prefill", "<reasoning>", "--num-generations", "2",
                "--max-completion-len", "6", "--max-steps", "2", "--name", "pics",
                "--rewards", f"structure,correct,{tmp_path / 'mine.py'}:sees")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "pics"
    logged = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert {x["reward"] for x in logged} == {"structure", "correct", "sees"}
    assert all(isinstance(x["completion"], str) and x["prefill"] == "<reasoning>" for x in logged)
    assert all(x["value"] == 1.0 for x in logged if x["reward"] == "sees"), logged
    steps = [x for x in _log(run) if "rewards/sees/mean" in x]
    assert len(steps) == 2 and all(x["rewards/sees/mean"] == 1.0 for x in steps)
    evals = [x for x in _log(run) if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 2], evals
    assert all(x["eval_rewards/sees"] == 1.0 and "eval_accuracy" in x and "eval_format" in x for x in evals)
    assert (run / "best" / "adapter_model.safetensors").is_file()

    # a training set that mixes samples with and without images: one line before the model loads
    (tmp_path / "train" / "train1.json").write_text(json.dumps({"text": "a blue thing", "answer": "blue"}))
    r = run_cli("train.py", *line, "--trainer", "grpo", "--name", "mixed")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'train' / 'train1.json'}: sample train1: field 'image': GRPO on images needs one in "
        "every training sample: TRL's GRPOTrainer cannot batch prompts with and without images")
    assert not (tmp_path / "log" / "mixed").exists()


def test_trl_generates_from_the_prompt_sft_and_eval_render_for_an_image_sample(tiny_vlm, tmp_path):
    """The token ids TRL's GRPOTrainer generates from (its own chat rendering, the prefill continued) equal what
    the Formatter renders for SFT and eval, the processor expanding the image into its vision tokens."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from dataset import Formatter, load_prompts
    from finetune import rl, training
    from finetune.sources import load_samples
    from tiny_models import IMAGE_PAD

    train = _pictures(tmp_path, "train", 2, 0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"system": ["You sort pictures.", "Sort the pictures."],
                                   "question": ["Red or blue?", "Which colour is the square?"]}))
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    samples = load_samples(train, load_prompts(prompts))
    cls = rl.grpo_trainer_class(training.make_trainer_class(GRPOTrainer))
    trainer = cls(model=AutoModelForImageTextToText.from_pretrained(tiny_vlm), processing_class=processor,
                  reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                  args=GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                                  per_device_train_batch_size=2, num_generations=2),
                  train_dataset=rl.grpo_dataset(Formatter(processor.tokenizer, processor), samples, None, True))
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for prefill in (None, "<reasoning>"):
        fmt = Formatter(processor.tokenizer, processor, max_len=256, prompts=load_prompts(prompts), prefill=prefill)
        row = rl.grpo_dataset(fmt, samples, prefill, chat=True)[0]
        # what TRL does with a batch: the images into the prompt's image parts, then its own rendering
        ids, images, fields = trainer._tokenize_prompts([prepare_multimodal_messages(row["prompt"], row["images"])])
        image = Image.open(samples[0].image).convert("RGB")
        want = processor(text=[fmt.prompt_text(samples[0], train=True)], images=[image])["input_ids"][0]
        assert list(ids[0]) == list(want), (prefill, ids[0], want)
        assert ids[0].count(pad) == int(fields["image_grid_thw"].prod()) // 4 > 1  # 2x2 patches merge into a token
        assert images == [[row["images"][0]]] and "pixel_values" in fields
        text = processor.decode(ids[0])
        assert text.endswith("<|im_start|>assistant\n" + (prefill or "")) and "<|im_end|>" not in text[-30:], text
