"""Bad input that is not data: one line, exit status 2, no traceback. (Bad data: the table in test_bad_data.py.)"""
from conftest import run_cli


def test_eval_rejects_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "weights").mkdir()
    r = run_cli("eval.py", "-c", tmp_path / "weights", "--test-data", tmp_path / "x.jsonl")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a run of train.py" in r.stderr.strip().splitlines()[-1]
