"""Tokenizers: ``tokenizer.json`` through the `tokenizers` library, or raw UTF-8 bytes.

Mamba checkpoints on the hub ship the GPT-NeoX tokenizer as ``tokenizer.json``
(the original state-spaces ones ship none: pass ``EleutherAI/gpt-neox-20b``).
mambastep's own byte-level models say ``"tokenizer": "bytes"`` in config.json;
``train_bpe`` makes a byte-level BPE tokenizer from text (what ``train --tokenizer bpe:N`` uses).

``TextStream`` turns a stream of token ids into a stream of text pieces, holding
back bytes until they form whole UTF-8 characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import tokenizers

# Special tokens taken as end-of-sequence, first match wins.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BYTES = "bytes"
SUGGESTED_TOKENIZER = "EleutherAI/gpt-neox-20b"
SUGGESTED_TOKENIZER_SIZE = 50277  # its tokens: the vocabulary in the state-spaces checkpoints' config.json
REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, fetched or read."""


class Tokenizer(Protocol):
    """What generation needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level: the ids 0..255 are the bytes of the UTF-8 encoding."""

    vocab_size = 256

    def __init__(self, eos_token_id: int | None = None):
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id must lie in [0, 256), got {eos_token_id!r}")
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes to text; invalid or incomplete UTF-8 becomes U+FFFD.

        Raises:
            ValueError: an id outside [0, 256) (a model whose vocabulary is not bytes).
        """
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer cannot decode token id {bad[0]}: ids must lie in [0, 256)")
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (read from tokenizer.json) behind the ``Tokenizer`` protocol."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token_id: int | None = None):
        """Args: tokenizer; eos_token_id: None finds it among the special tokens (EOS_TOKENS)."""
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id if eos_token_id is not None else _find_eos(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read a tokenizer.json.

        Raises:
            TokenizerError: a missing, unreadable or corrupt file; the message names it.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from err
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # `tokenizers` raises a plain Exception for a malformed tokenizer
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from err
        return cls(tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens (BOS...) are added only if asked."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included (ids the vocabulary lacks are dropped by `tokenizers`)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenization) of ``vocab_size`` tokens learned from ``texts``.

    Every byte has a token, so any text encodes; id 0 is ``<|endoftext|>``, the end-of-sequence
    token. The result depends only on the texts and their order.

    Raises:
        ValueError: ``vocab_size`` too small to hold the 256 bytes and the special token.
    """
    least = len(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < least:
        raise ValueError(f"a byte-level BPE vocabulary needs at least {least} tokens, got {vocab_size}")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS_TOKENS[0]],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return HFTokenizer(tokenizer)


def _find_eos(tokenizer: tokenizers.Tokenizer) -> int | None:
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return next((special[name] for name in EOS_TOKENS if name in special), None)


def load_tokenizer(path_or_id: str | Path, tokenizer: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint, or one named explicitly.

    Args:
        path_or_id: a checkpoint directory (with tokenizer.json, or a config.json that says
            ``"tokenizer": "bytes"``), a tokenizer.json file, "bytes", or a hub id "owner/name".
        tokenizer: where to take the tokenizer from instead of ``path_or_id`` (same forms);
            for checkpoints that ship none, e.g. "EleutherAI/gpt-neox-20b".

    Returns:
        a ``ByteTokenizer`` or an ``HFTokenizer``.

    Raises:
        TokenizerError: nothing usable at the path, a corrupt file, or a hub id that cannot
            be fetched (offline); the message says what to pass instead.
    """
    source = path_or_id if tokenizer is None else tokenizer
    text = str(source)
    if text == BYTES:
        return ByteTokenizer()
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return HFTokenizer.from_file(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise TokenizerError(f"no tokenizer at {text}: not a directory, a tokenizer.json file, 'bytes' or a hub id")
    return HFTokenizer.from_file(_download(text))


def _from_directory(directory: Path) -> Tokenizer:
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        return HFTokenizer.from_file(tokenizer_json)
    config_path = directory / "config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            named = config.get("tokenizer")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise TokenizerError(f"{config_path}: not a readable JSON object ({err})") from err
        if named == BYTES:
            return ByteTokenizer()
        if named is not None:
            raise TokenizerError(f"{config_path}: tokenizer {named!r} is not understood (only {BYTES!r})")
    raise TokenizerError(
        f'{directory}: no tokenizer.json (nor a config.json saying "tokenizer": "bytes"). '
        + _missing_tokenizer_hint(config.get("vocab_size"))
    )


def _missing_tokenizer_hint(vocab_size: object) -> str:
    """What to pass for a checkpoint without a tokenizer, by the vocabulary its config.json gives."""
    if not isinstance(vocab_size, int) or vocab_size >= SUGGESTED_TOKENIZER_SIZE:
        return (
            "The original state-spaces checkpoints ship without one; pass a tokenizer explicitly, e.g. "
            f"--tokenizer {SUGGESTED_TOKENIZER} (load_tokenizer(path, tokenizer={SUGGESTED_TOKENIZER!r}))."
        )
    if vocab_size < ByteTokenizer.vocab_size:
        return (
            f"Its vocabulary of {vocab_size} tokens is too small for a text tokenizer: give it token ids "
            "instead (mambastep inspect --ids, mambastep stream --ids)."
        )
    return (
        f"Pass the tokenizer it was trained with (at most {vocab_size} tokens) with --tokenizer "
        "(a directory, a tokenizer.json file, a hub id, or 'bytes' for byte-level text)."
    )


def _download(repo_id: str) -> Path:
    """tokenizer.json of a hub repository, through the huggingface_hub cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json"))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as err:
        raise TokenizerError(
            f"{repo_id} is not a local path and its tokenizer.json could not be fetched from the "
            f"Hugging Face Hub ({type(err).__name__}: offline, or no such repository or file). Pass a local directory "
            f"that holds tokenizer.json or the path of a tokenizer.json file; for a checkpoint without a "
            f"tokenizer, name one, e.g. --tokenizer {SUGGESTED_TOKENIZER}."
        ) from err


class TextStream:
    """Incremental detokenizer: push token ids one at a time, get the new text.

    Only a short window of ids is decoded per push: ids[prefix:read] were already
    emitted and give the decoder context (some decoders change the first token's
    text), ids[read:] are new. A piece that ends in U+FFFD may be a split UTF-8
    character, so it is held back until more ids arrive or ``flush`` is called.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while held back)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything held back, incomplete characters included (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        context = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if not final and (len(text) <= len(context) or text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(context) :]
