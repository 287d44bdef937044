"""One-token recurrences: the "mamba_step" at the heart of decoding.

A step is a constant amount of work whatever the context length: an
elementwise decay of the state, an outer product added to it, and a dot
product to read it out. The state is kept and updated in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gate(y: Tensor, z: Tensor | None) -> Tensor:
    """The SSM's output y gated by SiLU(z) (same shape), in float32 (float64 for a float64 y);
    y itself without z."""
    return y if z is None else y * F.silu(z.to(torch.promote_types(y.dtype, torch.float32)))


def selective_step(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state: Tensor,
    *,
    z: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-1 selective scan.

    h = exp(Δ A) h + Δ B x,   y = (C · h + D x) SiLU(z)

    Args:
        x: (b, e), dt: (b, e) Δ (with ``dt_softplus``: before its softplus), A: (e, n),
        B: (b, n), C: (b, n), D: (e,) or None, state: (b, e, n), z: (b, e) or None (no gate).

    Returns:
        y: (b, e) in the state's dtype; state: (b, e, n) the next state.
    """
    f = state.dtype
    x, dt = x.to(f), dt.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[:, :, None] * A.to(f))  # (b, e, n)
    dBx = (dt * x)[:, :, None] * B.to(f)[:, None, :]  # (b, e, n)
    state = dA * state + dBx
    y = torch.bmm(state, C.to(f)[:, :, None]).squeeze(-1)  # (b, e)
    if D is not None:
        y = y + D.to(f) * x
    return gate(y, z), state


def ssd_step(
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
    """One token of the Mamba-2 recurrence (scalar decay per head).

    h = exp(dt A) h + dt x ⊗ B,   y = (h · C + D x) SiLU(z); head i uses group i // (h / g).

    Args:
        x: (b, h, p), dt: (b, h) after softplus and clamping, A: (h,),
        B: (b, g, n), C: (b, g, n), D: (h,) or (h, p) or None, state: (b, h, p, n),
        z: (b, h, p) or None (no gate).

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
    return gate(y, z), state
