"""Models built from ops: one file per family, sharing the LM shell of lm.py."""

from mambastep.config import GPTNeoXConfig, Mamba2Config, MambaConfig, MambaLTIConfig, ModelConfig
from mambastep.models.lm import LanguageModel
from mambastep.models.mamba import MambaLM
from mambastep.models.mamba2 import Mamba2LM
from mambastep.models.mamba_lti import MambaLTILM
from mambastep.models.transformer import TransformerLM


def model_class(config: ModelConfig) -> type[LanguageModel]:
    """The model class of a config's family."""
    return {MambaConfig: MambaLM, MambaLTIConfig: MambaLTILM, Mamba2Config: Mamba2LM, GPTNeoXConfig: TransformerLM}[type(config)]


__all__ = ["LanguageModel", "MambaLM", "Mamba2LM", "MambaLTILM", "TransformerLM", "model_class"]
