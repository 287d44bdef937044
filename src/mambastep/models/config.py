"""Model configurations: one typed dataclass per family.

``families`` reads and writes them as config.json (the format ``transformers`` writes, and
the original state-spaces one) and says what each family is made of.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration that mambastep cannot run as written."""


class ModelConfig:
    """What every family's configuration shares: its family's name and its fingerprint."""

    family: ClassVar[str]

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the architecture (family and every field): states and sessions carry it."""
        text = json.dumps({"family": self.family, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MambaConfig(ModelConfig):
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
        check_positive(self, "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand")
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        check_positive(self, "dt_rank")
        object.__setattr__(self, "d_inner", self.expand * self.d_model)


@dataclass(frozen=True)
class MambaLTIConfig(MambaConfig):
    """The Mamba-1 block with a time-invariant SSM (S4D-real) in place of the selective S6.

    The Mamba paper's key ablation (its Table 1, "Mamba block with S4"): Δ, B and
    C are parameters instead of functions of the input. ``model_type``
    "mamba_lti" is mambastep's own; ``dt_rank`` is unused.
    """

    family: ClassVar[str] = "mamba_lti"


@dataclass(frozen=True)
class Mamba2Config(ModelConfig):
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
        check_positive(self, "d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups")
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


@dataclass(frozen=True)
class GPTNeoXConfig(ModelConfig):
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
        check_positive(self, "d_model", "n_layer", "n_heads", "vocab_size")
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        check_positive(self, "d_ff")
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


def check_positive(config: Any, *names: str) -> None:
    """Refuse fields that must be positive integers and are not.

    Raises:
        ConfigError: the message names the field.
    """
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
