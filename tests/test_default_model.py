"""The bundled default model predicts held-out Python source as well as docs/default-model.md says,
and writes the samples it shows."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import pytest
import torch

import mambastep
from mambastep.cli import main
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.evidence.likelihood import text_bits

# Four whole files of CPython 3.11.7's Lib/ that the default model's training held out
# (seed 0, holdout 0.05): asyncio/trsock.py, cmd.py, ctypes/test/test_keeprefs.py and
# ctypes/test/test_slicing.py, concatenated in path order (tests/data/README.md). Committed, so the
# sample does not depend on the Python installed here.
SAMPLE = Path(__file__).parent / "data" / "stdlib_heldout_sample.txt"
SAMPLE_SHA256 = "a50251b0faf6363edef1f7fee840e1ee7c1692edd8264c50ec56435203a44f90"
DOC = Path(__file__).parents[1] / "docs" / "default-model.md"
WINDOW = 512  # tokens read from a fresh state, as in training and in the documented evaluation

# docs/default-model.md reports 1.055 bits per byte over all 93 held-out files with text. This
# sample, four source files, measures 0.9711: lower than the documented figure (a third of the
# held-out bytes are pydoc_data/topics.py, English prose), so the threshold is the measured value
# plus a margin, not the documented one (it stays below 1.055, so the documented claim holds on this
# sample too). Margin: the figure is deterministic up to float rounding (the shipped bfloat16
# weights give 0.97113, and 0.97116 widened to float32), so 0.01 bpb is over a hundred times
# that; a random model of the same config reads about 3.4.
MEASURED_BPB = 0.971
MARGIN_BPB = 0.01
THRESHOLD_BPB = MEASURED_BPB + MARGIN_BPB


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """A small model: intra-op threads only wait on each other."""


def check_heldout_bits_per_byte(model) -> float:
    data = SAMPLE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SAMPLE_SHA256, f"{SAMPLE} changed"
    bpb = text_bits(model, mambastep.load_tokenizer(DEFAULT_MODEL), data.decode("utf-8"), WINDOW).bits_per_byte
    assert bpb <= THRESHOLD_BPB, f"{bpb:.4f} bits per byte on the held-out sample, above {THRESHOLD_BPB:.3f}"
    return bpb


def test_default_model_bits_per_byte_on_held_out_stdlib_files():
    model = mambastep.load(DEFAULT_MODEL)
    assert model.config.family == "mamba2" and model.config.vocab_size == 8192
    bpb = check_heldout_bits_per_byte(model)
    assert bpb == pytest.approx(MEASURED_BPB, abs=MARGIN_BPB)


def test_a_random_model_of_the_same_config_fails_the_check(tmp_path):
    shipped = mambastep.load(DEFAULT_MODEL)
    torch.manual_seed(0)
    random = mambastep.load(mambastep.save(type(shipped)(shipped.config), tmp_path / "random"))
    with pytest.raises(AssertionError, match="bits per byte on the held-out sample"):
        check_heldout_bits_per_byte(random)


def test_the_documented_samples_are_what_their_commands_print(capsys):
    """docs/default-model.md shows each sample under its command, exactly as the command prints it."""
    samples = DOC.read_text().split("## Samples", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"```bash\n(mambastep generate [^\n]*)\n```\n\n```\n(.*?)```", samples, re.DOTALL)
    assert len(pairs) == 3
    for command, printed in pairs:
        assert main(shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == printed, command
