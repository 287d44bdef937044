"""Training text: find the files, check them, split them by file, tokenize, cut into lanes.

The held-out split is fixed by a rule, not by chance: a file is held out when
the hash of ``f"{seed}/{relative path}"`` falls below ``holdout``. Adding or
removing other files never moves a file from one side to the other.

Each side is one token stream (its files concatenated in path order), cut
into ``lanes`` equal rows, one per sequence of the batch. Step ``s`` reads one
window of every lane at offsets drawn from a generator seeded by (seed, s), so
the data position is the step itself, a batch covers the whole corpus evenly,
and consecutive batches are not neighbouring text (which would let the
weights chase the file at hand instead of learning the language). Each
process keeps only its own contiguous block of lanes (its shard).

A window may start at any token, or only where a line starts (``window_starts="lines"``), as a
prompt does: then a model learns that the first token of its context is the start of a line,
indentation included, instead of a guess at the column of a fragment. A token of newlines and
indentation (byte-level BPE keeps them together) that starts a window gives way to the
indentation's own token, which is how the tokenizer reads an indented line at a text's start.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mambastep.files.tokenizer import ByteTokenizer, Tokenizer
from mambastep.training.settings import DataSettings, TrainingError


@dataclass(frozen=True)
class TextFile:
    """A selected file."""

    path: Path
    name: str  # path relative to the folder it was found in: what the split hashes


@dataclass(frozen=True)
class Split:
    """One side of the split: its files and their token stream."""

    names: tuple[str, ...]
    tokens: Tensor  # (t,) int32: the files' tokens, concatenated in path order
    n_bytes: int  # UTF-8 bytes of the text

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(len(self.tokens), 1)


@dataclass(frozen=True)
class Corpus:
    """The training text, split by file."""

    train: Split
    heldout: Split
    heldout_text: bytes  # the held-out files' bytes, concatenated: what gzip and xz are measured on


def find_files(settings: DataSettings) -> list[TextFile]:
    """Every file under ``settings.paths`` that the include/exclude patterns select, in path order.

    Raises:
        TrainingError: a path that does not exist, or no file selected at all.
    """
    found: list[TextFile] = []
    for given in settings.paths:
        root = Path(given).expanduser()
        if root.is_file():
            found.append(TextFile(root, root.name))
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                name = path.relative_to(root).as_posix()
                if path.is_file() and _selected(name, settings):
                    found.append(TextFile(path, name))
        else:
            raise TrainingError(f"training data path {given} does not exist")
    if not found:
        raise TrainingError(
            f"no training files in {', '.join(settings.paths)}: nothing matches include "
            f"{list(settings.include)} (and not exclude {list(settings.exclude)})"
        )
    return found


def _selected(name: str, settings: DataSettings) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in settings.include) and not any(
        fnmatch.fnmatch(name, p) for p in settings.exclude
    )


def is_heldout(name: str, seed: int, holdout: float) -> bool:
    """The split rule: sha256 of ``f"{seed}/{name}"``, read as a fraction of 2**64, below ``holdout``."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < holdout


def _read_texts(files: list[TextFile], skip_binary: bool) -> list[tuple[TextFile, bytes]]:
    """The files' bytes; files that are not UTF-8 text (a NUL byte, invalid UTF-8) are binary."""
    texts, binary = [], []
    for f in files:
        data = f.path.read_bytes()
        try:
            data.decode("utf-8")
            text_ok = b"\0" not in data
        except UnicodeDecodeError:
            text_ok = False
        if text_ok:
            texts.append((f, data))
        else:
            binary.append(f.path)
    if binary and not skip_binary:
        shown = ", ".join(str(p) for p in binary[:5]) + (f" and {len(binary) - 5} more" if len(binary) > 5 else "")
        raise TrainingError(
            f"{len(binary)} file(s) are not UTF-8 text: {shown}. Leave them out with --exclude, "
            "or pass --skip-binary to skip every such file"
        )
    if not any(data for _, data in texts):
        raise TrainingError(f"the {len(files)} selected file(s) hold no text (all empty or binary)")
    return texts


