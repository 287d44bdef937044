"""Mamba-2 (``model_type`` "mamba2"): the SSD mixer, one decay per head."""

from __future__ import annotations

import torch

from mambastep.families.accounting import RMSNORM_FLOPS, SSM_STATE_BYTES, Terms, ssm_state_bytes
from mambastep.families.config_json import Keys, parse_limit, read_hf_ssm, write_hf_ssm
from mambastep.families.family import Family
from mambastep.families.mamba import TASK_D_STATE, final_norm_terms
from mambastep.models.config import ConfigError, Mamba2Config
from mambastep.models.mamba2 import Mamba2LM
from mambastep.settings import EngineSettings

TASK_HEAD_DIM = 16


def read_hf(keys: Keys) -> Mamba2Config:
    # transformers' Mamba2 ignores "norm_before_gate" (it always gates before normalising), and
    # "time_step_rank" has no weight in Mamba-2; both are written by some checkpoints.
    keys.ignore("norm_before_gate", "time_step_rank")
    limit = parse_limit(keys.raw.get("time_step_limit", [0.0, None]), keys.where)
    keys.ignore("time_step_limit")
    config = Mamba2Config(
        **read_hf_ssm(keys),
        d_state=keys.get("state_size", 128),
        head_dim=keys.get("head_dim", 64),
        n_groups=keys.get("n_groups", 1),
        dt_limit=limit,
    )
    heads = keys.get("num_heads", config.n_heads)
    if heads != config.n_heads:
        raise ConfigError(f"{keys.where}: num_heads = {heads} but expand * hidden_size / head_dim = {config.n_heads}")
    return config


def write_hf(config: Mamba2Config) -> dict:
    if config.D_has_hdim:
        raise ConfigError("D per channel (D_has_hdim) has no Hugging Face config key")
    return {
        **write_hf_ssm(config),
        "architectures": ["Mamba2ForCausalLM"],
        "num_heads": config.n_heads,
        "head_dim": config.head_dim,
        "n_groups": config.n_groups,
        "time_step_limit": list(config.dt_limit),  # json writes inf as Infinity, which both readers take
    }


def read_original(keys: Keys, ssm: Keys, common: dict) -> Mamba2Config:
    ssm.require("rmsnorm", True, True)
    ssm.require("norm_before_gate", False, False)
    limit = parse_limit(ssm.raw.get("dt_limit", [0.0, None]), ssm.where)
    ssm.ignore("dt_limit")
    config = Mamba2Config(
        **common,
        d_state=ssm.get("d_state", 128),
        head_dim=ssm.get("headdim", 64),
        n_groups=ssm.get("ngroups", 1),
        dt_limit=limit,
        D_has_hdim=ssm.get("D_has_hdim", False, bool),
    )
    d_ssm = ssm.get("d_ssm", None, (int, type(None)))
    if d_ssm not in (None, config.d_inner):
        raise ConfigError(f"{ssm.where}: d_ssm = {d_ssm} != d_inner = {config.d_inner} (a gated MLP) is not supported")
    return config


def state_bytes(config: Mamba2Config, context: int, batch: int, dtype: torch.dtype) -> int:
    return ssm_state_bytes(config, config.conv_dim, batch, torch.empty(0, dtype=dtype).element_size())


