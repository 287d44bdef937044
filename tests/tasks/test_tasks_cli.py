"""`mambastep tasks train|eval` and `mambastep inspect --task` end to end."""

import json

import pytest

from mambastep.cli import main
from mambastep.tasks.train import shipped_runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "copy-s6"
    args = ["tasks", "train", "selective_copying", "--layer", "s6", "--out", str(out), "--length", "24", "--n-memorize", "3",
            "--steps", "30", "--batch-size", "8", "--eval-every", "10", "--eval-count", "16", "--json"]
    assert main(args) == 0
    return out


def test_train_writes_a_loadable_run(run_dir, capsys):
    record = json.loads((run_dir / "task.json").read_text())
    assert record["steps"] == 30 and record["train_length"] == 24 and record["task_settings"]["n_memorize"] == 3
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "curve.png").is_file()


def test_eval_prints_a_table_and_writes_its_files(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["tasks", "eval", "selective_copying", "--model", str(run_dir), "--lengths", "24,96", "--count", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| s6 (trained at 24) |" in out and "| 24 | 96 |" in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [r["length"] for r in report["rows"]] == [24, 96]
    assert (tmp_path / "eval" / "accuracy.png").stat().st_size > 1000


def test_inspect_task_highlights_the_data_tokens(run_dir, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "selection.png"
    assert main(["inspect", "--task", "selective_copying", "--model", str(run_dir), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["highlighted_over_other"] is not None  # the 3 data tokens were marked


def test_eval_refuses_a_run_of_another_task(run_dir, tmp_path, capsys):
    assert main(["tasks", "eval", "induction_heads", "--model", str(run_dir), "--lengths", "64", "--out", str(tmp_path)]) == 1
    assert "was trained on 'selective_copying'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["selective_copying", "induction_heads"])
def test_shipped_runs_evaluate_out_of_the_box(name, tmp_path, capsys):
    runs = shipped_runs(name)
    assert {json.loads((r / "task.json").read_text())["layer"] for r in runs} >= {"s6"}
    assert main(["tasks", "eval", name, "--lengths", "256", "--count", "2", "--out", str(tmp_path)]) == 0
