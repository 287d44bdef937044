"""Calls of the ``mambastep::`` operators: each prepares its inputs as the schema takes them
(float32, rows contiguous) and returns what the op functions return. The op functions
(``ops.scan``, ``ops.ssd``, ``ops.conv``, ``ops.norm``, ``ops.linear``) call these where their
backend turns the kernels on; the device's implementation must be loaded (``ops.backend``).

``selective_scan`` and ``ssd_scan`` are differentiable: when grad mode is on and an input
requires grad, their forward also saves the state every ``CHECKPOINT_CHUNK`` tokens and the
backward recomputes each chunk's states from those checkpoints (memory l / CHECKPOINT_CHUNK
times the state, never (l, e, n)). ``causal_conv_silu`` is differentiable too: its backward
recomputes the conv from the saved inputs. The other kernels serve inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mambastep.ops.backend import wants_grad
from mambastep.ops.step import gate

CHECKPOINT_CHUNK = 64  # tokens between the states saved for the backward
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the sequence kernels read as it lies


def f32(t: Tensor) -> Tensor:
    """``t`` as contiguous float32."""
    return t.to(torch.float32).contiguous()


def rows(t: Tensor, dims: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """``t`` in ``dtype`` with its last ``dims`` dimensions contiguous, its other strides kept
    (a copy only where they are not): what the kernels that read strided rows take."""
    t = t.to(dtype)
    inner = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:])):
        if stride != inner:
            return t.clone(memory_format=torch.contiguous_format)
        inner *= size
    return t


def _shared_dtype(*inputs: Tensor | None) -> torch.dtype:
    """The dtype the kernels read these inputs in: theirs where they share one of ``INPUT_DTYPES``
    (None is no input), else float32, so that no input is rounded to another's precision."""
    dtypes = {t.dtype for t in inputs if t is not None}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(INPUT_DTYPES) else torch.float32


def _empty_or_f32(t: Tensor | None) -> Tensor:
    return torch.empty(0) if t is None else f32(t)


def _specs(*inputs: Tensor | None) -> list[tuple[torch.dtype, torch.Size] | None]:
    """Each input's dtype and shape (None for None): what its gradient must have."""
    return [None if t is None else (t.dtype, t.shape) for t in inputs]


def _as_inputs(ctx, grads: list[Tensor | None]) -> list[Tensor | None]:
    """A backward's gradients in their inputs' dtypes and shapes (``ctx.inputs``, from
    ``_specs``), None where autograd needs none."""
    return [
        g.to(spec[0]).reshape(spec[1]) if spec is not None and needed else None
        for g, spec, needed in zip(grads, ctx.inputs, ctx.needs_input_grad)
    ]


class _CheckpointedScan(torch.autograd.Function):
    """A scan with its backward: ``op`` "selective_scan" (Mamba-1) or "ssd_scan" (Mamba-2),
    whose ``{op}_fwd`` also saves the state every ``chunk`` tokens and ``{op}_bwd`` recomputes
    from those. Inputs as the op's (D may be None), without the gate."""

    @staticmethod
    def forward(ctx, op, x, dt, A, B, C, D, state, chunk):
        args = [f32(t) for t in (x, dt, A, B, C)]
        D32 = _skip_per_channel(D, *x.shape[2:]) if op == "ssd_scan" else _empty_or_f32(D)
        y, final, ckpt = getattr(torch.ops.mambastep, f"{op}_fwd")(*args, D32, f32(state), chunk)
        ctx.save_for_backward(*args, D32, ckpt)
        ctx.op, ctx.chunk = op, chunk
        ctx.inputs = [None, *_specs(x, dt, A, B, C, D, state)]
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh):
        x, dt, A, B, C, D32, ckpt = ctx.saved_tensors
        grads = getattr(torch.ops.mambastep, f"{ctx.op}_bwd")(x, dt, A, B, C, D32, ckpt, f32(gy), f32(gh), ctx.chunk)
        dx, ddt, dA, dB, dC, dD, dstate = grads
        # Partials per sequence (dA, dD), and per channel block (Mamba-1) or head (Mamba-2) for
        # dB and dC, summed here.
        if ctx.op == "ssd_scan":
            b, l, g, n = B.shape
            dB, dC = (d.view(b, g, -1, l, n).sum(2).transpose(1, 2) for d in (dB, dC))  # (b, l, g, n)
            dD = dD.sum(0)  # (h, p)
            if ctx.inputs[6] is not None and len(ctx.inputs[6][1]) == 1:
                dD = dD.sum(-1)  # a skip of one value per head, D (h,)
        else:
            dB, dC, dD = dB.sum(1), dC.sum(1), dD.sum(0)
        return (*_as_inputs(ctx, [None, dx, ddt, dA.sum(0), dB, dC, dD, dstate]), None)


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state: Tensor,
    z: Tensor | None,
    dt_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """The Mamba-1 scan in one pass (``ops.selective_scan``'s contract); y and state float32.

    When gradients are wanted it runs the differentiable pair of kernels, with the softplus
    and the gate as PyTorch operators around it; otherwise the inference kernel, which saves
    nothing, computes the softplus and the gate inside, and reads x, dt, B, C and z where they
    lie (rows at any stride, as slices of a projection's output), in their dtype where they
    share one of ``INPUT_DTYPES`` (else as float32).
    """
    if wants_grad(x, dt, A, B, C, D, state, z):
        dt = F.softplus(dt) if dt_softplus else dt
        y, state = _CheckpointedScan.apply("selective_scan", x, dt, A, B, C, D, state, CHECKPOINT_CHUNK)
        return gate(y, z), state
    read = _shared_dtype(x, dt, B, C, z)
    z = torch.empty(0) if z is None else rows(z, dtype=read)
    x, dt, B, C = (rows(t, dtype=read) for t in (x, dt, B, C))
    y, state = torch.ops.mambastep.selective_scan(x, dt, f32(A), B, C, _empty_or_f32(D), z, f32(state), dt_softplus)
    return y, state


