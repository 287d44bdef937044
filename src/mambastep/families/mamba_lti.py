"""The Mamba block with a time-invariant S4D-real SSM (``model_type`` "mamba_lti",
mambastep's own): the Mamba paper's ablation of selection. Its config.json follows Mamba-1's;
transformers has no class for it."""

from __future__ import annotations

from functools import partial

from mambastep.families import mamba
from mambastep.families.family import Family
from mambastep.models.config import MambaLTIConfig
from mambastep.models.mamba_lti import MambaLTILM


def train_floats(c: MambaLTIConfig, seq_len: int) -> int:
    e, n, d = c.d_inner, c.d_state, c.d_model
    # The scan runs e * n one-state channels: their decays, inputs and states, per token.
    return 4 * e * n + 12 * e + 4 * d


MAMBA_LTI = Family(
    name="mamba_lti",
    config=MambaLTIConfig,
    model=MambaLTILM,
    read_hf=partial(mamba.read_hf, cls=MambaLTIConfig),
    write_hf=mamba.write_hf,
    state_bytes=mamba.state_bytes,
    layer_terms=partial(mamba.layer_terms, selective=False),
    edge_terms=mamba.final_norm_terms,
    train_floats=train_floats,
    task_layer="s4d",
    task_config=lambda vocab, d_model, n_layer: MambaLTIConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=mamba.TASK_D_STATE
    ),
    delta="channel",
)
