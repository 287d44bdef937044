"""The prompt's scans: one program per block of channels of one sequence, reading the tokens in
order with its block of the state held in registers (sequential in time, parallel over
sequences and channels), from a given state to the next one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambastep.ops.triton.common import check_state, operand, silu, softplus


@triton.jit
def _mamba_scan_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, out_ptr,
    l, e, n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(1)
    ch = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    k = tl.arange(0, BLOCK_N)
    ch_ok, k_ok = ch < e, k < n
    both = ch_ok[:, None] & k_ok[None, :]
    cell = seq * e * n + ch[:, None] * n + k[None, :]
    h = tl.load(state_ptr + cell, mask=both, other=0.0)
    A = tl.load(A_ptr + ch[:, None] * n + k[None, :], mask=both, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    for t in range(l):
        row = (seq * l + t) * e + ch  # into (b, l, e)
        x = tl.load(x_ptr + row, mask=ch_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row, mask=ch_ok, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = softplus(dt)
        B = tl.load(B_ptr + (seq * l + t) * n + k, mask=k_ok, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + (seq * l + t) * n + k, mask=k_ok, other=0.0).to(tl.float32)
        h = h * tl.exp(A * dt[:, None]) + (dt * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1)
        if HAS_D:
            y += D * x
        if HAS_Z:
            y *= silu(tl.load(z_ptr + row, mask=ch_ok, other=0.0).to(tl.float32))
        tl.store(y_ptr + row, y, mask=ch_ok)
    tl.store(out_ptr + cell, h, mask=both)


def mamba_scan(
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
    """The Mamba-1 selective scan over a sequence from ``state`` (``ops.scan.selective_scan``).

    Args:
        x: (b, l, e), dt: (b, l, e) Δ (before ``dt_bias`` and the softplus where given),
        A: (e, n), B: (b, l, n), C: (b, l, n), D: (e,) or None, state: (b, e, n) float32,
        z: (b, l, e) or None, dt_bias: (e,) or None.

    Returns:
        y: (b, l, e) float32; state: (b, e, n) float32 after the last token, new.
    """
    b, l, e = x.shape
    n = state.shape[2]
    check_state(state)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    out, y = torch.empty_like(state), torch.empty(b, l, e, dtype=torch.float32, device=state.device)
    block_n = triton.next_power_of_2(n)
    block_e = max(1, min(triton.next_power_of_2(e), 2048 // block_n))
    _mamba_scan_kernel[(triton.cdiv(e, block_e), b)](
        state, x, dt, operand(dt_bias, out), A, B, C, operand(D, out), operand(z, out), y, out,
        l, e, n,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_E=block_e, BLOCK_N=block_n,
    )  # fmt: skip
    return y, out


@triton.jit
def _mamba2_scan_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, out_ptr,
    l, heads, p, n, heads_per_group, groups,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq_head = tl.program_id(1)
    seq, head = seq_head // heads, seq_head % heads
    group = head // heads_per_group
    ch = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, BLOCK_N)
    ch_ok, k_ok = ch < p, k < n
    both = ch_ok[:, None] & k_ok[None, :]
    cell = seq_head * p * n + ch[:, None] * n + k[None, :]
    h = tl.load(state_ptr + cell, mask=both, other=0.0)
    A = tl.load(A_ptr + head).to(tl.float32)
    if HAS_D:
        if D_PER_CHANNEL:
            D = tl.load(D_ptr + head * p + ch, mask=ch_ok, other=0.0).to(tl.float32)
        else:
            D = tl.load(D_ptr + head).to(tl.float32)
    for t in range(l):
        token = seq * l + t
        row = (token * heads + head) * p + ch  # into (b, l, h, p)
        x = tl.load(x_ptr + row, mask=ch_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + token * heads + head).to(tl.float32)
        bc = (token * groups + group) * n + k
        B = tl.load(B_ptr + bc, mask=k_ok, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + bc, mask=k_ok, other=0.0).to(tl.float32)
        h = h * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1)
        if HAS_D:
            y += D * x
        if HAS_Z:
            y *= silu(tl.load(z_ptr + row, mask=ch_ok, other=0.0).to(tl.float32))
        tl.store(y_ptr + row, y, mask=ch_ok)
    tl.store(out_ptr + cell, h, mask=both)


def mamba2_scan(
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
    """The Mamba-2 scan over a sequence from ``state`` (``ops.ssd.ssd_scan``).

    Args:
        x: (b, l, h, p), dt: (b, l, h) after softplus and clamping, A: (h,), B: (b, l, g, n),
        C: (b, l, g, n), D: (h,) or (h, p) or None, state: (b, h, p, n) float32,
        z: (b, l, h, p) or None.

    Returns:
        y: (b, l, h, p) float32; state: (b, h, p, n) float32 after the last token, new.
    """
    b, l, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    if heads % groups:
        raise ValueError(f"{heads} heads do not split into {groups} groups")
    check_state(state)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    out, y = torch.empty_like(state), torch.empty(b, l, heads, p, dtype=torch.float32, device=state.device)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 2048 // block_n))
    _mamba2_scan_kernel[(triton.cdiv(p, block_p), b * heads)](
        state, x, dt, A, B, C, operand(D, out), operand(z, out), y, out,
        l, heads, p, n, heads // groups, groups,
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return y, out
