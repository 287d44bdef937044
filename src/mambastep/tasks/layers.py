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

from mambastep.config import GPTNeoXConfig, Mamba2Config, MambaConfig, MambaLTIConfig, ModelConfig

LAYERS = ("s6", "s4d", "mamba2", "attention")
D_MODEL = 64
N_LAYER = 2
D_STATE = 16
ATTENTION_HEADS = 4


def layer_config(layer: str, vocab_size: int, d_model: int = D_MODEL, n_layer: int = N_LAYER) -> ModelConfig:
    """The model configuration of ``layer`` for a task of ``vocab_size`` tokens.

    Raises:
        ValueError: an unknown layer (the message lists the known ones).
    """
    if layer == "s6":
        return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_state=D_STATE)
    if layer == "s4d":
        return MambaLTIConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_state=D_STATE)
    if layer == "mamba2":
        return Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_state=D_STATE, head_dim=16)
    if layer == "attention":
        return GPTNeoXConfig(
            d_model=d_model, n_layer=n_layer, n_heads=ATTENTION_HEADS, vocab_size=vocab_size,
            rotary_pct=1.0, parallel_residual=False, tie_embeddings=True,
        )
    raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")


def layer_name(config: ModelConfig) -> str:
    """The inverse of ``layer_config``: which layer a configuration uses."""
    return {"mamba": "s6", "mamba_lti": "s4d", "mamba2": "mamba2", "gpt_neox": "attention"}[config.family]
