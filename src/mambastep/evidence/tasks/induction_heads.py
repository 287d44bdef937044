"""Induction Heads (Mamba paper, arXiv 2312.00752, section 3.1 / 4.1.1 and appendix E.1).

A special "trigger" token appears once somewhere in a random sequence,
followed by the token to recall; the sequence ends with the trigger again and
the model must predict the token that followed the first trigger. The paper
trains at length 256 and evaluates at lengths 2**6 .. 2**20 to measure how
far the recall extrapolates.

Layout of one sequence, with ``V = vocab_size`` and ``L = length`` input
tokens (following HazyResearch/safari ``generate_induction_head`` with one
trigger and a recall of one token)::

    position   0 ... p-1 | p       | p+1 | p+2 ... L-2 | L-1
    tokens     random    | trigger | x   | random      | trigger
    targets    IGNORE ...................................| x

* Token ids: trigger = ``V - 1``; content tokens are ``1 .. V-2`` (14 values
  with the paper's vocabulary of 16). Id ``0`` is reserved and never
  appears: it is safari's unused no-op token (safari's special tokens sort to
  ids 0 and V-1), and it keeps the same id convention as
  `~mambastep.evidence.tasks.selective_copying` (0 blank, V-1 special, 1..V-2 content).
* Every non-trigger position holds a content token drawn independently and
  uniformly from ``1 .. V-2``; in particular the recalled token ``x`` is
  uniform over the content tokens and is never the trigger. The trigger
  appears exactly twice, so the answer is unique.
* The first trigger's position ``p`` is uniform over ``0 .. L-4`` (safari
  draws it the same way): there is at least one random token between ``x``
  and the final trigger, so the answer is never simply the previous token.
  At evaluation lengths the distance to recall is therefore uniform over
  roughly the whole sequence. The shortest valid length is 4.
* Scored position: exactly one, the last (``L-1``): after reading the final
  trigger the model must output ``x``; ``targets[:, L-1] = x``, `IGNORE`
  elsewhere (``targets[:, i]`` = output after reading ``tokens[:, i]``).
  Chance accuracy is ``1/(V-2)``. (safari scores only this position at test
  time but trains with a next-token loss on every position; the interface here
  scores the last position only, for training and evaluation alike.)
* ``length`` counts every input token, the final trigger included: length
  2**20 means 2**20 tokens read. Default ``train_length`` is 256.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambastep.evidence.tasks.base import IGNORE, Task, TaskBatch, _as_int

__all__ = ["InductionHeads"]

MIN_LENGTH = 4  # trigger, recalled token, one random token, final trigger


class InductionHeads(Task):
    """Induction Heads: after the final trigger, predict the token that followed the first trigger.

    Args:
        vocab_size:   number of token ids, the trigger and the reserved id 0 included
                      (>= 4, so that there are at least two content values). Paper: 16.
        train_length: default training length in input tokens (>= 4). Paper: 256.

    Token ids: ``trigger_token`` (vocab_size - 1), content tokens ``1 .. vocab_size - 2``,
    0 unused. See the module docstring for the full layout.
    """

    name = "induction_heads"

    def __init__(self, vocab_size: int = 16, train_length: int = 256) -> None:
        vocab_size = _as_int(vocab_size, "vocab_size")
        if vocab_size < 4:
            raise ValueError(
                f"vocab_size must be >= 4 for induction_heads (reserved 0, trigger and at least two content "
                f"tokens), got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.trigger_token = vocab_size - 1
        self.train_length = self._check_length(train_length, "train_length")

    @property
    def min_length(self) -> int:
        """4: trigger, recalled token, one random token, final trigger."""
        return MIN_LENGTH

    def _length_rule(self) -> str:
        return "trigger, recalled token, at least one other token, final trigger"

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> TaskBatch:
        device = generator.device
        rows = torch.arange(batch_size, device=device)  # (b,)
        tokens = torch.randint(1, self.vocab_size - 1, (batch_size, length), generator=generator, device=device)
        first = torch.randint(0, length - 3, (batch_size,), generator=generator, device=device)  # (b,) in [0, l-4]
        tokens[rows, first] = self.trigger_token
        tokens[:, -1] = self.trigger_token
        targets = torch.full((batch_size, length), IGNORE, dtype=torch.int64, device=device)  # (b, l)
        targets[:, -1] = tokens[rows, first + 1]
        return TaskBatch(tokens, targets)

    def key_positions(self, tokens: Tensor) -> Tensor:
        """The triggers and the token that follows the first one (the token to recall)."""
        trigger = tokens == self.trigger_token
        after = torch.zeros_like(trigger)
        after[1:] = trigger[:-1]  # the final trigger is the last input: nothing follows it
        return trigger | after

    def describe(self) -> str:
        v = self.vocab_size
        return (
            f"Induction heads: each sequence of L input tokens (default L={self.train_length}) is random content "
            f"tokens (ids 1..{v - 2}, uniform) except for the trigger token (id {v - 1}), which appears exactly "
            f"twice: once at a uniformly random position p in 0..L-4, followed by the token to recall, and once as "
            f"the last input. After reading the final trigger the model must output the token that followed the "
            f"first one. Only that last position is scored (chance accuracy 1/{v - 2})."
        )
