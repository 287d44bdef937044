"""The product of activations with a weight matrix: y = x W^T + bias, by whichever kernel
suits the call.

A decode step multiplies one activation row per sequence by each weight matrix, so it runs
at the speed the weights stream from memory. PyTorch's CPU linear reaches that speed for
float32 weights only; the backend's matvec kernel (``ops.kernels.matvec``) for bfloat16 and
int8 weights too. A product takes the kernel when the backend has it, the kernel reads the
weights' dtype (float32, bfloat16, int8), x has at most ``matvec_rows`` rows and no gradient
is wanted. Everything else (prompts, training) takes ``F.linear``: in float32 for bfloat16
or float16 weights on a CPU without native products in that dtype (``float32_product``), and
for wide float32 prompt products through oneDNN's matmul where the backend says so.

Int8 weights are stored as int8 rows with a float32 scale per row (``models.int8``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from mambastep.ops import kernels
from mambastep.ops.backend import TORCH, Backend, computes_in, wants_grad

MATVEC_ROWS = 16  # rows (sequences x tokens) up to which float weights that PyTorch multiplies natively take the kernel
WIDE_MATVEC_ROWS = 64  # the same for weights whose other path converts them to float32 on every call
MATVEC_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # the weights the kernel reads
CONVERTED_ROWS = 256  # weight rows converted to float32 at a time by float32_product
ONEDNN_MIN_FEATURES = 1024  # outputs from which a float32 prompt product may take oneDNN's matmul


def matvec_rows(dtype: torch.dtype) -> int:
    """Rows up to which a product with weights of ``dtype`` takes the matvec kernel (0: a dtype
    it does not read): ``MATVEC_ROWS`` where PyTorch multiplies the dtype natively (beyond,
    its matmul is faster), ``WIDE_MATVEC_ROWS`` where its other path converts the weights."""
    if dtype not in MATVEC_DTYPES:
        return 0
    return MATVEC_ROWS if computes_in(dtype) else WIDE_MATVEC_ROWS


def takes_matvec(x: Tensor, weight: Tensor, backend: Backend, *params: Tensor | None) -> bool:
    """Whether the product of ``x`` (..., k) with ``weight`` takes the matvec kernel (``params``:
    the layer's other tensors, which must not want gradients either)."""
    return (
        backend.matvec_kernel
        and x.numel() <= matvec_rows(weight.dtype) * x.shape[-1]
        and not wants_grad(x, weight, *params)
    )


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale: Tensor | None = None, backend: Backend = TORCH
) -> Tensor:
    """y = x W^T (times ``scale`` per output row for int8 weights) + bias: (..., k) -> (..., n).

    Args:
        x: (..., k); weight: (n, k) float, or int8 with ``scale`` (n,) float32; bias: (n,) or None.
        backend: the kernels to take (``ops.backend``); PyTorch's operators by default.

    Returns:
        (..., n) in x's dtype for float weights; float32 for int8 weights.
    """
    if takes_matvec(x, weight, backend, bias):
        y = kernels.matvec(x, weight, scale, bias)
        return y if scale is not None else y.to(x.dtype)
    if scale is not None:
        y = float32_product(x, weight) * scale  # (..., n)
        return y if bias is None else y + bias
    if backend.onednn_prompts and takes_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    if x.device.type == "cpu" and not computes_in(weight.dtype):
        y = float32_product(x, weight)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def float32_product(x: Tensor, weight: Tensor) -> Tensor:
    """x W^T in float32 for a weight stored in a dtype PyTorch does not multiply fast here
    (int8 values, or bfloat16 / float16 on a CPU without native kernels): (..., in) -> (..., out).

    The weight is converted ``CONVERTED_ROWS`` rows at a time, each block just before its
    product, while it is still in cache. A float32 copy of the whole weight would be written
    to memory and read back on every call, and would add 4 bytes per weight to a prompt's
    peak memory.
    """
    x = x.float()
    blocks = [F.linear(x, weight[r : r + CONVERTED_ROWS].float()) for r in range(0, weight.shape[0], CONVERTED_ROWS)]
    return torch.cat(blocks, dim=-1)


def takes_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether a product fits oneDNN's matmul: float32, at least ``ONEDNN_MIN_FEATURES``
    outputs (narrower ones ran slower there than in MKL), inference, on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.shape[0] >= ONEDNN_MIN_FEATURES
        and x.numel() > 0
        and not wants_grad(x, weight)
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + bias through oneDNN's matmul, the CPU linear op of PyTorch's compiler
    (inference only): (..., in) -> (..., out)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (m, out)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _onednn_linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0]  # multiply-adds, for FlopCounterMode
