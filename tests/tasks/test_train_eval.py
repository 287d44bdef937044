"""Training on the synthetic tasks, and evaluation far past the training length in constant memory."""

import json

import pytest
import torch

from mambastep.evidence.tasks import task
from mambastep.evidence.tasks.evaluate import (
    MEASURED,
    OUT_OF_MEMORY,
    OUT_OF_TIME,
    EvalSettings,
    evaluate,
    evaluate_model,
    markdown_table,
    parse_lengths,
    score,
)
from mambastep.evidence.tasks.layers import LAYERS, layer_config, layer_name
from mambastep.evidence.tasks.train import TaskTrainSettings, correct, train_task
from mambastep.models import MambaLM, TransformerLM
from mambastep.models.config import GPTNeoXConfig, MambaConfig
from mambastep.training.settings import OptimSettings


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_has_the_papers_shell(layer):
    config = layer_config(layer, 16)
    assert (config.d_model, config.n_layer, config.vocab_size) == (64, 2, 16)
    assert layer_name(config) == layer


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_trains_and_its_run_loads(layer, tmp_path):
    settings = TaskTrainSettings(
        task="induction_heads",
        task_settings={"train_length": 16},
        layer=layer,
        out=str(tmp_path / layer),
        steps=3,
        batch_size=4,
        eval_every=3,
        eval_count=8,
        progress=False,
    )
    record = train_task(settings)
    assert record["steps"] == 3 and record["layer"] == layer and len(record["curve"]) == 1
    report = evaluate("induction_heads", [tmp_path / layer], EvalSettings(lengths=(16,), count=8, progress=False))
    assert report["rows"][0]["accuracy"] == pytest.approx(record["validation_accuracy"], abs=1e-6)


def test_a_run_continues_from_another_of_the_same_task_and_layer(tmp_path):
    common = dict(
        task="induction_heads",
        task_settings={"train_length": 16},
        layer="s6",
        batch_size=4,
        eval_every=2,
        eval_count=8,
        progress=False,
    )
    train_task(TaskTrainSettings(out=str(tmp_path / "first"), steps=3, **common))
    record = train_task(TaskTrainSettings(out=str(tmp_path / "more"), steps=2, init=str(tmp_path / "first"), **common))
    assert record["steps"] == 5
    with pytest.raises(ValueError, match="cannot continue"):
        train_task(
            TaskTrainSettings(
                **{**common, "task_settings": {"train_length": 32}},
                out=str(tmp_path / "other"),
                steps=2,
                init=str(tmp_path / "first"),
            )
        )


def test_a_short_run_beats_chance(tmp_path):
    """Selective copying at a small scale: 4 tokens to copy from 32 positions, learnt within seconds."""
    settings = TaskTrainSettings(
        task="selective_copying",
        task_settings={"n_memorize": 4, "train_length": 32},
        layer="s6",
        out=str(tmp_path / "run"),
        steps=300,
        batch_size=32,
        optim=OptimSettings(lr=3e-3, weight_decay=0.0),
        eval_every=100,
        eval_count=256,
        progress=False,
    )
    record = train_task(settings)
    chance = 1 / task("selective_copying").n_answers
    assert record["validation_accuracy"] > 3 * chance, record["curve"]
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "task.json").read_text())
    assert saved["task_settings"] == {"vocab_size": 16, "n_memorize": 4, "train_length": 32}
    report = evaluate("selective_copying", [tmp_path / "run"], EvalSettings(lengths=(32,), count=256, progress=False))
    assert report["rows"][0]["accuracy"] == pytest.approx(record["validation_accuracy"], abs=1e-6)
    with pytest.raises(ValueError, match="already holds"):
        train_task(settings)


def _random_model(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=16, d_state=4)).eval()


def test_prefill_and_steps_score_like_one_forward_pass():
    model, batch = _random_model(), task("selective_copying", n_memorize=5).validation_set(60, 8)
    logits, _ = model(batch.tokens)
    assert score(model, batch) == correct(logits, batch.targets)


def test_evaluation_at_a_long_length_takes_constant_memory():
    model, heads = _random_model(), task("induction_heads")
    settings = EvalSettings(lengths=(2**12, 2**18), count=2, batch_size=2, progress=False)
    rows = evaluate_model(model, heads, settings, "s6")
    assert [r["status"] for r in rows] == [MEASURED, MEASURED]
    assert rows[1]["input_bytes"] == 2 * 2 * 2**18 * 8  # the validation tokens and targets themselves
    assert rows[1]["peak_rss_added"] < rows[1]["input_bytes"] + 64 * 2**20, rows
    assert rows[1]["state_bytes"] == rows[0]["state_bytes"]


def test_attention_reports_what_does_not_fit():
    torch.manual_seed(0)
    model = TransformerLM(GPTNeoXConfig(d_model=16, n_layer=2, n_heads=2, vocab_size=16, rotary_pct=1.0)).eval()
    heads = task("induction_heads")
    out_of_memory = evaluate_model(
        model, heads, EvalSettings(lengths=(64, 2**20), count=1, memory_budget=2**20, progress=False), "attention"
    )
    assert [r["status"] for r in out_of_memory] == [MEASURED, OUT_OF_MEMORY]
    out_of_time = evaluate_model(
        model, heads, EvalSettings(lengths=(64, 2**20), count=1, time_budget_s=1.0, progress=False), "attention"
    )
    assert [r["status"] for r in out_of_time] == [MEASURED, OUT_OF_TIME]
    assert out_of_time[1]["predicted_s"] > 1.0


def test_markdown_table_marks_skipped_lengths():
    report = {
        "lengths": [64, 2**20],
        "models": [{"name": "attention"}],
        "rows": [
            {"model": "attention", "length": 64, "status": MEASURED, "accuracy": 0.5},
            {"model": "attention", "length": 2**20, "status": OUT_OF_MEMORY},
        ],
    }
    table = markdown_table(report)
    assert "| attention | 50.0 | OOM |" in table and "2^20" in table


@pytest.mark.parametrize("text, lengths", [("64..256", (64, 128, 256)), ("100", (100,)), ("64,4096", (64, 4096))])
def test_parse_lengths(text, lengths):
    assert parse_lengths(text) == lengths


@pytest.mark.parametrize("text", ["", "0", "63..256", "256..64", "a..b", "64,-1"])
def test_parse_lengths_refuses_bad_ranges(text):
    with pytest.raises(ValueError, match="lengths"):
        parse_lengths(text)


def test_bad_training_settings(tmp_path):
    with pytest.raises(ValueError, match="layer"):
        TaskTrainSettings(task="induction_heads", layer="lstm", out=str(tmp_path))
    with pytest.raises(ValueError, match="steps"):
        TaskTrainSettings(task="induction_heads", layer="s6", out=str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="unknown task"):
        train_task(TaskTrainSettings(task="copying", layer="s6", out=str(tmp_path)))
    with pytest.raises(ValueError, match="too short"):
        train_task(
            TaskTrainSettings(task="induction_heads", task_settings={"train_length": 2}, layer="s6", out=str(tmp_path))
        )


def test_memory_the_system_cannot_tell_is_no_limit(monkeypatch):
    """Where psutil cannot tell the available memory, nothing is skipped as out of memory."""
    import psutil

    from mambastep import memory

    def unknown():
        raise OSError("no memory information here")

    monkeypatch.setattr(psutil, "virtual_memory", unknown)
    assert memory.available_memory() is None
    rows = evaluate_model(
        _random_model(), task("induction_heads"), EvalSettings(lengths=(64,), count=1, progress=False), "s6"
    )
    assert [r["status"] for r in rows] == [MEASURED]
