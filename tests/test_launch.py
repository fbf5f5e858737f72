"""The batch plan behind --total-batch-size / --auto-batch-size, and the --split-model guard (table-driven)."""
import pytest

from finetune import launch


@pytest.mark.parametrize("total, max_per_device, world, groups, expected", [
    (64, 8, 1, 1, (8, 8)),
    (64, 8, 2, 1, (8, 4)),
    (64, 8, 4, 1, (8, 2)),
    (24, 16, 1, 1, (12, 2)),   # the largest per-device batch that divides evenly, not just -b
    (6, 8, 2, 1, (3, 1)),
    (7, 8, 1, 1, (7, 1)),
    (16, 8, 2, 4, (8, 1)),     # GRPO: whole groups of 4 completions per device
    (24, 8, 1, 4, (8, 3)),
])
def test_plan_batch_splits_the_total_exactly(total, max_per_device, world, groups, expected):
    per_device, accumulation = launch.plan_batch(total, max_per_device, world, groups)
    assert (per_device, accumulation) == expected
    assert world * per_device * accumulation == total and per_device <= max_per_device


@pytest.mark.parametrize("total, max_per_device, world, groups, suggestion", [
    (30, 8, 4, 1, "use 28 or 32"),
    (10, 8, 1, 4, "use 8 or 12"),
    (3, 8, 4, 1, "use 4"),
])
def test_plan_batch_names_the_nearest_totals(total, max_per_device, world, groups, suggestion):
    with pytest.raises(ValueError, match=suggestion):
        launch.plan_batch(total, max_per_device, world, groups)


def test_auto_batch_size_keeps_the_total_and_takes_the_largest_that_fits():
    candidates = launch.batch_candidates(48, 16, 2)
    assert candidates == [12, 8, 6, 4, 3, 2, 1]
    tried = []

    def fits(p):  # a GPU that holds at most 5 samples of the longest batch
        tried.append(p)
        return p <= 5

    assert launch.largest_fitting(candidates, fits) == 4 and tried == [12, 8, 6, 4]
    with pytest.raises(ValueError, match="--max-len"):
        launch.largest_fitting([2, 1], lambda p: False)


def test_split_model_refused_under_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.split_model_error(True) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.split_model_error(False) is None
    assert "--split-model" in launch.split_model_error(True) and "torchrun" in launch.split_model_error(True)


def test_train_cli_prints_the_plan_error_in_one_line():
    from conftest import run_cli

    r = run_cli("train.py", "-m", "x", "--train-data", "x.jsonl", "--total-batch-size", "30",
                "--max-batch-size-per-device", "8", env={"WORLD_SIZE": "4", "RANK": "0"})
    assert r.returncode == 2 and r.stderr.strip() == ("error: --total-batch-size 30 cannot be split evenly over 4 "
                                                      "processes: use 28 or 32")


@pytest.mark.parametrize("flag, value", [("-b", "0"), ("--grad-accum", "0"), ("--max-len", "-1"), ("-r", "0")])
def test_train_cli_rejects_sizes_below_one(flag, value):
    from conftest import run_cli

    r = run_cli("train.py", "-m", "x", "--train-data", "x.jsonl", flag, value)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --") and "at least 1" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("script, flag", [("eval.py", "-b"), ("eval.py", "--limit"), ("generate.py", "-b")])
def test_eval_and_generate_reject_sizes_below_one(script, flag):
    from conftest import run_cli

    source = ["-m", "x", "--test-data"] if script == "eval.py" else ["-c", "log/x", "--data"]
    r = run_cli(script, *source, "x.jsonl", flag, "0")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --") and "at least 1" in r.stderr
