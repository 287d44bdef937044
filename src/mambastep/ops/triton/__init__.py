"""Triton kernels for the GPU: the decode step's pieces, each one launch, batched over sequences.

    step   the Mamba-1 and Mamba-2 state updates (Δ's softplus, exp(ΔA), the update, C·h, the D
           skip and the SiLU(z) gate in one kernel) and the causal conv step
    scan   the same over a prompt: the Mamba-1 and Mamba-2 scans, sequential in time, parallel
           over sequences and channels
    common SiLU, softplus, operands and checks

Each takes a state and returns the next one in new memory: the state given is never written.
Weights and activations in float32, bfloat16 or float16; the state and every sum in float32.
The ops (``ops.scan``, ``ops.ssd``, ``ops.conv``) take them for CUDA tensors where the backend
says so (``Backend.triton_kernels``) and no gradient is wanted: training on a GPU keeps the
differentiable PyTorch scans. Under ``TRITON_INTERPRET=1`` (set before this package is
imported) they run on the CPU through Triton's interpreter, which is how the tests check them
against ``ops.reference`` on machines without a GPU.
"""

from mambastep.ops.triton.scan import mamba2_scan, mamba_scan
from mambastep.ops.triton.step import conv_step, mamba2_state_update, mamba_state_update

__all__ = ["conv_step", "mamba2_scan", "mamba2_state_update", "mamba_scan", "mamba_state_update"]
