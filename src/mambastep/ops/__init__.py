"""Pure tensor functions for selective state space models (no nn.Module).

Every function that runs over time takes a state and returns the next one:
``y, state = op(..., state)``. ``state=None`` means a zero state.

Glossary (letters in shape comments, with the paper's symbols):

====  ==========================================  =====================
code  meaning                                     Mamba paper
====  ==========================================  =====================
b     batch                                       B
l     sequence length                             L
d     model width (d_model)                       D
e     inner width, expand * d (d_inner)           ED
n     state size per channel (d_state)            N
k     causal conv kernel width (d_conv)
r     rank of the dt projection (dt_rank)         R
h     heads (Mamba-2)                             H
p     head dimension (Mamba-2)                    P
g     groups sharing B and C (Mamba-2)            G
q     chunk length of a chunked scan              Q
c     conv channels (e for Mamba-1, e + 2gn for Mamba-2)
====  ==========================================  =====================

``dt`` is the step size Δ after softplus, ``A`` the (negative) state
matrix, ``B``/``C`` the input/output projections of the state, ``D`` the
skip connection. The recurrence of one channel is

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t        y_t = C_t · h_t + D x_t

Every op function takes the ``backend`` to run with (``ops.backend``: resolved once per model
from its ``EngineSettings``) and picks its kernel itself; without one it runs PyTorch's operators.

Modules:
    reference   the spec: plain sequential loops
    backend     the one choice of kernels: Backend, resolve
    conv        causal depthwise conv, full (alone or with SiLU) and one step
    scan        Mamba-1 selective scan, from any state
    ssd         Mamba-2 state space duality, chunked, from any state
    step        one-token recurrences, and the SiLU(z) gate
    norm        RMSNorm
    linear      products with weight matrices (matvec for decode steps)
    stack_step  the decode step of a whole stack of layers in one call
    library     the mambastep:: operator schemas; kernels: their calls
    cpu         the C++ implementations for the CPU, built on first use
    triton      the Triton kernels for the GPU (scans, state updates, conv step), imported on use
"""

from mambastep.ops.backend import TORCH, Backend, resolve
from mambastep.ops.conv import causal_conv, causal_conv_silu, causal_conv_step
from mambastep.ops.norm import rms_norm
from mambastep.ops.products import linear
from mambastep.ops.scan import selective_scan, selective_scan_chunked
from mambastep.ops.ssd import ssd_scan, ssd_scan_chunked
from mambastep.ops.step import gate, selective_step, ssd_step

__all__ = [
    "TORCH",
    "Backend",
    "causal_conv",
    "causal_conv_silu",
    "causal_conv_step",
    "gate",
    "linear",
    "resolve",
    "rms_norm",
    "selective_scan",
    "selective_scan_chunked",
    "selective_step",
    "ssd_scan",
    "ssd_scan_chunked",
    "ssd_step",
]
