"""`mambastep inspect`: the selection trace (Δ and state norms), its plot, its summary and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mambastep
from mambastep.cli import main
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.evidence.selection import (
    SelectionTrace,
    escape_label,
    plot_selection,
    selection_summary,
    token_labels,
    trace_selection,
)
from mambastep.files.checkpoints import read_config, save
from mambastep.files.tokenizer import ByteTokenizer
from mambastep.models import Mamba2LM, MambaLM, MambaLTILM
from mambastep.models.config import Mamba2Config, MambaConfig, MambaLTIConfig

from conftest import make_hf_checkpoint, random_tokens

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOCAB = 32


def tiny_model(family: str, seed: int = 0):
    """A random 2-layer model with 32 inner channels (Mamba-2: 4 heads of 8), weights moved off their init."""
    torch.manual_seed(seed)
    common = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)
    model = {
        "mamba": lambda: MambaLM(MambaConfig(**common)),
        "mamba2": lambda: Mamba2LM(Mamba2Config(**common, head_dim=8)),
        "mamba_lti": lambda: MambaLTILM(MambaLTIConfig(**common)),
    }[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.05 if name.endswith("A_log") else 0.2) * torch.randn_like(p))
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: intra-op threads only wait on each other."""


def full_forward_dt(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Δ of every layer from one full forward pass (the scan path): (l, width) per layer."""
    seen, handles = [], []
    for block in model.backbone.layers:
        handles.append(
            block.mixer.dt_probe.register_forward_hook(lambda m, i, out: seen.append(out[0].float().clone()))
        )
    try:
        with torch.no_grad():
            model(tokens[None])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["mamba", "mamba2", "mamba_lti"])
def test_traced_dt_equals_the_dt_of_one_full_forward(family):
    model = tiny_model(family)
    tokens = random_tokens(VOCAB, 1, 70)[0]  # longer than one scan chunk (64)
    trace = trace_selection(model, tokens, groups=8, progress=False)
    full = full_forward_dt(model, tokens)
    assert trace.family == family and len(trace.dt) == len(full) == 2
    for ours, dt in zip(trace.dt, full):
        assert dt.shape == ((70, 4) if family == "mamba2" else (70, 32))  # 4 heads; 32 channels
        expected = dt if family == "mamba2" else dt.view(70, 8, 4).mean(-1)  # 8 contiguous groups of 4
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_uneven_groups_cover_every_channel_once():
    model = tiny_model("mamba")
    tokens = random_tokens(VOCAB, 1, 9)[0]
    trace = trace_selection(model, tokens, groups=5, progress=False)
    full = full_forward_dt(model, tokens)
    bounds = trace.group_bounds[0]
    assert bounds[0][0] == 0 and bounds[-1][1] == 32 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert {stop - start for start, stop in bounds} == {6, 7}
    expected = torch.stack([full[0][:, a:b].mean(-1) for a, b in bounds], dim=-1)
    torch.testing.assert_close(trace.dt[0], expected, atol=1e-5, rtol=1e-5)
    assert trace_selection(model, tokens, groups=100, progress=False).dt[0].shape == (9, 32)  # at most one per channel


@pytest.mark.parametrize("family", ["mamba", "mamba2", "mamba_lti"])
def test_state_norm_equals_the_norm_of_the_prefilled_state(family):
    model = tiny_model(family)
    tokens = random_tokens(VOCAB, 1, 40)[0]
    trace = trace_selection(model, tokens, progress=False)
    assert trace.state_norm.shape == (2, 40) and trace.state_norm.dtype == torch.float32
    for t in (0, 7, 39):
        _, state = model.prefill(tokens[None, : t + 1])
        for i, layer in enumerate(state.layers):
            torch.testing.assert_close(trace.state_norm[i, t], layer.ssm.float().norm(), atol=1e-5, rtol=1e-5)


def test_only_the_time_invariant_model_has_the_same_dt_at_every_token():
    tokens = random_tokens(VOCAB, 1, 30)[0]
    for family in ("mamba", "mamba2", "mamba_lti"):
        trace = trace_selection(tiny_model(family), tokens, progress=False)
        summary = selection_summary(trace)
        for dt, row in zip(trace.dt, summary["layers"]):
            if family == "mamba_lti":
                assert torch.equal(dt, dt[:1].expand_as(dt))
                assert row["time_invariant"] and row["log_dt_std_over_tokens"] == pytest.approx(0, abs=1e-6)
            else:
                assert (dt.max(0).values / dt.min(0).values).max() > 1.05, family
                assert not row["time_invariant"] and row["log_dt_std_over_tokens"] > 1e-3


def test_bad_inputs_are_refused_and_hooks_are_always_removed(monkeypatch):
    from mambastep.models import TransformerLM
    from mambastep.models.config import GPTNeoXConfig

    transformer = TransformerLM(GPTNeoXConfig(d_model=16, n_layer=1, n_heads=2, vocab_size=VOCAB))
    with pytest.raises(
        ValueError, match=r"inspect needs a state space model \(mamba, mamba_lti, mamba2\), got gpt_neox"
    ):
        trace_selection(transformer, [1, 2])
    model = tiny_model("mamba2")
    probes = [block.mixer.dt_probe for block in model.backbone.layers]
    with pytest.raises(ValueError, match="empty input"):
        trace_selection(model, [])
    with pytest.raises(ValueError, match=r"token id 32 is outside the model's vocabulary \[0, 32\)"):
        trace_selection(model, [1, 32])
    with pytest.raises(ValueError, match="groups"):
        trace_selection(model, [1, 2], groups=0)

    calls = []

    def failing_forward(tokens, state=None):
        calls.append(tokens)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return type(model).forward(model, tokens, state)

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        trace_selection(model, [1, 2, 3, 4], progress=False)
    assert len(calls) == 3
    assert all(len(p._forward_hooks) == 0 for p in probes)
    monkeypatch.undo()
    trace_selection(model, [1, 2], progress=False)
    assert all(len(p._forward_hooks) == 0 for p in probes)


def test_labels_escape_what_would_not_render():
    assert escape_label("a b\n\t$\x00") == "a\u2423b\\n\\t\\$\\x00"
    assert escape_label("") == "\u2205"
    assert token_labels(ByteTokenizer(), list("é\n".encode())) == ["\\xc3", "\\xa9", "\\n"]


def read_png(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return plt.imread(path)


@pytest.mark.parametrize("length", [20, 600])
@pytest.mark.parametrize("with_highlight", [False, True])
def test_plot_writes_a_png(tmp_path, length, with_highlight):
    family = "mamba" if length == 20 else "mamba_lti"
    trace = trace_selection(tiny_model(family), random_tokens(VOCAB, 1, length)[0], progress=False)
    labels = [escape_label(s) for s in ["a", " ", "\n", "$x$", "é"] * 4] if length == 20 else None
    highlight = (trace.tokens % 5 == 0) if with_highlight else None
    out = plot_selection(trace, tmp_path / "sub" / "sel.png", labels=labels, highlight=highlight, title="t")
    assert out == tmp_path / "sub" / "sel.png"
    image = read_png(out)
    height, width = image.shape[:2]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 500 < width < 3000 and 400 < height < 3000
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_refuses_labels_of_the_wrong_length(tmp_path):
    trace = trace_selection(tiny_model("mamba2"), [1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="one string per token"):
        plot_selection(trace, tmp_path / "x.png", labels=["a"])


def test_summary_of_a_hand_made_trace():
    trace = SelectionTrace(
        tokens=torch.tensor([5, 1, 5, 1]),
        dt=[
            torch.tensor([[1.0], [8.0], [1.0], [8.0]]),  # Δ 8x larger at highlighted positions
            torch.tensor([[1.0, 3.0], [2.0, 2.0], [1.0, 3.0], [2.0, 2.0]]),  # the same on average
        ],
        state_norm=torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.25]]),
        family="mamba",
    )
    highlight = torch.tensor([False, True, False, True])
    summary = selection_summary(trace, highlight)
    json.dumps(summary, allow_nan=False)
    first, second = summary["layers"]
    assert first["mean_dt"] == pytest.approx(4.5) and second["mean_dt"] == pytest.approx(2.0)
    assert first["mean_dt_highlighted"] == pytest.approx(8.0) and first["mean_dt_other"] == pytest.approx(1.0)
    assert first["highlighted_over_other"] == pytest.approx(8.0) and second["highlighted_over_other"] == pytest.approx(
        1.0
    )
    assert first["final_state_norm"] == 4.0 and second["final_state_norm"] == 0.25
    assert summary["mean_dt"] == pytest.approx(3.25) and summary["highlighted_positions"] == 2
    assert summary["mean_dt_highlighted"] == pytest.approx(5.0) and summary["mean_dt_other"] == pytest.approx(1.5)
    assert summary["highlighted_over_other"] == pytest.approx(5.0 / 1.5)
    nothing = selection_summary(trace, torch.zeros(4, dtype=torch.bool))
    assert nothing["highlighted_over_other"] is None and nothing["layers"][0]["mean_dt_highlighted"] is None
    assert "highlighted_over_other" not in selection_summary(trace)
    with pytest.raises(ValueError, match="boolean mask"):
        selection_summary(trace, torch.tensor([0, 1, 0, 1]))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_ids_on_a_tiny_model_without_tokenizer(tmp_path, capsys):
    model_dir = save(tiny_model("mamba_lti"), tmp_path / "lti")
    out = tmp_path / "plots" / "lti.png"
    assert (
        main(
            [
                "inspect",
                "--model",
                str(model_dir),
                "--ids",
                "3,1,4,1,5,9,2,6",
                "--highlight-ids",
                "1",
                "--groups",
                "4",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["png"] == str(out) and read_png(out).shape[0] > 300
    assert summary["family"] == "mamba_lti" and summary["tokens"] == 8 and summary["highlighted_positions"] == 2
    assert all(row["time_invariant"] and row["groups"] == 4 for row in summary["layers"])
    assert summary["highlighted_over_other"] == pytest.approx(1.0, rel=1e-5)  # an LTI model cannot select


def test_cli_text_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "sel.png"
    [period] = mambastep.load_tokenizer(DEFAULT_MODEL).encode(".")
    n_layer = read_config(DEFAULT_MODEL).n_layer
    text = "The cat sat on the mat.\n"
    assert main(["inspect", "--input", text, "--highlight-ids", str(period), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"layer {n_layer - 1}" in printed and "highlighted / other" in printed
    read_png(out)
    text = tmp_path / "in.txt"
    text.write_text("hello\n", encoding="utf-8")
    assert main(["inspect", "--input-file", str(text), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "mamba2" and summary["tokens"] == 2  # "hello", "\n"
    assert len(summary["layers"]) == n_layer


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "GPT", "--ids", "1,2"],
            "inspect needs a state space model (mamba, mamba_lti, mamba2), got gpt_neox",
        ),
        (["--input", ""], "empty input"),
        (["--ids", "1,8192"], "token id 8192 is outside the model's vocabulary [0, 8192)"),
        (["--ids", "1,x"], "--ids takes comma-separated integer token ids"),
        (["--input-file", "/nonexistent/in.txt"], "no input file at /nonexistent/in.txt"),
        (["--model", "/nonexistent/dir", "--ids", "1"], "no checkpoint directory at /nonexistent/dir"),
        (["--input", "x", "--groups", "0"], "--groups must be >= 1"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(tmp_path, capsys, args, message):
    if "GPT" in args:
        args[args.index("GPT")] = str(make_hf_checkpoint(tmp_path / "gpt", "gpt_neox"))
        capsys.readouterr()  # transformers' own progress bar while saving
    out = tmp_path / "never.png"
    assert main(["inspect", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("mambastep: error: ")
    assert "Traceback" not in err and not out.exists()
