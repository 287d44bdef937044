"""RMSNorm, over the whole width or over groups of channels (Mamba-2's gated norm)."""

from __future__ import annotations

import torch
from torch import Tensor

from mambastep.ops import kernels
from mambastep.ops.backend import TORCH, Backend, wants_grad


def rms_norm(x: Tensor, weight: Tensor, eps: float, group: int | None = None, *, backend: Backend = TORCH) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over each group of ``group`` channels
    (the whole width by default), normalised in float32.

    Inference in float32, bfloat16 or float16 (x and weight each) takes the backend's one-pass
    kernel where it has one (outside torch.compile, which fuses PyTorch's operators itself);
    PyTorch's operators make several passes over the activations and their temporaries. Both
    round a 16-bit result as ``weight * normalised.to(weight.dtype)`` does.

    Args:
        x: (..., d); weight: (d,); group: channels per group, dividing d.

    Returns:
        (..., d) in weight's dtype.
    """
    group = group or x.shape[-1]
    if (
        backend.sequence_kernels
        and x.dtype in kernels.INPUT_DTYPES
        and weight.dtype in kernels.INPUT_DTYPES
        and not torch.compiler.is_compiling()
        and not wants_grad(x, weight)
    ):
        return kernels.rms_norm(x, weight, eps, group)
    shape = x.shape
    h = x.float().unflatten(-1, (-1, group))  # (..., groups, group)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.flatten(-2).to(weight.dtype).view(shape)
