"""Choosing tokens: the sampling parameters, and a sampler that is pure per row.

Each row draws with its own generator, so a prompt gives the same tokens in any batch;
nothing is sorted over the vocabulary, and a draw is one uniform number per token.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NUCLEUS_CANDIDATES = 256  # the most likely tokens in which a row's top-p nucleus is first looked for


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token, and when to stop.

    max_new_tokens: most tokens generated per sequence (an eos token counts).
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    min_p: keep tokens whose probability is at least min_p times the largest one.
    repetition_penalty: > 1 discourages tokens already in the prompt or the output (CTRL).
    seed: seeds every sequence's generator (so a prompt gives the same output in any batch);
        None draws a fresh seed per sequence.
    stop: strings that end generation; the text ends just before the first one.
    eos_token_id: token that ends a sequence; None takes the tokenizer's.
    ignore_eos: keep generating after eos (until max_new_tokens or a stop string).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        _check_int(self, "max_new_tokens", low=1)
        _check_int(self, "top_k", low=0)
        _check_number(self, "temperature", low=0.0)
        _check_number(self, "top_p", low=0.0, high=1.0, low_open=True)
        _check_number(self, "min_p", low=0.0, high=1.0)
        _check_number(self, "repetition_penalty", low=0.0, low_open=True)
        if self.seed is not None:
            _check_int(self, "seed", low=0, high=2**64 - 1)
        if self.eos_token_id is not None:
            _check_int(self, "eos_token_id", low=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, (tuple, list)):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}; e.g. stop=('\\n',)")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must hold only non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(params: SamplingParams, name: str, low: int, high: int | None = None) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_number(
    params: SamplingParams, name: str, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    value = getattr(params, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or value > high or (low_open and value == low):
        bounds = ("> " if low_open else ">= ") + f"{low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")


def sample(
    logits: Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator],
    previous_tokens: Sequence[Collection[int]],
) -> Tensor:
    """Choose one token per row.

    Order: repetition penalty, then (unless greedy) temperature, top-k, top-p, min-p,
    and a draw from what is left with the row's own generator. Every operation is per row,
    so a row's token never depends on the other rows.

    Args:
        logits: (b, vocab) float32 next-token logits.
        params: the sampling parameters (the stopping fields are not used here).
        generators: b CPU generators, one per row.
        previous_tokens: b collections of token ids already seen (prompt and output),
            for the repetition penalty.

    Returns:
        (b,) long token ids, on the device of ``logits``.
    """
    b, vocab = logits.shape
    if len(generators) != b or len(previous_tokens) != b:
        raise ValueError(
            f"{b} rows of logits need {b} generators and {b} token histories, "
            f"got {len(generators)} and {len(previous_tokens)}"
        )
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = _penalize(logits, params.repetition_penalty, previous_tokens)
    if params.greedy:
        return logits.argmax(-1)
    logits = logits / params.temperature
    ids = None  # the token id of each column of logits, once narrowed to the top-k
    if 0 < params.top_k < vocab:
        logits, ids = _top_k(logits, params.top_k)  # (b, c) each, c >= top_k
    if params.top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits.softmax(-1), params.top_p), -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)  # (b, c)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
    columns = _draw(logits.softmax(-1).cpu(), generators).to(logits.device)  # (b,)
    return columns if ids is None else ids.gather(-1, columns[:, None])[:, 0]


def _top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(b, vocab) -> the logits and token ids (b, c) of each row's k largest logits and of any
    tied with its k-th (c: the most such tokens in a row; a row with fewer holds -inf in the
    rest), ids in vocabulary order, so that a draw among them picks the token a draw over the
    whole row, the others masked, would pick. What follows then runs over c columns, not the
    vocabulary."""
    values, ids = logits.topk(k, dim=-1)  # (b, k), largest first
    kth = values[:, -1:]  # (b, 1)
    width = int((logits >= kth).sum(-1).max())
    if width > k:  # ties with some row's k-th logit: all of them stay
        values, ids = logits.topk(width, dim=-1)
        values = values.masked_fill(values < kth, -math.inf)
    ids, order = ids.sort(dim=-1)
    return values.gather(-1, order), ids


def _outside_nucleus(probs: Tensor, top_p: float) -> Tensor:
    """(b, vocab) -> (b, vocab) bool: True for the tokens outside their row's nucleus, the
    smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely
    token is always in it).

    The nucleus is looked for among the ``NUCLEUS_CANDIDATES`` most likely tokens, then among
    4x as many while some row's candidates hold less than ``top_p``; a token beyond them has at
    least that much probability before it, so the result is the one a sort of the whole row gives,
    at a fraction of its cost (BENCHMARKS.md, Sampling).
    """
    vocab = probs.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    while True:
        top, order = probs.topk(k, dim=-1)  # (b, k) each, most likely first
        mass = top.cumsum(-1)  # (b, k)
        if k == vocab or bool((mass[:, -1] >= top_p).all()):
            break
        k = min(4 * k, vocab)
    outside = mass - top >= top_p  # the more likely tokens already reach top_p
    outside[:, 0] = False
    return torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, outside)


def _draw(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row of ``probs`` (b, vocab) on the CPU, each with its probability (rows
    need not sum to 1): the first token whose cumulative probability exceeds a uniform draw
    from the row's generator, scaled to the row's total: one uniform number per row, where
    ``torch.multinomial`` draws an exponential per token.

    Raises:
        ValueError: a row's probabilities are not finite (logits with NaN or inf).
    """
    cdf = probs.double().cumsum(-1)  # (b, vocab)
    total = cdf[:, -1:]  # (b, 1)
    if not bool(torch.isfinite(total).all()):
        raise ValueError("cannot sample: the logits hold NaN or infinite values")
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])[:, None]  # (b, 1) in [0, 1)
    # In float64, u < 1 times the total rounds to below the total, so the draw never passes
    # the last token of non-zero probability.
    return torch.searchsorted(cdf, u * total, right=True)[:, 0]


def _penalize(logits: Tensor, penalty: float, previous_tokens: Sequence[Collection[int]]) -> Tensor:
    """CTRL repetition penalty: seen tokens' logits are divided by ``penalty`` if positive, else multiplied."""
    logits = logits.clone()
    for row, seen in enumerate(previous_tokens):
        ids = torch.tensor(sorted(seen), dtype=torch.long, device=logits.device)  # (s,)
        values = logits[row, ids]
        logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the OS's entropy when None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
