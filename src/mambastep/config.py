"""Model configurations: one typed dataclass per family, parsed from config.json.

Two on-disk formats are understood: the one `transformers` writes
(``model_type`` "mamba", "mamba2", or "gpt_neox" for the transformer
baseline; mambastep's own "mamba_lti" follows it) and the original state-spaces one
(``d_model``, ``n_layer``, ``ssm_cfg``...). A key that is not understood is an
error, since it may change the architecture; keys known to matter only for
initialisation or bookkeeping are ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Union


class ConfigError(ValueError):
    """A configuration that mambastep cannot run as written."""


def _fingerprint(family: str, config: Any) -> str:
    text = json.dumps({"family": family, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MambaConfig:
    """Mamba-1 language model: embedding, n_layer pre-norm Mamba blocks, final RMSNorm, LM head."""

    family: ClassVar[str] = "mamba"

    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding (already padded)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 means ceil(d_model / 16), as "auto" does
    conv_bias: bool = True
    bias: bool = False  # in_proj and out_proj
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    d_inner: int = field(init=False)

    def __post_init__(self):
        _check_positive(self, "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand")
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        _check_positive(self, "dt_rank")
        object.__setattr__(self, "d_inner", self.expand * self.d_model)

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the architecture: states and checkpoints carry it."""
        return _fingerprint(self.family, self)


@dataclass(frozen=True)
class MambaLTIConfig(MambaConfig):
    """The Mamba-1 block with a time-invariant SSM (S4D-real) in place of the selective S6.

    The Mamba paper's key ablation (its Table 1, "Mamba block with S4"): Δ, B and
    C are parameters instead of functions of the input. ``model_type``
    "mamba_lti" is mambastep's own; ``dt_rank`` is unused.
    """

    family: ClassVar[str] = "mamba_lti"


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 language model: like Mamba-1, with SSD mixers (scalar decay per head)."""

    family: ClassVar[str] = "mamba2"

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)
    D_has_hdim: bool = False  # D per channel (h, p) instead of per head (h,)
    d_inner: int = field(init=False)
    n_heads: int = field(init=False)
    conv_dim: int = field(init=False)  # channels of the causal conv: x, B and C
    norm_group_size: int = field(init=False)

    def __post_init__(self):
        _check_positive(self, "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups")
        d_inner = self.expand * self.d_model
        if d_inner % self.head_dim:
            raise ConfigError(f"expand * d_model = {d_inner} is not a multiple of head_dim = {self.head_dim}")
        n_heads = d_inner // self.head_dim
        if n_heads % self.n_groups:
            raise ConfigError(f"{n_heads} heads cannot be split into n_groups = {self.n_groups}")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ConfigError(f"dt_limit must satisfy 0 <= low < high, got {self.dt_limit}")
        object.__setattr__(self, "dt_limit", (float(lo), float(hi)))
        object.__setattr__(self, "d_inner", d_inner)
        object.__setattr__(self, "n_heads", n_heads)
        object.__setattr__(self, "conv_dim", d_inner + 2 * self.n_groups * self.d_state)
        object.__setattr__(self, "norm_group_size", d_inner // self.n_groups)

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the architecture: states and checkpoints carry it."""
        return _fingerprint(self.family, self)


