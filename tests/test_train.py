"""Training: loss goes down, exact resume, DDP == one process, checkpoints load, bad inputs fail early."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mambastep
from mambastep.cli import main
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.families.presets import builtin_config
from mambastep.files.checkpoints import read_config
from mambastep.files.tokenizer import train_bpe
from mambastep.training import DataSettings, OptimSettings, TrainingError, TrainSettings, loop, loss, train
from mambastep.training.checkpoint import read_train_state
from mambastep.training.data import Lanes, LineStarts, is_heldout
from mambastep.training.init import deepen, deeper_config
from mambastep.training.loop import TRAIN_STATE_FILE
from mambastep.training.optim import build_optimizer, lr_factor

TINY = {
    "mamba2": {
        "d_model": 16,
        "n_layer": 2,
        "vocab_size": 256,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8},
    },
    "mamba": {"d_model": 16, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {"d_state": 4}},
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 256,
        "intermediate_size": 32,
        "rotary_pct": 0.5,
    },
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A dozen small Python-like files; with seed 0 and holdout 0.2 some are held out."""
    root = tmp_path / "corpus"
    for i in range(12):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)]
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text("".join(lines))
    assert any(is_heldout(f"pkg{i % 3}/mod{i}.py", 0, 0.2) for i in range(12))
    return root


def tiny_config(tmp_path: Path, family: str = "mamba2") -> str:
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(TINY[family]))
    return str(path)


def settings(corpus: Path, out: Path, config: str, **overrides) -> TrainSettings:
    base = dict(
        data=DataSettings(paths=(str(corpus),), holdout=0.2, seq_len=16),
        optim=OptimSettings(lr=1e-2, warmup_steps=2),
        out=str(out),
        config=config,
        steps=6,
        batch_size=4,
        eval_every=3,
        eval_tokens=64,
        checkpoint_every=0,
        log_every=1,
        progress=False,
    )
    return TrainSettings(**{**base, **overrides})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize(
    "family, precision", [("mamba2", "fp32"), ("mamba", "fp32"), ("gpt_neox", "fp32"), ("mamba2", "bf16")]
)
def test_a_few_steps_reduce_the_loss(corpus, tmp_path, family, precision):
    record = train(
        settings(corpus, tmp_path / "out", tiny_config(tmp_path, family), steps=12, eval_every=0, precision=precision)
    )
    losses = [e["loss"] for e in record["train"]]
    assert losses[-1] < losses[0] - 0.5
    final = record["eval"][-1]
    assert final["final"] and final["bits_per_byte"] < 8
    assert set(record["baselines"]) == {"gzip -9", "xz -9"}
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "log.json").read_text())["train"] == record["train"]


@pytest.mark.parametrize(
    "family, precision, tolerance", [("mamba2", "bf16", 2e-2), ("mamba", "fp32", 1e-4), ("gpt_neox", "fp32", 1e-3)]
)
def test_compiled_steps_train_as_eager_ones_to_rounding(corpus, tmp_path, family, precision, tolerance):
    """--compile traces the steps through mambastep's kernels (their shape functions: no graph
    break at them) and trains the same model, up to the rounding of fused operations (which
    AdamW's normalisation enlarges for gradients near zero: the looser tolerances)."""
    from torch._dynamo.utils import counters

    config = tiny_config(tmp_path, family)
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        runs[compiled] = train(settings(corpus, out, config, eval_every=0, precision=precision, compile=compiled))
    assert counters["stats"]["unique_graphs"] > 0
    breaks = " ".join(counters["graph_break"])
    assert "fake tensor" not in breaks and "mambastep" not in breaks, breaks
    eager, compiled = ([e["loss"] for e in runs[c]["train"]] for c in (False, True))
    assert eager == pytest.approx(compiled, abs=tolerance)
    for name, weight in weights(tmp_path / "False").items():
        torch.testing.assert_close(weights(tmp_path / "True")[name], weight, atol=tolerance, rtol=tolerance)


def test_resume_is_bitwise_equal_to_uninterrupted(corpus, tmp_path):
    config = tiny_config(tmp_path)
    train(settings(corpus, tmp_path / "straight", config))
    train(settings(corpus, tmp_path / "resumed", config, stop_after=3))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(settings(corpus, tmp_path / "resumed", config))
    with pytest.raises(TrainingError, match=r"batch_size \(saved 4, now 8\)"):
        train(settings(corpus, tmp_path / "resumed", config, batch_size=8, resume=True))
    record = train(settings(corpus, tmp_path / "resumed", config, resume=True))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [e["step"] for e in record["train"]] == list(range(1, 7))


