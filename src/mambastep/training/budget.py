"""Will the run fit in memory? An estimate made before anything is allocated.

Parameters are counted on the meta device (no memory). The estimate adds
their gradients and AdamW's two moments, and the activations that the
backward pass keeps, per token and layer, from the shapes the family's
forward pass creates, and the process's own footprint. It errs on the
generous side (float32 everywhere).
"""

from __future__ import annotations

import torch

from mambastep.families import family_of, parameter_count
from mambastep.memory import available_memory
from mambastep.models.config import ModelConfig
from mambastep.training.settings import TrainingError

FLOAT_BYTES = 4
# What a training process holds besides the model and its activations: PyTorch itself,
# the text, the allocator's slack.
RUNTIME_BYTES = 512 * 2**20


def estimate_bytes(config: ModelConfig, parameters: int, sequences: int, seq_len: int, world: int) -> int:
    """Peak bytes of one training process (an estimate).

    Args:
        parameters: from ``families.parameter_count``.
        sequences: sequences per step in this process; seq_len: tokens per sequence.
        world: processes (under DDP each also holds gradient buckets, one more copy).
    """
    weights = parameters * FLOAT_BYTES * (4 + (world > 1))  # weights, gradients, two AdamW moments
    tokens = sequences * seq_len
    per_token = (
        config.n_layer * family_of(config).train_floats(config, seq_len) + 3 * config.vocab_size + 2 * config.d_model
    )
    return RUNTIME_BYTES + weights + tokens * per_token * FLOAT_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or the system's available RAM (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def check_fits(
    config: ModelConfig, sequences: int, seq_len: int, world: int, local_world: int, device: torch.device
) -> int:
    """Refuse a run that cannot fit; return the estimate in bytes.

    ``local_world`` processes share this machine's memory on CPU.

    Raises:
        TrainingError: the estimate exceeds the free memory; the message gives both and what to lower.
    """
    parameters = parameter_count(config)
    need = estimate_bytes(config, parameters, sequences, seq_len, world)
    free = available_bytes(device)
    share = local_world if device.type == "cpu" else 1
    if free is not None and need * share > free:
        raise TrainingError(
            f"this run needs about {need * share / 2**30:.1f} GiB on {device} ({parameters:,} parameters: "
            f"{parameters * FLOAT_BYTES * 4 / 2**30:.1f} GiB with gradients and AdamW; plus the activations of "
            f"{sequences} x {seq_len} tokens per process, times {share} process(es)), but only "
            f"{free / 2**30:.1f} GiB is free; choose a smaller config, --batch-size or --seq-len"
        )
    return need
