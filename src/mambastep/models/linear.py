"""The linear layer of every model: PyTorch's, or the fused CPU matvec for decode steps.

A decode step multiplies one activation row per sequence by each weight matrix,
so it runs at the speed the weights stream from memory. PyTorch's CPU linear
reaches that speed for float32 weights only; ``ops.cpu.matvec`` reaches it for
bfloat16 and int8 weights too. A layer takes the kernel when the engine settings
allow it (``matvec``), the kernel reads its weights' dtype (float32, bfloat16, int8), its
input is on the CPU with at most ``matvec_rows`` rows, and no gradient is wanted. The rows are
``MATVEC_ROWS`` for weights PyTorch multiplies natively (beyond, its matmul is faster), and
``WIDE_MATVEC_ROWS`` for the others (int8; bfloat16 on a CPU without native bfloat16
kernels), whose alternative is a float32 copy of the weight on every call. Everything else
(prompts, training) takes ``F.linear``, in float32 for bfloat16 or float16 weights on a CPU
without native products in that dtype (where PyTorch's bfloat16 matmul runs hundreds of
times slower than its float32 one), or, for float32 prompts on CPUs where MKL is not tuned
(``prompt_matmul``), oneDNN's matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from mambastep.ops.cpu import computes_in, matvec, wants_grad

MATVEC_ROWS = 16  # rows (sequences x tokens) up to which float weights that PyTorch multiplies natively take the fused kernel
WIDE_MATVEC_ROWS = 64  # the same for weights whose other path converts them to float32 on every call
MATVEC_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # the weights the kernel reads
CONVERTED_ROWS = 256  # weight rows converted to float32 at a time by float32_product
# Outputs from which a float32 prompt product may take oneDNN's matmul rather than MKL's. On an
# AMD EPYC (Zen 3), 256-token products with 1,536 to 6,448 outputs ran 1.1-1.6x faster in
# oneDNN, narrower ones (80 to 768 outputs) 0.7-1.0x.
ONEDNN_MIN_FEATURES = 1024


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


def _wants_grad(layer: nn.Module, x: Tensor) -> bool:
    # Grad mode first: inference (every decode step) then skips gathering the parameters.
    return torch.is_grad_enabled() and wants_grad(x, *layer.parameters())


def takes_matvec(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer`` (with ``fused_matvec`` and ``matvec_rows``) computes ``x`` with the fused matvec kernel."""
    return (
        layer.fused_matvec
        and x.device.type == "cpu"
        and x.numel() <= layer.matvec_rows * x.shape[-1]
        and not _wants_grad(layer, x)
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + bias through oneDNN's matmul, the CPU linear op of PyTorch's compiler
    (inference only): (..., in) -> (..., out)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (m, out)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _onednn_linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0]  # multiply-adds, for FlopCounterMode


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoints) whose decode-step products may take
    the fused matvec kernel, and whose float32 prompt products may take oneDNN's matmul
    (``onednn_prompts``, for layers of at least ``ONEDNN_MIN_FEATURES`` outputs); the result
    has the input's dtype either way."""

    fused_matvec = False  # set by LanguageModel.configure
    onednn_prompts = False  # likewise

    @property
    def matvec_rows(self) -> int:
        """Rows up to which this layer takes the fused kernel (0: its weights' dtype is not one the kernel reads)."""
        if self.weight.dtype not in MATVEC_DTYPES:
            return 0
        return MATVEC_ROWS if computes_in(self.weight.dtype) else WIDE_MATVEC_ROWS

    def takes_onednn(self, x: Tensor) -> bool:
        """Whether a float32 product with ``x`` fits oneDNN's matmul (when ``onednn_prompts``)."""
        return (
            x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and self.out_features >= ONEDNN_MIN_FEATURES
            and x.numel() > 0
            and not _wants_grad(self, x)
        )

    def matvec_operands(self) -> tuple[Tensor, None, Tensor | None]:
        """The layer as ``ops.cpu.matvec`` takes it: weight, scale (none), bias."""
        return self.weight, None, self.bias

    def forward(self, x: Tensor) -> Tensor:
        if takes_matvec(self, x):
            return matvec(x, *self.matvec_operands()).to(x.dtype)
        if self.onednn_prompts and self.takes_onednn(x):
            return onednn_linear(x, self.weight, self.bias)
        if x.device.type == "cpu" and not computes_in(self.weight.dtype):
            y = float32_product(x, self.weight)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
