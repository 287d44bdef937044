"""mambastep: constant-memory, real-time inference for selective state space models.

    model = mambastep.load("state-spaces/mamba-130m-hf")
    state = model.new_state(batch_size=1)
    last, state = model.prefill(tokens, state)   # (b, l) -> (b, vocab)
    last, state = model.step(token, state)       # (b,)   -> (b, vocab)

The training names (``train``, ``TrainSettings``...) are imported when first used, so
``import mambastep`` does not load the training stack.
"""

from importlib import import_module

from mambastep.files.checkpoints import CheckpointError, load, save
from mambastep.files.formats import load_state
from mambastep.files.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from mambastep.models import LanguageModel, Mamba2LM, MambaLM, TransformerLM
from mambastep.models.config import ConfigError, GPTNeoXConfig, Mamba2Config, MambaConfig
from mambastep.models.state import KVLayerState, ModelState, SSMLayerState, StateError
from mambastep.runtime.generation import generate, generate_batch, generate_tokens
from mambastep.runtime.sampling import SamplingParams
from mambastep.runtime.session import Session
from mambastep.settings import EngineSettings

__version__ = "0.1.0"

_TRAINING = ("DataSettings", "OptimSettings", "TrainingError", "TrainSettings", "train")


def __getattr__(name: str):
    if name in _TRAINING:
        return getattr(import_module("mambastep.training"), name)
    raise AttributeError(f"module 'mambastep' has no attribute {name!r}")


__all__ = [
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "DataSettings",
    "EngineSettings",
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
