"""Recurrent state: one named object per layer type, and the model-level state.

A model never owns its state: it takes one and returns the next, so a state
can be copied, saved, forked or dropped freely. Every tensor here is
batch-first, so ``select`` and ``cat`` work on dimension 0.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

if TYPE_CHECKING:
    from mambastep.models import LanguageModel

STATE_FORMAT = "mambastep-state"
STATE_VERSION = 1


class StateError(ValueError):
    """A state file or state object that does not fit the model."""


class _BatchTensors:
    """Shared behaviour of a dataclass whose fields are batch-first tensors."""

    # The dimension that grows with every token (a KV cache), or None for a constant-size state.
    seq_dim: ClassVar[int | None] = None

    def _map(self, fn) -> "_BatchTensors":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    def clone(self):
        return self._map(torch.clone)

    def select(self, indices: Sequence[int] | Tensor):
        """Keep the sequences at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def to(self, device: torch.device | str):
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def cat(cls, states: Sequence):
        """Join states along the batch."""
        names = [f.name for f in fields(cls)]
        return cls(**{name: torch.cat([getattr(s, name) for s in states]) for name in names})


@dataclass(frozen=True)
class SSMLayerState(_BatchTensors):
    """State of one Mamba or Mamba-2 layer.

    conv: (b, k-1, c) the last k-1 inputs of the causal conv, in the activation dtype.
    ssm:  (b, e, n) for Mamba-1, (b, h, p, n) for Mamba-2; float32 by default.
    """

    conv: Tensor
    ssm: Tensor

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        conv_shape: tuple[int, ...],
        ssm_shape: tuple[int, ...],
        conv_dtype: torch.dtype,
        ssm_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "SSMLayerState":
        return cls(
            conv=torch.zeros(batch_size, *conv_shape, dtype=conv_dtype, device=device),
            ssm=torch.zeros(batch_size, *ssm_shape, dtype=ssm_dtype, device=device),
        )


@dataclass
class _Reserve:
    """A KV buffer with spare room at its end, shared by the states that view it.

    ``used`` positions are written. Only a state of length ``used`` may write the
    next ones in place; any other (an older state, the second of two forks)
    copies, so the tensors of a state a caller holds never change.
    """

    k: Tensor  # (b, capacity, h, p)
    v: Tensor  # (b, capacity, h, p)
    used: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, length: int, end: int, like: Tensor) -> bool:
        """Reserve positions [length, end) for a state of ``length`` tokens with ``like``'s dtype and device."""
        if self.k.dtype != like.dtype or self.k.device != like.device:
            return False
        with self.lock:
            if self.used != length or end > self.k.shape[1]:
                return False
            self.used = end
            return True


# Spare room given to a KV buffer when it is (re)allocated: a quarter of its length, at least
# this many tokens, so a decode loop copies the cache O(log l) times instead of at every token.
KV_MIN_SPARE = 64


