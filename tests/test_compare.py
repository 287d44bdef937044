"""``mambastep compare`` end to end on tiny checkpoints, its JSON schema, and its pieces."""

import json
import math

import pytest
import torch

from mambastep.cli import main
from mambastep.evidence import compare, plots
from mambastep.evidence.compare import CompareSettings, synthetic_state
from mambastep.families.presets import random_model
from mambastep.models.config import GPTNeoXConfig, Mamba2Config

from conftest import make_hf_checkpoint

REPORT_KEYS = {"schema", "machine", "settings", "models", "rows", "crossings"}
ROW_KEYS = {
    "model",
    "family",
    "context",
    "batch",
    "ttft_s",
    "ttft_predicted_s",
    "decode_ms_per_token",
    "decode_ms_predicted",
    "decode_measured_over_predicted",
    "state_bytes",
    "peak_rss_extra_bytes",
    "max_batch_in_budget",
    "skipped",
}
CROSSING_KEYS = {
    "transformer",
    "ssm",
    "metric",
    "ratios",
    "crosses_at_context",
    "longest_context",
    "ratio_at_longest_context",
}


def test_compare_end_to_end_on_tiny_checkpoints(tmp_path, capsys, monkeypatch):
    ssm, transformer = (make_hf_checkpoint(tmp_path / f, family=f) for f in ("mamba", "gpt_neox"))
    # Pretend memory is scarce: the transformer's cache at 4096 tokens (2 MiB) is skipped, the SSM's state is not.
    monkeypatch.setattr(compare, "available_memory", lambda: 2**21)
    out = tmp_path / "out"
    args = [
        "compare",
        "--models",
        str(ssm),
        str(transformer),
        "--contexts",
        "4",
        "16",
        "64",
        "4096",
        "--prefill-max",
        "16",
        "--repeats",
        "2",
        "--decode-steps",
        "2",
        "--hardware",
        "cpu",
        "--memory-budget-gib",
        "1",
        "--scan",
        "torch",
        "--out",
        str(out),
    ]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # The progress on stderr names each measurement's model and context as it starts.
    assert "building models" in captured.err and "measuring" in captured.err
    for model, context in [(m, c) for m in (ssm, transformer) for c in (4, 16, 64, 4096)]:
        assert (f"{model}, context {context:,}" in captured.err) == (model == ssm or context < 4096)
    assert set(report) == REPORT_KEYS and report["schema"] == "mambastep.compare/1"
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]
    assert (out / "latency.png").stat().st_size > 0 and (out / "memory.png").stat().st_size > 0
    rows = {(r["model"], r["context"]): r for r in report["rows"]}
    weights = {m["model"]: m["weight_bytes"] for m in report["models"]}
    assert len(rows) == 8 and all(set(r) == ROW_KEYS for r in rows.values())
    for (model, context), r in rows.items():
        skipped = model == str(transformer) and context == 4096
        assert (r["skipped"] is not None) == skipped
        assert (r["ttft_s"] is not None) == (context <= 16)
        assert (r["decode_ms_per_token"] is not None) == (not skipped)
        assert r["ttft_predicted_s"] > 0 and r["decode_ms_predicted"] > 0
        assert r["max_batch_in_budget"] == (2**30 - weights[model]) // r["state_bytes"]
    kv = rows[(str(transformer), 64)]["state_bytes"] - rows[(str(transformer), 16)]["state_bytes"]
    assert kv == 48 * 2 * 2 * 4 * 8 * 4  # tokens x (k, v) x layers x heads x head_dim x float32
    assert rows[(str(ssm), 4)]["state_bytes"] == rows[(str(ssm), 4096)]["state_bytes"]
    assert [c["metric"] for c in report["crossings"]] == [
        "ttft_s",
        "decode_ms_per_token",
        "ttft_predicted_s",
        "decode_ms_predicted",
        "state_bytes",
    ]
    assert all(set(c) == CROSSING_KEYS for c in report["crossings"])
    assert main([*args, "--no-progress"]) == 0  # the readable table
    captured = capsys.readouterr()
    assert "transformer / SSM ratios" in captured.out and "measuring" not in captured.err


@pytest.mark.parametrize(
    "config",
    [
        GPTNeoXConfig(d_model=32, n_layer=2, n_heads=4, vocab_size=97),
        Mamba2Config(d_model=16, n_layer=2, vocab_size=97, d_state=4, head_dim=8),
    ],
)
def test_a_synthetic_state_has_the_size_of_a_real_one(config):
    model = random_model(config)
    _, real = model.prefill(torch.zeros(2, 30, dtype=torch.long))
    fake = synthetic_state(model, 2, 30, torch.Generator().manual_seed(0))
    assert fake.nbytes == real.nbytes
    assert [t.shape for l in fake.layers for t in l.tensors().values()] == [
        t.shape for l in real.layers for t in l.tensors().values()
    ]
    model.step(torch.zeros(2, dtype=torch.long), fake)


def test_crossing_is_interpolated_on_log_axes():
    assert math.isclose(compare._crossing([(100, 0.5), (1000, 2.0)]), math.sqrt(100 * 1000))
    assert compare._crossing([(100, 0.5), (1000, 0.9)]) is None
    assert compare._crossing([(100, 1.5), (1000, 3.0)]) == 100


def test_settings_are_checked():
    with pytest.raises(ValueError, match="contexts must be positive integers"):
        CompareSettings(contexts=(0, 5))
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        CompareSettings(repeats=0)


def test_a_single_context_shows_the_roofline_as_a_point():
    """With one context there is no line to draw: the prediction is a marker, as the measurement is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = {
        "models": [{"model": "m"}],
        "rows": [{"model": "m", "context": 2048, "decode_ms_per_token": 3.0, "decode_ms_predicted": 2.0}],
    }
    fig, ax = plt.subplots()
    plots._panel(ax, report, "decode_ms_per_token", "decode_ms_predicted", "decode (ms per token)")
    drawn = {line.get_linestyle(): line for line in ax.get_lines()}
    plt.close(fig)
    assert list(drawn["--"].get_ydata()) == [2.0] and drawn["--"].get_marker() not in ("", "None", None)
    assert list(drawn["-"].get_ydata()) == [3.0] and drawn["-"].get_marker() not in ("", "None", None)
