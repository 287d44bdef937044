"""The model families: one record each (``Family``), the one place that says what a family is
made of: its config (read and written as config.json), its model class, its state's size, its
primitive operations for the cost model, its training memory, and how the synthetic tasks
build its layer.

An unregistered family is an error everywhere, never a silent fallback. Adding a family: its
config in ``models/config.py``, its model in ``models/``, its record in a module here, and
one entry in ``FAMILIES``.
"""

from __future__ import annotations

import torch

from mambastep.families.config_json import (
    IGNORED_HF_KEYS,
    IGNORED_ORIGINAL_KEYS,
    IGNORED_SSM_CFG_KEYS,
    Keys,
    read_original_common,
)
from mambastep.families.family import Family
from mambastep.families.gpt_neox import GPT_NEOX
from mambastep.families.mamba import MAMBA
from mambastep.families.mamba2 import MAMBA2
from mambastep.families.mamba_lti import MAMBA_LTI
from mambastep.models.config import ConfigError, ModelConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (MAMBA, MAMBA_LTI, MAMBA2, GPT_NEOX)}
_BY_CONFIG = {f.config: f for f in FAMILIES.values()}
_BY_ORIGINAL_LAYER = {f.original_layer: f for f in FAMILIES.values() if f.original_layer}


def family_of(config: ModelConfig) -> Family:
    """The record of ``config``'s family (by its exact class: a subclass is another family).

    Raises:
        ConfigError: a configuration of no registered family.
    """
    family = _BY_CONFIG.get(type(config))
    if family is None:
        raise ConfigError(f"{type(config).__name__} is not the config of a registered family ({', '.join(FAMILIES)})")
    return family


def family_named(name: str) -> Family:
    """The record of the family whose ``model_type`` is ``name``.

    Raises:
        ConfigError: no such family; the message lists the known ones.
    """
    if name not in FAMILIES:
        raise ConfigError(f"model_type {name!r} is not supported (only {', '.join(map(repr, FAMILIES))})")
    return FAMILIES[name]


def parameter_count(config: ModelConfig) -> int:
    """Distinct parameters of a model of ``config`` (a tied head counted once), from the model
    built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = family_of(config).model(config)
    return sum(p.numel() for p in model.parameters())


def config_from_dict(raw: dict, where: str = "config.json") -> ModelConfig:
    """Parse a checkpoint's config.json (Hugging Face or original state-spaces format).

    Raises:
        ConfigError: unknown model type, unknown key, wrong type or unsupported value;
            the message names ``where`` and the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "model_type" in raw:
        try:
            family = family_named(raw["model_type"])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        keys = Keys(raw, where, IGNORED_HF_KEYS)
        config = family.read_hf(keys)
        keys.finish()
        return config
    if "d_model" in raw and "n_layer" in raw:
        return _original(raw, where)
    raise ConfigError(f"{where}: neither a Hugging Face config (model_type) nor a state-spaces one (d_model, n_layer)")


def _original(raw: dict, where: str) -> ModelConfig:
    """The original state-spaces config.json: the family by ``ssm_cfg.layer``."""
    keys = Keys(raw, where, IGNORED_ORIGINAL_KEYS)
    ssm_cfg = keys.get("ssm_cfg", {}, dict)
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in _BY_ORIGINAL_LAYER:
        raise ConfigError(
            f"{where}: ssm_cfg.layer {layer!r} is not supported (only {', '.join(map(repr, _BY_ORIGINAL_LAYER))})"
        )
    ssm = Keys(ssm_cfg, f"{where} (ssm_cfg)", IGNORED_SSM_CFG_KEYS)
    config = _BY_ORIGINAL_LAYER[layer].read_original(keys, ssm, read_original_common(keys, ssm))
    ssm.finish()
    keys.finish()
    return config


def config_to_dict(config: ModelConfig) -> dict:
    """The config.json that ``transformers`` writes for this architecture (inverse of ``config_from_dict``).

    Raises:
        ConfigError: a configuration that format cannot express.
    """
    family = family_of(config)
    return {"model_type": family.name, **family.write_hf(config)}


__all__ = ["FAMILIES", "Family", "config_from_dict", "config_to_dict", "family_named", "family_of", "parameter_count"]
