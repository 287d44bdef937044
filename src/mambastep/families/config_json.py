"""Reading config.json: the key reader every family's parser uses, and the keys the families
share.

Two on-disk formats are understood: the one ``transformers`` writes (``model_type`` "mamba",
"mamba2", or "gpt_neox" for the transformer baseline; mambastep's own "mamba_lti" follows it)
and the original state-spaces one (``d_model``, ``n_layer``, ``ssm_cfg``...). A key that is
not understood is an error, since it may change the architecture; keys known to matter only
for initialisation or bookkeeping are ignored.
"""

from __future__ import annotations

import math
from typing import Any

from mambastep.models.config import ConfigError

# Keys that only matter for training-time initialisation, generation defaults or bookkeeping.
IGNORED_HF_KEYS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "rescale_prenorm_residual",
    "time_step_floor",
    "time_step_init_scheme",
    "time_step_max",
    "time_step_min",
    "time_step_scale",
    "use_cache",
    "use_mambapy",
    "use_associative_scan",
    "fused_add_norm",
    "pad_vocab_size_multiple",
    "chunk_size",
    "model_type",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "torchscript",
    "tie_encoder_decoder",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "pruned_heads",
    "max_length",
    "quantization_config",
    "tokenizer",  # mambastep's own marker: "bytes" for byte-level models (read by files.tokenizer)
}
IGNORED_SSM_CFG_KEYS = {
    "layer",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "use_fast_path",
    "conv_init",
    "A_init_range",
    "chunk_size",
    "use_mem_eff_path",
    "process_group",
    "sequence_parallel",
}
IGNORED_ORIGINAL_KEYS = {"fused_add_norm", "attn_cfg"}


class Keys:
    """Reads keys from a config dict, then insists that every key was understood."""

    def __init__(self, raw: dict, where: str, ignored: set[str]):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.where, self.used = raw, where, set(ignored)

    def get(self, key: str, default: Any = ..., kind: type | tuple = (int,)) -> Any:
        """The value of ``key`` (``default`` where it is absent), which must be of ``kind``."""
        self.used.add(key)
        if key not in self.raw:
            if default is ...:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{self.where}: key {key!r} has value {value!r} of the wrong type")
        return value

    def require(self, key: str, allowed: Any, default: Any) -> None:
        """A key whose only supported value is ``allowed``."""
        self.used.add(key)
        value = self.raw.get(key, default)
        if value != allowed:
            raise ConfigError(f"{self.where}: {key} = {value!r} is not supported (only {allowed!r})")

    def ignore(self, *keys: str) -> None:
        """Keys that may be present and change nothing."""
        self.used.update(keys)

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.where}: unknown config key(s) {unknown}; they may change the architecture, "
                "so mambastep refuses to guess"
            )


def parse_limit(value: Any, where: str) -> tuple[float, float]:
    """A (low, high) pair as JSON writes it: floats, "Infinity", null or {"__float__": "Infinity"}."""

    def one(v: Any) -> float:
        if isinstance(v, dict) and set(v) == {"__float__"}:
            v = v["__float__"]
        if v is None:
            return math.inf
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: cannot read {v!r} as a number in the dt limit") from None

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where}: the dt limit must be a pair [low, high], got {value!r}")
    return one(value[0]), one(value[1])


def read_dt_rank(keys: Keys, key: str) -> int:
    """Mamba-1's Δ rank: an integer, or "auto" (0, which the config turns into ceil(d / 16))."""
    rank = keys.get(key, "auto", (int, str))
    if isinstance(rank, str) and rank != "auto":
        raise ConfigError(f"{keys.where}: {key} must be an integer or 'auto', got {rank!r}")
    return 0 if rank == "auto" else rank


def read_hf_ssm(keys: Keys) -> dict:
    """The keys of transformers' config.json that the SSM families share."""
    d_model = keys.get("hidden_size")
    n_layer = keys.get("num_hidden_layers")
    if keys.get("n_layer", n_layer) != n_layer:
        raise ConfigError(f"{keys.where}: n_layer and num_hidden_layers disagree")
    keys.require("hidden_act", "silu", "silu")
    keys.require("rms_norm", True, True)
    return dict(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=keys.get("vocab_size"),
        d_conv=keys.get("conv_kernel", 4),
        expand=keys.get("expand", 2),
        conv_bias=keys.get("use_conv_bias", True, bool),
        bias=keys.get("use_bias", False, bool),
        norm_eps=float(keys.get("layer_norm_epsilon", 1e-5, (int, float))),
        residual_in_fp32=keys.get("residual_in_fp32", True, bool),
        tie_embeddings=keys.get("tie_word_embeddings", True, bool),
    )


def write_hf_ssm(config: Any) -> dict:
    """The inverse of ``read_hf_ssm``."""
    return {
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
    }


def read_original_common(keys: Keys, ssm: Keys) -> dict:
    """The keys of the original state-spaces config.json that every family there shares. The
    vocabulary is padded to ``pad_vocab_size_multiple`` (8 unless given), as the published
    checkpoints' embeddings are."""
    keys.require("rms_norm", True, True)
    keys.require("d_intermediate", 0, 0)
    keys.require("attn_layer_idx", [], [])
    multiple = keys.get("pad_vocab_size_multiple", 8)
    vocab = keys.get("vocab_size")
    return dict(
        d_model=keys.get("d_model"),
        n_layer=keys.get("n_layer"),
        vocab_size=vocab + (-vocab % multiple) if multiple > 1 else vocab,
        residual_in_fp32=keys.get("residual_in_fp32", True, bool),
        tie_embeddings=keys.get("tie_embeddings", True, bool),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        conv_bias=ssm.get("conv_bias", True, bool),
        bias=ssm.get("bias", False, bool),
    )
