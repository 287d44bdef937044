"""The interface every synthetic task implements: a `Task` makes `TaskBatch` objects.

A batch is a pair of int64 tensors of the same shape ``(b, l)``:

* ``tokens[:, i]``  is the i-th token the model reads;
* ``targets[:, i]`` is the token the model should output after reading
  ``tokens[:, i]`` (its "next token" prediction at position i), or
  `IGNORE` (-100, the default ``ignore_index`` of
  ``torch.nn.functional.cross_entropy``) where position i is not scored.

So a causal model's logits ``(b, l, vocab)`` line up with ``targets``
position by position, without any shift::

    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())

``l`` is always the number of *input* tokens: evaluating at length 2**20
means the model reads 2**20 tokens.

Randomness: `Task.sample` draws only from the ``torch.Generator`` it is given
(never from the global RNG) and returns tensors on that generator's device.
`Task.validation_set` is a fixed set: row ``i`` of
``validation_set(length, count, seed)`` is ``sample(1, length, g_i)`` with
``g_i`` a CPU generator seeded from a SHA-256 hash of
``(task name, length, seed, i)``. It is therefore bitwise the same on every
call and in every process (for a given torch version: torch does not promise
identical random streams across releases), does not depend on ``count``
(a longer set extends a shorter one), and can be built one row at a time
with ``start=`` when a whole batch of very long sequences would not fit.
"""

from __future__ import annotations

import hashlib
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100
"""Target value of positions that are not scored (``cross_entropy``'s default ``ignore_index``)."""


@dataclass(frozen=True)
class TaskBatch:
    """Inputs and per-position targets of a batch of task sequences.

    Attributes:
        tokens:  (b, l) int64, the tokens the model reads.
        targets: (b, l) int64, ``targets[:, i]`` is the output expected after
            reading ``tokens[:, i]``; `IGNORE` where position i is not scored.
    """

    tokens: Tensor  # (b, l) int64
    targets: Tensor  # (b, l) int64, IGNORE where not scored

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.targets.shape:
            raise ValueError(
                f"tokens and targets must both be (batch, length); got {tuple(self.tokens.shape)} "
                f"and {tuple(self.targets.shape)}"
            )
        if self.tokens.dtype != torch.int64 or self.targets.dtype != torch.int64:
            raise ValueError(f"tokens and targets must be int64; got {self.tokens.dtype} and {self.targets.dtype}")

    @property
    def batch_size(self) -> int:
        """b, the number of sequences."""
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """l, the number of input tokens of each sequence."""
        return self.tokens.shape[1]

    @property
    def scored_mask(self) -> Tensor:
        """(b, l) bool: True where a position is scored (its target is not `IGNORE`)."""
        return self.targets != IGNORE

    @property
    def scored_positions(self) -> Tensor:
        """(s,) int64, sorted: the positions (columns) scored in at least one sequence.

        Both built-in tasks score the same positions in every sequence, so
        ``logits[:, batch.scored_positions]`` and ``targets[:, batch.scored_positions]``
        hold everything that counts (no need to project all l positions to the vocabulary).
        """
        return self.scored_mask.any(dim=0).nonzero().squeeze(1)

    @property
    def n_scored(self) -> int:
        """The number of scored (sequence, position) entries over the whole batch: accuracy's denominator."""
        return int(self.scored_mask.sum())

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch with both tensors on ``device``."""
        return TaskBatch(self.tokens.to(device), self.targets.to(device))


def _as_int(value: object, what: str) -> int:
    """``value`` as a Python int; ValueError naming ``what`` if it is not an integer (bools are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def validation_seed(name: str, length: int, seed: int, index: int) -> int:
    """The 63-bit seed of row ``index`` of a validation set: stable across processes (unlike ``hash()``)."""
    key = f"{name}|length={length}|seed={seed}|index={index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


class Task(ABC):
    """A synthetic sequence task: a generator of `TaskBatch` objects of any length >= `min_length`.

    Attributes (set by subclasses):
        name:         registry name, e.g. ``"selective_copying"``.
        vocab_size:   tokens are in ``[0, vocab_size)``, special tokens included.
        train_length: default training length (number of input tokens).
    """

    name: str
    vocab_size: int
    train_length: int

    @property
    @abstractmethod
    def min_length(self) -> int:
        """The shortest sequence (number of input tokens) this task can lay out."""

    @property
    def content_tokens(self) -> range:
        """The ids ``1 .. vocab_size - 2`` that carry content (and so every scored target):
        both tasks reserve 0 and ``vocab_size - 1`` for their special tokens."""
        return range(1, self.vocab_size - 1)

    @property
    def n_answers(self) -> int:
        """How many distinct values a scored target can take (uniformly): chance accuracy is ``1 / n_answers``."""
        return len(self.content_tokens)

    @abstractmethod
    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> TaskBatch:
        """`sample` after its arguments are checked."""

    @abstractmethod
    def key_positions(self, tokens: Tensor) -> Tensor:
        """(l,) bool for one sequence (l,): the positions that hold what must be remembered
        (what ``mambastep inspect --task`` highlights)."""

    @abstractmethod
    def describe(self) -> str:
        """One paragraph: the layout of a sequence, in words (for docs and ``--help``)."""

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> TaskBatch:
        """A fresh random batch of ``batch_size`` sequences of ``length`` input tokens.

        Draws only from ``generator``; the tensors are on ``generator.device``.
        """
        batch_size = _as_int(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        length = self._check_length(length)
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return self._generate(batch_size, length, generator)

    def validation_set(self, length: int, count: int, seed: int = 0, *, start: int = 0) -> TaskBatch:
        """A fixed batch: rows ``start .. start+count-1`` of the validation set ``(length, seed)``.

        The same arguments always give bitwise the same tensors (CPU), whatever
        the global RNG state. Row i depends only on ``(name, length, seed, i)``,
        so ``validation_set(l, 1, s, start=i)`` is row i of ``validation_set(l, n, s)``:
        use it to evaluate very long sequences one at a time.
        """
        count = _as_int(count, "count")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        seed = _as_int(seed, "seed")
        start = _as_int(start, "start")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        length = self._check_length(length)
        tokens = torch.empty(count, length, dtype=torch.int64)  # (count, l)
        targets = torch.empty(count, length, dtype=torch.int64)  # (count, l)
        for row, index in enumerate(range(start, start + count)):  # one row at a time: peak memory ~ the result
            generator = torch.Generator().manual_seed(validation_seed(self.name, length, seed, index))
            one = self._generate(1, length, generator)
            tokens[row] = one.tokens[0]
            targets[row] = one.targets[0]
        return TaskBatch(tokens, targets)

    def _length_rule(self) -> str:
        """Why `min_length` is what it is, in words (for error messages)."""
        return f"min_length={self.min_length}"

    def _check_length(self, length: object, what: str = "length") -> int:
        length = _as_int(length, what)
        if length < self.min_length:
            raise ValueError(
                f"{what} {length} is too short for {self.name}: it needs at least {self.min_length} "
                f"input tokens ({self._length_rule()})"
            )
        return length

    def settings(self) -> dict[str, int]:
        """The constructor arguments: ``task(name, **settings())`` builds the same task."""
        return {"vocab_size": self.vocab_size, "train_length": self.train_length}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.settings().items())})"
