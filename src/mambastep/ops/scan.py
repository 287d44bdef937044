"""Mamba-1 selective scan, chunked, from any starting state.

The recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t has a separate decay
for every (channel, state) pair, so, unlike Mamba-2, it has no matrix-multiply
form. Per chunk of q tokens the expensive parts run vectorised over the chunk:
the decays exp(Δ A), the inputs Δ B x and the read-out C · h as one batched
contraction. What remains in the loop is one fused multiply-add per token over
(b, e, n): the work-efficient form on a CPU. Only factors exp(Δ A) <= 1 are
ever multiplied, never divided by, so very negative Δ A (down to underflow)
and million-token inputs stay finite and exact. Memory is bounded by the
chunk, not the sequence.

``selective_scan`` is the op the models call: one token takes the recurrent step, a sequence
the backend's kernel where it has one (``ops.kernels``), else ``selective_scan_chunked``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambastep.ops import kernels
from mambastep.ops.backend import TORCH, Backend, load_triton, takes_triton
from mambastep.ops.step import gate, selective_step

DEFAULT_CHUNK = 64


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    *,
    z: Tensor | None = None,
    dt_softplus: bool = False,
    backend: Backend = TORCH,
) -> tuple[Tensor, Tensor]:
    """Selective scan (S6) over a sequence, starting from ``state``; optionally with the
    softplus of Δ before it and the SiLU(z) gate after it.

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,   y_t = (C_t · h_t + D x_t) SiLU(z_t)

    Args:
        x: (b, l, e) inputs; dt: (b, l, e) Δ, or with ``dt_softplus`` Δ before its softplus;
        A: (e, n) state matrix (negative); B: (b, l, n), C: (b, l, n); D: (e,) or None;
        state: (b, e, n) or None for zeros; z: (b, l, e) or None (no gate).
        backend: the kernels to take (``ops.backend``); PyTorch's operators by default.

    Returns:
        y: (b, l, e) float32 (float64 for float64 inputs); state: (b, e, n) after the last token.
    """
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
    if x.shape[1] == 1:
        one = None if z is None else z[:, 0]
        step = selective_step
        if takes_triton(backend, state, x, dt, A, B, C, D, z):
            step = load_triton().mamba_state_update
        y, state = step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state, z=one, dt_softplus=dt_softplus)
        return y[:, None], state  # (b, 1, e)
    if takes_triton(backend, state, x, dt, A, B, C, D, z):
        return load_triton().mamba_scan(x, dt, A, B, C, D, state, z=z, dt_softplus=dt_softplus)
    if backend.sequence_kernels:
        return kernels.selective_scan(x, dt, A, B, C, D, state, z, dt_softplus)
    y, state = selective_scan_chunked(x, F.softplus(dt) if dt_softplus else dt, A, B, C, D, state, backend.scan_chunk)
    return gate(y, z), state


def selective_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Selective scan (S6) over a sequence, starting from ``state``, in PyTorch's operators
    (any device, differentiable), by chunks of ``chunk_size`` tokens.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t · h_t + D x_t

    Args:
        x: (b, l, e) inputs.
        dt: (b, l, e) step sizes (after softplus).
        A: (e, n) state matrix (negative).
        B: (b, l, n), C: (b, l, n) input-dependent projections.
        D: (e,) skip, or None.
        state: (b, e, n) starting state, or None for zeros.
        chunk_size: tokens per vectorised block (any value >= 1; it need not divide l).

    Returns:
        y: (b, l, e) in float32 (float64 for float64 inputs); state: (b, e, n) after the last token.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    f = torch.promote_types(x.dtype, torch.float32)
    b, l, e = x.shape
    h = x.new_zeros(b, e, A.shape[1], dtype=f) if state is None else state.to(f)
    A = A.to(f)
    ys = []
    for start in range(0, l, chunk_size):
        piece = slice(start, start + chunk_size)
        x_q, dt_q = x[:, piece].to(f), dt[:, piece].to(f)  # (b, q, e)
        dA = torch.exp(dt_q.transpose(0, 1)[..., None] * A)  # (q, b, e, n)
        dBx = (dt_q * x_q).transpose(0, 1)[..., None] * B[:, piece].to(f).transpose(0, 1)[:, :, None, :]  # (q, b, e, n)
        hs = []
        for t in range(dA.shape[0]):
            h = torch.addcmul(dBx[t], dA[t], h)  # (b, e, n)
            hs.append(h)
        ys.append(torch.einsum("qben,bqn->bqe", torch.stack(hs), C[:, piece].to(f)))  # (b, q, e)
    y = torch.cat(ys, dim=1)  # (b, l, e)
    if D is not None:
        y = y + D.to(f) * x.to(f)
    return y, h
