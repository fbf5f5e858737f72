"""train.py's options: typed, grouped, frozen once parsed; derived values recorded as such; and run folders whose
run.json is in the format written before the options were typed still load in eval, generate, export and --resume
(tests/fixtures/run-json-2026-12.json, a run.json as train.py wrote it on 2026-12-03 at 8ca898c)."""
import dataclasses
import json
from pathlib import Path

import pytest

import train
from conftest import run_cli, write_jsonl
from finetune import config

FIXTURE = Path(__file__).parent / "fixtures" / "run-json-2026-12.json"
ROWS = [{"id": f"s{i}", "text": f"the {'red' if i % 2 else 'blue'} house", "answer": "red" if i % 2 else "blue",
         "question": "Which colour?"} for i in range(16)]


def test_every_option_has_exactly_one_group():
    dests = {a.dest for a in train.build_parser()._actions if a.dest != "help"}
    grouped = [f.name for cls in config.GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == dests


def test_options_are_frozen_and_derived_values_are_recorded_as_such(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", ROWS)
    opts = train.parse_args(["-m", "some/model", "--train-data", str(data), "--lr", "1e-3", "--name", "n"])
    assert isinstance(opts, config.Options) and opts.training.lr == opts.lr == 1e-3 and opts.lora_alpha == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 1.0
    with pytest.raises(AttributeError):
        opts.no_such_option
    assert getattr(opts, "no_such_option", "absent") == "absent"
    derived = opts.derive(gradient_checkpointing=True, mixed_precision="bf16")
    assert (opts.gradient_checkpointing, derived.gradient_checkpointing) == (None, True)
    record = derived.record()
    assert record["gradient_checkpointing"] is True and record["mixed_precision"] == "bf16"
    assert record["derived"] == {"gradient_checkpointing": True, "mixed_precision": "bf16"}
    assert record["lr"] == 1e-3 and record["name"] == "n"


def test_the_default_name_is_the_model_and_time():
    opts = train.parse_args(["-m", "org/Some-Model", "--train-data", "x.jsonl"])
    assert opts.name.startswith("Some-Model-") and len(opts.name) == len("Some-Model-20261203-061500")


@pytest.fixture(scope="module")
def old_run(tiny_llm, tmp_path_factory):
    """A tiny run trained now, whose run.json files (the run's, best/'s, latest/'s) are then replaced by the fixture:
    what a user upgrading with existing runs in log/ has."""
    tmp = tmp_path_factory.mktemp("old-format")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    log = tmp / "log"
    args = ["-m", tiny_llm, "--train-data", data, "--validation-split", "4", "--max-steps", "2", "-b", "4", "-r", "8",
            "--name", "old", "--log-dir", log]
    r = run_cli("train.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    text = FIXTURE.read_text().replace("{MODEL}", str(tiny_llm)).replace("{DATA}", str(data)).replace("{LOG}", str(log))
    run = log / "old"
    for folder in (run, run / "best", run / "latest"):
        cfg = json.loads(text)
        if folder != run:
            cfg["checkpoint"] = json.loads((folder / "run.json").read_text())["checkpoint"]
        (folder / "run.json").write_text(json.dumps(cfg, indent=2))
    return run, args, tmp


def test_an_old_run_json_loads_in_eval_generate_export_and_resume(old_run):
    run, args, tmp = old_run
    r = run_cli("eval.py", "-c", run, "--split", "validation", "-o", tmp / "eval")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(next((tmp / "eval").rglob("metrics.json")).read_text())
    assert metrics["samples"] == 4 if "samples" in metrics else len(metrics["confusion_matrix"]) == 2
    r = run_cli("generate.py", "-c", run, "--prompt", "Which colour?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export.py", "merge", run, "-o", tmp / "merged")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp / "merged" / "finetune_run.json").read_text())["export"]["dtype"] == "float32"
    r = run_cli("train.py", *[a if a != "2" else "3" for a in args], "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["validation_split_ids"] == json.loads(FIXTURE.read_text())["validation_split_ids"]
    assert cfg["derived"]["gradient_checkpointing"] is False  # the resumed run records what it chose
