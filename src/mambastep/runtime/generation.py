"""Text generation: streaming generators over a model and a sampler (``runtime.sampling``).

Each prompt is prefilled alone (no padding, so a prompt in a batch gives exactly
what it gives alone), the states are joined along the batch, then every step
decodes one token per live sequence; a finished sequence leaves the batch.
``generate_from_state`` runs the same decoding from a sequence already read into a
state (its last logits and state), which is how a ``Session`` continues a stream.

A text prompt that ends in a token of whitespace alone ("def " is "def", " " to a BPE
tokenizer, which joins a space to the word after it) is healed: the space goes back out of
the prompt, and the first new token must start with it. Its text leaves out the space the
prompt already holds, so the completion reads on from the prompt as it was written.

    for piece in generate(model, tok, "Mamba is", max_new_tokens=50):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import fields, replace
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor

from mambastep.files.tokenizer import ByteTokenizer, TextStream, Tokenizer
from mambastep.models.lm import LanguageModel
from mambastep.models.state import ModelState
from mambastep.runtime.sampling import SamplingParams, generator, sample


def generate_tokens(
    model: LanguageModel, prompts: list[list[int]], params: SamplingParams | None = None
) -> Iterator[tuple[int, int]]:
    """Generate from several prompts at once, yielding tokens as they are produced.

    Each prompt is prefilled alone, then the batch decodes together; a sequence stops
    after an eos token (yielded, unless ``params.ignore_eos``; ``params.eos_token_id``
    None means no eos) or after ``max_new_tokens``. Stop strings are not applied here
    (see ``generate``).

    Args:
        model: the language model.
        prompts: token ids of each prompt (each non-empty, within the model's vocabulary).
        params: sampling parameters; None takes the defaults.

    Returns:
        an iterator of (sequence index, token id), one step of the batch after another.

    Raises:
        ValueError: no prompts, an empty prompt, or a token id outside the vocabulary.
    """
    params = params or SamplingParams()
    _check_prompts(model, prompts, params)
    return _decode(model, partial(_prefill, model, prompts), _seen(prompts, params), params, cancelled=set())


def _check_prompts(model: LanguageModel, prompts: list[list[int]], params: SamplingParams) -> None:
    vocab = model.config.vocab_size
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"empty prompt at index {i}: the model needs at least one token to start from")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]!r}, outside the model's vocabulary [0, {vocab})")
    _check_eos(model, params)


def _check_eos(model: LanguageModel, params: SamplingParams) -> None:
    vocab = model.config.vocab_size
    if params.eos_token_id is not None and params.eos_token_id >= vocab:
        raise ValueError(f"eos_token_id {params.eos_token_id} lies outside the model's vocabulary [0, {vocab})")


def _prefill(model: LanguageModel, prompts: list[list[int]]) -> tuple[Tensor, ModelState]:
    """Prefill each prompt alone (no padding) and join: (b, vocab) last logits, a state of b sequences."""
    firsts, states = [], []
    for prompt in prompts:
        last, state = model.prefill(torch.tensor([prompt], device=model.device))
        firsts.append(last)  # (1, vocab)
        states.append(state)
    return torch.cat(firsts), ModelState.cat(states)


def _seen(histories: Sequence[Iterable[int]], params: SamplingParams) -> list[set[int]]:
    """Per sequence, the token ids the repetition penalty looks at (none when it is off)."""
    if params.repetition_penalty == 1.0:
        return [set() for _ in histories]
    return [set(history) for history in histories]


def _decode(
    model: LanguageModel,
    start: Callable[[], tuple[Tensor, ModelState]],
    seen: list[set[int]],
    params: SamplingParams,
    cancelled: set[int],
) -> Iterator[tuple[int, int]]:
    """The decoding loop, from the (b, vocab) last logits and the state of b sequences
    that ``start`` returns (called on the first ``next``, so that nothing runs before).

    ``seen`` holds each sequence's token ids for the repetition penalty, and grows with
    the output. A caller may add a sequence index to ``cancelled`` after receiving one
    of its tokens: that sequence then yields no more tokens."""
    generators = [generator(params.seed) for _ in seen]
    logits, state = start()  # (b, vocab), batch of b
    active = list(range(len(seen)))  # sequence index of each batch row
    eos = None if params.ignore_eos else params.eos_token_id
    for n_generated in range(1, params.max_new_tokens + 1):
        tokens = sample(logits, params, [generators[i] for i in active], [seen[i] for i in active])  # (b,)
        keep = []
        for row, (i, token) in enumerate(zip(active, tokens.tolist())):
            yield i, token
            if params.repetition_penalty != 1.0:
                seen[i].add(token)
            if token != eos and i not in cancelled:
                keep.append(row)
        if n_generated == params.max_new_tokens or not keep:
            return
        if len(keep) < len(active):
            active = [active[row] for row in keep]
            tokens, state = tokens[keep], state.select(keep)  # (b',), batch of b'
        logits, state = model.step(tokens, state)


def generate(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Stream the completion of one prompt as text pieces.

    A piece never splits a UTF-8 character. Generation ends at eos, at max_new_tokens, or
    at the first stop string; the stop string and what follows are not emitted, and text
    that could still become the start of a stop string is held back until resolved.

    Args:
        model: the language model.
        tokenizer: encodes the prompt and decodes the output.
        prompt: non-empty text.
        params: sampling parameters; None takes the defaults.
        **overrides: SamplingParams fields that replace those of ``params``, e.g. max_new_tokens=50.

    Returns:
        an iterator of text pieces whose concatenation is the completion.

    Raises:
        ValueError: an empty prompt or an invalid sampling parameter.
    """
    params = _resolve(tokenizer, params, overrides)
    ids = [_encode(tokenizer, prompt)]
    _check_prompts(model, ids, params)
    read, healed = zip(*(heal_prompt(tokenizer, prompt) for prompt in ids))
    start = _healed_start(tokenizer, partial(_prefill, model, list(read)), healed)
    pieces = _text_pieces(model, tokenizer, start, _seen(ids, params), params, healed=healed)
    return (piece for _, piece in pieces)


def generate_from_state(
    model: LanguageModel,
    tokenizer: Tokenizer,
    logits: Tensor,
    state: ModelState,
    params: SamplingParams | None = None,
    history: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Stream the continuation of one sequence already read into ``state``, as ``generate`` does.

    Args:
        model: the language model.
        tokenizer: decodes the output.
        logits: (1, vocab) next-token logits after the last token read; state: the state
            after it (one sequence, left unchanged).
        params, overrides: as for ``generate``.
        history: token ids already read, for the repetition penalty.
        on_token: called with each generated token id as it is drawn, including an eos
            token and the tokens of a stop string (which the text leaves out).

    Returns:
        an iterator of text pieces whose concatenation is the continuation.

    Raises:
        ValueError: logits or state not of one sequence of this model, or an invalid
            sampling parameter.
    """
    params = _resolve(tokenizer, params, overrides)
    vocab = model.config.vocab_size
    if logits.shape != (1, vocab):
        raise ValueError(f"logits must have shape (1, {vocab}), got {tuple(logits.shape)}")
    if state.batch_size != 1 or state.fingerprint != model.config.fingerprint:
        raise ValueError(
            f"state must hold one sequence of this model ({model.config.fingerprint}), "
            f"got {state.batch_size} of model {state.fingerprint}"
        )
    _check_eos(model, params)
    pieces = _text_pieces(
        model,
        tokenizer,
        lambda: (logits, state),
        _seen([history], params),
        params,
        on_token=None if on_token is None else lambda _, token: on_token(token),
    )
    return (piece for _, piece in pieces)


def generate_batch(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams | None = None,
    **overrides: Any,
) -> list[str]:
    """Complete several prompts in one batch; each completion is what ``generate`` gives alone.

    Args:
        model, tokenizer, params, overrides: as for ``generate``.
        prompts: non-empty texts.

    Returns:
        the completion of each prompt, in order.

    Raises:
        ValueError: an empty prompt or an invalid sampling parameter.
    """
    params = _resolve(tokenizer, params, overrides)
    ids = [_encode(tokenizer, prompt, i) for i, prompt in enumerate(prompts)]
    _check_prompts(model, ids, params)
    read, healed = zip(*(heal_prompt(tokenizer, prompt) for prompt in ids))
    start = _healed_start(tokenizer, partial(_prefill, model, list(read)), healed)
    pieces: list[list[str]] = [[] for _ in prompts]
    for i, piece in _text_pieces(model, tokenizer, start, _seen(ids, params), params, healed=healed):
        pieces[i].append(piece)
    return ["".join(p) for p in pieces]


def _resolve(tokenizer: Tokenizer, params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    names = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(names)}")
    params = replace(params or SamplingParams(), **overrides)
    if params.eos_token_id is None and tokenizer.eos_token_id is not None:
        params = replace(params, eos_token_id=tokenizer.eos_token_id)
    return params


def _encode(tokenizer: Tokenizer, prompt: str, index: int = 0) -> list[int]:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {index} must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(
            f"empty prompt at index {index}: the model needs at least one token to start from; "
            "pass some text (a BOS token, if the tokenizer has one)"
        )
    return tokenizer.encode(prompt)


def heal_prompt(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[int], str]:
    """A text prompt's ids to read, and the whitespace its last token held if that token is taken
    back out (see the module's docstring; "" when the prompt is read whole: byte-level tokenizers,
    a prompt of one token, a last token that is not whitespace alone). The first new token must
    then begin with that text (``limit_to_healed``), and the completion leaves it out."""
    if isinstance(tokenizer, ByteTokenizer) or len(ids) < 2:
        return ids, ""
    tail = tokenizer.decode(ids[-1:])
    return (ids[:-1], tail) if tail.isspace() else (ids, "")


def _tokens_starting_with(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    """The ids whose text alone begins with ``text``: decoded once per tokenizer and text where
    the tokenizer can be a cache key (both of mambastep's can), else on every call."""
    if isinstance(tokenizer, Hashable):
        return _cached_tokens_starting_with(tokenizer, text)
    return _cached_tokens_starting_with.__wrapped__(tokenizer, text)


@lru_cache(maxsize=8)
def _cached_tokens_starting_with(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    return tuple(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).startswith(text))


def _healed_start(
    tokenizer: Tokenizer, start: Callable[[], tuple[Tensor, ModelState]], healed: Sequence[str]
) -> Callable[[], tuple[Tensor, ModelState]]:
    """``start``, with the first logits of each healed sequence limited to tokens that begin with its text."""
    if not any(healed):
        return start

    def healed_start() -> tuple[Tensor, ModelState]:
        logits, state = start()  # (b, vocab)
        return limit_to_healed(tokenizer, logits, healed), state

    return healed_start


def limit_to_healed(tokenizer: Tokenizer, logits: Tensor, healed: Sequence[str]) -> Tensor:
    """``logits`` (b, vocab), with row i's tokens that do not begin with ``healed[i]`` at -inf
    (a new tensor where any row is healed; rows whose ``healed`` text is "" are left alone)."""
    if not any(healed):
        return logits
    logits = logits.clone()
    for row, text in enumerate(healed):
        if text:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed[list(_tokens_starting_with(tokenizer, text))] = True
            logits[row].masked_fill_(~allowed, float("-inf"))
    return logits


def _text_pieces(
    model: LanguageModel,
    tokenizer: Tokenizer,
    start: Callable[[], tuple[Tensor, ModelState]],
    seen: list[set[int]],
    params: SamplingParams,
    on_token: Callable[[int, int], None] | None = None,
    healed: Sequence[str] = (),
) -> Iterator[tuple[int, str]]:
    """(sequence index, text piece) as tokens arrive; stop strings end a sequence.

    ``start`` and ``seen`` are as for ``_decode``; ``on_token(index, token)`` sees every token;
    ``healed[i]``: text the prompt already holds that sequence i's first token begins with."""
    cancelled: set[int] = set()
    unsaid = [SkipHealed(text) for text in healed] or [SkipHealed("") for _ in seen]
    streams = [TextStream(tokenizer) for _ in seen]
    filters = [StopFilter(params.stop) for _ in seen]
    eos = None if params.ignore_eos else params.eos_token_id
    for i, token in _decode(model, start, seen, params, cancelled):
        if on_token is not None:
            on_token(i, token)
        if token == eos:
            continue  # ends the sequence; not part of the text
        piece = filters[i].push(unsaid[i](streams[i].push(token)))
        if filters[i].stopped:
            cancelled.add(i)
        if piece:
            yield i, piece
    for i, (stream, stop_filter) in enumerate(zip(streams, filters)):
        piece = stop_filter.push(unsaid[i](stream.flush())) + stop_filter.flush()
        if piece:
            yield i, piece


class SkipHealed:
    """A completion's text pieces without the healed text its prompt already holds (``heal_prompt``)."""

    def __init__(self, healed: str):
        self.left = len(healed)  # characters still to leave out

    def __call__(self, piece: str) -> str:
        cut = min(self.left, len(piece))
        self.left -= cut
        return piece[cut:]


class StopFilter:
    """Cuts a stream of text before the first stop string.

    Text is released only once it can no longer be the start of a stop string, so at
    most max(len(stop)) - 1 characters are held back. "First" means the occurrence
    that ends first (the earliest-starting one among those), whatever the pieces.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.stopped = False
        self._pending = ""

    def push(self, piece: str) -> str:
        """Add text; return what is safe to release ("" once stopped)."""
        if self.stopped:
            return ""
        text = self._pending + piece
        hits = [(at + len(s), at) for s in self.stop if (at := text.find(s)) >= 0]  # (end, start)
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)[1]]
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """The held-back text, at the end of the stream."""
        piece, self._pending = self._pending, ""
        return piece