def _split(texts: list[tuple[TextFile, bytes]], tokenizer: Tokenizer) -> Split:
    if isinstance(tokenizer, ByteTokenizer):
        joined = b"".join(data for _, data in texts)
        tokens = torch.from_numpy(np.frombuffer(joined, dtype=np.uint8).astype(np.int32))
    else:
        ids = [i for _, data in texts for i in tokenizer.encode(data.decode("utf-8"))]
        tokens = torch.tensor(ids, dtype=torch.int32)
    return Split(tuple(f.name for f, _ in texts), tokens, sum(len(data) for _, data in texts))


@dataclass(frozen=True)
class SplitTexts:
    """The selected files with their bytes, on each side of the split, in path order."""

    train: list[tuple[TextFile, bytes]]
    heldout: list[tuple[TextFile, bytes]]


def read_texts(settings: DataSettings) -> SplitTexts:
    """Read, check and split the training text.

    Raises:
        TrainingError: missing paths, no files, binary files (unless skipped), no text,
            or a split with no file on one side; the message names the paths or files.
    """
    texts = _read_texts(find_files(settings), settings.skip_binary)
    train = [(f, d) for f, d in texts if not is_heldout(f.name, settings.seed, settings.holdout)]
    heldout = [(f, d) for f, d in texts if is_heldout(f.name, settings.seed, settings.holdout)]
    if not train:
        raise TrainingError(f"every one of the {len(texts)} file(s) fell in the held-out split; lower --holdout")
    if settings.holdout > 0 and not heldout:
        raise TrainingError(
            f"no file of the {len(texts)} fell in the held-out split (holdout {settings.holdout}); "
            "add files, raise --holdout, or pass --holdout 0 to train without evaluation"
        )
    return SplitTexts(train, heldout)


def tokenize(texts: SplitTexts, tokenizer: Tokenizer) -> Corpus:
    """Both sides of the split as token streams."""
    heldout_text = b"".join(d for _, d in texts.heldout)
    return Corpus(_split(texts.train, tokenizer), _split(texts.heldout, tokenizer), heldout_text)


def window_draw_seed(seed: int, step: int) -> int:
    """The generator seed of a training step's windows: 32 bits, all that PyTorch's CPU generator
    keeps. Seed s starts s times 0x9E3779B1 (2^32 over the golden ratio), modulo 2^32, into the
    sequence of draws, so two seeds below 1,000 are at least 1.9 million steps apart and their
    runs share no draw."""
    return (step + seed * 0x9E3779B1) % 2**32


@dataclass(frozen=True)
class LineStarts:
    """Which tokens let a line start after them, and which start one themselves, in a vocabulary."""

    ends_line: Tensor  # (vocab,) bool: the token's text ends with a newline
    indentation: Tensor  # (vocab,) int64: for newlines then indentation, the indentation's one token; else -1

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> LineStarts:
        """The tables of ``tokenizer``'s vocabulary, from each token's text alone."""
        ends_line = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        indentation = torch.full((tokenizer.vocab_size,), -1, dtype=torch.int64)
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            ends_line[i] = text.endswith("\n")
            head, newline, indent = text.rpartition("\n")
            if newline and indent and not (head + indent).strip(" \t\n"):
                alone = tokenizer.encode(indent)
                if len(alone) == 1:  # else the indentation takes several tokens: no window starts here
                    indentation[i] = alone[0]
        return cls(ends_line, indentation)

    def positions(self, tokens: Tensor) -> Tensor:
        """(k,) int64: the positions in ``tokens`` (t,) where a line starts, in order."""
        tokens = tokens.long()
        after_newline = torch.cat([torch.ones(1, dtype=torch.bool), self.ends_line[tokens[:-1]]])
        return torch.nonzero(after_newline | (self.indentation[tokens] >= 0)).flatten()

    def first_tokens(self, first: Tensor) -> Tensor:
        """Windows' first tokens (any shape), those of newlines and indentation as the indentation alone."""
        swapped = self.indentation[first]
        return torch.where(swapped >= 0, swapped, first)


