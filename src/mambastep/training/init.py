"""The initialisation of a model trained from scratch.

The model classes initialise like ``nn.Module`` (an embedding of unit variance)
plus the SSM parameters (A, D, dt). With tied embeddings a unit-variance
embedding gives logits of standard deviation sqrt(d_model) at the start, and
a loss far above log(vocab); so, as the Mamba and GPT-2 recipes do, the
embedding starts at a standard deviation of 0.02, and the projections that
write into the residual stream are scaled by 1/sqrt(n_layer) so that its
variance does not grow with depth.
"""

from __future__ import annotations

import math

import torch

from mambastep.models import LanguageModel

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
