"""The next-token loss, read from the logits as they lie.

``F.cross_entropy(logits.float(), target)`` on a bfloat16 model's logits writes a float32
copy of them, their log-softmax, and the gradients of both: four passes over N x vocab
float32 values. ``token_nll`` widens one block of rows at a time instead, small enough to stay
in a core's L2 cache, and writes the gradient in the logits' own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_VALUES = 1 << 19
"""Logits widened at a time (2 MB of float32): a block of max(1, BLOCK_VALUES // vocab) rows."""


def token_nll(logits: Tensor, target: Tensor) -> Tensor:
    """The negative log-likelihood of each target under its row of logits, differentiable with
    respect to the logits: ``F.cross_entropy(logits.float(), target, reduction="none")``
    (float64 for float64 logits) without a widened copy of the logits or of their gradient.

    Args:
        logits: (N, vocab), any floating dtype.
        target: (N,) token ids.

    Returns:
        (N,) float32 (float64 for float64 logits).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        shapes = f"{tuple(logits.shape)} and {tuple(target.shape)}"
        raise ValueError(f"token_nll takes logits (N, vocab) and targets (N,), got {shapes}")
    return _TokenNll.apply(logits, target)


def _blocks(rows: int, vocab: int) -> list[slice]:
    size = max(1, BLOCK_VALUES // vocab)
    return [slice(start, start + size) for start in range(0, rows, size)]


class _TokenNll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=wide, device=logits.device)  # (N,): log of each row's sum of exps
        for rows in _blocks(*logits.shape):
            lse[rows] = torch.logsumexp(logits[rows].to(wide), dim=-1)
        ctx.save_for_backward(logits, target, lse)
        return lse - logits.gather(1, target[:, None])[:, 0].to(wide)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for rows in _blocks(*logits.shape):
            p = logits[rows].to(lse.dtype, copy=True).sub_(lse[rows, None]).exp_()  # (block, vocab): softmax
            p[torch.arange(p.shape[0], device=p.device), target[rows]] -= 1
            out[rows] = p.mul_(grad[rows, None])
        return out, None