class Lanes:
    """A token stream cut into ``count`` equal lanes, read ``seq_len`` tokens at a time.

    This process keeps lanes [rank * count / world, (rank + 1) * count / world): a
    contiguous block of the stream. ``sample`` draws a training window per lane, at any token
    or, given ``line_starts``, where a line starts; ``window`` reads the lanes front to back,
    for evaluation.
    """

    def __init__(
        self,
        tokens: Tensor,
        count: int,
        seq_len: int,
        rank: int,
        world: int,
        what: str,
        min_len: int,
        line_starts: LineStarts | None = None,
    ):
        """``min_len``: the fewest tokens a lane may hold (seq_len + 1 to sample training windows)."""
        lane_len = len(tokens) // count
        if lane_len < min_len:
            raise TrainingError(
                f"the {what} split holds {len(tokens)} tokens, too few for {count} lanes (one per sequence "
                f"of the batch) of at least {min_len} tokens: add text or lower --batch-size"
                + (" or --seq-len" if min_len > 2 else "")
            )
        self.count, self.local = count, count // world
        self.first = rank * self.local  # the global index of this process's first lane
        self.tokens = tokens[self.first * lane_len : (self.first + self.local) * lane_len].view(self.local, lane_len)
        self.seq_len = seq_len
        self.line_starts = line_starts
        self.starts = None  # per lane of this process: where in it a window may start, where lines start
        if line_starts is not None:
            at = line_starts.positions(tokens[: count * lane_len])
            lane, offset = at // lane_len, at % lane_len
            room = offset < lane_len - seq_len
            self.starts = [offset[room & (lane == i)] for i in range(self.first, self.first + self.local)]
            if any(len(p) == 0 for p in self.starts):
                raise TrainingError(
                    f"a lane of the {what} split has no line start with {seq_len} tokens after it "
                    "(too few newlines): pass --window-starts tokens, or lower --seq-len or --batch-size"
                )

    def sample(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """Training inputs and targets of ``step``: (b, seq_len) int64 each, one window per lane.

        Every process draws the offsets of all lanes from the same generator and keeps its own,
        so the global batch does not depend on the number of processes.
        """
        generator = torch.Generator().manual_seed(window_draw_seed(seed, step))
        mine = slice(self.first, self.first + self.local)
        if self.starts is None:
            at = torch.randint(0, self.tokens.shape[1] - self.seq_len, (self.count,), generator=generator)[mine]
        else:
            draws = torch.rand(self.count, generator=generator, dtype=torch.float64)[mine]
            at = torch.stack([p[int(u * len(p))] for p, u in zip(self.starts, draws)])
        index = at[:, None] + torch.arange(self.seq_len + 1)  # (b, seq_len + 1)
        piece = self.tokens.gather(1, index).long()
        if self.line_starts is not None:
            piece[:, 0] = self.line_starts.first_tokens(piece[:, 0])
        return piece[:, :-1], piece[:, 1:]

    def windows(self, max_tokens: int) -> int:
        """Windows needed to read ``max_tokens`` inputs of each lane (or to its end), the last one shorter."""
        return -(-self._end(max_tokens) // self.seq_len)

    def window(self, i: int, max_tokens: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of window ``i`` from the lanes' starts: (b, q) int64 each, q <= seq_len."""
        start = i * self.seq_len
        piece = self.tokens[:, start : min(start + self.seq_len, self._end(max_tokens)) + 1].long()
        return piece[:, :-1], piece[:, 1:]

    def _end(self, max_tokens: int) -> int:
        """Inputs read per lane: ``max_tokens``, or all but its last token where it holds fewer."""
        return min(self.tokens.shape[1] - 1, max_tokens)
