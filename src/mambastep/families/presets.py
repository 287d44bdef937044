"""Built-in configurations of the published model sizes, for use with random weights, and two
small ones to train from.

Benchmarks, ``mambastep info``, ``cost`` and ``compare`` need only a model's shape, not
its trained weights, so they run offline on these (``files.checkpoints.model_for`` and
``resolve_config`` take a preset's name wherever they take a checkpoint's; a local directory
of that name wins). The shapes are
those of the released checkpoints: state-spaces/mamba-*, state-spaces/mamba2-*
(vocabulary 50,277 padded to a multiple of 8, resp. 16) and EleutherAI/pythia-*
(vocabulary 50,304, rotary on a quarter of each head, 4x MLP, parallel residual).
Their vocabularies are those of the GPT-NeoX tokenizer, not of bytes.

``mamba2-bytes`` (``BYTE_CONFIG``) is a byte-level Mamba-2 of 690k parameters, a start for
``mambastep train`` on text read as bytes, its default tokenizer. ``mamba2-bpe8k``
(``BPE_CONFIG``) is the shape the bundled default model (``assets/default``) started from, before
``train --n-layer 16`` deepened it: a Mamba-2 of 5.6M parameters for a tokenizer of 8,192 tokens
(``train --tokenizer bpe:8192``).
"""

from __future__ import annotations

import torch

from mambastep.families import family_of
from mambastep.models.config import ConfigError, GPTNeoXConfig, Mamba2Config, MambaConfig, ModelConfig
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings

_MAMBA = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
_MAMBA2 = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
_PYTHIA = {
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
}

BYTE_CONFIG = "mamba2-bytes"
BPE_CONFIG = "mamba2-bpe8k"

BUILTIN_CONFIGS: dict[str, ModelConfig] = {
    **{f"mamba-{size}": MambaConfig(d_model=d, n_layer=n, vocab_size=50280) for size, (d, n) in _MAMBA.items()},
    **{
        f"mamba2-{size}": Mamba2Config(d_model=d, n_layer=n, vocab_size=50288, d_state=128, head_dim=64, expand=2)
        for size, (d, n) in _MAMBA2.items()
    },
    **{
        f"pythia-{size}": GPTNeoXConfig(d_model=d, n_layer=n, n_heads=h, vocab_size=50304, rotary_pct=0.25)
        for size, (d, n, h) in _PYTHIA.items()
    },
    BYTE_CONFIG: Mamba2Config(d_model=128, n_layer=6, vocab_size=256, d_state=32, head_dim=32, expand=2),
    BPE_CONFIG: Mamba2Config(d_model=256, n_layer=8, vocab_size=8192, d_state=64, head_dim=64, expand=2),
}


def builtin_config(name: str) -> ModelConfig:
    """The configuration called ``name`` (e.g. "mamba-130m", "pythia-160m").

    Raises:
        ConfigError: an unknown name; the message lists the known ones.
    """
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"no built-in configuration {name!r}; known: {', '.join(BUILTIN_CONFIGS)}")
    return BUILTIN_CONFIGS[name]


def random_model(
    name_or_config: str | ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    settings: EngineSettings | None = None,
) -> LanguageModel:
    """A model of a built-in (or given) configuration with its initial random weights.

    Good for timing and memory (the work of a step does not depend on the weights'
    values); its text is noise. Building takes seconds per billion parameters.
    """
    config = builtin_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    with torch.device(device):
        model = family_of(config).model(config)
    return model.to(dtype).eval().configure(settings or EngineSettings())
