"""AdamW with weight decay on matrices only, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mambastep.training.settings import OptimSettings

# Parameters that are matrices in shape but not in role: Mamba-1's A_log is (e, n), yet it
# holds decay rates, like D; decaying them towards zero would change the dynamics.
NO_DECAY_NAMES = ("A_log", "D")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies: matrices (and conv kernels), not norms, biases, A_log, D or dt bias."""
    return param.dim() >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def build_optimizer(model: nn.Module, settings: OptimSettings) -> torch.optim.AdamW:
    """AdamW over two groups: the decayed matrices and the rest (tied weights counted once)."""
    decayed, other = [], []
    for name, param in model.named_parameters():
        (decayed if decays(name, param) else other).append(param)
    groups = [
        {"params": decayed, "weight_decay": settings.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``lr_factor`` over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, total_steps, settings.min_lr_ratio)
    )
