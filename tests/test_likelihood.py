"""Bits per byte of a text under a model: windows from a fresh state, every token but the first predicted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambastep.evidence.likelihood import text_bits
from mambastep.files.tokenizer import ByteTokenizer, train_bpe
from mambastep.models import Mamba2LM
from mambastep.models.config import Mamba2Config

TEXT = "def f(x):\n    return x * 2  # déjà ☃\n" * 7  # 266 bytes, some of them multi-byte characters


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """A tiny model: intra-op threads only wait on each other."""


def tiny_model(vocab_size: int) -> Mamba2LM:
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(d_model=16, n_layer=2, vocab_size=vocab_size, d_state=4, head_dim=8)).eval()


def one_window_at_a_time(model, tokens: list[int], window: int) -> float:
    """The plain reading: each token from the second on, predicted from the window it falls in, in nats."""
    nats = 0.0
    for start in range(0, len(tokens) - 1, window):
        piece = torch.tensor(tokens[start : start + window + 1])
        logits, _ = model(piece[None, :-1])
        nats += F.cross_entropy(logits[0].double(), piece[1:], reduction="sum").item()
    return nats


@pytest.mark.parametrize("window", [1, 7, 64, 265, 266, 1000])
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_text_bits_is_the_sum_over_windows_of_each_predicted_token(tokenizer, window):
    tok = ByteTokenizer() if tokenizer == "bytes" else train_bpe([TEXT], 300)
    model = tiny_model(tok.vocab_size)
    tokens = tok.encode(TEXT)
    cost = text_bits(model, tok, TEXT, window)
    assert cost.tokens == len(tokens)
    first = len(tok.decode(tokens[:1]).encode())
    assert cost.predicted_bytes == len(TEXT.encode()) - first
    assert cost.bits == pytest.approx(one_window_at_a_time(model, tokens, window) / math.log(2), rel=1e-5)
    assert cost.bits_per_byte == cost.bits / cost.predicted_bytes


def test_a_text_of_one_token_predicts_nothing():
    cost = text_bits(tiny_model(256), ByteTokenizer(), "x")
    assert (cost.bits, cost.predicted_bytes, cost.tokens) == (0.0, 0, 1) and math.isnan(cost.bits_per_byte)
    with pytest.raises(ValueError, match="window must be at least 1"):
        text_bits(tiny_model(256), ByteTokenizer(), TEXT, 0)