@dataclass(frozen=True)
class GPTNeoXConfig:
    """GPT-NeoX / Pythia decoder: the transformer baseline, with a KV cache.

    embedding -> n_layer x (LayerNorm -> attention with rotary positions, LayerNorm -> gelu MLP,
    parallel or sequential residual) -> LayerNorm -> untied output embedding.
    """

    family: ClassVar[str] = "gpt_neox"

    d_model: int
    n_layer: int
    n_heads: int
    vocab_size: int
    d_ff: int = 0  # 0 means 4 * d_model
    rotary_pct: float = 0.25  # share of each head's dims that rotate
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)), else sequential
    attention_bias: bool = True  # bias on query_key_value and dense
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)

    def __post_init__(self):
        _check_positive(self, "d_model", "n_layer", "n_heads", "vocab_size")
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        _check_positive(self, "d_ff")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model = {self.d_model} is not a multiple of n_heads = {self.n_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must lie in [0, 1], got {self.rotary_pct}")
        head_dim = self.d_model // self.n_heads
        rotary_dim = int(head_dim * self.rotary_pct)  # as transformers truncates it
        if rotary_dim % 2:
            raise ConfigError(f"rotary dims = int({head_dim} * {self.rotary_pct}) = {rotary_dim} must be even")
        object.__setattr__(self, "rotary_pct", float(self.rotary_pct))
        object.__setattr__(self, "rotary_base", float(self.rotary_base))
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "rotary_dim", rotary_dim)

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the architecture: states and checkpoints carry it."""
        return _fingerprint(self.family, self)


ModelConfig = Union[MambaConfig, MambaLTIConfig, Mamba2Config, GPTNeoXConfig]


def _check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# Keys that only matter for training-time initialisation, generation defaults or bookkeeping.
_IGNORED_HF_KEYS = {
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "dtype", "torch_dtype", "transformers_version", "initializer_range", "rescale_prenorm_residual",
    "time_step_floor", "time_step_init_scheme", "time_step_max", "time_step_min", "time_step_scale",
    "use_cache", "use_mambapy", "use_associative_scan", "fused_add_norm", "pad_vocab_size_multiple",
    "chunk_size", "model_type", "output_hidden_states", "output_attentions", "return_dict",
    "torchscript", "tie_encoder_decoder", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
    "finetuning_task", "chunk_size_feed_forward", "pruned_heads", "max_length", "quantization_config",
    "tokenizer",  # mambastep's own marker: "bytes" for byte-level models (read by tokenizer.py)
}
# transformers' Mamba2 ignores "norm_before_gate" (it always gates before normalising), and
# "time_step_rank" has no weight in Mamba-2; both are written by some checkpoints.
_IGNORED_HF_MAMBA2_KEYS = {"norm_before_gate", "time_step_rank"}
_IGNORED_SSM_CFG_KEYS = {
    "layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path",
    "conv_init", "A_init_range", "chunk_size", "use_mem_eff_path", "process_group", "sequence_parallel",
}
_IGNORED_ORIGINAL_KEYS = {"fused_add_norm", "attn_cfg", "pad_vocab_size_multiple"}


class _Keys:
    """Reads keys from a config dict, then insists that every key was understood."""

    def __init__(self, raw: dict, where: str, ignored: set[str]):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.where, self.used = raw, where, set(ignored)

    def get(self, key: str, default: Any = ..., kind: type | tuple = (int,)) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is ...:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self.raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise ConfigError(f"{self.where}: key {key!r} has value {value!r} of the wrong type")
        return value

    def require(self, key: str, allowed: Any, default: Any) -> None:
        """A key whose only supported value is ``allowed``."""
        self.used.add(key)
        value = self.raw.get(key, default)
        if value != allowed:
            raise ConfigError(f"{self.where}: {key} = {value!r} is not supported (only {allowed!r})")

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.where}: unknown config key(s) {unknown}; they may change the architecture, "
                "so mambastep refuses to guess"
            )


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _parse_limit(value: Any, where: str) -> tuple[float, float]:
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


def _pad(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size % multiple) if multiple > 1 else vocab_size


def config_from_dict(raw: dict, where: str = "config.json") -> ModelConfig:
    """Parse a checkpoint's config.json (Hugging Face or original state-spaces format).

    Raises:
        ConfigError: unknown model type, unknown key, wrong type or unsupported value;
            the message names ``where`` and the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "model_type" in raw:
        model_type = raw["model_type"]
        if model_type in ("mamba", "mamba_lti"):
            return _hf_mamba(raw, where, MambaLTIConfig if model_type == "mamba_lti" else MambaConfig)
        if model_type == "mamba2":
            return _hf_mamba2(raw, where)
        if model_type == "gpt_neox":
            return _hf_gpt_neox(raw, where)
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported (only 'mamba', 'mamba2', 'gpt_neox' and 'mamba_lti')"
        )
    if "d_model" in raw and "n_layer" in raw:
        return _original(raw, where)
    raise ConfigError(f"{where}: neither a Hugging Face config (model_type) nor a state-spaces one (d_model, n_layer)")


