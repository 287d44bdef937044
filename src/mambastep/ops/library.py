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
    # what the CPU build is: its instruction set, the path of each weight type's products, and the
    # names of its layers' parameter lists
    "cpu_kernels_isa() -> str",
    "cpu_matvec_paths() -> str",
    "cpu_layers_step_params(str kind) -> str[]",
)

_library = torch.library.Library("mambastep", "DEF")
for _schema in SCHEMAS:
    _library.define(_schema)


@torch.library.register_fake("mambastep::matvec")
def _matvec_shape(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])  # the output's shape, for torch.compile


@register_flop_formula(torch.ops.mambastep.matvec)
def _matvec_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]  # multiply-adds, for FlopCounterMode
