"""mambastep: constant-memory, real-time inference for selective state space models.

    model = mambastep.load("state-spaces/mamba-130m-hf")
    state = model.new_state(batch_size=1)
    last, state = model.prefill(tokens, state)   # (b, l) -> (b, vocab)
    last, state = model.step(token, state)       # (b,)   -> (b, vocab)
"""

from mambastep.config import ConfigError, GPTNeoXConfig, Mamba2Config, MambaConfig
from mambastep.generation import SamplingParams, generate, generate_batch, generate_tokens
from mambastep.loading import CheckpointError, load, save
from mambastep.models import LanguageModel, Mamba2LM, MambaLM, TransformerLM
from mambastep.session import Session
from mambastep.state import KVLayerState, ModelState, SSMLayerState, StateError, load_state
from mambastep.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from mambastep.training import DataSettings, OptimSettings, TrainingError, TrainSettings, train

__version__ = "0.1.0"

__all__ = [
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "DataSettings",
    "GPTNeoXConfig",
    "HFTokenizer",
    "KVLayerState",
    "LanguageModel",
    "Mamba2Config",
    "Mamba2LM",
    "MambaConfig",
    "MambaLM",
    "ModelState",
    "OptimSettings",
    "SSMLayerState",
    "SamplingParams",
    "Session",
    "StateError",
    "TokenizerError",
    "TrainSettings",
    "TrainingError",
    "TransformerLM",
    "generate",
    "generate_batch",
    "generate_tokens",
    "load",
    "load_state",
    "load_tokenizer",
    "save",
    "train",
]
