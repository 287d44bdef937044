"""GPT-NeoX / Pythia (``model_type`` "gpt_neox"): the transformer baseline, whose state is a
KV cache that grows with every token."""

from __future__ import annotations

import torch

from mambastep.families.accounting import LAYERNORM_FLOPS, SOFTMAX_ELEMENTWISE_FLOPS, Terms
from mambastep.families.config_json import Keys
from mambastep.families.family import Family
from mambastep.models.config import ConfigError, GPTNeoXConfig
from mambastep.models.transformer import TransformerLM
from mambastep.settings import EngineSettings

TASK_HEADS = 4


def read_hf(keys: Keys) -> GPTNeoXConfig:
    # Training only (dropout), or not enforced: rotary positions have no learned table, so
    # max_position_embeddings is only the length the model was trained at.
    keys.ignore(
        "attention_dropout",
        "hidden_dropout",
        "classifier_dropout",
        "attention_probs_dropout_prob",
        "hidden_dropout_prob",
        "max_position_embeddings",
    )
    keys.require("hidden_act", "gelu", "gelu")
    rotary_pct, rotary_base = _rotary(keys)
    return GPTNeoXConfig(
        d_model=keys.get("hidden_size"),
        n_layer=keys.get("num_hidden_layers"),
        n_heads=keys.get("num_attention_heads"),
        vocab_size=keys.get("vocab_size"),
        d_ff=keys.get("intermediate_size"),
        rotary_pct=rotary_pct,
        rotary_base=rotary_base,
        parallel_residual=keys.get("use_parallel_residual", True, bool),
        attention_bias=keys.get("attention_bias", True, bool),
        norm_eps=float(keys.get("layer_norm_eps", 1e-5, (int, float))),
        tie_embeddings=keys.get("tie_word_embeddings", False, bool),
    )


def _rotary(keys: Keys) -> tuple[float, float]:
    """(rotary_pct, rotary_base): transformers 5 writes ``rope_parameters``, older configs
    ``rotary_pct`` and ``rotary_emb_base``; where both are given they must agree."""
    if keys.get("rope_scaling", None, (dict, type(None))) is not None:
        raise ConfigError(f"{keys.where}: rope_scaling is not supported (only plain rotary embeddings)")
    rope = Keys(keys.get("rope_parameters", None, (dict, type(None))) or {}, f"{keys.where} (rope_parameters)", set())
    rope.require("rope_type", "default", "default")
    values = []
    for old, new, default in (
        ("rotary_pct", "partial_rotary_factor", 0.25),
        ("rotary_emb_base", "rope_theta", 10000.0),
    ):
        legacy, current = keys.get(old, None, (int, float)), rope.get(new, None, (int, float))
        if legacy is not None and current is not None and legacy != current:
            raise ConfigError(f"{keys.where}: {old} = {legacy} and rope_parameters.{new} = {current} disagree")
        values.append(float(next(v for v in (current, legacy, default) if v is not None)))
    rope.finish()
    return values[0], values[1]


def write_hf(config: GPTNeoXConfig) -> dict:
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.d_ff,
        "hidden_act": "gelu",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_base,
            "partial_rotary_factor": config.rotary_pct,
        },
        "use_parallel_residual": config.parallel_residual,
        "attention_bias": config.attention_bias,
        "layer_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
    }


def kv_bytes_per_token(config: GPTNeoXConfig, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one more token of one sequence."""
    return config.n_layer * 2 * config.d_model * torch.empty(0, dtype=dtype).element_size()


def state_bytes(config: GPTNeoXConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    return batch * context * kv_bytes_per_token(config, dtype)


def layer_terms(t: Terms, c: GPTNeoXConfig, batch: int, start: int, q: int, settings: EngineSettings) -> None:
    """One GPT-NeoX layer over q new tokens per sequence, after ``start`` cached ones."""
    d, h, p, f, rows, keys = c.d_model, c.n_heads, c.head_dim, c.d_ff, batch * q, start + q
    t.norm("input layernorm", rows, d, LAYERNORM_FLOPS, 2)
    t.linear("query_key_value", rows, d, 3 * d, c.attention_bias)
    t.vector_op("rotary q, k", "elementwise", 2 * rows * h * c.rotary_dim, flops_per_value=3, inputs=2)
    t.add("kv cache append", "copy", state_written=2 * rows * d * t.a)
    contraction = "matvec" if q == 1 else "matmul"
    cache = batch * keys * d * t.a  # all keys (or all values) of the batch
    t.add("attention scores q·K", contraction, 2 * batch * h * q * keys * p, state_read=cache)
    t.add("softmax", "elementwise", SOFTMAX_ELEMENTWISE_FLOPS * batch * h * q * keys)
    t.add("softmax exp", "nonlinear", batch * h * q * keys)
    t.add("attention values p·V", contraction, 2 * batch * h * q * keys * p, state_read=cache)
    t.linear("dense", rows, d, d, c.attention_bias)
    t.norm("post-attention layernorm", rows, d, LAYERNORM_FLOPS, 2)
    t.linear("mlp up", rows, d, f, True)
    t.vector_op("gelu", "nonlinear", rows * f)
    t.linear("mlp down", rows, f, d, True)
    t.vector_op("residual adds", "elementwise", 2 * rows * d, inputs=2)


def edge_terms(t: Terms, c: GPTNeoXConfig, rows: int, q: int) -> None:
    """The rotary angles of the call's positions and the final LayerNorm."""
    r = c.rotary_dim
    t.add("rotary angles", "elementwise", q * r // 2)
    t.add("rotary cos, sin", "nonlinear", 2 * q * r)
    t.norm("final layernorm", rows, c.d_model, LAYERNORM_FLOPS, 2)


def train_floats(c: GPTNeoXConfig, seq_len: int) -> int:
    # Attention probabilities over the window, per head, and the 4x MLP.
    return 4 * c.n_heads * seq_len + 12 * c.d_model + 3 * c.d_ff


GPT_NEOX = Family(
    name="gpt_neox",
    config=GPTNeoXConfig,
    model=TransformerLM,
    read_hf=read_hf,
    write_hf=write_hf,
    state_bytes=state_bytes,
    layer_terms=layer_terms,
    edge_terms=edge_terms,
    train_floats=train_floats,
    task_layer="attention",
    task_config=lambda vocab, d_model, n_layer: GPTNeoXConfig(
        d_model=d_model,
        n_layer=n_layer,
        n_heads=TASK_HEADS,
        vocab_size=vocab,
        rotary_pct=1.0,
        parallel_residual=False,
        tie_embeddings=True,
    ),
    delta=None,
    kv_bytes_per_token=kv_bytes_per_token,
)
