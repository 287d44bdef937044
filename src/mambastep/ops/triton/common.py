"""What the kernels share: SiLU and softplus inside a kernel, and the checks and operands of a launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def silu(v):
    return v / (1.0 + tl.exp(-v))


@triton.jit
def softplus(v):
    """As torch.nn.functional.softplus: above 20, v itself."""
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


def operand(tensor: Tensor | None, stand_in: Tensor) -> Tensor:
    """``tensor`` as a kernel reads it (contiguous), or for one it leaves out (a variant without
    it: a constexpr flag off) any pointer, never read."""
    return stand_in if tensor is None else tensor.contiguous()


def check_state(state: Tensor) -> None:
    """The state updates and scans read and write a contiguous float32 state."""
    if state.dtype != torch.float32:
        raise ValueError(f"the Triton state updates keep the state in float32, got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("the Triton state updates read a contiguous state")
