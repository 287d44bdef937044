"""The family registry: one record per family, and an unregistered family is an error everywhere."""

from dataclasses import dataclass

import pytest
import torch

from mambastep.evidence import cost
from mambastep.evidence.selection import trace_selection
from mambastep.evidence.tasks.layers import LAYERS, layer_config, layer_name
from mambastep.families import FAMILIES, config_from_dict, config_to_dict, family_named, family_of, parameter_count
from mambastep.families.presets import random_model
from mambastep.models.config import ConfigError, GPTNeoXConfig, MambaConfig
from mambastep.training.budget import estimate_bytes


@dataclass(frozen=True)
class UnknownConfig(MambaConfig):
    """A subclass of a registered config is another family: not registered."""

    family = "unknown"


UNKNOWN = UnknownConfig(d_model=16, n_layer=1, vocab_size=11)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_reads_back_what_it_writes(name):
    family = FAMILIES[name]
    config = family.task_config(37, 32, 2)
    assert type(config) is family.config and family_of(config) is family and family_named(config.family) is family
    raw = config_to_dict(config)
    assert raw["model_type"] == name and config_from_dict(raw) == config
    assert layer_name(config) == family.task_layer and layer_config(family.task_layer, 37, 32, 2) == config


def test_every_family_names_its_task_layer_once():
    assert sorted(LAYERS) == sorted(f.task_layer for f in FAMILIES.values()) and len(set(LAYERS)) == len(FAMILIES)


def test_an_unregistered_family_is_an_error_everywhere():
    with pytest.raises(ConfigError, match="UnknownConfig is not the config of a registered family"):
        family_of(UNKNOWN)
    for use in (
        lambda: config_to_dict(UNKNOWN),
        lambda: cost.terms(UNKNOWN, "decode", 10),
        lambda: cost.state_bytes(UNKNOWN, 10),
        lambda: parameter_count(UNKNOWN),
        lambda: estimate_bytes(UNKNOWN, 1000, 1, 64, 1),
        lambda: layer_name(UNKNOWN),
        lambda: random_model(UNKNOWN),
    ):
        with pytest.raises(ConfigError, match="not the config of a registered family"):
            use()
    with pytest.raises(ConfigError, match="model_type 'unknown' is not supported"):
        config_from_dict({"model_type": "unknown", "hidden_size": 16})


def test_the_time_invariant_family_has_its_own_cost_and_no_delta_per_token():
    """mamba_lti is not costed as Mamba-1 (it has no x_proj or dt_proj); inspect refuses a family without Δ."""
    lti, s6 = FAMILIES["mamba_lti"].task_config(16, 64, 2), FAMILIES["mamba"].task_config(16, 64, 2)
    names = lambda config: {t.name for t in cost.terms(config, "decode", 8)}  # noqa: E731
    assert {"x_proj", "dt_proj"} <= names(s6) and not {"x_proj", "dt_proj"} & names(lti)
    attention = random_model(GPTNeoXConfig(d_model=16, n_layer=1, n_heads=2, vocab_size=11))
    with pytest.raises(ValueError, match="inspect needs a state space model"):
        trace_selection(attention, torch.tensor([1, 2]))