def _skip_per_channel(D: Tensor | None, h: int, p: int) -> Tensor:
    """The skip D, (h,) or (h, p), as the kernels take it: (h, p) float32, or empty for None."""
    return torch.empty(0) if D is None else f32(D.reshape(h, -1).expand(h, p))


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor, z: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The Mamba-2 scan in one pass (``ops.ssd_scan``'s contract); y and state float32. Each
    state entry is updated token by token, as in ``reference.ssd_scan_ref``, so the result is
    the same for any split of the sequence; except a bfloat16 prompt of 64 tokens or more on a
    CPU with AMX tiles, which runs in chunks of 64 as matrix products on the tiles
    (``cpu_ssd_scan_path`` says which): the same values to the precision of its 16-bit
    operands, about 1e-5 relative.

    When gradients are wanted it runs the differentiable pair of kernels (float32 copies of
    the inputs), with the gate as PyTorch operators after it; otherwise the inference kernel,
    which saves nothing, gates inside, and reads x, B, C and z where they lie (rows at any
    stride, as slices of in_proj's output), in their dtype where they share one of
    ``INPUT_DTYPES`` (else as float32)."""
    if wants_grad(x, dt, A, B, C, D, state, z):
        y, state = _CheckpointedScan.apply("ssd_scan", x, dt, A, B, C, D, state, CHECKPOINT_CHUNK)
        return gate(y, z), state
    h, p = x.shape[2], x.shape[3]
    read = _shared_dtype(x, B, C, z)
    D = _skip_per_channel(D, h, p)
    z = torch.empty(0) if z is None else rows(z, 2, read)
    y, state = torch.ops.mambastep.ssd_scan(
        rows(x, 2, read), f32(dt), f32(A), rows(B, 2, read), rows(C, 2, read), D, z, f32(state)
    )
    return y, state


def _conv_operands(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> list[Tensor]:
    """``causal_conv_silu``'s inputs as the kernels take them."""
    return [rows(x, dtype=x.dtype), f32(weight), _empty_or_f32(bias), state.to(x.dtype).contiguous()]


class _CausalConvSilu(torch.autograd.Function):
    """SiLU of the causal conv with its backward. Inputs as ``causal_conv_silu``."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        ctx.inputs = _specs(x, weight, bias, state)
        operands = _conv_operands(x, weight, bias, state)
        ctx.save_for_backward(*operands)
        return tuple(torch.ops.mambastep.causal_conv_silu(*operands))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gnext):
        x, weight, bias, state = ctx.saved_tensors
        dx, dstate, dweight, dbias = torch.ops.mambastep.causal_conv_silu_backward(
            x, weight, bias, state, gy.to(x.dtype).contiguous(), gnext.to(x.dtype).contiguous()
        )
        # Partials per sequence (dweight (b, k, c), dbias), summed here.
        return tuple(_as_inputs(ctx, [dx, dweight.sum(0).t(), dbias.sum(0), dstate]))


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU of the causal conv in one pass (``ops.causal_conv_silu``'s contract): x (b, l, c)
    float32, bfloat16 or float16, read where it lies (rows at any stride); y (b, l, c)
    contiguous and the state (b, k-1, c), both in x's dtype. Differentiable: the backward is
    one pass too, the conv recomputed from x."""
    if wants_grad(x, weight, bias, state):
        return _CausalConvSilu.apply(x, weight, bias, state)
    y, state = torch.ops.mambastep.causal_conv_silu(*_conv_operands(x, weight, bias, state))
    return y, state


def rms_norm(x: Tensor, weight: Tensor, eps: float, group: int) -> Tensor:
    """RMSNorm in one pass (``ops.rms_norm``'s contract), inference only: x and weight each in
    one of ``INPUT_DTYPES``, the result in weight's."""
    return torch.ops.mambastep.rms_norm(x, weight, eps, group)


def matvec(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """y = x W^T (times ``scale`` per output row for int8 weights) + bias, in float32, reading
    each weight once: (..., k) -> (..., n). Weights float32, bfloat16 or int8; inference only.
    Meant for a few rows of x (a decode step: one per sequence)."""
    flat = f32(x.reshape(-1, x.shape[-1]))  # (m, k)
    y = torch.ops.mambastep.matvec(flat, weight, scale, None if bias is None else f32(bias))  # (m, n)
    return y.reshape(*x.shape[:-1], weight.shape[0])
