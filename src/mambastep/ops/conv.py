"""Causal depthwise conv over a sequence (alone or followed by SiLU), and its one-token form.

The conv state is the last k-1 inputs, oldest first: (b, k-1, c). Feeding a
sequence in pieces, carrying the state, gives the same outputs as in one go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambastep.ops import kernels
from mambastep.ops.backend import TORCH, Backend, computes_in, load_triton, wants_grad


def causal_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv from a given state.

    Args:
        x: (b, l, c) inputs.
        weight: (c, k) one kernel per channel; ``weight[:, -1]`` multiplies the newest input.
        bias: (c,) or None.
        state: (b, k-1, c) the k-1 inputs before ``x``, or None for zeros.

    Returns:
        y: (b, l, c) in the dtype of ``x``; state: (b, k-1, c) the last k-1 inputs. On a CPU
        without native kernels for the dtype of ``x`` the conv runs in float32 and rounds back.
    """
    b, _, c = x.shape
    k = weight.shape[1]
    if state is None:
        state = x.new_zeros(b, k - 1, c)
    window = torch.cat([state.to(x.dtype), x], dim=1)  # (b, k-1+l, c)
    work = x.dtype if x.device.type != "cpu" or computes_in(x.dtype) else torch.float32
    w = weight[:, None, :].to(work)  # (c, 1, k)
    bias = None if bias is None else bias.to(work)
    y = F.conv1d(window.transpose(1, 2).to(work), w, bias, groups=c)  # (b, c, l)
    return y.transpose(1, 2).to(x.dtype), _own(window[:, window.shape[1] - (k - 1) :])


def causal_conv_silu(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, *, backend: Backend = TORCH
) -> tuple[Tensor, Tensor]:
    """SiLU(causal_conv(x, weight, bias, state)), with the next conv state.

    One token takes ``causal_conv_step``. A sequence in float32, bfloat16 or float16 takes the
    backend's kernel where it has one (one pass, y contiguous in x's dtype; its backward one
    pass too); otherwise PyTorch's conv (``causal_conv``), then SiLU.

    Args:
        x: (b, l, c); weight: (c, k); bias: (c,) or None; state: (b, k-1, c).

    Returns:
        y: (b, l, c) in x's dtype; state: (b, k-1, c).
    """
    if x.shape[1] == 1:
        step = causal_conv_step
        if backend.triton_kernels and x.dtype in kernels.INPUT_DTYPES and not wants_grad(x, weight, bias, state):
            step = load_triton().conv_step
        y, state = step(x[:, 0], weight, bias, state)  # (b, c)
        return F.silu(y[:, None]), state
    if backend.sequence_kernels and x.dtype in kernels.INPUT_DTYPES:
        return kernels.causal_conv_silu(x, weight, bias, state)
    y, state = causal_conv(x, weight, bias, state)
    return F.silu(y), state


def causal_conv_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the causal conv: roll the window, dot product with the kernel.

    Args:
        x: (b, c) the new input.
        weight: (c, k); bias: (c,) or None.
        state: (b, k-1, c) the previous k-1 inputs.

    Returns:
        y: (b, c); state: (b, k-1, c) with ``x`` as its newest entry.
    """
    window = torch.cat([state.to(x.dtype), x[:, None, :]], dim=1)  # (b, k, c)
    y = torch.einsum("bkc,ck->bc", window, weight.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, _own(window[:, 1:])


def _own(state: Tensor) -> Tensor:
    """A contiguous copy, never a view: a state must not keep the whole window alive, and every
    state has the same layout (a compiled step is then compiled once, not once per layout)."""
    return state.clone(memory_format=torch.contiguous_format)
