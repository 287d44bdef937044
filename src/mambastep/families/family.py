"""The record of a model family: everything mambastep knows about it, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from mambastep.families.accounting import Terms
from mambastep.families.config_json import Keys
from mambastep.models.config import ModelConfig
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings


@dataclass(frozen=True)
class Family:
    """One model family.

    name: its ``model_type`` in config.json (and ``config.family``).
    config: its configuration class; model: its model class.
    read_hf: its configuration from the keys of the config.json ``transformers`` writes;
        write_hf: the inverse (without ``model_type``, which the registry adds).
    read_original: from the original state-spaces config.json (``keys``, its ``ssm_cfg``
        keys and the keys every family there shares), for the families that format has, under
        ``ssm_cfg.layer`` = ``original_layer``; None for the others.
    state_bytes: bytes of a batch's state after ``context`` tokens in activation dtype ``dtype``
        (what ``ModelState.nbytes`` reports).
    kv_bytes_per_token: bytes one sequence's state grows by per token (a KV cache); None for a
        constant-size state.
    layer_terms: adds one layer's primitive operations over a call of ``q`` tokens per sequence
        after ``start`` cached ones to a ``Terms`` (``evidence.cost``); edge_terms: the
        operations outside the layers besides the embedding and the LM head (final norm...).
    train_floats: floats one layer keeps for the backward pass, per token, at a sequence length
        (``training.budget``).
    task_layer: the layer's name in the synthetic tasks (``--layer``); task_config: the
        configuration the tasks train of it (vocabulary, width, layers).
    delta: what Δ is per token: "channel" (one per inner channel), "head" (one per head), or
        None for a family without one (``mambastep inspect``).
    """

    name: str
    config: type[ModelConfig]
    model: type[LanguageModel]
    read_hf: Callable[[Keys], ModelConfig]
    write_hf: Callable[[ModelConfig], dict]
    state_bytes: Callable[[ModelConfig, int, int, torch.dtype], int]
    layer_terms: Callable[[Terms, ModelConfig, int, int, int, EngineSettings], None]
    edge_terms: Callable[[Terms, ModelConfig, int, int], None]
    train_floats: Callable[[ModelConfig, int], int]
    task_layer: str
    task_config: Callable[[int, int, int], ModelConfig]
    delta: Literal["channel", "head"] | None
    kv_bytes_per_token: Callable[[ModelConfig, torch.dtype], int] | None = None
    original_layer: str | None = None
    read_original: Callable[[Keys, Keys, dict], ModelConfig] | None = None
