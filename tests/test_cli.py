"""The command lines users bring: RVL-CDIP layout with the seed-style flags, --config YAML, W&B offline,
--resume, eval on the RVL-CDIP test split, and a zero-shot baseline."""
import json

from conftest import run_cli, write_jsonl

SECRETS = {"HF_TOKEN": "hf_SECRETtoken123", "WANDB_API_KEY": "wandbSECRETkey456",
           "MLFLOW_TRACKING_PASSWORD": "mlflowSECRET789"}


def rvl_folder(folder, n_per_split):
    """An RVL-CDIP OCR layout with 3 of the 16 classes: the class word appears in the OCR text."""
    folder.mkdir()
    words = {0: "dear sir letter", 2: "from to subject email", 11: "invoice total due amount"}
    for split, n in n_per_split.items():
        for i in range(n):
            idx = list(words)[i % 3]
            (folder / f"{split}_{i:04d}_{idx}_aws.json").write_text(json.dumps({"ocr": f"{words[idx]} page {i}"}))
    return folder


def test_rvl_cdip_seed_flags_config_wandb_resume_and_eval(tiny_llm, tmp_path):
    data = rvl_folder(tmp_path / "rvl", {"train": 12, "validation": 6, "test": 9})
    (tmp_path / "run.yaml").write_text("batch_size: 4\nmax_steps: 2\nsave_steps: 1\nlr: 0.001\n")
    env = {**SECRETS, "WANDB_DIR": str(tmp_path / "wandb")}
    common = ["-m", tiny_llm, "-d", data, "--set-pad-token", "--lora-rank", "4", "--lora-alpha", "8",
              "--max-len", "64", "--generative", "--response-template", "### Classification:", "--mixed-precision",
              "--trainable", "lora", "--name", "rvl", "--log-dir", tmp_path / "log"]
    r = run_cli("train.py", "--config", tmp_path / "run.yaml", *common, "--eval-steps", "1", "--report-to", "wandb",
                env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "log" / "rvl"
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["format"] == "plain" and cfg["batch_size"] == 4 and cfg["lr"] == 0.001 and cfg["lora_rank"] == 4
    assert cfg["classes"][:3] == ["letter", "form", "email"] and len(cfg["classes"]) == 16
    assert list((tmp_path / "wandb").rglob("*.wandb")), "W&B wrote no offline run"

    # --resume continues from the last checkpoint to the new --max-steps, not from scratch
    # ... reporting to MLflow (no MLFLOW_TRACKING_URI: a file store in the log folder) and TensorBoard this time
    r2 = run_cli("train.py", "--config", tmp_path / "run.yaml", *common, "--eval-steps", "1", "--resume",
                 "--max-steps", "4", "--report-to", "mlflow,tensorboard", env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    steps = [x["step"] for x in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in x]
    assert steps == [1, 2, 3, 4]
    assert json.loads((run / "latest" / "run.json").read_text())["checkpoint"]["step"] == 4
    mlflow_loss = [f for f in (tmp_path / "log" / "mlruns").rglob("loss") if f.parent.name == "metrics"]
    assert len(mlflow_loss) == 1 and [int(x.split()[2]) for x in mlflow_loss[0].read_text().splitlines()] == [3, 4]
    events = list(run.rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(e)).Reload().Tags()["scalars"] for e in events))
    assert "train/loss" in tags and "eval/accuracy" in tags, tags

    # no secret from the environment in anything the run wrote (run config, logs, W&B and MLflow files)
    for f in [*run.rglob("*"), *(tmp_path / "wandb").rglob("*"), *(tmp_path / "log" / "mlruns").rglob("*")]:
        if f.is_file():
            blob = f.read_bytes()
            assert not any(v.encode() in blob for v in SECRETS.values()), f

    e = run_cli("eval.py", "-d", data, "-c", run, "-b", "20", "--max-len", "64", "-o", tmp_path / "results")
    assert e.returncode == 0, e.stderr[-3000:]
    m = json.loads((tmp_path / "results" / "64-max-len" / "rvl" / "metrics.json").read_text())
    assert m["samples"] == 9 and m["max_len"] == 64 and set(m["per_class"]) == set(cfg["classes"])


def test_zero_shot_baseline(tiny_llm, tmp_path):
    rows = [{"text": f"doc {i}", "answer": ["red", "blue"][i % 2]} for i in range(6)]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    (tmp_path / "prompts.json").write_text(json.dumps({"question": ["Which colour?"]}))
    r = run_cli("eval.py", "-m", tiny_llm, "--test-data", test, "--classes", tmp_path / "classes.txt",
                "-p", tmp_path / "prompts.json", "-o", tmp_path / "res", "--predict", "generate",
                "--max-new-tokens", "3", "--prefill", "<answer>")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "res" / "1024-max-len" / tiny_llm.rstrip("/").split("/")[-1] / "metrics.json")
                   .read_text())
    assert m["samples"] == 6 and m["checkpoint"] is None and m["predict"] == "generate"
    rows = [l.split("\t") for l in (tmp_path / "res" / "1024-max-len" / tiny_llm.rstrip("/").split("/")[-1] /
                                     "predictions.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 6 and all(r[1] in ("", "red", "blue") for r in rows)
    assert m["invalid"] == sum(r[1] == "" for r in rows)  # unmatched outputs are counted, not dropped
    assert m["accuracy"] == sum(r[1] == r[2] for r in rows) / 6


def test_answers_spelled_differently_count_as_their_class(tiny_llm, tmp_path):
    """'Red.', 'RED', ' red ' are the class red in training (classes merge), in predictions.tsv, in the metrics and
    in the confusion matrix: a correct prediction is never counted wrong for its reference's spelling."""
    spellings = ["red", "Red.", "RED", " red ", "blue", "Blue!", "BLUE", "blue"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}", "answer": a, "question": "Which colour?"}
                                              for i, a in enumerate(spellings)])
    r = run_cli("train.py", "-m", tiny_llm, "--train-data", data, "--validation-data", data, "--max-steps", "1",
                "-b", "4", "--name", "v", "--log-dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "log/v/run.json").read_text())["classes"] == ["red", "blue"]
    assert ("leakage: 0 exact duplicates within train; 8 validation documents also in train (ids line 1, line 2, "
            "line 3, line 4, line 5, ...)") in r.stdout  # the validation file is the training file
    e = run_cli("eval.py", "-c", tmp_path / "log/v", "--test-data", data, "-o", tmp_path / "res")
    assert e.returncode == 0, e.stderr[-3000:]
    out = tmp_path / "res/1024-max-len/v"
    rows = [l.split("\t") for l in (out / "predictions.tsv").read_text().splitlines()[1:]]
    assert [r[2] for r in sorted(rows, key=lambda r: int(r[0].split()[-1]))] == ["red"] * 4 + ["blue"] * 4
    m = json.loads((out / "metrics.json").read_text())
    assert sum(map(sum, m["confusion_matrix"]["counts"])) == 8  # every sample is in the matrix
    assert m["accuracy"] == sum(r[1] == r[2] for r in rows) / 8


def test_help_imports_no_ml_library():
    """--help must answer at once (under 2 s): no CLI imports torch / transformers to print it.
    Timing is measured, not asserted; what is asserted is the cause of slowness, the imports."""
    import subprocess
    import sys

    from conftest import ROOT

    for script in ("train.py", "eval.py", "export.py", "generate.py", "dataset.py"):
        code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
                f"try:\n    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr[-2000:])
        assert r.stdout.strip().splitlines()[-1] == "[]", (script, r.stdout.strip().splitlines()[-1])
