"""The ``mambastep::`` operators: each schema is defined here, once; each device registers
its own implementations of them.

The CPU's are C++ (``ops/cpu``, ``TORCH_LIBRARY_IMPL(mambastep, CPU, ...)``), built on first
use. Another device adds its implementations of the same schemas, in C++ or in Python
(``torch.library.impl("mambastep::ssd_scan", "CUDA")``), and ``ops.backend`` turns them on
for its tensors: the op functions and the models above them stay as they are.

The operators take float32 activations (the weights of ``matvec`` and the layers' steps
also bfloat16 or int8) and never change their inputs: every state they return is new.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

SCHEMAS = (
    # y (m, n) = x (m, k) W^T (times scale per row for int8 W) + bias, float32
    "matvec(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor",
    # x / sqrt(mean(x^2) + eps) * weight over groups of `group` channels
    "rms_norm(Tensor x, Tensor weight, float eps, int group) -> Tensor",
    # SiLU of the causal depthwise conv from a state: [y, next state]
    "causal_conv_silu(Tensor x, Tensor weight, Tensor bias, Tensor state) -> Tensor[]",
    # its gradients: [dx, dstate, dweight, dbias], the last two per sequence (see ops.kernels)
    "causal_conv_silu_backward(Tensor x, Tensor weight, Tensor bias, Tensor state, Tensor gy, Tensor gnext) "
    "-> Tensor[]",
    # Mamba-1 selective scan, inference: [y, next state]
    "selective_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, Tensor state, "
    "bool dt_softplus) -> Tensor[]",
    # the same for training: [y, next state, the states every `chunk` tokens]
    "selective_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor state, "
    "int chunk) -> Tensor[]",
    # its gradients: [dx, ddt, dA, dB, dC, dD, dstate], partial sums (see ops.kernels)
    "selective_scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor ckpt, "
    "Tensor gy, Tensor gh, int chunk) -> Tensor[]",
    # Mamba-2 scan, inference: [y, next state]
    "ssd_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, Tensor state) -> Tensor[]",
    # the same for training, without the gate: [y, next state, the states every `chunk` tokens]
    "ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor state, int chunk) -> Tensor[]",
    # its gradients: [dx, ddt, dA, dB, dC, dD, dstate], partial sums (see ops.kernels)
    "ssd_scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor ckpt, "
    "Tensor gy, Tensor gh, int chunk) -> Tensor[]",
    # one decode step of a whole stack of layers: [out, next conv states..., next SSM states...]
    "mamba_layers_step(Tensor residual, Tensor?[] params, Tensor?[] head, Tensor[] conv_states, "
    "Tensor[] ssm_states, float eps, int reuse_bytes) -> Tensor[]",
    "mamba2_layers_step(Tensor residual, Tensor?[] params, Tensor?[] head, Tensor[] conv_states, "
    "Tensor[] ssm_states, float eps, int n_groups, float dt_min, float dt_max, int reuse_bytes) -> Tensor[]",
    # what the CPU build is: its instruction set, the path of each weight type's products and of the
    # Mamba-2 scan, and the names of its layers' parameter lists
    "cpu_kernels_isa() -> str",
    "cpu_matvec_paths() -> str",
    "cpu_ssd_scan_path() -> str",
    "cpu_layers_step_params(str kind) -> str[]",
)

_library = torch.library.Library("mambastep", "DEF")
for _schema in SCHEMAS:
    _library.define(_schema)


@torch.library.register_fake("mambastep::matvec")
def _matvec_shape(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])  # the output's shape, for torch.compile


# The training operators' output shapes, so that torch.compile traces a training step through
# them (``mambastep train --compile``) instead of breaking its graph at each. The C++ kernels
# return contiguous tensors of these shapes (ops/cpu); a test checks each against them.

SELECTIVE_SCAN_BLOCK = 16
"""Channels per work item of the Mamba-1 scan's backward (``kBlock``, ops/cpu/selective_scan.cpp):
its dB and dC partials are one per block."""


@torch.library.register_fake("mambastep::causal_conv_silu")
def _conv_shapes(x: Tensor, weight: Tensor, bias: Tensor, state: Tensor) -> list[Tensor]:
    return [x.new_empty(x.shape), state.new_empty(state.shape)]  # y (b, l, c), next state (b, k - 1, c)


@torch.library.register_fake("mambastep::causal_conv_silu_backward")
def _conv_backward_shapes(x, weight, bias, state, gy, gnext) -> list[Tensor]:
    (b, _, c), k = x.shape, weight.shape[1]
    # dx (b, l, c), dstate (b, k - 1, c), dweight (b, k, c) and dbias (b, c) per sequence
    return [x.new_empty(x.shape), state.new_empty(state.shape), weight.new_empty(b, k, c), weight.new_empty(b, c)]


@torch.library.register_fake("mambastep::selective_scan_fwd")
def _selective_scan_shapes(x, dt, A, B, C, D, state, chunk: int) -> list[Tensor]:
    b, l, e = x.shape
    # y (b, l, e), next state (b, e, n), checkpoints (b, ceil(l / chunk), e, n)
    return [x.new_empty(b, l, e), state.new_empty(state.shape), state.new_empty(b, -(-l // chunk), e, A.shape[1])]


@torch.library.register_fake("mambastep::selective_scan_bwd")
def _selective_scan_backward_shapes(x, dt, A, B, C, D, ckpt, gy, gh, chunk: int) -> list[Tensor]:
    (b, l, e), n = x.shape, A.shape[1]
    blocks = -(-e // SELECTIVE_SCAN_BLOCK)
    # dx, ddt (b, l, e); dA (b, e, n); dB, dC (b, blocks, l, n); dD (b, e); dstate (b, e, n)
    return [
        x.new_empty(x.shape),
        dt.new_empty(dt.shape),
        x.new_empty(b, e, n),
        x.new_empty(b, blocks, l, n),
        x.new_empty(b, blocks, l, n),
        x.new_empty(b, e),
        gh.new_empty(gh.shape),
    ]


@torch.library.register_fake("mambastep::ssd_scan_fwd")
def _ssd_scan_shapes(x, dt, A, B, C, D, state, chunk: int) -> list[Tensor]:
    (b, l, h, p), n = x.shape, B.shape[3]
    # y (b, l, h, p), next state (b, h, p, n), checkpoints (b, ceil(l / chunk), h, p, n)
    return [x.new_empty(b, l, h, p), state.new_empty(state.shape), state.new_empty(b, -(-l // chunk), h, p, n)]


@torch.library.register_fake("mambastep::ssd_scan_bwd")
def _ssd_scan_backward_shapes(x, dt, A, B, C, D, ckpt, gy, gh, chunk: int) -> list[Tensor]:
    (b, l, h, p), n = x.shape, B.shape[3]
    # dx (b, l, h, p); ddt (b, l, h); dA (b, h); dB, dC (b, h, l, n); dD (b, h, p); dstate (b, h, p, n)
    return [
        x.new_empty(x.shape),
        dt.new_empty(dt.shape),
        x.new_empty(b, h),
        x.new_empty(b, h, l, n),
        x.new_empty(b, h, l, n),
        x.new_empty(b, h, p),
        gh.new_empty(gh.shape),
    ]


@register_flop_formula(torch.ops.mambastep.matvec)
def _matvec_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]  # multiply-adds, for FlopCounterMode
