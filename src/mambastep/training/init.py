"""How a trained model starts: from scratch, or deepened from a trained one.

From scratch, the model classes initialise like ``nn.Module`` (an embedding of unit variance)
plus the SSM parameters (A, D, dt). With tied embeddings a unit-variance
embedding gives logits of standard deviation sqrt(d_model) at the start, and
a loss far above log(vocab); so, as the Mamba and GPT-2 recipes do, the
embedding starts at a standard deviation of 0.02, and the projections that
write into the residual stream are scaled by 1/sqrt(n_layer) so that its
variance does not grow with depth.

Deepened (``deepen``), a trained Mamba or Mamba-2 gains layers that start as copies of its own
with their output projections at zero: the deeper model computes what the trained one did, and
training goes on from there with more parameters per token.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from mambastep.families import family_of
from mambastep.models import LanguageModel
from mambastep.models.config import ModelConfig
from mambastep.models.lm import SSMLanguageModel
from mambastep.training.settings import TrainingError

EMBEDDING_STD = 0.02
# Parameters that write a block's output into the residual stream.
RESIDUAL_OUTPUTS = ("out_proj.weight", "dense.weight", "dense_4h_to_h.weight")


@torch.no_grad()
def init_for_training(model: LanguageModel) -> None:
    """Re-initialise the embedding and scale the residual output projections, in place."""
    torch.nn.init.normal_(model.get_parameter(model.embedding_weight), std=EMBEDDING_STD)
    scale = 1 / math.sqrt(model.config.n_layer)
    for name, param in model.named_parameters():
        if name.endswith(RESIDUAL_OUTPUTS):
            param.mul_(scale)


LAYER_PREFIX = "backbone.layers."
COPY_ZEROED = "mixer.out_proj."  # in a copied layer: what writes into the residual stream


def deeper_config(config: ModelConfig, n_layer: int) -> ModelConfig:
    """``config`` with ``n_layer`` layers, checked for ``deepen``.

    Raises:
        TrainingError: ``n_layer`` below the config's depth, or a family other than Mamba and Mamba-2.
    """
    if not issubclass(family_of(config).model, SSMLanguageModel):
        raise TrainingError(f"only Mamba and Mamba-2 models can be deepened, not a {config.family} model")
    if n_layer < config.n_layer:
        raise TrainingError(f"cannot deepen a model of {config.n_layer} layers to {n_layer}: fewer layers than it has")
    return replace(config, n_layer=n_layer)


@torch.no_grad()
def deepen(model: LanguageModel, n_layer: int) -> LanguageModel:
    """A Mamba or Mamba-2 of ``n_layer`` layers that computes exactly what ``model`` computes.

    The layers keep their order, and copies spread evenly among them: each new layer follows
    the layer it copies (8 to 12 layers: copies after layers 0, 2, 4 and 6). A copy has its
    source's weights but an output projection of zeros, so it adds nothing to the residual
    stream until training moves that projection, and it starts out reading the stream as a
    trained layer does. ``n_layer`` equal to the model's depth returns an equal copy.

    Raises:
        TrainingError: as ``deeper_config``.
    """
    config = deeper_config(model.config, n_layer)
    sources = [j * model.config.n_layer // n_layer for j in range(n_layer)]  # (n_layer,): the layer each copies
    with torch.device(model.device):
        deeper = family_of(config).model(config).to(model.dtype)
    trained = model.state_dict()
    weights = {}
    for name in deeper.state_dict():
        if not name.startswith(LAYER_PREFIX):
            weights[name] = trained[name]
            continue
        index, _, rest = name[len(LAYER_PREFIX) :].partition(".")
        j = int(index)
        source = trained[f"{LAYER_PREFIX}{sources[j]}.{rest}"]
        is_copy = j > 0 and sources[j - 1] == sources[j]
        weights[name] = torch.zeros_like(source) if is_copy and rest.startswith(COPY_ZEROED) else source
    deeper.load_state_dict(weights, strict=True)
    return deeper.configure(model.settings)
