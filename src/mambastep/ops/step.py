"""One-token recurrences: the "mamba_step" at the heart of decoding.

A step is a constant amount of work whatever the context length: an
elementwise decay of the state, an outer product added to it, and a dot
product to read it out. The state is kept and updated in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selective_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-1 selective scan.

    h = exp(dt A) h + dt B x,   y = C · h + D x

    Args:
        x: (b, e), dt: (b, e) after softplus, A: (e, n), B: (b, n), C: (b, n),
        D: (e,) or None, state: (b, e, n).

    Returns:
        y: (b, e) in the state's dtype; state: (b, e, n) the next state.
    """
    f = state.dtype
    x, dt = x.to(f), dt.to(f)
    dA = torch.exp(dt[:, :, None] * A.to(f))  # (b, e, n)
    dBx = (dt * x)[:, :, None] * B.to(f)[:, None, :]  # (b, e, n)
    state = dA * state + dBx
    y = torch.bmm(state, C.to(f)[:, :, None]).squeeze(-1)  # (b, e)
    if D is not None:
        y = y + D.to(f) * x
    return y, state


def ssd_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-2 recurrence (scalar decay per head).

    h = exp(dt A) h + dt x ⊗ B,   y = h · C + D x; head i uses group i // (h / g).

    Args:
        x: (b, h, p), dt: (b, h) after softplus and clamping, A: (h,),
        B: (b, g, n), C: (b, g, n), D: (h,) or (h, p) or None, state: (b, h, p, n).

    Returns:
        y: (b, h, p) in the state's dtype; state: (b, h, p, n) the next state.
    """
    f = state.dtype
    nh, g = x.shape[1], B.shape[1]
    x, dt = x.to(f), dt.to(f)
    B = B.to(f).repeat_interleave(nh // g, dim=1)  # (b, h, n)
    C = C.to(f).repeat_interleave(nh // g, dim=1)  # (b, h, n)
    dA = torch.exp(dt * A.to(f))  # (b, h)
    dBx = (dt[:, :, None] * x)[..., None] * B[:, :, None, :]  # (b, h, p, n)
    state = dA[:, :, None, None] * state + dBx
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        D = D.to(f)
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    return y, state
