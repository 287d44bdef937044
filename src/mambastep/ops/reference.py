"""The spec: plain sequential loops, one token at a time.

These functions are slow on purpose. Every fast op in this package is tested
against them. They compute in float32 at least (float64 when given float64),
whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def causal_conv_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv, one output at a time.

    Args:
        x: (b, l, c) inputs.
        weight: (c, k) one kernel per channel; ``weight[:, -1]`` multiplies the newest input.
        bias: (c,) or None.
        state: (b, k-1, c) the k-1 inputs before ``x`` (oldest first), or None for zeros.

    Returns:
        y: (b, l, c) with y_t = sum_j weight[:, j] * window_t[j] + bias,
        state: (b, k-1, c) the last k-1 inputs.
    """
    dtype = _work_dtype(x)
    b, l, c = x.shape
    k = weight.shape[1]
    if state is None:
        state = x.new_zeros(b, k - 1, c)
    window = torch.cat([state.to(dtype), x.to(dtype)], dim=1)  # (b, k-1+l, c)
    w = weight.to(dtype)
    ys = []
    for t in range(l):
        y_t = (window[:, t : t + k] * w.T).sum(dim=1)  # (b, c)
        if bias is not None:
            y_t = y_t + bias.to(dtype)
        ys.append(y_t)
    return torch.stack(ys, dim=1), window[:, window.shape[1] - (k - 1) :]


def selective_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba-1 selective scan (S6), one token at a time.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t · h_t + D x_t

    Args:
        x: (b, l, e) inputs.
        dt: (b, l, e) step sizes (after softplus).
        A: (e, n) state matrix (negative).
        B: (b, l, n), C: (b, l, n) input-dependent projections.
        D: (e,) skip, or None.
        state: (b, e, n) starting state, or None for zeros.

    Returns:
        y: (b, l, e), state: (b, e, n) after the last token.
    """
    dtype = _work_dtype(x)
    b, l, e = x.shape
    n = A.shape[1]
    h = x.new_zeros(b, e, n, dtype=dtype) if state is None else state.to(dtype)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, t, :, None] * A)  # (b, e, n)
        dBx = (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]  # (b, e, n)
        h = dA * h + dBx
        y_t = (h * C[:, t, None, :]).sum(-1)  # (b, e)
        if D is not None:
            y_t = y_t + D.to(dtype) * x[:, t]
        ys.append(y_t)
    return torch.stack(ys, dim=1), h


def ssd_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba-2 scan (SSD with a scalar decay per head), one token at a time.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,   y_t = h_t · C_t + D x_t
    Head i reads B and C of group i // (h / g).

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) step sizes (after softplus and clamping).
        A: (h,) scalar decay rate per head (negative).
        B: (b, l, g, n), C: (b, l, g, n).
        D: (h,) or (h, p) skip, or None.
        state: (b, h, p, n) starting state, or None for zeros.

    Returns:
        y: (b, l, h, p), state: (b, h, p, n) after the last token.
    """
    dtype = _work_dtype(x)
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = nh // g
    h = x.new_zeros(b, nh, p, n, dtype=dtype) if state is None else state.to(dtype)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    if D is not None:
        D = D.to(dtype)
        D = D[:, None] if D.dim() == 1 else D  # (h, 1) or (h, p)
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, t] * A)  # (b, h)
        dBx = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b, h, p, n)
        h = dA[:, :, None, None] * h + dBx
        y_t = (h * C[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y_t = y_t + D * x[:, t]
        ys.append(y_t)
    return torch.stack(ys, dim=1), h