def test_resume_with_a_larger_steps_extends_a_finished_run(corpus, tmp_path, monkeypatch, caplog):
    config, out = tiny_config(tmp_path), tmp_path / "out"
    train(settings(corpus, out, config, steps=3, eval_every=0))
    with pytest.raises(TrainingError, match="at step 3 and --steps is 3; pass a larger --steps"):
        train(settings(corpus, out, config, steps=3, eval_every=0, resume=True))
    used = []  # the learning rate of each step as it is taken
    step = loop._Run._train_step
    monkeypatch.setattr(
        loop._Run, "_train_step", lambda run: used.append(run.optimizer.param_groups[0]["lr"]) or step(run)
    )
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        record = train(settings(corpus, out, config, steps=6, eval_every=0, resume=True))
    assert read_train_state(out / "train_state.pt")["step"] == 6
    assert [e["step"] for e in record["train"]] == list(range(1, 7))
    assert [e["step"] for e in record["eval"] if e["final"]] == [3, 6]
    # From step 3 on, the schedule over 6 steps (the 3-step one had reached its floor, 1e-3).
    assert used == pytest.approx([1e-2 * lr_factor(k, 2, 6, 0.1) for k in range(3, 6)])
    assert "resuming at step 3 with --steps 6 (the run had 3)" in caplog.text


def test_a_vocabulary_larger_than_the_tokenizers_is_warned_of(corpus, tmp_path, caplog):
    big = tmp_path / "big.json"  # mamba-130m's vocabulary on a tiny model
    big.write_text(json.dumps({**TINY["mamba2"], "vocab_size": 50280}))
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        train(settings(corpus, tmp_path / "big", str(big), steps=2, eval_every=0))
    [line] = caplog.messages
    assert "vocabulary has 50,280 tokens but the tokenizer (bytes) has 256" in line
    assert "--config mamba2-bytes" in line


