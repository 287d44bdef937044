"""mambastep's own files: states and sessions, as safetensors files with a versioned header;
and the safetensors reading and atomic writing that every file of mambastep goes through.

A state or session file records the fingerprint of the model's architecture and a digest of
its weights (``LanguageModel.weights_digest``). Loading it into a model of another
architecture is an error; into the same architecture with other weights (a fine-tuned
variant, other dtype, int8) an error too, unless the caller says ``other_weights=True``.
Files written before the digest was recorded (format version 1) load with a warning that
their weights cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from mambastep.models.state import KVLayerState, ModelState, SSMLayerState, StateError

if TYPE_CHECKING:
    from mambastep.models.lm import LanguageModel

log = logging.getLogger(__name__)

STATE_FORMAT = "mambastep-state"
SESSION_FORMAT = "mambastep-session"
VERSION = 2  # 2: the weights digest; 1 (still read): the fingerprint only
READ_VERSIONS = ("1", "2")
# Each format's kind and reader: named when a file of one is given to the other's reader.
_KINDS = {
    STATE_FORMAT: ("state", "mambastep.load_state (ModelState.load)"),
    SESSION_FORMAT: ("session", "Session.load"),
}
_LAYER_TYPES = {cls.__name__: cls for cls in (SSMLayerState, KVLayerState)}


def write_safetensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str], private: bool = True
) -> None:
    """Write a safetensors file atomically: a temporary file in the same directory is
    written, fsynced, renamed over ``path``, then the directory is fsynced.

    A crash at any point leaves the previous file or the new one, never a mix; a killed
    writer may leave a stray temporary file beside it. ``private``: the file is readable by
    its owner only (a state or session may hold a conversation); else it gets the usual mode,
    0666 less the umask (a checkpoint).
    """
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), private)


def write_atomically(path: str | Path, data: bytes | Callable[[Path], None], private: bool = True) -> None:
    """Write ``path`` as ``write_safetensors`` does: all of it or nothing.

    Args:
        data: the file's bytes, or a function that writes the file at the path it is given
            (such as safetensors' ``save_file``, which streams the tensors and replaces the
            file it is given with one readable by its owner only: the mode is set again after).
        private: readable by its owner only (0600), else the usual mode (0666 less the umask).

    Raises:
        FileNotFoundError: the folder ``path`` would be in does not exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:  # the mode, less the umask, is the kernel's doing: the umask is neither read nor changed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"cannot write {path}: there is no folder {path.parent}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
        if not isinstance(data, bytes):
            data(tmp)
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # makes the rename itself durable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(
    path: str | Path, error: type[ValueError] = StateError, kind: str = "state"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ``error``: a file that is not readable safetensors (truncated, corrupt, foreign); the
            message names the path and calls it a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path}: not a readable {kind} file: corrupt or truncated ({err})") from None
    return tensors, metadata


def read_safetensors_bytes(data: bytes, where: str, kind: str = "session") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors ``data`` held in memory (``where`` names it in errors).

    Raises:
        StateError: bytes that are not readable safetensors (truncated, corrupt, foreign).
    """
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, TypeError, AttributeError, OverflowError) as err:
        raise StateError(f"{where}: not a readable {kind} file: corrupt or truncated ({err})") from None
    if not isinstance(metadata, dict):
        raise StateError(f"{where}: not a readable {kind} file: its metadata is not a table")
    return tensors, metadata


def state_tensors(state: ModelState, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """A state as file content: contiguous CPU tensors named ``{prefix}layers.{i}.{field}``,
    and the metadata that ``state_from_tensors`` reads back (fingerprint, layer types)."""
    tensors = {
        f"{prefix}layers.{i}.{name}": t.detach().contiguous().cpu()
        for i, layer in enumerate(state.layers)
        for name, t in layer.tensors().items()
    }
    metadata = {
        "fingerprint": state.fingerprint,
        "layer_types": json.dumps([type(layer).__name__ for layer in state.layers]),
    }
    return tensors, metadata


def _weights_metadata(digest: str | None) -> dict[str, str]:
    if digest is None:
        log.warning("the weights of the model that made this state are unknown: the file records none")
        return {}
    return {"weights": digest}


def save_state(state: ModelState, path: str | Path) -> None:
    """Write ``state`` to a safetensors file with a versioned header, atomically (see
    ``write_safetensors``), with the digest of the weights of the model that made it."""
    tensors, metadata = state_tensors(state)
    header = {"format": STATE_FORMAT, "version": str(VERSION), **metadata, **_weights_metadata(state.weights_digest())}
    write_safetensors(path, tensors, header)


def load_state(path: str | Path, model: LanguageModel, other_weights: bool = False) -> ModelState:
    """Read a state written by ``save_state`` and check that it fits ``model``.

    Args:
        other_weights: load it although it was saved with other weights of the same architecture.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: not a mambastep state, a corrupt file, a state of another model, or of
            other weights (without ``other_weights``).
    """
    tensors, metadata = read_safetensors(path)
    _check_header(metadata, STATE_FORMAT, "state", path)
    state = state_from_tensors(tensors, metadata, model, path)  # another architecture: an error first
    _check_weights(metadata, model, other_weights, path)
    return state


def _check_header(metadata: dict[str, str], format: str, kind: str, path: str | Path) -> None:
    found = metadata.get("format")
    if found in _KINDS and found != format:
        other, reader = _KINDS[found]
        raise StateError(f"{path}: a mambastep {other} file, not a {kind} file: read it with {reader}")
    if found != format:
        raise StateError(f"{path}: not a mambastep {kind} file (format {found!r})")
    if metadata.get("version") not in READ_VERSIONS:
        raise StateError(
            f"{path}: {kind} format version {metadata.get('version')!r}, "
            f"this mambastep reads {', '.join(READ_VERSIONS)}"
        )


def _check_weights(metadata: dict[str, str], model: LanguageModel, other_weights: bool, path: str | Path) -> None:
    """Refuse a file saved with other weights than ``model``'s, unless ``other_weights``."""
    saved = metadata.get("weights")
    if saved is None:
        log.warning("%s records no weights digest (saved by an earlier mambastep): its weights cannot be checked", path)
        return
    if not other_weights and saved != model.weights_digest():
        raise StateError(
            f"{path}: saved with weights {saved}, but this model's weights are {model.weights_digest()} "
            "(same architecture, other weights: a fine-tuned variant, another dtype or int8); "
            "load it anyway with other_weights=True (--other-weights)"
        )


