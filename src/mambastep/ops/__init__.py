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

Modules:
    reference  the spec: plain sequential loops
    conv       causal depthwise conv, full (alone or with SiLU) and one step
    scan       Mamba-1 selective scan, chunked, from any state
    ssd        Mamba-2 state space duality, chunked, from any state
    step       one-token recurrences
"""

from mambastep.ops.conv import causal_conv, causal_conv_silu, causal_conv_step
from mambastep.ops.scan import selective_scan
from mambastep.ops.ssd import ssd_scan
from mambastep.ops.step import selective_step, ssd_step

__all__ = [
    "causal_conv",
    "causal_conv_silu",
    "causal_conv_step",
    "selective_scan",
    "selective_step",
    "ssd_scan",
    "ssd_step",
]