def test_the_byte_level_preset_trains_without_a_warning(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        record = train(settings(corpus, tmp_path / "out", "mamba2-bytes", steps=2, eval_every=0))
    assert record["model"]["parameters"] == 690_064 and not caplog.messages


def test_the_bpe_preset_deepened_and_the_tokenizer_are_the_bundled_models():
    """docs/default-model.md trains the bundled model with --config mamba2-bpe8k --tokenizer bpe:8192,
    then deepens it to 16 layers (--n-layer 16)."""
    assert deeper_config(builtin_config("mamba2-bpe8k"), 16) == read_config(DEFAULT_MODEL)
    tokenizer = mambastep.load_tokenizer(DEFAULT_MODEL)
    assert isinstance(tokenizer, mambastep.HFTokenizer) and tokenizer.vocab_size == 8192


def test_a_bpe_tokenizer_is_learned_from_the_training_files_saved_and_kept_on_resume(corpus, tmp_path, monkeypatch):
    config = tmp_path / "bpe.json"
    config.write_text(json.dumps({**TINY["mamba2"], "vocab_size": 300}))
    data = DataSettings(paths=(str(corpus),), holdout=0.2, seq_len=16, tokenizer="bpe:300")
    out = tmp_path / "out"
    record = train(settings(corpus, out, str(config), data=data, stop_after=3))
    learned = mambastep.load_tokenizer(out / "model")
    assert learned.vocab_size == 300 and learned.eos_token_id == 0
    # Learned from the training files only, in path order: the same as train_bpe on them.
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.py"))
    training = [(corpus / n).read_text() for n in names if not is_heldout(n, 0, 0.2)]
    assert learned.tokenizer.to_str() == train_bpe(training, 300).tokenizer.to_str()
    text = "def f3_7(x):\n    return x * 7 + 3\n"
    assert len(learned.encode(text)) < len(text.encode()) and learned.decode(learned.encode(text)) == text
    assert record["data"]["train_tokens"] < record["data"]["train_bytes"]
    # Resumed, the run reads the saved tokenizer instead of learning one again.
    saved = (out / "model" / "tokenizer.json").read_bytes()
    monkeypatch.setattr(loop, "train_bpe", lambda *_: pytest.fail("learned again on resume"))
    train(settings(corpus, out, str(config), data=data, resume=True))
    assert (out / "model" / "tokenizer.json").read_bytes() == saved
    model = mambastep.load(out / "model")
    params = mambastep.SamplingParams(max_new_tokens=5, temperature=0)
    assert len(list(mambastep.generate(model, learned, "def ", params))) == 5


def test_train_bpe_encodes_any_text_and_is_deterministic():
    texts = ["def f(x):\n    return x\n" * 20, "class A:\n    pass\n" * 20]
    one, two = train_bpe(texts, 280), train_bpe(texts, 280)
    assert one.tokenizer.to_str() == two.tokenizer.to_str()
    for text in ("déjà vu ☃ 🐍\n\t", "def f(x):\n    return x\n", "\x00\x7f"):
        assert one.decode(one.encode(text)) == text
    with pytest.raises(ValueError, match="at least 257 tokens"):
        train_bpe(texts, 256)


def test_warmup_longer_than_the_run_is_warned_of(corpus, tmp_path, caplog):
    optim = OptimSettings(lr=1e-2, warmup_steps=5)
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        train(settings(corpus, tmp_path / "out", tiny_config(tmp_path), steps=2, eval_every=0, optim=optim))
    [line] = caplog.messages
    assert "--warmup-steps 5 exceeds --steps 2" in line and "to 40% of --lr" in line


def test_the_final_evaluation_reads_at_most_eval_tokens_and_shows_its_progress(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", str(corpus), "--config", tiny_config(tmp_path), "--out", str(out), "--holdout", "0.2"]
    args += ["--seq-len", "16", "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--eval-tokens", "64"]
    assert main(args) == 0
    captured = capsys.readouterr()
    log = json.loads((out / "log.json").read_text())
    final, held_out = log["eval"][-1], log["data"]["heldout_tokens"]
    assert final["final"] and final["step"] == 2
    assert final["tokens_read"] == 64 < held_out  # 4 lanes x 16 tokens, of a larger held-out split
    assert f"bits per byte on 64 of {held_out:,} tokens" in captured.out
    assert "final held-out evaluation" in captured.err


def test_two_process_ddp_matches_one_process(corpus, tmp_path):
    config = tiny_config(tmp_path)
    train(settings(corpus, tmp_path / "one", config, steps=3, eval_every=0))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mambastep.cli",
        "train",
        str(corpus),
        "--config",
        config,
        "--out",
        str(tmp_path / "two"),
        "--holdout",
        "0.2",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--eval-tokens",
        "64",
        "--checkpoint-every",
        "0",
        "--log-every",
        "1",
        "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    log_one = json.loads((tmp_path / "one" / "log.json").read_text())
    log_two = json.loads((tmp_path / "two" / "log.json").read_text())
    assert log_two["processes"] == 2
    final_one, final_two = log_one["eval"][-1], log_two["eval"][-1]
    assert final_two["tokens_read"] == final_one["tokens_read"]
    assert final_two["loss"] == pytest.approx(final_one["loss"], rel=1e-4)


def heldout_loss(model, tokenizer, corpus: Path) -> float:
    """Mean next-token loss on the corpus's held-out files (holdout 0.2, seed 0), in windows of 16
    tokens (the runs' --seq-len) from a fresh state."""
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.py"))
    text = "".join((corpus / n).read_text() for n in names if is_heldout(n, 0, 0.2))
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    windows = (len(ids) - 1) // 16
    x, y = ids[: windows * 16].view(windows, 16), ids[1 : windows * 16 + 1].view(windows, 16)
    with torch.no_grad():
        logits, _ = model(x)  # (windows, 16, 256)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()


def test_checkpoint_loads_and_generates(corpus, tmp_path):
    config = tiny_config(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                str(corpus),
                "--config",
                config,
                "--out",
                str(out),
                "--holdout",
                "0.2",
                "--seq-len",
                "16",
                "--steps",
                "12",
                "--lr",
                "1e-2",
                "--warmup-steps",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    model = mambastep.load(out / "model")
    tokenizer = mambastep.load_tokenizer(out / "model")
    assert isinstance(tokenizer, mambastep.ByteTokenizer)
    umask = os.umask(0)
    os.umask(umask)
    for written in (out / "model" / "model.safetensors", out / TRAIN_STATE_FILE):  # the usual mode, as others write
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written
    # The untrained model: the same run's initial weights (one step at learning rate 0), written the same way.
    train(
        settings(
            corpus, tmp_path / "untrained", config, steps=1, optim=OptimSettings(lr=0.0, warmup_steps=0), eval_every=0
        )
    )
    untrained = mambastep.load(tmp_path / "untrained" / "model")
    # Measured: 4.05 trained, 5.52 untrained (log 256 = 5.55 is uniform); 1 nat asks for most of that gap.
    trained_loss, untrained_loss = heldout_loss(model, tokenizer, corpus), heldout_loss(untrained, tokenizer, corpus)
    assert trained_loss < untrained_loss - 1.0, (trained_loss, untrained_loss)
    # Greedy text is made of the corpus's characters (the untrained model's is bytes of any value).
    text = "".join(
        mambastep.generate(model, tokenizer, "def ", mambastep.SamplingParams(max_new_tokens=8, temperature=0))
    )
    alphabet = {ch for p in corpus.rglob("*.py") for ch in p.read_text()}
    assert len(text) == 8 and set(text) <= alphabet, repr(text)
    # Fine-tuning starts from the checkpoint's weights and tokenizer.
    record = train(settings(corpus, tmp_path / "tuned", None, init=str(out / "model"), steps=2, eval_every=0))
    assert record["model"]["family"] == "mamba2"


@pytest.mark.parametrize("family", ["mamba2", "mamba"])
def test_a_deepened_model_computes_what_it_grew_from(tmp_path, family):
    from mambastep.families import family_of

    config = loop.model_config(tiny_config(tmp_path, family))
    torch.manual_seed(0)
    model = family_of(config).model(config).configure(mambastep.EngineSettings())
    for param in model.parameters():  # every weight away from its initial value, out_proj included
        param.data.add_(0.1 * torch.randn_like(param))
    deeper = deepen(model, 5)  # 2 layers to 5: layer 0 then two copies of it, layer 1 then one copy
    assert deeper.config.n_layer == 5 and len(deeper.backbone.layers) == 5
    layers, grown = model.backbone.layers, deeper.backbone.layers
    for j, source, is_copy in [(0, 0, False), (1, 0, True), (2, 0, True), (3, 1, False), (4, 1, True)]:
        for name, value in grown[j].state_dict().items():
            expected = layers[source].state_dict()[name]
            if is_copy and name.startswith("mixer.out_proj."):
                expected = torch.zeros_like(expected)
            assert torch.equal(value, expected), (j, name)
    tokens = torch.randint(0, 256, (2, 11))
    assert torch.equal(deeper(tokens)[0], model(tokens)[0])
    logits, state = deeper.prefill(tokens[:, :7])
    expected, expected_state = model.prefill(tokens[:, :7])
    assert torch.equal(logits, expected)
    for t in range(7, 11):  # the copies' states differ from their sources', but add nothing to the stream
        logits, state = deeper.step(tokens[:, t], state)
        expected, expected_state = model.step(tokens[:, t], expected_state)
        assert torch.equal(logits, expected)
    same = deepen(model, 2)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))


def test_training_a_deepened_checkpoint_starts_from_its_loss(corpus, tmp_path):
    config = tiny_config(tmp_path)
    train(settings(corpus, tmp_path / "base", config, steps=6, eval_every=0))
    base = str(tmp_path / "base" / "model")
    kept = train(settings(corpus, tmp_path / "kept", None, init=base, steps=2, eval_every=0))
    deeper = train(settings(corpus, tmp_path / "deeper", None, init=base, n_layer=3, steps=2, eval_every=0))
    # The same function on the same windows: the first step's loss is the same; then the copies train.
    assert deeper["train"][0]["loss"] == pytest.approx(kept["train"][0]["loss"], rel=1e-6)
    assert deeper["model"]["config"]["n_layer"] == 3
    saved = weights(tmp_path / "deeper")
    assert saved["backbone.layers.2.mixer.out_proj.weight"].abs().max() > 0  # layer 1's copy has trained
    assert read_config(tmp_path / "deeper" / "model").n_layer == 3
    with pytest.raises(TrainingError, match="settings differ from the saved run: n_layer"):
        train(settings(corpus, tmp_path / "deeper", None, init=base, n_layer=4, steps=3, eval_every=0, resume=True))
    with pytest.raises(TrainingError, match="cannot deepen a model of 2 layers to 1"):
        train(settings(corpus, tmp_path / "shallower", None, init=base, n_layer=1))
    with pytest.raises(TrainingError, match="n_layer deepens the init checkpoint"):
        settings(corpus, tmp_path / "new", config, n_layer=3)
    train(settings(corpus, tmp_path / "neox", tiny_config(tmp_path, "gpt_neox"), steps=1, eval_every=0))
    with pytest.raises(TrainingError, match="only Mamba and Mamba-2 models can be deepened, not a gpt_neox model"):
        train(settings(corpus, tmp_path / "neox2", None, init=str(tmp_path / "neox" / "model"), n_layer=3))
    assert not (tmp_path / "shallower").exists() and not (tmp_path / "neox2").exists()


def test_weight_decay_only_on_matrices(tmp_path):
    from mambastep.families import family_of
    from mambastep.training.loop import model_config

    for family in ("mamba", "mamba2"):
        config = model_config(tiny_config(tmp_path, family))
        model = family_of(config).model(config)
        optimizer = build_optimizer(model, OptimSettings())
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)].rsplit(".", 1)[-1] for p in optimizer.param_groups[0]["params"]}
        other = {names[id(p)].rsplit(".", 1)[-1] for p in optimizer.param_groups[1]["params"]}
        assert optimizer.param_groups[1]["weight_decay"] == 0
        assert not decayed & {"A_log", "D", "dt_bias", "bias"}
        assert {"A_log", "D"} <= other and "in_proj" not in other


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_window_seed_moves_the_windows_and_keeps_the_split(corpus, tmp_path):
    config = tiny_config(tmp_path)
    base = settings(corpus, tmp_path / "base", config, eval_every=0)
    same = replace(base, out=str(tmp_path / "same"), data=replace(base.data, window_seed=0))
    moved = replace(base, out=str(tmp_path / "moved"), data=replace(base.data, window_seed=5))
    records = [train(s) for s in (base, same, moved)]
    assert len({r["data"]["heldout_tokens"] for r in records}) == 1  # one split
    assert records[0]["eval"][-1]["loss"] == records[1]["eval"][-1]["loss"]
    first, equal, other = (weights(Path(s.out)) for s in (base, same, moved))
    assert all(torch.equal(first[k], equal[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(TrainingError, match="window_seed must be an integer"):
        DataSettings(paths=(str(corpus),), window_seed=-1)


INDENTED = "".join(
    f"class C{i}:\n    def f(self, x):\n        if x > {i}:\n            return [\n                x,\n"
    f"                {i}]\n        return x\n\n\n"
    for i in range(60)
)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_line_windows_start_where_lines_start_indentation_included(tokenizer):
    tok = mambastep.ByteTokenizer() if tokenizer == "bytes" else train_bpe([INDENTED], 320)
    line_starts = [0] + [i + 1 for i, c in enumerate(INDENTED) if c == "\n"]
    stream = torch.tensor(tok.encode(INDENTED), dtype=torch.int32)
    starts = LineStarts.of(tok)
    one = Lanes(stream, 4, 24, 0, 1, "training", 25, starts)
    halves = [Lanes(stream, 4, 24, rank, 2, "training", 25, starts) for rank in (0, 1)]
    columns = set()
    for step in range(40):
        x, y = one.sample(step, seed=0)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in x.tolist():
            text = tok.decode(row)
            assert any(INDENTED.startswith(text, at) for at in line_starts), text
            assert tok.encode(text)[:2] == row[:2]  # the first tokens are how a prompt of this text reads
            columns.add(len(text) - len(text.lstrip(" ")))
        # The batch does not depend on the number of processes.
        assert torch.equal(torch.cat([h.sample(step, seed=0)[0] for h in halves]), x)
    # Indented lines start windows too (in this small BPE, 15 spaces take two tokens: no start at 16).
    assert columns == {0, 4, 8, 12, 16} if tokenizer == "bytes" else columns == {0, 4, 8, 12}
    # Windows at any token start in the middle of lines too.
    anywhere = Lanes(stream, 4, 24, 0, 1, "training", 25)
    texts = [tok.decode(row) for step in range(40) for row in anywhere.sample(step, seed=0)[0].tolist()]
    assert not all(any(INDENTED.startswith(t, at) for at in line_starts) for t in texts)


def test_line_windows_need_line_starts_and_a_known_setting(corpus, tmp_path):
    one_line = tmp_path / "one_line"
    one_line.mkdir()
    (one_line / "a.py").write_text("x = 1; " * 400)
    config = tiny_config(tmp_path)
    data = DataSettings(paths=(str(one_line),), holdout=0, seq_len=16, window_starts="lines")
    with pytest.raises(TrainingError, match="no line start with 16 tokens after it.*--window-starts tokens"):
        train(settings(one_line, tmp_path / "a", config, data=data))
    with pytest.raises(TrainingError, match="window_starts must be one of"):
        DataSettings(paths=(str(corpus),), window_starts="words")
    lines = replace(data, paths=(str(corpus),), holdout=0.2)
    record = train(settings(corpus, tmp_path / "b", config, data=lines))
    assert record["eval"][-1]["loss"] < record["eval"][0]["loss"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_token_nll_is_cross_entropy_of_widened_logits_block_by_block(monkeypatch, dtype):
    """7 rows of 50 logits in blocks of 2 rows (the last one short): the losses are those of
    F.cross_entropy on the same logits in float64, to float32's precision (float64's for
    float64), and the gradient, for any weight per row, is theirs rounded to the logits' dtype
    to within a unit in the last place."""
    monkeypatch.setattr(loss, "BLOCK_VALUES", 100)
    torch.manual_seed(0)
    logits = (torch.randn(7, 50, dtype=torch.float64) * 4).to(dtype)
    target, weights = torch.randint(0, 50, (7,)), torch.rand(7, dtype=torch.float64)
    wide = torch.promote_types(dtype, torch.float32)
    ours = logits.clone().requires_grad_()
    nll = loss.token_nll(ours, target)
    (nll * weights.to(wide)).sum().backward()
    reference = logits.to(torch.float64).requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference, target, reduction="none")
    (expected * weights).sum().backward()
    assert nll.dtype == wide and ours.grad.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(nll.double(), expected.detach(), rtol=tolerance, atol=tolerance)
    rounded = reference.grad.to(wide).to(dtype).double()  # float32 sums, rounded once to the logits' dtype
    step = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
    torch.testing.assert_close(ours.grad.double(), rounded, rtol=step, atol=1e-7)


def test_token_nll_checks_its_shapes():
    with pytest.raises(ValueError, match="logits \\(N, vocab\\) and targets \\(N,\\)"):
        loss.token_nll(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(3,\\)"):
        loss.token_nll(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_split_is_fixed_by_path_and_seed():
    names = [f"dir/file{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n, 0, 0.05)]
    assert 50 < len(held) < 150
    assert held == [n for n in names if is_heldout(n, 0, 0.05)]
    assert held != [n for n in names if is_heldout(n, 1, 0.05)]


def test_bad_inputs_fail_before_training(corpus, tmp_path):
    config = tiny_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match="no training files"):
        train(settings(empty, tmp_path / "a", config))
    (corpus / "blob.py").write_bytes(b"\x00\x01\xffbinary")
    with pytest.raises(TrainingError, match=r"not UTF-8 text: .*blob\.py.*--skip-binary"):
        train(settings(corpus, tmp_path / "b", config))
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"d_model": 16384, "n_layer": 96, "vocab_size": 256, "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(TrainingError, match=r"needs about [\d.]+ GiB .* only [\d.]+ GiB is free"):
        train(settings(corpus, tmp_path / "c", str(huge)))
    with pytest.raises(TrainingError, match="neither a JSON file nor a built-in name"):
        train(settings(corpus, tmp_path / "d", str(tmp_path / "missing.json")))
    with pytest.raises(TrainingError, match="seq_len must be an integer >= 2"):
        DataSettings(paths=(str(corpus),), seq_len=1)
    for spec in ("bpe:", "bpe:x", "bpe:100"):
        with pytest.raises(TrainingError, match="bpe:N needs a whole number N of at least 257"):
            DataSettings(paths=(str(corpus),), tokenizer=spec)
    bpe = DataSettings(paths=(str(corpus),), holdout=0.2, seq_len=16, tokenizer="bpe:512")
    with pytest.raises(TrainingError, match="the tokenizer has 512 tokens but the model's vocab_size is 256"):
        train(settings(corpus, tmp_path / "f", config, data=bpe))
    assert not (tmp_path / "b" / "train_state.pt").exists()
    # The command line reports the same errors as one line, with a non-zero status.
    assert main(["train", str(empty), "--config", config, "--out", str(tmp_path / "e"), "--no-progress"]) == 1
