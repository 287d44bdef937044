"""The layers the synthetic tasks compare, as model configurations of the paper's size.

The Mamba paper trains 2-layer models of width 64 on both tasks; every layer
here gets that shell (embedding, 2 blocks, head) so that only the sequence
mixer differs:

- ``s6``: the Mamba block with the selective SSM (Mamba-1);
- ``s4d``: the same block with a time-invariant S4D-real SSM (the ablation);
- ``mamba2``: the Mamba-2 block (selective, scalar decay per head);
- ``attention``: a GPT-NeoX transformer block with rotary positions (RoPE) on every head dimension.
"""

from __future__ import annotations

from mambastep.families import FAMILIES, family_of
from mambastep.models.config import ModelConfig

_BY_LAYER = {family.task_layer: family for family in FAMILIES.values()}
LAYERS = tuple(_BY_LAYER)  # s6, s4d, mamba2, attention
D_MODEL = 64
N_LAYER = 2


def layer_config(layer: str, vocab_size: int, d_model: int = D_MODEL, n_layer: int = N_LAYER) -> ModelConfig:
    """The model configuration of ``layer`` for a task of ``vocab_size`` tokens (its family's
    ``task_config``).

    Raises:
        ValueError: an unknown layer (the message lists the known ones).
    """
    if layer not in _BY_LAYER:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
    return _BY_LAYER[layer].task_config(vocab_size, d_model, n_layer)


def layer_name(config: ModelConfig) -> str:
    """The inverse of ``layer_config``: which layer a configuration uses."""
    return family_of(config).task_layer
