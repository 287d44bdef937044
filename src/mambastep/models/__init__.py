"""The networks: one file per family, sharing the LM shell of lm.py, with the configs they are
built from and the states they take and return. ``families`` names the class of each config."""

from mambastep.models.lm import LanguageModel
from mambastep.models.mamba import MambaLM
from mambastep.models.mamba2 import Mamba2LM
from mambastep.models.mamba_lti import MambaLTILM
from mambastep.models.transformer import TransformerLM

__all__ = ["LanguageModel", "Mamba2LM", "MambaLM", "MambaLTILM", "TransformerLM"]
