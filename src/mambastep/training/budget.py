"""Will the run fit in memory? An estimate made before anything is allocated.

Parameters are counted on the meta device (no memory). The estimate adds
their gradients and AdamW's two moments, and the activations that the
backward pass keeps, per token and layer, from the shapes the family's
forward pass creates, and the process's own footprint. It errs on the
generous side (float32 everywhere): for the default model's run it says
1.2 GiB where the process peaked at 1.0 GiB.
"""

from __future__ import annotations

import os

import torch

from mambastep.config import GPTNeoXConfig, Mamba2Config, MambaConfig, ModelConfig
from mambastep.models import model_class
from mambastep.training.settings import TrainingError

FLOAT_BYTES = 4
# What a training process holds besides the model and its activations: PyTorch itself,
# the text, the allocator's slack (about 0.3 GiB measured on CPU).
RUNTIME_BYTES = 512 * 2**20
# Chunk length of the chunked scans (their q x q blocks are kept for the backward pass).
SCAN_CHUNK = 64


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a model of ``config`` (tied weights once), without allocating it."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in model.parameters())


def _floats_per_token_layer(config: ModelConfig, seq_len: int) -> int:
    """Floats one layer keeps for the backward pass, per token."""
    d = config.d_model
    if isinstance(config, MambaConfig):
        e, n = config.d_inner, config.d_state
        # exp(dt A), dt B x and the states h_t of the scan, each (e, n) per token.
        return 4 * e * n + 12 * e + 4 * d + config.dt_rank + 2 * n
    if isinstance(config, Mamba2Config):
        e, h, c = config.d_inner, config.n_heads, config.conv_dim
        # The within-chunk decay and score blocks, (h, q) per token, a few times over.
        return 6 * h * SCAN_CHUNK + 10 * e + 4 * c + 4 * d + 4 * h
    if isinstance(config, GPTNeoXConfig):
        # Attention probabilities over the window, per head, and the 4x MLP.
        return 4 * config.n_heads * seq_len + 12 * d + 3 * config.d_ff
    raise TypeError(f"no memory estimate for {type(config).__name__}")


def estimate_bytes(config: ModelConfig, parameters: int, sequences: int, seq_len: int, world: int) -> int:
    """Peak bytes of one training process (an estimate).

    Args:
        parameters: from ``count_parameters``.
        sequences: sequences per step in this process; seq_len: tokens per sequence.
        world: processes (under DDP each also holds gradient buckets, one more copy).
    """
    weights = parameters * FLOAT_BYTES * (4 + (world > 1))  # weights, gradients, two AdamW moments
    tokens = sequences * seq_len
    per_token = config.n_layer * _floats_per_token_layer(config, seq_len) + 3 * config.vocab_size + 2 * config.d_model
    return RUNTIME_BYTES + weights + tokens * per_token * FLOAT_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or the system's available RAM (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits(
    config: ModelConfig, sequences: int, seq_len: int, world: int, local_world: int, device: torch.device
) -> int:
    """Refuse a run that cannot fit; return the estimate in bytes.

    ``local_world`` processes share this machine's memory on CPU.

    Raises:
        TrainingError: the estimate exceeds the free memory; the message gives both and what to lower.
    """
    parameters = count_parameters(config)
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
