"""The decode step's kernels: one program per block of channels of one sequence."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambastep.ops.triton.common import check_state, operand, silu, softplus


@triton.jit
def _mamba_update_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, out_ptr,
    e, n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,) channels
    k = tl.arange(0, BLOCK_N)  # (BLOCK_N,) state entries
    ch_ok, k_ok = ch < e, k < n
    both = ch_ok[:, None] & k_ok[None, :]
    cell = seq * e * n + ch[:, None] * n + k[None, :]  # (BLOCK_E, BLOCK_N) into (b, e, n)
    h = tl.load(state_ptr + cell, mask=both, other=0.0)
    x = tl.load(x_ptr + seq * e + ch, mask=ch_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + seq * e + ch, mask=ch_ok, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + ch[:, None] * n + k[None, :], mask=both, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + seq * n + k, mask=k_ok, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + seq * n + k, mask=k_ok, other=0.0).to(tl.float32)
    h = h * tl.exp(A * dt[:, None]) + (dt * x)[:, None] * B[None, :]
    tl.store(out_ptr + cell, h, mask=both)
    y = tl.sum(h * C[None, :], axis=1)  # (BLOCK_E,)
    if HAS_D:
        y += tl.load(D_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32) * x
    if HAS_Z:
        y *= silu(tl.load(z_ptr + seq * e + ch, mask=ch_ok, other=0.0).to(tl.float32))
    tl.store(y_ptr + seq * e + ch, y, mask=ch_ok)


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
    """One token of the Mamba-1 selective scan (``ops.step.selective_step``), one launch.

    Args:
        x: (b, e), dt: (b, e) Δ (before ``dt_bias`` and the softplus where given), A: (e, n),
        B: (b, n), C: (b, n), D: (e,) or None, state: (b, e, n) float32, z: (b, e) or None,
        dt_bias: (e,) or None.

    Returns:
        y: (b, e) float32; state: (b, e, n) float32, new (the one given is left as it was).
    """
    b, e, n = state.shape
    check_state(state)
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.contiguous()
    out, y = torch.empty_like(state), torch.empty(b, e, dtype=torch.float32, device=state.device)
    block_n = triton.next_power_of_2(n)
    block_e = max(1, min(triton.next_power_of_2(e), 4096 // block_n))
    dummy = out  # a pointer for the operands a variant leaves out (never read)
    _mamba_update_kernel[(triton.cdiv(e, block_e), b)](
        state, x, dt, operand(dt_bias, dummy), A, B, C, operand(D, dummy), operand(z, dummy), y, out,
        e, n,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_E=block_e, BLOCK_N=block_n,
    )  # fmt: skip
    return y, out


@triton.jit
def _mamba2_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, out_ptr,
    heads, p, n, heads_per_group, groups,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq_head = tl.program_id(1)  # seq * heads + head
    seq, head = seq_head // heads, seq_head % heads
    group = head // heads_per_group
    ch = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) of the head's p
    k = tl.arange(0, BLOCK_N)
    ch_ok, k_ok = ch < p, k < n
    both = ch_ok[:, None] & k_ok[None, :]
    cell = seq_head * p * n + ch[:, None] * n + k[None, :]  # into (b, h, p, n)
    h = tl.load(state_ptr + cell, mask=both, other=0.0)
    x = tl.load(x_ptr + seq_head * p + ch, mask=ch_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + seq_head).to(tl.float32)  # one Δ and one decay per head
    decay = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))
    bc = (seq * groups + group) * n + k
    B = tl.load(B_ptr + bc, mask=k_ok, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + bc, mask=k_ok, other=0.0).to(tl.float32)
    h = h * decay + (dt * x)[:, None] * B[None, :]
    tl.store(out_ptr + cell, h, mask=both)
    y = tl.sum(h * C[None, :], axis=1)
    if HAS_D:
        if D_PER_CHANNEL:
            y += tl.load(D_ptr + head * p + ch, mask=ch_ok, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + head).to(tl.float32) * x
    if HAS_Z:
        y *= silu(tl.load(z_ptr + seq_head * p + ch, mask=ch_ok, other=0.0).to(tl.float32))
    tl.store(y_ptr + seq_head * p + ch, y, mask=ch_ok)


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
    """One token of the Mamba-2 recurrence (``ops.step.ssd_step``), one launch.

    Args:
        x: (b, h, p), dt: (b, h) after softplus and clamping, A: (h,), B: (b, g, n),
        C: (b, g, n), D: (h,) or (h, p) or None, state: (b, h, p, n) float32, z: (b, h, p) or None.

    Returns:
        y: (b, h, p) float32; state: (b, h, p, n) float32, new (the one given is left as it was).
    """
    b, heads, p, n = state.shape
    groups = B.shape[1]
    if heads % groups:
        raise ValueError(f"{heads} heads do not split into {groups} groups")
    check_state(state)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    out, y = torch.empty_like(state), torch.empty(b, heads, p, dtype=torch.float32, device=state.device)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n))
    dummy = out
    _mamba2_update_kernel[(triton.cdiv(p, block_p), b * heads)](
        state, x, dt, A, B, C, operand(D, dummy), operand(z, dummy), y, out,
        heads, p, n, heads // groups, groups,
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return y, out


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
