"""The linear layer of every model: ``nn.Linear``'s parameters (the same checkpoints), its
products by ``ops.linear``, which picks the kernel for the call (the matvec kernel for decode
steps, oneDNN or PyTorch's matmul for prompts)."""

from __future__ import annotations

from torch import Tensor, nn

from mambastep import ops
from mambastep.ops.backend import TORCH, Backend


class Linear(nn.Linear):
    """``nn.Linear`` whose forward takes the backend to run with; the result has x's dtype."""

    def forward(self, x: Tensor, backend: Backend = TORCH) -> Tensor:
        return ops.linear(x, self.weight, self.bias, backend=backend)

    def operands(self) -> tuple[Tensor, None, Tensor | None]:
        """The layer as the matvec kernel takes it: weight, scale (none), bias."""
        return self.weight, None, self.bias
