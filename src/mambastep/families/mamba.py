"""Mamba-1 (``model_type`` "mamba"): the selective SSM (S6)."""

from __future__ import annotations

import torch

from mambastep.families.accounting import RMSNORM_FLOPS, SSM_STATE_BYTES, Terms, ssm_state_bytes
from mambastep.families.config_json import Keys, read_dt_rank, read_hf_ssm, write_hf_ssm
from mambastep.families.family import Family
from mambastep.models.config import ConfigError, MambaConfig
from mambastep.models.mamba import MambaLM
from mambastep.settings import EngineSettings

TASK_D_STATE = 16  # the Mamba paper's synthetic tasks


def read_hf(keys: Keys, cls: type[MambaConfig] = MambaConfig) -> MambaConfig:
    config = cls(**read_hf_ssm(keys), d_state=keys.get("state_size", 16), dt_rank=read_dt_rank(keys, "time_step_rank"))
    inner = keys.get("intermediate_size", config.d_inner)
    if inner != config.d_inner:
        raise ConfigError(f"{keys.where}: intermediate_size = {inner} but expand * hidden_size = {config.d_inner}")
    return config


def write_hf(config: MambaConfig) -> dict:
    return {**write_hf_ssm(config), "intermediate_size": config.d_inner, "time_step_rank": config.dt_rank}


def write_hf_mamba(config: MambaConfig) -> dict:
    return {**write_hf(config), "architectures": ["MambaForCausalLM"]}


def read_original(keys: Keys, ssm: Keys, common: dict) -> MambaConfig:
    return MambaConfig(**common, d_state=ssm.get("d_state", 16), dt_rank=read_dt_rank(ssm, "dt_rank"))


def state_bytes(config: MambaConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    return ssm_state_bytes(config, config.d_inner, batch, torch.empty(0, dtype=dtype).element_size())


def layer_terms(
    t: Terms, c: MambaConfig, batch: int, start: int, q: int, settings: EngineSettings, selective: bool = True
) -> None:
    """One Mamba-1 layer over a call of q tokens per sequence (the step and the scan do the
    same work); ``selective=False``: the time-invariant SSM, whose Δ, B and C are parameters."""
    d, e, n, r, rows = c.d_model, c.d_inner, c.d_state, c.dt_rank, batch * q
    t.norm("norm", rows, d, RMSNORM_FLOPS, 1)
    t.linear("in_proj", rows, d, 2 * e, c.bias)
    t.conv(batch, rows, e, c.d_conv, c.conv_bias)
    t.vector_op("silu(x)", "nonlinear", rows * e)
    if selective:
        t.linear("x_proj", rows, e, r + 2 * n, False)
        t.linear("dt_proj", rows, r, e, True)
        t.vector_op("softplus(dt)", "nonlinear", rows * e)
    else:
        t.add("softplus(dt)", "nonlinear", e, weight_bytes=e * t.w)
    t.add("decay dt*A", "elementwise", rows * e * n, weight_bytes=e * n * SSM_STATE_BYTES)
    t.add("exp(dt*A)", "nonlinear", rows * e * n)
    t.add("input dt*x ⊗ B", "elementwise", rows * e + rows * e * n)
    state = batch * e * n * SSM_STATE_BYTES
    t.add("state update h = dA*h + dBx", "elementwise", 2 * rows * e * n, state_read=state, state_written=state)
    t.add("read-out C·h", "dot", 2 * rows * e * n, weight_bytes=0 if selective else e * n * t.w)
    t.add("skip D*x", "elementwise", 2 * rows * e, weight_bytes=e * t.w)
    t.vector_op("gate silu(z)", "nonlinear", rows * e)
    t.vector_op("gate multiply", "elementwise", rows * e, inputs=2)
    t.linear("out_proj", rows, e, d, c.bias)
    t.vector_op("residual add", "elementwise", rows * d, inputs=2)


def final_norm_terms(t: Terms, c, rows: int, q: int) -> None:
    """What an SSM family runs outside its layers besides the embedding and the head: the final RMSNorm."""
    t.norm("final norm", rows, c.d_model, RMSNORM_FLOPS, 1)


def train_floats(c: MambaConfig, seq_len: int) -> int:
    e, n, d = c.d_inner, c.d_state, c.d_model
    # exp(dt A), dt B x and the states h_t of the scan, each (e, n) per token.
    return 4 * e * n + 12 * e + 4 * d + c.dt_rank + 2 * n


MAMBA = Family(
    name="mamba",
    config=MambaConfig,
    model=MambaLM,
    read_hf=read_hf,
    write_hf=write_hf_mamba,
    state_bytes=state_bytes,
    layer_terms=layer_terms,
    edge_terms=final_norm_terms,
    train_floats=train_floats,
    task_layer="s6",
    task_config=lambda vocab, d_model, n_layer: MambaConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=TASK_D_STATE
    ),
    delta="channel",
    original_layer="Mamba1",
    read_original=read_original,
)
