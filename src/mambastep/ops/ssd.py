"""Mamba-2 state space duality (SSD): the chunked scan.

With a scalar decay per head, the Mamba-2 recurrence is also a masked,
attention-like matrix product (Dao and Gu, "Transformers are SSMs",
arXiv 2405.21060). The paper's chunked SSD algorithm cuts the sequence into
chunks of length q and uses both views: the quadratic form inside a chunk,
the recurrence between chunks. Here the chunks are taken one after another,
carrying the state, so the memory besides the output is that of one chunk.

``ssd_scan`` is the op the models call: one token takes the recurrent step, a sequence the
backend's kernel where it has one (``ops.kernels``; on the CPU also when a gradient is
wanted), else ``ssd_scan_chunked``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambastep.ops import kernels
from mambastep.ops.backend import TORCH, Backend, load_triton, takes_triton
from mambastep.ops.step import gate, ssd_step


def _segsum_exp(a: Tensor) -> Tensor:
    """exp of the segment sums of ``a`` (..., q): (..., q, q), 0 above the diagonal.

    Entry [t, s] is exp(a_{s+1} + ... + a_t) for t >= s. The sums are masked
    cumulative sums, never differences of prefix sums, and every exponent is
    <= 0 when ``a`` is, so nothing overflows and nothing cancels.
    """
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    a = a[..., None].expand(*a.shape, q)  # (..., q, q): a[..., t, s] = a_t
    seg = a.masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)  # (..., q, q): sum over s < k <= t
    return seg.masked_fill(~ones.tril(), float("-inf")).exp()


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    *,
    z: Tensor | None = None,
    backend: Backend = TORCH,
) -> tuple[Tensor, Tensor]:
    """Mamba-2 scan over a sequence from ``state``, y gated by SiLU(z) where z is given.

    Args:
        as ``ssd_scan_chunked``; z: (b, l, h, p) or None (no gate); backend: the kernels to
        take (``ops.backend``); PyTorch's operators by default.

    Returns:
        y: (b, l, h, p), state: (b, h, p, n), both float32 (float64 when x is float64).
    """
    if state is None:
        b, _, nh, p = x.shape
        state = x.new_zeros(b, nh, p, B.shape[3], dtype=torch.promote_types(x.dtype, torch.float32))
    if x.shape[1] == 1:
        one = None if z is None else z[:, 0]
        step = load_triton().mamba2_state_update if takes_triton(backend, state, x, dt, A, B, C, D, z) else ssd_step
        y, state = step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state, z=one)
        return y[:, None], state  # (b, 1, h, p)
    if takes_triton(backend, state, x, dt, A, B, C, D, z):
        return load_triton().mamba2_scan(x, dt, A, B, C, D, state, z=z)
    if backend.sequence_kernels:
        return kernels.ssd_scan(x, dt, A, B, C, D, state, z)
    y, state = ssd_scan_chunked(x, dt, A, B, C, D, state, backend.scan_chunk)
    return gate(y, z), state


def ssd_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Mamba-2 scan (SSD with a scalar decay per head), chunk by chunk, in PyTorch's
    operators (any device, differentiable).

    Same result as ``reference.ssd_scan_ref``:

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,   y_t = h_t · C_t + D x_t

    Head i reads B and C of group i // (h / g). Within a chunk, with
    a_t = dt_t A and h_in the state entering it,

        y_t = sum_{s <= t} (C_t · B_s) exp(a_{s+1} + ... + a_t) dt_s x_s
              + exp(a_0 + ... + a_t) h_in · C_t + D x_t,

    and the state leaving it is exp(a_0 + ... + a_{q-1}) h_in plus the
    chunk's own inputs decayed to its end.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) step sizes (after softplus and clamping).
        A: (h,) scalar decay rate per head (negative).
        B: (b, l, g, n), C: (b, l, g, n).
        D: (h,) or (h, p) skip, or None.
        state: (b, h, p, n) starting state, or None for zeros.
        chunk_size: q, the chunk length; need not divide l.

    Returns:
        y: (b, l, h, p), state: (b, h, p, n) after the last token, both in
        float32 (float64 when x is float64).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    f = torch.promote_types(x.dtype, torch.float32)
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = nh // g  # heads per group
    A = A.to(f)
    if D is not None:
        D = D.to(f)
        D = D[:, None] if D.dim() == 1 else D  # (h, 1) or (h, p)
    state = x.new_zeros(b, nh, p, n, dtype=f) if state is None else state.to(f)
    ys = []
    for start in range(0, l, chunk_size):
        c = slice(start, start + chunk_size)
        xc, dtc = x[:, c].to(f), dt[:, c].to(f)  # (b, q, h, p), (b, q, h)
        Bc, Cc = B[:, c].to(f), C[:, c].to(f)  # (b, q, g, n)
        q = xc.shape[1]
        a = dtc * A  # (b, q, h)
        decay = _segsum_exp(a.transpose(1, 2)).view(b, g, r, q, q)  # (b, g, r, q, q)
        decay_in = a.cumsum(dim=1).exp()  # (b, q, h): from the chunk's start to t
        xdt = (xc * dtc[..., None]).view(b, q, g, r, p)  # (b, q, g, r, p)
        # Diagonal block: the quadratic, attention-like form.
        scores = torch.einsum("btgn,bsgn->bgts", Cc, Bc)[:, :, None] * decay  # (b, g, r, q, q)
        y = torch.einsum("bgrts,bsgrp->btgrp", scores, xdt)  # (b, q, g, r, p)
        # The state entering the chunk, decayed to each t and read out by C_t.
        h_in = state.reshape(b, g, r, p, n)
        y_off = torch.einsum("bgrpn,btgn->btgrp", h_in, Cc)  # (b, q, g, r, p)
        y = (y + y_off * decay_in.view(b, q, g, r, 1)).reshape(b, q, nh, p)  # (b, q, h, p)
        if D is not None:
            y = y + D * xc
        # The state leaving the chunk: h_in decayed over it, plus its own inputs.
        decay_out = decay[..., -1, :]  # (b, g, r, q): from s to the chunk's end
        h_own = torch.einsum("bgrs,bsgrp,bsgn->bgrpn", decay_out, xdt, Bc).reshape(b, nh, p, n)
        state = decay_in[:, -1, :, None, None] * state + h_own  # (b, h, p, n)
        ys.append(y)
    return torch.cat(ys, dim=1), state
