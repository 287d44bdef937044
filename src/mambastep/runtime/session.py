"""A live stream through a model: feed, generate, checkpoint, roll back, fork, save.

A Mamba model's whole past is its constant-size state, so a session reads a stream of
any length in constant memory. A state cannot be run backwards, so to roll back the
session keeps the last tokens (a bounded history) and snapshots of the state every
``checkpoint_every`` tokens: it restores the nearest snapshot at or before the target
and replays the tokens after it (fewer than ``checkpoint_every``).

    session = Session(model, tokenizer)
    session.feed("the log so far")            # text, bytes or token ids, any length
    for piece in session.fork().generate(SamplingParams(max_new_tokens=20)):
        print(piece, end="")                  # a fork explores; the session is unchanged
    session.rollback_tokens(3)                # as if the last 3 tokens were never fed
    session.save("log.session")
    session = Session.load("log.session", model, tokenizer)

Memory, whatever the stream's length: the state and its last logits, at most
``max_rollback // checkpoint_every + 2`` snapshots (a state and logits each) and
``max_rollback + checkpoint_every`` int32 token ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mambastep.files.formats import SessionRecord, load_session, save_session, session_bytes, session_from_bytes
from mambastep.files.tokenizer import Tokenizer
from mambastep.models.lm import LanguageModel
from mambastep.models.state import ModelState
from mambastep.runtime.generation import generate_from_state
from mambastep.runtime.sampling import SamplingParams

# Defaults: any of the last 1024 tokens can be rolled back, replaying fewer than 256 tokens.
DEFAULT_MAX_ROLLBACK = 1024
DEFAULT_CHECKPOINT_EVERY = 256
# Token ids converted and checked at a time, so a list of millions makes no giant tensor.
FEED_PIECE = 65536
# Prefill lengths are a multiple of this plus powers of two below it: kernels then see a few
# shapes whatever the chunking (each new shape costs memory in oneDNN's and the allocator's caches).
SHAPE_STEP = 256


@dataclass(frozen=True)
class _Snapshot:
    """The state after ``position`` tokens, and the logits there (None at position 0)."""

    position: int
    state: ModelState
    logits: Tensor | None  # (1, vocab)


class _TokenWindow:
    """The last ``capacity`` token ids of a stream, in a ring indexed by absolute position."""

    def __init__(self, capacity: int, start: int = 0):
        self.capacity = capacity
        self._ring = torch.zeros(capacity, dtype=torch.int32)
        self.end = start  # position after the last token
        self.size = 0  # tokens held: positions [end - size, end)

    @property
    def start(self) -> int:
        return self.end - self.size

    def append(self, tokens: Tensor) -> None:
        """Add (m,) token ids after ``end``; the oldest fall out."""
        kept = tokens[-self.capacity :]
        self._write(self.end + len(tokens) - len(kept), kept)
        self.end += len(tokens)
        self.size = min(self.size + len(tokens), self.capacity)

    def read(self, start: int, end: int) -> Tensor:
        """The (end - start,) int64 token ids at positions [start, end), a copy."""
        assert self.start <= start <= end <= self.end, (start, end, self.start, self.end)
        i, n = start % self.capacity, end - start
        first = min(n, self.capacity - i)
        return torch.cat([self._ring[i : i + first], self._ring[: n - first]]).long()

    def truncate(self, end: int) -> None:
        """Forget the tokens at positions >= ``end``."""
        assert self.start <= end <= self.end, (end, self.start, self.end)
        self.size -= self.end - end
        self.end = end

    def copy(self) -> _TokenWindow:
        other = _TokenWindow(self.capacity)
        other._ring, other.end, other.size = self._ring.clone(), self.end, self.size
        return other

    def _write(self, position: int, tokens: Tensor) -> None:
        i = position % self.capacity
        first = min(len(tokens), self.capacity - i)
        self._ring[i : i + first] = tokens[:first]
        self._ring[: len(tokens) - first] = tokens[first:]


@dataclass
class _Timeline:
    """Everything that moves as a session reads: what ``checkpoint`` copies and ``rollback`` restores."""

    state: ModelState
    logits: Tensor | None  # (1, vocab) after the last token; None before the first
    window: _TokenWindow
    snapshots: list[_Snapshot]  # by position, all within the window; shared between copies, never changed

    def copy(self) -> _Timeline:
        return _Timeline(self.state.clone(), _clone(self.logits), self.window.copy(), list(self.snapshots))


def _clone(logits: Tensor | None) -> Tensor | None:
    return None if logits is None else logits.clone()


class Session:
    """One stream through a model, fed in chunks of any size, that can generate, roll back,
    fork and be saved.

    Args:
        model: the language model, for one sequence. With a Mamba or Mamba-2 model memory
            stays constant; a transformer's KV cache grows with the stream.
        tokenizer: encodes fed text and decodes generated text; None for token ids only.
        max_rollback: ``rollback_tokens(n)`` is guaranteed for n up to this many tokens
            (see ``rollback_limit``).
        checkpoint_every: the state is snapshotted at every multiple of this many tokens
            (within reach of a rollback), so a rollback replays fewer tokens than this.
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer | None = None,
        *,
        max_rollback: int = DEFAULT_MAX_ROLLBACK,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ):
        _check_count("max_rollback", max_rollback, low=0)
        _check_count("checkpoint_every", checkpoint_every, low=1)
        self.model = model
        self.tokenizer = tokenizer
        self.max_rollback = max_rollback
        self.checkpoint_every = checkpoint_every
        state = model.new_state(1)
        window = _TokenWindow(max_rollback + checkpoint_every)
        self._now = _Timeline(state, None, window, [_Snapshot(0, state.clone(), None)])
        self._marks: dict[int, _Timeline] = {}
        self._next_mark = 0
        self._generating = False

    def __repr__(self) -> str:
        return f"Session(position={self.position}, model={self.model.config.fingerprint})"

    @property
    def position(self) -> int:
        """Tokens read so far (fed or generated, less those rolled back)."""
        return self._now.window.end

    @property
    def state(self) -> ModelState:
        """A copy of the state after the last token (one sequence)."""
        return self._now.state.clone()

    @property
    def logits(self) -> Tensor | None:
        """A copy of the (1, vocab) float32 next-token logits, or None before the first token."""
        return _clone(self._now.logits)

    @property
    def history(self) -> Tensor:
        """The recent token ids kept for rollback, oldest first: (h,) int64, h <= max_rollback + checkpoint_every."""
        window = self._now.window
        return window.read(window.start, window.end)

    @property
    def rollback_limit(self) -> int:
        """The most tokens ``rollback_tokens`` can undo now.

        At least min(position, max_rollback) in a stream read forward; a rollback uses
        this reach up, and reading new tokens gives it back."""
        return self.position - self._now.snapshots[0].position

    @property
    def state_bytes(self) -> int:
        """Bytes of the state after the last token (``state.nbytes``, without the copy)."""
        return self._now.state.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held by the state, the snapshots and the history (checkpoints excluded)."""
        now = self._now
        held = [(s.state, s.logits) for s in now.snapshots] + [(now.state, now.logits)]
        logits = sum(t.numel() * t.element_size() for _, t in held if t is not None)
        return sum(state.nbytes for state, _ in held) + logits + now.window.capacity * 4

    def feed(self, tokens: str | bytes | Sequence[int] | Tensor | np.ndarray) -> None:
        """Read more of the stream, from the current state.

        Every id is checked before any is read, so a bad chunk changes nothing.

        Args:
            tokens: text (needs a tokenizer); bytes, read as byte ids 0..255 (for
                byte-level models); or token ids: a sequence of ints, or a 1-D integer
                tensor or array. Any length: long chunks go through ``model.prefill``
                in pieces, so memory does not grow with them.

        Raises:
            ValueError: an id outside the vocabulary (the message gives its offset), ids
                that are not integers, text without a tokenizer, or a generation from
                this session still running.
        """
        self._check_idle()
        if isinstance(tokens, str):
            tokens = self._need_tokenizer("feed text").encode(tokens)
        elif isinstance(tokens, (bytes, bytearray)):
            tokens = np.frombuffer(tokens, dtype=np.uint8).copy()  # a writable array for torch
        for _ in _pieces(tokens, self.model.config.vocab_size):
            pass  # check every piece first: a bad id anywhere must leave the session as it was
        for piece in _pieces(tokens, self.model.config.vocab_size):
            self._advance(piece)

    def generate(self, params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        """Stream a continuation, as ``mambastep.generate`` does for a prompt.

        The session reads what it generates: when the iterator ends (or is closed), the
        session has advanced by every generated token, an eos token and the tokens of a
        stop string included. To explore without changing the session, generate from
        ``fork()``. The repetition penalty sees the session's history.

        Args:
            params: sampling parameters; None takes the defaults.
            **overrides: SamplingParams fields that replace those of ``params``.

        Returns:
            an iterator of text pieces.

        Raises:
            ValueError: nothing fed yet, no tokenizer, an invalid sampling parameter, or
                another generation from this session still running.
        """
        self._check_idle()
        tokenizer = self._need_tokenizer("generate text")
        if self._now.logits is None:
            raise ValueError("nothing to continue: feed at least one token before generate")
        generated: list[int] = []
        pieces = generate_from_state(
            self.model,
            tokenizer,
            self._now.logits,
            self._now.state,
            params,
            history=self.history.tolist(),
            on_token=generated.append,
            **overrides,
        )
        return self._reading(pieces, generated)

    def checkpoint(self) -> int:
        """Remember this point of the stream; ``rollback(id)`` returns to it exactly.

        A checkpoint holds a copy of the state, the history and references to the
        snapshots, and lives until the session does (it is not saved to files).
        """
        self._marks[self._next_mark] = self._now.copy()
        self._next_mark += 1
        return self._next_mark - 1

    def rollback(self, checkpoint_id: int) -> None:
        """Return exactly to a checkpoint of this session (or of the session it was forked from).

        Raises:
            ValueError: an unknown id.
        """
        self._check_idle()
        if checkpoint_id not in self._marks:
            raise ValueError(f"no checkpoint {checkpoint_id!r} in this session; known: {sorted(self._marks)}")
        self._now = self._marks[checkpoint_id].copy()

    def rollback_tokens(self, n: int) -> None:
        """Undo the last ``n`` tokens: the session is then as if they had never been read.

        Restores the nearest snapshot at or before the target and replays the tokens
        after it from the history.

        Raises:
            ValueError: n negative, or more than ``rollback_limit`` (the session is unchanged).
        """
        self._check_idle()
        _check_count("n", n, low=0)
        if n > self.rollback_limit:
            raise ValueError(
                f"cannot roll back {n} tokens: this session can undo at most {self.rollback_limit} "
                f"(it has read {self.position}; max_rollback={self.max_rollback}); nothing was changed"
            )
        now, target = self._now, self.position - n
        base = next(s for s in reversed(now.snapshots) if s.position <= target)
        replay = now.window.read(base.position, target)  # (target - base.position,)
        now.window.truncate(base.position)
        now.snapshots = [s for s in now.snapshots if s.position <= base.position]
        now.state, now.logits = base.state.clone(), _clone(base.logits)
        if len(replay):
            self._advance(replay)

    def fork(self) -> Session:
        """An independent copy: reading, rolling back or generating in one never changes the other.

        The fork shares this session's checkpoints (as they were), not its later ones.
        """
        other = Session(
            self.model, self.tokenizer, max_rollback=self.max_rollback, checkpoint_every=self.checkpoint_every
        )
        other._now, other._marks, other._next_mark = self._now.copy(), dict(self._marks), self._next_mark
        return other

    def save(self, path: str | Path) -> None:
        """Write the session to a file, atomically (``files.formats.save_session``).

        The file holds the state and logits, the oldest snapshot with its logits (the
        base a rollback replays from), the history, the token count, the rollback
        settings, the model's fingerprint and weights digest, and a SHA-256 checksum of all
        of it. Checkpoints made with ``checkpoint()`` are not saved.
        """
        save_session(self._record(), path, self.model.weights_digest())

    def to_bytes(self) -> bytes:
        """The bytes of the file ``save`` writes."""
        return session_bytes(self._record(), self.model.weights_digest())

    @classmethod
    def load(
        cls, path: str | Path, model: LanguageModel, tokenizer: Tokenizer | None = None, other_weights: bool = False
    ) -> Session:
        """Read a session written by ``save`` and continue it with ``model``.

        Args:
            other_weights: continue it although it was saved with other weights of the same
                architecture (a fine-tuned variant, another dtype, int8).

        Raises:
            FileNotFoundError: no file at ``path``.
            StateError: a truncated or corrupt file (unreadable, or a checksum that does
                not match), a file that is not a mambastep session, or a session of
                another model or other weights; the message names the file.
        """
        return cls._from_record(load_session(path, model, other_weights), model, tokenizer)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        model: LanguageModel,
        tokenizer: Tokenizer | None = None,
        other_weights: bool = False,
        where: str = "session",
    ) -> Session:
        """``load`` for the bytes of a session file held in memory (``where`` names them in errors)."""
        return cls._from_record(session_from_bytes(data, model, other_weights, where), model, tokenizer)

    def _record(self) -> SessionRecord:
        now, base = self._now, self._now.snapshots[0]
        return SessionRecord(
            state=now.state,
            logits=now.logits,
            base_state=base.state,
            base_logits=base.logits,
            history=self.history,
            position=self.position,
            base_position=base.position,
            max_rollback=self.max_rollback,
            checkpoint_every=self.checkpoint_every,
        )

    @classmethod
    def _from_record(cls, record: SessionRecord, model: LanguageModel, tokenizer: Tokenizer | None) -> Session:
        session = cls(model, tokenizer, max_rollback=record.max_rollback, checkpoint_every=record.checkpoint_every)
        window = _TokenWindow(
            record.max_rollback + record.checkpoint_every, start=record.position - len(record.history)
        )
        window.append(record.history)
        base = _Snapshot(record.base_position, record.base_state, record.base_logits)
        session._now = _Timeline(record.state, record.logits, window, [base])
        return session

    def _advance(self, tokens: Tensor) -> None:
        """Read (m,) checked token ids, snapshotting the state at the multiples of
        ``checkpoint_every`` that stay within the history."""
        now, k = self._now, self.checkpoint_every
        origin, end = now.window.end, now.window.end + len(tokens)
        window_start = end - min(now.window.capacity, now.window.size + len(tokens))
        first_cut = -(-max(window_start, origin + 1) // k) * k  # first multiple of k worth a snapshot
        cuts = list(range(first_cut, end + 1, k))
        if not cuts or cuts[-1] != end:
            cuts.append(end)
        start = origin
        for cut in cuts:
            for size in _piece_sizes(cut - start):
                segment = tokens[start - origin : start - origin + size]  # (size,)
                now.logits, now.state = self.model.prefill(segment[None].to(self.model.device), now.state)
                now.window.append(segment)
                start += size
            if cut % k == 0:
                now.snapshots.append(_Snapshot(cut, now.state.clone(), now.logits.clone()))
        now.snapshots = [s for s in now.snapshots if s.position >= now.window.start]

    def _reading(self, pieces: Iterator[str], generated: list[int]) -> Iterator[str]:
        """Pass the pieces on; then read the generated tokens into the session."""
        self._generating = True
        try:
            yield from pieces
        finally:
            self._generating = False
            if generated:
                self._advance(torch.tensor(generated, dtype=torch.long))

    def _check_idle(self) -> None:
        if self._generating:
            raise ValueError("a generation from this session is still running: finish or close() it first")

    def _need_tokenizer(self, action: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"cannot {action}: this session has no tokenizer (pass one to Session or Session.load)")
        return self.tokenizer


def _check_count(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _pieces(tokens: Sequence[int] | Tensor | np.ndarray, vocab: int) -> Iterator[Tensor]:
    """Consecutive pieces of at most FEED_PIECE ids, each checked: (m,) int64 on the CPU.

    Raises:
        ValueError: ids that are not integers, not 1-D, or outside [0, vocab).
    """
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if isinstance(tokens, Tensor) and tokens.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(tokens.shape)} (pass one sequence, e.g. ids[0])")
    for offset in range(0, len(tokens), FEED_PIECE):
        piece = tokens[offset : offset + FEED_PIECE]
        if not isinstance(piece, Tensor):
            piece = torch.tensor(piece)  # infers the dtype, so floats are caught below
        if piece.dtype == torch.bool or piece.is_floating_point() or piece.is_complex() or piece.dim() != 1:
            raise ValueError(
                f"token ids must be a 1-D sequence of integers, got {piece.dtype} of shape {tuple(piece.shape)}"
            )
        piece = piece.to(device="cpu", dtype=torch.long)
        bad = ((piece < 0) | (piece >= vocab)).nonzero()
        if len(bad):
            at = int(bad[0])
            raise ValueError(
                f"token id {int(piece[at])} at offset {offset + at} lies outside the model's vocabulary [0, {vocab})"
            )
        yield piece


def _piece_sizes(n: int) -> list[int]:
    """n as a multiple of SHAPE_STEP followed by decreasing powers of two."""
    rest = n % SHAPE_STEP
    sizes = [n - rest] if n >= SHAPE_STEP else []
    return sizes + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
