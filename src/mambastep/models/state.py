"""Recurrent state: one named object per layer type, and the model-level state.

A model never owns its state: it takes one and returns the next, so a state
can be copied, saved, forked or dropped freely. Every tensor here is
batch-first, so ``select`` and ``cat`` work on dimension 0.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn


class StateError(ValueError):
    """A state file or state object that does not fit the model."""


class _BatchTensors:
    """Shared behaviour of a dataclass whose fields are batch-first tensors."""

    # The dimension that grows with every token (a KV cache), or None for a constant-size state.
    seq_dim: ClassVar[int | None] = None

    def _map(self, fn) -> _BatchTensors:
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

    @property
    def nbytes_per_token(self) -> int:
        """Bytes the state grows by per token (whole batch): 0 for a constant-size state."""
        if self.seq_dim is None:
            return 0
        shapes = ((t.shape[: self.seq_dim] + t.shape[self.seq_dim + 1 :], t) for t in self.tensors().values())
        return sum(math.prod(shape) * t.element_size() for shape, t in shapes)

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
    ) -> SSMLayerState:
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
    ) -> KVLayerState:
        shape = (batch_size, length, n_heads, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device))

    @property
    def length(self) -> int:
        """Tokens held."""
        return self.k.shape[1]

    @torch.compiler.disable  # Dynamo cannot trace the lock of the room's reserve: a compiled step runs this as is
    def append(self, k: Tensor, v: Tensor) -> KVLayerState:
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
    def cat(cls, states: Sequence[KVLayerState]) -> KVLayerState:
        """Join caches of the same length along the batch."""
        lengths = sorted({s.length for s in states})
        if len(lengths) > 1:
            raise StateError(f"cannot batch KV caches of different lengths {lengths} (there is no padding)")
        return super().cat(states)


LayerState = SSMLayerState | KVLayerState


@dataclass(frozen=True)
class ModelState:
    """The whole recurrent state of a model: one state per layer.

    ``fingerprint`` names the model configuration the state belongs to; loading a state into
    another model is an error. ``weights`` gives, when asked, the digest of the weights of the
    model that made the state (``LanguageModel.weights_digest``; None where that model is
    gone or was never known), which a saved state records.
    """

    layers: tuple[LayerState, ...]
    fingerprint: str
    weights: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)

    def with_layers(self, layers: Sequence[LayerState]) -> ModelState:
        """The same model's state with other layer states: what a call returns."""
        return ModelState(tuple(layers), self.fingerprint, self.weights)

    def weights_digest(self) -> str | None:
        """The digest of the weights that made this state, or None where it is unknown."""
        return None if self.weights is None else self.weights()

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all layers, whole batch)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def nbytes_per_token(self) -> int:
        """Bytes the state grows by per token of context (all layers, whole batch): a KV
        cache's keys and values; 0 for the constant-size state of an SSM."""
        return sum(layer.nbytes_per_token for layer in self.layers)

    def _map(self, fn) -> ModelState:
        return self.with_layers([fn(layer) for layer in self.layers])

    def clone(self) -> ModelState:
        return self._map(lambda s: s.clone())

    def select(self, indices: Sequence[int] | Tensor) -> ModelState:
        """Keep the sequences at ``indices`` (in that order)."""
        return self._map(lambda s: s.select(indices))

    def to(self, device: torch.device | str) -> ModelState:
        return self._map(lambda s: s.to(device))

    @staticmethod
    def cat(states: Sequence[ModelState]) -> ModelState:
        """Join states of the same model along the batch."""
        if not states:
            raise StateError("cat needs at least one state")
        fingerprints = {s.fingerprint for s in states}
        if len(fingerprints) != 1:
            raise StateError(f"cannot cat states of different models: {sorted(fingerprints)}")
        layers = [type(group[0]).cat(group) for group in zip(*(s.layers for s in states))]
        makers = {s.weights for s in states}
        return ModelState(tuple(layers), states[0].fingerprint, makers.pop() if len(makers) == 1 else None)

    def save(self, path: str | Path) -> None:
        """Write the state to a file, atomically (``files.formats.save_state``)."""
        # The one import that runs up the layers, at call time: the file formats sit above the
        # models, and a state saves itself (docs/architecture.md).
        from mambastep.files.formats import save_state

        save_state(self, path)

    @staticmethod
    def load(path: str | Path, model: nn.Module, other_weights: bool = False) -> ModelState:
        """Read a state written by ``save`` and check that it belongs to ``model``, a
        ``LanguageModel`` (``files.formats.load_state``)."""
        from mambastep.files.formats import load_state

        return load_state(path, model, other_weights)
