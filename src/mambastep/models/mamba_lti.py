"""The Mamba block with a time-invariant SSM: the Mamba paper's ablation of selection.

Everything is Mamba-1's block (in_proj, causal conv, SiLU gate, out_proj)
except the SSM, which is S4D-real: Δ (per channel), B and C are parameters,
the same at every token, so the layer cannot choose what to keep. B is folded
into C (with a diagonal A only their product C·B per (channel, state) pair
matters), leaving C of shape (e, n) read out per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep import ops
from mambastep.models.config import MambaLTIConfig
from mambastep.models.lm import SSMLanguageModel
from mambastep.models.mamba import MambaMixer, dt_bias_init, s4d_real_log_A
from mambastep.ops.backend import Backend


class TimeInvariantMixer(MambaMixer):
    """Mamba's block around an S4D-real SSM: h_t = exp(Δ A) h_{t-1} + Δ x_t,  y_t = Σ_n C h_t + D x_t."""

    stack_step = None  # no whole-stack decode step for this SSM

    def add_ssm_parameters(self) -> None:
        e, n = self.config.d_inner, self.config.d_state
        self.dt_bias = nn.Parameter(torch.empty(e))  # Δ = softplus(dt_bias)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.C = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """S4D's initialisation with real A: A = -(1..n), C standard normal, D = 1, Δ log-uniform."""
        e, n = self.A_log.shape
        self.A_log.copy_(s4d_real_log_A(e, n))
        nn.init.normal_(self.C)
        self.D.fill_(1.0)
        self.dt_bias.copy_(dt_bias_init(e, dt_min, dt_max))

    def ssm(self, x: Tensor, h: Tensor, z: Tensor | None, backend: Backend) -> tuple[Tensor, Tensor]:
        """The time-invariant SSM over x (b, l, e) from state h (b, e, n): y (b, l, e) float32
        and the next state; y gated by SiLU(z) (b, l, e) where z is given.

        Each (channel, state) pair runs as a channel of its own with one state and
        B = C = 1, so the selective scan's kernels return the states themselves;
        the per-channel read-out C (e, n) is applied after.
        """
        b, l, e = x.shape
        n = self.config.d_state
        f = torch.promote_types(x.dtype, torch.float32)  # the scan's precision
        dt = self.dt_probe(F.softplus(self.dt_bias.to(f)).expand(b, l, e))  # (b, l, e)
        A = -torch.exp(self.A_log.to(f))  # (e, n)
        pairs = lambda t: t[..., None].expand(b, l, e, n).flatten(-2)  # noqa: E731  (b, l, e) -> (b, l, e*n)
        ones = x.new_ones(b, l, 1, dtype=f)  # B and C of the one-state channels
        states, h = ops.selective_scan(
            pairs(x), pairs(dt), A.reshape(e * n, 1), ones, ones, None, h.reshape(b, e * n, 1), backend=backend
        )  # (b, l, e*n)
        y = (states.unflatten(-1, (e, n)) * self.C.to(f)).sum(-1) + self.D.to(f) * x.to(f)  # (b, l, e)
        return ops.gate(y, z), h.view(b, e, n)


class MambaLTILM(SSMLanguageModel):
    """Language model of time-invariant Mamba blocks (``model_type`` "mamba_lti", mambastep's own)."""

    def __init__(self, config: MambaLTIConfig):
        super().__init__(config, [TimeInvariantMixer(config) for _ in range(config.n_layer)])
