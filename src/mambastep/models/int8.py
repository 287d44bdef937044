"""Weight-only int8 quantization of a model's linear layers.

Each output row of a weight matrix gets one scale (symmetric, absmax / 127);
activations stay in float32. Decode steps take the matvec kernel (``ops.linear``), which
reads a quarter of the float32 weight bytes; longer inputs (prompts) are multiplied by the
int8 values, converted to float32 a block of rows at a time, then scaled. Norms, the SSM parameters (A, D, dt bias),
the conv and the embedding lookup are untouched: they are a small part of the bytes and
most of the sensitivity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mambastep import ops
from mambastep.memory import in_huge_pages, place_in_huge_pages
from mambastep.ops.backend import TORCH, Backend


class Int8Linear(nn.Module):
    """y = x W^T + bias with W stored as int8 rows times a float32 scale per row."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
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

    def operands(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layer as the matvec kernel takes it: int8 weight, scale per row, bias."""
        return self.weight_int8, self.scale, self.bias

    def forward(self, x: Tensor, backend: Backend = TORCH) -> Tensor:
        """(..., in) -> (..., out) float32."""
        return ops.linear(x, self.weight_int8, self.bias, scale=self.scale, backend=backend)

    def dequantized(self) -> Tensor:
        """The float32 weight this layer computes with: (out, in)."""
        return self.weight_int8.float() * self.scale[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear; return the model.

    A tied head keeps its float embedding for the lookup and gets an int8 copy for the product.
    The model must hold float32 weights on the CPU (or on the meta device, which holds none:
    the int8 model's shape and sizes without its values). Where the float weights were in huge pages
    (``memory.place_in_huge_pages``), the int8 ones are placed there too, so the float ones'
    memory is freed.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    placed = any(in_huge_pages(linear.weight) for _, linear in linears)
    for name, linear in linears:
        if linear.weight.device.type not in ("cpu", "meta") or linear.weight.dtype != torch.float32:
            raise ValueError(
                f"int8 weights need float32 weights on the CPU; "
                f"{name} is {linear.weight.dtype} on {linear.weight.device}"
            )
        parent, _, child = name.rpartition(".")
        quantized = Int8Linear(linear.weight, linear.bias)
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    if placed:
        place_in_huge_pages(model)
    return model
