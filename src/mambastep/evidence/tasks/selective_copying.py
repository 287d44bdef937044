"""Selective Copying (Mamba paper, arXiv 2312.00752, section 3.1 and appendix E.1).

A few "data" tokens are scattered at random positions among "noise" tokens;
at the end the model must output the data tokens in their order of
appearance, skipping the noise. Unlike the classic copying task the gaps
between data tokens vary, so a time-invariant (LTI) model cannot solve it by
a fixed delay: it must select what to remember based on content.

Layout of one sequence, with ``V = vocab_size``, ``M = n_memorize`` and
``L = length`` input tokens (following state-spaces/s4's
``torch_copying_data(..., variable=True)``)::

    position   0 ........................ L-M-1 | L-M ........ L-1
    tokens     noise and M data tokens           | M markers
    targets    IGNORE ....................IGNORE | d_1 ........ d_M

* Token ids: noise = ``0``, marker = ``V - 1``, data tokens are
  ``1 .. V-2`` (``V - 2`` values: 14 with the paper's vocabulary of 16, which
  counts the noise token, as in the paper, and the marker, as in the s4 code).
  Special tokens (noise, marker) never appear as data.
* Data region: the first ``L - M`` positions. ``M`` distinct positions are
  drawn uniformly without replacement (every subset equally likely); each
  holds a data token drawn independently and uniformly from ``1 .. V-2``, so
  a value may repeat. All other positions of the region are noise.
* Answer segment: the last ``M`` positions are all the marker token. The model
  never reads its own answers (no teacher forcing of data tokens, as in s4):
  after reading the j-th marker (position ``L-M+j-1``) it must output ``d_j``,
  the j-th data token in order of appearance. The markers tell it *when*
  to answer and, by counting them, *which* answer is due.
* Scored positions: exactly the last ``M`` positions of every sequence;
  ``targets[:, L-M+j-1] = d_j``, `IGNORE` everywhere else. Targets follow the
  package convention ``targets[:, i]`` = output after reading ``tokens[:, i]``,
  so a causal model's logits need no shift. Chance accuracy is ``1/(V-2)``.
* ``length`` counts every input token, the markers included. The paper's
  "sequences of length 4096" is taken as 4096 input tokens (the default
  ``train_length``): 4080 data-region positions + 16 markers. (s4's
  ``L`` counts only the noise, giving ``L + 2M`` inputs; the paper does not
  say which it used.) The shortest valid length is ``2M`` (a data region
  with no noise at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambastep.evidence.tasks.base import IGNORE, Task, TaskBatch, _as_int

__all__ = ["SelectiveCopying"]

NOISE = 0


def distinct_sorted_positions(batch_size: int, n: int, k: int, generator: torch.Generator) -> Tensor:
    """(b, k) int64: per row, k distinct positions of ``[0, n)`` chosen uniformly, in increasing order.

    Floyd's algorithm, vectorised over rows: k steps of O(b k) work, so the
    cost does not grow with ``n`` (a data region of 2**20 costs the same as one of 64).
    """
    device = generator.device
    chosen = torch.empty(batch_size, k, dtype=torch.int64, device=device)  # (b, k)
    for step, top in enumerate(range(n - k, n)):
        # Draw from [0, top]; if already taken, take `top` itself (never taken: all earlier picks are < top).
        draw = torch.randint(0, top + 1, (batch_size,), generator=generator, device=device)  # (b,)
        taken = (chosen[:, :step] == draw[:, None]).any(dim=1)  # (b,)
        chosen[:, step] = torch.where(taken, torch.full_like(draw, top), draw)
    return chosen.sort(dim=1).values


class SelectiveCopying(Task):
    """Selective Copying: recall ``n_memorize`` data tokens scattered among noise, in order.

    Args:
        vocab_size:   number of token ids, noise and marker included (>= 4, so that
                      there are at least two data values). Paper: 16.
        n_memorize:   data tokens per sequence (>= 1). Paper: 16.
        train_length: default training length in input tokens (>= 2 * n_memorize). Paper: 4096.

    Token ids: ``noise_token`` (0), ``marker_token`` (vocab_size - 1), data tokens
    ``1 .. vocab_size - 2``. See the module docstring for the full layout.
    """

    name = "selective_copying"

    def __init__(self, vocab_size: int = 16, n_memorize: int = 16, train_length: int = 4096) -> None:
        vocab_size = _as_int(vocab_size, "vocab_size")
        if vocab_size < 4:
            raise ValueError(
                f"vocab_size must be >= 4 for selective_copying (noise, marker and at least two data tokens), "
                f"got {vocab_size}"
            )
        n_memorize = _as_int(n_memorize, "n_memorize")
        if n_memorize < 1:
            raise ValueError(f"n_memorize must be >= 1, got {n_memorize}")
        self.vocab_size = vocab_size
        self.n_memorize = n_memorize
        self.noise_token = NOISE
        self.marker_token = vocab_size - 1
        self.train_length = self._check_length(train_length, "train_length")

    @property
    def min_length(self) -> int:
        """``2 * n_memorize``: the data tokens plus one marker per answer."""
        return 2 * self.n_memorize

    def _length_rule(self) -> str:
        m = self.n_memorize
        return f"{m} data tokens + {m} markers with n_memorize={m}"

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> TaskBatch:
        device = generator.device
        m = self.n_memorize
        region = length - m  # data-region length
        data = torch.randint(1, self.vocab_size - 1, (batch_size, m), generator=generator, device=device)  # (b, m)
        positions = distinct_sorted_positions(batch_size, region, m, generator)  # (b, m), increasing
        tokens = torch.full((batch_size, length), self.noise_token, dtype=torch.int64, device=device)  # (b, l)
        tokens.scatter_(1, positions, data)
        tokens[:, region:] = self.marker_token
        targets = torch.full((batch_size, length), IGNORE, dtype=torch.int64, device=device)  # (b, l)
        targets[:, region:] = data  # positions are sorted, so `data` is in order of appearance
        return TaskBatch(tokens, targets)

    def key_positions(self, tokens: Tensor) -> Tensor:
        """The data tokens: neither noise nor marker."""
        return (tokens != self.noise_token) & (tokens != self.marker_token)

    def describe(self) -> str:
        v, m = self.vocab_size, self.n_memorize
        return (
            f"Selective copying: each sequence of L input tokens (default L={self.train_length}) starts with a "
            f"data region of L-{m} tokens holding {m} data tokens (ids 1..{v - 2}, uniform, repeats allowed) at "
            f"uniformly random distinct positions, every other position being the noise token 0; then come {m} "
            f"marker tokens (id {v - 1}). After reading the j-th marker the model must output the j-th data token "
            f"in order of appearance. Only those last {m} positions are scored (chance accuracy 1/{v - 2})."
        )

    def settings(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "n_memorize": self.n_memorize, "train_length": self.train_length}