def state_from_tensors(
    tensors: dict[str, Tensor], metadata: dict[str, str], model: LanguageModel, path: str | Path, prefix: str = ""
) -> ModelState:
    """The state that ``state_tensors(prefix)`` wrote, checked against ``model`` and moved to
    its device; tensors without ``prefix`` are ignored.

    Raises:
        StateError: a state of another model, or missing, extra or misshapen tensors; the
            message names ``path`` (the file read) and the tensor.
    """
    tensors = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
    if metadata.get("fingerprint") != model.config.fingerprint:
        raise StateError(
            f"{path}: state of model {metadata.get('fingerprint')}, not of this model ({model.config.fingerprint})"
        )
    try:
        layer_types = json.loads(metadata["layer_types"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise StateError(f"{path}: missing or unreadable layer_types in the metadata ({err!r})") from None
    first_layer = [t for key, t in tensors.items() if key.startswith("layers.0.")]
    if any(name not in _LAYER_TYPES for name in layer_types) or not first_layer:
        raise StateError(f"{path}: unknown or empty layer states {layer_types}")
    batch_size = first_layer[0].shape[0]
    expected = model.new_state(batch_size, device="cpu")
    layers, lengths = [], set()
    for i, (type_name, ref) in enumerate(zip(layer_types, expected.layers)):
        cls = _LAYER_TYPES[type_name]
        values = {}
        for f in fields(cls):
            key = f"layers.{i}.{f.name}"
            if key not in tensors:
                raise StateError(f"{path}: missing tensor {key}")
            t, want = tensors[key], getattr(ref, f.name)
            # A growing state (a KV cache) may hold any number of tokens along its seq_dim.
            got_shape, want_shape = list(t.shape), list(want.shape)
            if cls.seq_dim is not None and len(got_shape) == len(want_shape):
                lengths.add(got_shape[cls.seq_dim])
                want_shape[cls.seq_dim] = got_shape[cls.seq_dim]
            if got_shape != want_shape:
                raise StateError(f"{path}: {key} has shape {tuple(got_shape)}, model expects {tuple(want_shape)}")
            values[f.name] = t.to(want.dtype)
        layers.append(cls(**values))
    if len(layers) != len(expected.layers) or len(tensors) != sum(len(layer.tensors()) for layer in layers):
        raise StateError(f"{path}: layer count does not match the model")
    if len(lengths) > 1:
        raise StateError(f"{path}: the layers hold caches of different lengths {sorted(lengths)}")
    return expected.with_layers(layers).to(model.device)


@dataclass(frozen=True)
class SessionRecord:
    """What a session file holds.

    state, logits: the state after the last token and the (1, vocab) float32 logits there
        (None at position 0); base_state, base_logits: the same at ``base_position``, the
        oldest snapshot, which a rollback replays from; history: (h,) int32, the last h token
        ids (positions position - h .. position - 1); max_rollback, checkpoint_every: the
        session's settings.
    """

    state: ModelState
    logits: Tensor | None
    base_state: ModelState
    base_logits: Tensor | None
    history: Tensor
    position: int
    base_position: int
    max_rollback: int
    checkpoint_every: int


def session_bytes(record: SessionRecord, weights_digest: str) -> bytes:
    """A session as the bytes of its file: with the digest of the model's weights and a SHA-256
    checksum of everything in it."""
    tensors, metadata = state_tensors(record.state, prefix="state.")
    tensors.update(state_tensors(record.base_state, prefix="base.")[0])
    tensors["history"] = record.history.to(torch.int32)
    for name, logits in (("state_logits", record.logits), ("base_logits", record.base_logits)):
        if logits is not None:
            tensors[name] = logits.detach().contiguous().cpu()
    metadata = {
        "format": SESSION_FORMAT,
        "version": str(VERSION),
        **metadata,
        **_weights_metadata(weights_digest),
        **{
            name: str(getattr(record, name))
            for name in ("position", "base_position", "max_rollback", "checkpoint_every")
        },
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    return safetensors_bytes(tensors, metadata=metadata)


def save_session(record: SessionRecord, path: str | Path, weights_digest: str) -> None:
    """Write a session to ``path`` atomically (see ``write_safetensors``)."""
    write_atomically(path, session_bytes(record, weights_digest))


def load_session(path: str | Path, model: LanguageModel, other_weights: bool = False) -> SessionRecord:
    """Read a session written by ``save_session`` and check that it fits ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: a truncated or corrupt file (unreadable, or a checksum that does not
            match), a file that is not a mambastep session, a session of another model or of
            other weights (without ``other_weights``), or parts that do not fit together; the
            message names the file.
    """
    tensors, metadata = read_safetensors(path, kind="session")
    return _session_record(tensors, metadata, model, other_weights, path)


def session_from_bytes(
    data: bytes, model: LanguageModel, other_weights: bool = False, where: str = "session"
) -> SessionRecord:
    """``load_session`` for a session file's bytes held in memory (``where`` names them in errors)."""
    tensors, metadata = read_safetensors_bytes(data, where)
    return _session_record(tensors, metadata, model, other_weights, where)


def _session_record(
    tensors: dict[str, Tensor], metadata: dict[str, str], model: LanguageModel, other_weights: bool, path: str | Path
) -> SessionRecord:
    _check_header(metadata, SESSION_FORMAT, "session", path)
    stored = metadata.pop("checksum", None)
    if stored != _checksum(tensors, metadata):
        raise StateError(f"{path}: checksum mismatch: the file is corrupt")
    state = state_from_tensors(tensors, metadata, model, path, prefix="state.")
    _check_weights(metadata, model, other_weights, path)
    base_state = state_from_tensors(tensors, metadata, model, path, prefix="base.")
    position, base_position, max_rollback, checkpoint_every = (
        _metadata_int(metadata, name, path)
        for name in ("position", "base_position", "max_rollback", "checkpoint_every")
    )
    if checkpoint_every < 1:
        raise StateError(f"{path}: checkpoint_every must be >= 1, got {checkpoint_every}")
    history = tensors.get("history")
    if history is None or history.dim() != 1 or history.dtype != torch.int32:
        raise StateError(f"{path}: the token history must be a 1-D int32 tensor")
    vocab = model.config.vocab_size
    if len(history) and not (int(history.min()) >= 0 and int(history.max()) < vocab):
        raise StateError(f"{path}: the token history holds ids outside the vocabulary [0, {vocab})")
    capacity = max_rollback + checkpoint_every
    if len(history) > capacity or not 0 <= position - len(history) <= base_position <= position:
        raise StateError(
            f"{path}: {len(history)} history tokens, base position {base_position} and position {position} "
            f"do not fit together (history capacity {capacity})"
        )
    return SessionRecord(
        state=state,
        logits=_logits_from(tensors, "state_logits", position, model, path),
        base_state=base_state,
        base_logits=_logits_from(tensors, "base_logits", base_position, model, path),
        history=history,
        position=position,
        base_position=base_position,
        max_rollback=max_rollback,
        checkpoint_every=checkpoint_every,
    )


def _checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of the metadata and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata_int(metadata: dict[str, str], name: str, path: str | Path) -> int:
    try:
        value = int(metadata[name])
    except (KeyError, ValueError):
        raise StateError(f"{path}: metadata {name!r} is missing or not an integer ({metadata.get(name)!r})") from None
    if value < 0:
        raise StateError(f"{path}: metadata {name!r} is negative ({value})")
    return value


def _logits_from(
    tensors: dict[str, Tensor], name: str, position: int, model: LanguageModel, path: str | Path
) -> Tensor | None:
    """The stored logits ``name``: (1, vocab) float32 if ``position`` > 0, absent at position 0."""
    logits = tensors.get(name)
    if position == 0:
        if logits is not None:
            raise StateError(f"{path}: {name} stored at position 0, where there are none")
        return None
    want = (1, model.config.vocab_size)
    if logits is None or tuple(logits.shape) != want or logits.dtype != torch.float32:
        got = None if logits is None else (tuple(logits.shape), logits.dtype)
        raise StateError(f"{path}: {name} must be float32 of shape {want}, got {got}")
    return logits.to(model.device)
