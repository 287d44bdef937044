"""How well a language model predicts a text, in bits per byte: the bits an arithmetic coder
driven by the model would need, so a figure comparable to gzip's or xz's on the same bytes.

The text is read as training reads it: in windows of ``window`` tokens, each from a fresh state.
Every token but the first is predicted once (a window's first input is the previous window's
last target), so the bytes counted are all but those of the first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mambastep.files.tokenizer import Tokenizer
from mambastep.models import LanguageModel
from mambastep.training.loss import token_nll

BATCH = 32  # full windows read together


@dataclass(frozen=True)
class TextBits:
    """A text's cost under a model."""

    bits: float  # summed cross-entropy of the predicted tokens, in bits
    predicted_bytes: int  # UTF-8 bytes of the predicted tokens
    tokens: int  # tokens of the whole text

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.predicted_bytes if self.predicted_bytes else math.nan


@torch.no_grad()
def text_bits(model: LanguageModel, tokenizer: Tokenizer, text: str, window: int = 512) -> TextBits:
    """The bits ``model`` needs for ``text`` tokenized by ``tokenizer``, read in windows of ``window``.

    Raises:
        ValueError: ``window`` below 1.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int64)  # (t,)
    if len(tokens) < 2:
        return TextBits(0.0, 0, len(tokens))
    pieces = [tokens[start : start + window + 1] for start in range(0, len(tokens) - 1, window)]
    full = [p for p in pieces if len(p) == window + 1]
    nats = 0.0
    for first in range(0, len(full), BATCH):
        rows = torch.stack(full[first : first + BATCH])  # (n, window + 1)
        logits, _ = model(rows[:, :-1], float_logits=False)  # (n, window, vocab)
        nats += token_nll(logits.flatten(0, 1), rows[:, 1:].flatten()).sum().item()
    if len(pieces[-1]) < window + 1:  # the last, shorter window
        logits, _ = model(pieces[-1][None, :-1], float_logits=False)
        nats += token_nll(logits[0], pieces[-1][1:]).sum().item()
    first_bytes = len(tokenizer.decode(tokens[:1].tolist()).encode("utf-8"))
    return TextBits(nats / math.log(2), len(text.encode("utf-8")) - first_bytes, len(tokens))