@dataclass(frozen=True)
class KVLayerState(_BatchTensors):
    """State of one attention layer: the keys and values of every token so far.

    k: (b, l, h, p) keys, after the rotary embedding; v: (b, l, h, p) values; both in
    the activation dtype. It grows by one position per token; l = 0 is the empty cache.
    ``nbytes`` counts the l positions held; the buffer behind a grown cache keeps up to a
    quarter more (at least KV_MIN_SPARE positions) as room to grow in place.
    """

    k: Tensor
    v: Tensor
    seq_dim: ClassVar[int] = 1

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        length: int = 0,
    ) -> "KVLayerState":
        shape = (batch_size, length, n_heads, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device))

    @property
    def length(self) -> int:
        """Tokens held."""
        return self.k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> "KVLayerState":
        """This cache followed by ``k``, ``v`` (b, l', h, p); ``self`` is left as it was.

        Writes in place into spare room after the cache when this state is the
        longest view of it, else copies into a new buffer with spare room.
        """
        length, end = self.length, self.length + k.shape[1]
        reserve: _Reserve | None = getattr(self, "_reserve", None)
        if reserve is None or not reserve.claim(length, end, k):
            b, _, h, p = k.shape
            capacity = end + max(end // 4, KV_MIN_SPARE)
            reserve = _Reserve(k.new_empty(b, capacity, h, p), k.new_empty(b, capacity, h, p), used=end)
            reserve.k[:, :length], reserve.v[:, :length] = self.k, self.v
        reserve.k[:, length:end], reserve.v[:, length:end] = k, v
        state = KVLayerState(k=reserve.k[:, :end], v=reserve.v[:, :end])  # views: (b, end, h, p)
        object.__setattr__(state, "_reserve", reserve)  # not a field: clone, select, to and cat drop it
        return state

    @classmethod
    def cat(cls, states: Sequence["KVLayerState"]) -> "KVLayerState":
        """Join caches of the same length along the batch."""
        lengths = sorted({s.length for s in states})
        if len(lengths) > 1:
            raise StateError(f"cannot batch KV caches of different lengths {lengths} (there is no padding)")
        return super().cat(states)


LayerState = Union[SSMLayerState, KVLayerState]


@dataclass(frozen=True)
class ModelState:
    """The whole recurrent state of a model: one state per layer.

    ``fingerprint`` names the model configuration the state belongs to;
    loading a state into another model is an error.
    """

    layers: tuple[LayerState, ...]
    fingerprint: str

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all layers, whole batch)."""
        return sum(layer.nbytes for layer in self.layers)

    def _map(self, fn) -> "ModelState":
        return ModelState(tuple(fn(layer) for layer in self.layers), self.fingerprint)

    def clone(self) -> "ModelState":
        return self._map(lambda s: s.clone())

    def select(self, indices: Sequence[int] | Tensor) -> "ModelState":
        """Keep the sequences at ``indices`` (in that order)."""
        return self._map(lambda s: s.select(indices))

    def to(self, device: torch.device | str) -> "ModelState":
        return self._map(lambda s: s.to(device))

    @staticmethod
    def cat(states: Sequence["ModelState"]) -> "ModelState":
        """Join states of the same model along the batch."""
        if not states:
            raise StateError("cat needs at least one state")
        fingerprints = {s.fingerprint for s in states}
        if len(fingerprints) != 1:
            raise StateError(f"cannot cat states of different models: {sorted(fingerprints)}")
        layers = tuple(
            type(group[0]).cat(group) for group in zip(*(s.layers for s in states))
        )
        return ModelState(layers, states[0].fingerprint)

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file with a versioned header, atomically
        (see ``write_safetensors``)."""
        tensors, metadata = self.to_tensors()
        write_safetensors(path, tensors, {"format": STATE_FORMAT, "version": str(STATE_VERSION), **metadata})

    def to_tensors(self, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
        """The state as file content: contiguous CPU tensors named ``{prefix}layers.{i}.{field}``,
        and the metadata that ``state_from_tensors`` reads back (fingerprint, layer types)."""
        tensors = {
            f"{prefix}layers.{i}.{name}": t.detach().contiguous().cpu()
            for i, layer in enumerate(self.layers)
            for name, t in layer.tensors().items()
        }
        metadata = {
            "fingerprint": self.fingerprint,
            "layer_types": json.dumps([type(layer).__name__ for layer in self.layers]),
        }
        return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temporary file in the same directory is
    written, flushed and fsynced, renamed over ``path``, then the directory is fsynced.

    A crash at any point leaves the previous file or the new one, never a mix; a killed
    writer may leave a stray ``.{name}.*.tmp`` beside it. The file is readable by its
    owner only (it may hold a conversation).
    """
    path = Path(path)
    data = safetensors_bytes(tensors, metadata=metadata)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def read_safetensors(path: str | Path, kind: str = "state") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: a file that is not readable safetensors (truncated, corrupt, foreign);
            the message names the path and calls it a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"{path}: not a readable {kind} file ({err})") from None
    return tensors, metadata


_LAYER_TYPES = {cls.__name__: cls for cls in (SSMLayerState, KVLayerState)}


def load_state(path: str | Path, model: "LanguageModel") -> ModelState:
    """Read a state written by ``ModelState.save`` and check it fits ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: not a mambastep state, a corrupt file, or a state of another model.
    """
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not a mambastep state file")
    if metadata.get("version") != str(STATE_VERSION):
        raise StateError(
            f"{path}: state format version {metadata.get('version')}, this mambastep reads {STATE_VERSION}"
        )
    return state_from_tensors(tensors, metadata, model, path)


def state_from_tensors(
    tensors: dict[str, Tensor], metadata: dict[str, str], model: "LanguageModel", path: str | Path, prefix: str = ""
) -> ModelState:
    """The state that ``ModelState.to_tensors(prefix)`` wrote, checked against ``model``
    and moved to its device; tensors without ``prefix`` are ignored.

    Raises:
        StateError: a state of another model, or missing, extra or misshapen tensors;
            the message names ``path`` (the file read) and the tensor.
    """
    tensors = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
    if metadata.get("fingerprint") != model.config.fingerprint:
        raise StateError(
            f"{path}: state of model {metadata.get('fingerprint')}, "
            f"not of this model ({model.config.fingerprint})"
        )
    try:
        layer_types = json.loads(metadata["layer_types"])
    except (KeyError, json.JSONDecodeError) as err:
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
    if len(layers) != len(expected.layers) or len(tensors) != sum(len(l.tensors()) for l in layers):
        raise StateError(f"{path}: layer count does not match the model")
    if len(lengths) > 1:
        raise StateError(f"{path}: the layers hold caches of different lengths {sorted(lengths)}")
    return ModelState(tuple(layers), model.config.fingerprint).to(model.device)
