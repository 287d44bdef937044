"""Recurrent state: one named object per layer type, and the model-level state.

A model never owns its state: it takes one and returns the next, so a state
can be copied, saved, forked or dropped freely. Every tensor here is
batch-first, so ``select`` and ``cat`` work on dimension 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from mambastep.models import LanguageModel

STATE_FORMAT = "mambastep-state"
STATE_VERSION = 1


class StateError(ValueError):
    """A state file or state object that does not fit the model."""


class _BatchTensors:
    """Shared behaviour of a dataclass whose fields are batch-first tensors."""

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


@dataclass(frozen=True)
class ModelState:
    """The whole recurrent state of a model: one state per layer.

    ``fingerprint`` names the model configuration the state belongs to;
    loading a state into another model is an error.
    """

    layers: tuple[SSMLayerState, ...]
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
        """Write the state to a safetensors file with a versioned header."""
        tensors = {
            f"layers.{i}.{name}": t.detach().contiguous().cpu()
            for i, layer in enumerate(self.layers)
            for name, t in layer.tensors().items()
        }
        metadata = {
            "format": STATE_FORMAT,
            "version": str(STATE_VERSION),
            "fingerprint": self.fingerprint,
            "layer_types": json.dumps([type(layer).__name__ for layer in self.layers]),
        }
        save_file(tensors, str(path), metadata=metadata)


_LAYER_TYPES = {cls.__name__: cls for cls in (SSMLayerState,)}


def load_state(path: str | Path, model: "LanguageModel") -> ModelState:
    """Read a state written by ``ModelState.save`` and check it fits ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: not a mambastep state, a corrupt file, or a state of another model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"{path}: not a readable state file ({err})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not a mambastep state file")
    if metadata.get("version") != str(STATE_VERSION):
        raise StateError(
            f"{path}: state format version {metadata.get('version')}, this mambastep reads {STATE_VERSION}"
        )
    if metadata.get("fingerprint") != model.config.fingerprint:
        raise StateError(
            f"{path}: state of model {metadata.get('fingerprint')}, "
            f"not of this model ({model.config.fingerprint})"
        )
    layer_types = json.loads(metadata["layer_types"])
    first_layer = [t for key, t in tensors.items() if key.startswith("layers.0.")]
    if any(name not in _LAYER_TYPES for name in layer_types) or not first_layer:
        raise StateError(f"{path}: unknown or empty layer states {layer_types}")
    batch_size = first_layer[0].shape[0]
    expected = model.new_state(batch_size, device="cpu")
    layers = []
    for i, (type_name, ref) in enumerate(zip(layer_types, expected.layers)):
        cls = _LAYER_TYPES[type_name]
        values = {}
        for f in fields(cls):
            key = f"layers.{i}.{f.name}"
            if key not in tensors:
                raise StateError(f"{path}: missing tensor {key}")
            t, want = tensors[key], getattr(ref, f.name)
            if t.shape != want.shape:
                raise StateError(f"{path}: {key} has shape {tuple(t.shape)}, model expects {tuple(want.shape)}")
            values[f.name] = t.to(want.dtype)
        layers.append(cls(**values))
    if len(layers) != len(expected.layers) or len(tensors) != sum(len(l.tensors()) for l in layers):
        raise StateError(f"{path}: layer count does not match the model")
    return ModelState(tuple(layers), model.config.fingerprint).to(model.device)