def _hf_common(keys: _Keys) -> dict:
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


def _hf_mamba(raw: dict, where: str, cls: type[MambaConfig] = MambaConfig) -> MambaConfig:
    keys = _Keys(raw, where, _IGNORED_HF_KEYS)
    common = _hf_common(keys)
    rank = keys.get("time_step_rank", "auto", (int, str))
    if isinstance(rank, str) and rank != "auto":
        raise ConfigError(f"{where}: time_step_rank must be an integer or 'auto', got {rank!r}")
    config = cls(**common, d_state=keys.get("state_size", 16), dt_rank=0 if rank == "auto" else rank)
    inner = keys.get("intermediate_size", config.d_inner)
    if inner != config.d_inner:
        raise ConfigError(f"{where}: intermediate_size = {inner} but expand * hidden_size = {config.d_inner}")
    keys.finish()
    return config


def _hf_mamba2(raw: dict, where: str) -> Mamba2Config:
    keys = _Keys(raw, where, _IGNORED_HF_KEYS | _IGNORED_HF_MAMBA2_KEYS)
    common = _hf_common(keys)
    limit = _parse_limit(raw.get("time_step_limit", [0.0, None]), where)
    keys.used.add("time_step_limit")
    config = Mamba2Config(
        **common,
        d_state=keys.get("state_size", 128),
        head_dim=keys.get("head_dim", 64),
        n_groups=keys.get("n_groups", 1),
        dt_limit=limit,
    )
    heads = keys.get("num_heads", config.n_heads)
    if heads != config.n_heads:
        raise ConfigError(
            f"{where}: num_heads = {heads} but expand * hidden_size / head_dim = {config.n_heads}"
        )
    keys.finish()
    return config


# GPT-NeoX keys for training only (dropout), or not enforced: rotary positions have no learned
# table, so max_position_embeddings is only the length the model was trained at.
_IGNORED_HF_GPT_NEOX_KEYS = {
    "attention_dropout", "hidden_dropout", "classifier_dropout", "attention_probs_dropout_prob",
    "hidden_dropout_prob", "max_position_embeddings",
}


