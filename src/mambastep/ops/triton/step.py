"""The decode step's kernels: the state updates (the scans over one token) and the conv step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambastep.ops.triton.common import operand
from mambastep.ops.triton.scan import mamba2_scan, mamba_scan


def mamba_state_update(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state: Tensor,
    *,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-1 selective scan (``ops.step.selective_step``), one launch: the
    scan's kernel over a sequence of one token.

    Args:
        x: (b, e), dt: (b, e) Δ (before ``dt_bias`` and the softplus where given), A: (e, n),
        B: (b, n), C: (b, n), D: (e,) or None, state: (b, e, n) float32, z: (b, e) or None,
        dt_bias: (e,) or None.

    Returns:
        y: (b, e) float32; state: (b, e, n) float32, new (the one given is left as it was).
    """
    one = None if z is None else z[:, None]
    y, state = mamba_scan(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state, z=one, dt_bias=dt_bias, dt_softplus=dt_softplus
    )
    return y[:, 0], state


def mamba2_state_update(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state: Tensor,
    *,
    z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-2 recurrence (``ops.step.ssd_step``), one launch: the scan's
    kernel over a sequence of one token.

    Args:
        x: (b, h, p), dt: (b, h) after softplus and clamping, A: (h,), B: (b, g, n),
        C: (b, g, n), D: (h,) or (h, p) or None, state: (b, h, p, n) float32, z: (b, h, p) or None.

    Returns:
        y: (b, h, p) float32; state: (b, h, p, n) float32, new (the one given is left as it was).
    """
    one = None if z is None else z[:, None]
    y, state = mamba2_scan(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state, z=one)
    return y[:, 0], state


@triton.jit
def _conv_step_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr, out_ptr,
    c,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = ch < c
    x = tl.load(x_ptr + seq * c + ch, mask=ok, other=0.0)
    y = x.to(tl.float32) * tl.load(w_ptr + ch * K + (K - 1), mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):  # the window's older entries: state[seq, j, ch]
        old = tl.load(state_ptr + (seq * (K - 1) + j) * c + ch, mask=ok, other=0.0)
        y += old.to(tl.float32) * tl.load(w_ptr + ch * K + j, mask=ok, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(out_ptr + (seq * (K - 1) + j - 1) * c + ch, old.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + (seq * (K - 1) + K - 2) * c + ch, x.to(out_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        y += tl.load(bias_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + seq * c + ch, y.to(y_ptr.dtype.element_ty), mask=ok)


def conv_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the causal depthwise conv (``ops.conv.causal_conv_step``), one launch.

    Args:
        x: (b, c); weight: (c, k) or (c, 1, k); bias: (c,) or None; state: (b, k-1, c).

    Returns:
        y: (b, c) and state: (b, k-1, c), both in x's dtype (the sums in float32); the state is
        new, with ``x`` as its newest entry.
    """
    b, c = x.shape
    weight = weight.reshape(c, -1).contiguous()
    k = weight.shape[1]
    if k < 2 or state.shape != (b, k - 1, c):
        raise ValueError(f"conv_step: a state of shape {(b, k - 1, c)} is needed, got {tuple(state.shape)}")
    x, state = x.contiguous(), state.contiguous()
    out, y = torch.empty(state.shape, dtype=x.dtype, device=x.device), torch.empty_like(x)
    block_c = min(triton.next_power_of_2(c), 1024)
    _conv_step_kernel[(triton.cdiv(c, block_c), b)](
        x, weight, operand(bias, weight), state, y, out, c, K=k, HAS_BIAS=bias is not None, BLOCK_C=block_c
    )
    return y, out