def _ssd_chunk(t: Terms, c: Mamba2Config, batch: int, q: int) -> None:
    """One chunk of q tokens of the chunked SSD scan (ops/ssd.py), per layer."""
    h, p, n, g, b = c.n_heads, c.head_dim, c.d_state, c.n_groups, batch
    # Sums over the chunk's tokens are matrix products; over a 1-token chunk they are plain products.
    over_tokens, per_product = ("matmul", 2) if q > 1 else ("elementwise", 1)
    t.add("ssd scores C·B", "matmul", 2 * b * g * q * q * n)
    t.add("ssd segment sums", "elementwise", b * h * (q * q + 2 * q))  # masked cumsums, dt*A, decay to each t
    t.add("ssd decays exp", "nonlinear", b * h * (q * q + q))
    t.add("ssd scores × decay, dt*x", "elementwise", b * h * q * (q + p))
    t.add("ssd diagonal blocks", over_tokens, per_product * b * h * q * q * p)
    t.add("ssd state in, read out", "matmul", 2 * b * h * q * p * n)
    t.add("ssd decay × read-out, add", "elementwise", 2 * b * h * q * p)
    t.add("ssd decay to chunk end × dt*x", "elementwise", b * h * q * p)
    t.add("ssd chunk's own state", over_tokens, per_product * b * h * q * p * n)
    t.add("ssd state update", "elementwise", 2 * b * h * p * n)


def layer_terms(t: Terms, c: Mamba2Config, batch: int, start: int, q: int, settings: EngineSettings) -> None:
    """One Mamba-2 layer over a call of q tokens per sequence: the step for q = 1, else the
    SSD in chunks of ``settings.scan_chunk``, as ops/ssd.py runs it."""
    d, e, n, h, p, rows = c.d_model, c.d_inner, c.d_state, c.n_heads, c.head_dim, batch * q
    t.norm("norm", rows, d, RMSNORM_FLOPS, 1)
    t.linear("in_proj", rows, d, e + c.conv_dim + h, c.bias)
    t.conv(batch, rows, c.conv_dim, c.d_conv, c.conv_bias)
    t.vector_op("silu(xBC)", "nonlinear", rows * c.conv_dim)
    t.add("dt + bias, clamp", "elementwise", 2 * rows * h, weight_bytes=h * t.w)
    t.add("softplus(dt)", "nonlinear", rows * h)
    state = batch * h * p * n * SSM_STATE_BYTES
    if q == 1:
        t.add("decay dt*A", "elementwise", rows * h, weight_bytes=h * t.w)
        t.add("exp(dt*A)", "nonlinear", rows * h)
        t.add("input dt*x ⊗ B", "elementwise", rows * e + rows * e * n)
        t.add("state update h = dA*h + dBx", "elementwise", 2 * rows * e * n, state_read=state, state_written=state)
        t.add("read-out h·C", "dot", 2 * rows * e * n)
    else:
        t.add("ssd state in/out", "copy", state_read=state, state_written=state)
        for begin in range(0, q, settings.scan_chunk):
            _ssd_chunk(t, c, batch, min(settings.scan_chunk, q - begin))
    t.add("skip D*x", "elementwise", 2 * rows * e, weight_bytes=(e if c.D_has_hdim else h) * t.w)
    t.vector_op("gate silu(z)", "nonlinear", rows * e)
    t.vector_op("gate multiply", "elementwise", rows * e, inputs=2)
    t.norm("gated norm", rows, e, RMSNORM_FLOPS, 1)
    t.linear("out_proj", rows, e, d, c.bias)
    t.vector_op("residual add", "elementwise", rows * d, inputs=2)


def train_floats(c: Mamba2Config, seq_len: int) -> int:
    e, h, conv, d = c.d_inner, c.n_heads, c.conv_dim, c.d_model
    # The within-chunk decay and score blocks, (h, q) per token, a few times over.
    return 6 * h * EngineSettings().scan_chunk + 10 * e + 4 * conv + 4 * d + 4 * h


MAMBA2 = Family(
    name="mamba2",
    config=Mamba2Config,
    model=Mamba2LM,
    read_hf=read_hf,
    write_hf=write_hf,
    state_bytes=state_bytes,
    layer_terms=layer_terms,
    edge_terms=final_norm_terms,
    train_floats=train_floats,
    task_layer="mamba2",
    task_config=lambda vocab, d_model, n_layer: Mamba2Config(
        d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=TASK_D_STATE, head_dim=TASK_HEAD_DIM
    ),
    delta="head",
    original_layer="Mamba2",
    read_original=read_original,
)
