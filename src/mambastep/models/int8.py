"""Weight-only int8 quantization of a model's linear layers.

Each output row of a weight matrix gets one scale (symmetric, absmax / 127);
activations stay in float32. Decode steps take the fused matvec kernel (see
``models.linear``), which reads a quarter of the float32 weight bytes; longer
inputs (prompts) are multiplied by the int8 values, converted to float32 a block of rows
at a time (``float32_product``), then scaled. Norms, the SSM parameters (A, D, dt bias),
the conv and the embedding lookup are untouched: they are a small part of the bytes and
most of the sensitivity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mambastep.memory import in_huge_pages, place_in_huge_pages
from mambastep.models.linear import WIDE_MATVEC_ROWS, float32_product, takes_matvec
from mambastep.ops.cpu import matvec


class Int8Linear(nn.Module):
    """y = x W^T + bias with W stored as int8 rows times a float32 scale per row."""

    # Up to this many rows the fused kernel; beyond, float32 products of converted blocks of
    # the weight, which convert every weight on every call and pay off only for prompts.
    matvec_rows = WIDE_MATVEC_ROWS

    def __init__(self, weight: Tensor, bias: Tensor | None, fused_matvec: bool = False):
        super().__init__()
        self.fused_matvec = fused_matvec
        w = weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @property
    def in_features(self) -> int:
        return self.weight_int8.shape[1]

    def _apply(self, fn, recurse=True):
        kept = {"scale": self.scale, "bias": self.bias}
        super()._apply(fn, recurse)
        for name, before in kept.items():  # a model's .to(dtype) leaves them float32 (matvec needs it)
            after = getattr(self, name)
            if after is not None and after.dtype != torch.float32:
                setattr(self, name, before.to(after.device))
        return self

    def matvec_operands(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layer as ``ops.cpu.matvec`` takes it: int8 weight, scale per row, bias."""
        return self.weight_int8, self.scale, self.bias

    def forward(self, x: Tensor) -> Tensor:
        if takes_matvec(self, x):
            return matvec(x, *self.matvec_operands())
        y = float32_product(x, self.weight_int8) * self.scale  # (..., out)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> Tensor:
        """The float32 weight this layer computes with: (out, in)."""
        return self.weight_int8.float() * self.scale[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear; return the model.

    A tied head keeps its float embedding for the lookup and gets an int8 copy for the product.
    The model must hold float32 weights on the CPU. Each layer keeps its engine settings, and
    where the float weights were in huge pages (``memory.place_in_huge_pages``) the weights are
    placed there again, so the float ones' memory is freed.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    placed = any(in_huge_pages(linear.weight) for _, linear in linears)
    for name, linear in linears:
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise ValueError(f"int8 weights need float32 weights on the CPU; {name} is {linear.weight.dtype} on {linear.weight.device}")
        parent, _, child = name.rpartition(".")
        quantized = Int8Linear(linear.weight, linear.bias, getattr(linear, "fused_matvec", False))
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    if placed:
        place_in_huge_pages(model)
    return model