def _hf_gpt_neox(raw: dict, where: str) -> GPTNeoXConfig:
    keys = _Keys(raw, where, _IGNORED_HF_KEYS | _IGNORED_HF_GPT_NEOX_KEYS)
    keys.require("hidden_act", "gelu", "gelu")
    rotary_pct, rotary_base = _gpt_neox_rotary(keys)
    config = GPTNeoXConfig(
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
    keys.finish()
    return config


def _gpt_neox_rotary(keys: _Keys) -> tuple[float, float]:
    """(rotary_pct, rotary_base): transformers 5 writes ``rope_parameters``, older configs
    ``rotary_pct`` and ``rotary_emb_base``; where both are given they must agree."""
    if keys.get("rope_scaling", None, (dict, type(None))) is not None:
        raise ConfigError(f"{keys.where}: rope_scaling is not supported (only plain rotary embeddings)")
    rope = _Keys(keys.get("rope_parameters", None, (dict, type(None))) or {}, f"{keys.where} (rope_parameters)", set())
    rope.require("rope_type", "default", "default")
    values = []
    for old, new, default in (("rotary_pct", "partial_rotary_factor", 0.25), ("rotary_emb_base", "rope_theta", 10000.0)):
        legacy, current = keys.get(old, None, (int, float)), rope.get(new, None, (int, float))
        if legacy is not None and current is not None and legacy != current:
            raise ConfigError(f"{keys.where}: {old} = {legacy} and rope_parameters.{new} = {current} disagree")
        values.append(float(next(v for v in (current, legacy, default) if v is not None)))
    rope.finish()
    return values[0], values[1]


def _original(raw: dict, where: str) -> ModelConfig:
    keys = _Keys(raw, where, _IGNORED_ORIGINAL_KEYS)
    keys.require("rms_norm", True, True)
    keys.require("d_intermediate", 0, 0)
    keys.require("attn_layer_idx", [], [])
    ssm_cfg = keys.get("ssm_cfg", {}, dict)
    layer = ssm_cfg.get("layer", "Mamba1")
    ssm = _Keys(ssm_cfg, f"{where} (ssm_cfg)", _IGNORED_SSM_CFG_KEYS)
    common = dict(
        d_model=keys.get("d_model"),
        n_layer=keys.get("n_layer"),
        vocab_size=_pad(keys.get("vocab_size"), keys.raw.get("pad_vocab_size_multiple", 8)),
        residual_in_fp32=keys.get("residual_in_fp32", True, bool),
        tie_embeddings=keys.get("tie_embeddings", True, bool),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        conv_bias=ssm.get("conv_bias", True, bool),
        bias=ssm.get("bias", False, bool),
    )
    if layer == "Mamba1":
        rank = ssm.get("dt_rank", "auto", (int, str))
        if isinstance(rank, str) and rank != "auto":
            raise ConfigError(f"{where}: ssm_cfg.dt_rank must be an integer or 'auto', got {rank!r}")
        config: ModelConfig = MambaConfig(**common, d_state=ssm.get("d_state", 16), dt_rank=0 if rank == "auto" else rank)
    elif layer == "Mamba2":
        ssm.require("rmsnorm", True, True)
        ssm.require("norm_before_gate", False, False)
        limit = _parse_limit(ssm_cfg.get("dt_limit", [0.0, None]), where)
        ssm.used.add("dt_limit")
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
            raise ConfigError(f"{where}: ssm_cfg.d_ssm = {d_ssm} != d_inner = {config.d_inner} (a gated MLP) is not supported")
    else:
        raise ConfigError(f"{where}: ssm_cfg.layer {layer!r} is not supported (only 'Mamba1' and 'Mamba2')")
    ssm.finish()
    keys.finish()
    return config


def config_to_hf_dict(config: ModelConfig) -> dict:
    """The config.json that `transformers` writes for this architecture (inverse of ``config_from_dict``)."""
    if isinstance(config, GPTNeoXConfig):
        return {
            "model_type": config.family,
            "architectures": ["GPTNeoXForCausalLM"],
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_heads,
            "vocab_size": config.vocab_size,
            "intermediate_size": config.d_ff,
            "hidden_act": "gelu",
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": config.rotary_pct},
            "use_parallel_residual": config.parallel_residual,
            "attention_bias": config.attention_bias,
            "layer_norm_eps": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
        }
    if isinstance(config, Mamba2Config) and config.D_has_hdim:
        raise ConfigError("D per channel (D_has_hdim) has no Hugging Face config key")
    raw = {
        "model_type": config.family,
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
    architecture = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}.get(config.family)
    if architecture:  # transformers has no class for mambastep's own families
        raw["architectures"] = [architecture]
    if isinstance(config, MambaConfig):
        raw.update(intermediate_size=config.d_inner, time_step_rank=config.dt_rank)
    else:
        raw.update(
            num_heads=config.n_heads,
            head_dim=config.head_dim,
            n_groups=config.n_groups,
            time_step_limit=list(config.dt_limit),  # json writes inf as Infinity, which both readers take
        )
    return raw
