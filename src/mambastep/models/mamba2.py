"""Mamba-2: the SSD mixer (scalar decay per head) and its language model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.config import Mamba2Config
from mambastep.models.linear import Linear
from mambastep.models.lm import RMSNorm, SSMLanguageModel
from mambastep.ops import causal_conv_silu, causal_conv_step, cpu, ssd_scan, ssd_step
from mambastep.settings import EngineSettings
from mambastep.state import SSMLayerState


class Mamba2Mixer(nn.Module):
    """in_proj -> [z, xBC, dt]; causal conv over x, B and C; SSD; gated RMSNorm -> out_proj."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        c = config
        self.config = c
        self.in_proj = Linear(c.d_model, c.d_inner + c.conv_dim + c.n_heads, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.empty(c.d_inner if c.D_has_hdim else c.n_heads))
        self.norm = RMSNorm(c.d_inner, c.norm_eps, group_size=c.norm_group_size)
        self.out_proj = Linear(c.d_inner, c.d_model, bias=c.bias)
        self.dt_probe = nn.Identity()  # sees Δ (b, l, h): a hook here watches the selection (``mambastep inspect``)
        self.reset_ssm_parameters()
        self.scan_chunk = EngineSettings().scan_chunk
        self.fused_scan = False

    def configure(self, settings: EngineSettings) -> None:
        """Choose the scan: the fused CPU kernel for inference on the CPU, else the chunked SSD."""
        self.scan_chunk = settings.scan_chunk
        self.fused_scan = cpu.chosen(settings.scan)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-2's initialisation: A uniform in [1, 16] per head, D = 1, dt log-uniform."""
        h = self.config.n_heads
        self.A_log.copy_(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SSMLayerState:
        c = self.config
        return SSMLayerState.zeros(
            batch_size, (c.d_conv - 1, c.conv_dim), (c.n_heads, c.head_dim, c.d_state), dtype, device=device
        )

    def forward(self, u: Tensor, state: SSMLayerState) -> tuple[Tensor, SSMLayerState]:
        """Args: u (b, l, d), state. Returns: (b, l, d) and the next state.

        One token (l == 1) takes the recurrent step; longer inputs the chunked SSD.
        """
        c = self.config
        b, l, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([c.d_inner, c.conv_dim, c.n_heads], dim=-1)  # (b, l, e|c|h)
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (c, k), (c,)
        one_token = l == 1
        if one_token:
            xBC, conv = causal_conv_step(xBC[:, 0], weight, bias, state.conv)  # (b, c)
            xBC = F.silu(xBC[:, None])  # (b, 1, c)
        else:
            xBC, conv = causal_conv_silu(xBC, weight, bias, state.conv, self.fused_scan)  # (b, l, c)
        x, B, C = xBC.split([c.d_inner, c.n_groups * c.d_state, c.n_groups * c.d_state], dim=-1)
        x = x.unflatten(-1, (c.n_heads, c.head_dim))  # (b, l, h, p)
        B = B.unflatten(-1, (c.n_groups, c.d_state))  # (b, l, g, n)
        C = C.unflatten(-1, (c.n_groups, c.d_state))  # (b, l, g, n)
        # The clamp applies on both paths, so a step always agrees with the chunked scan.
        dt = self.dt_probe(F.softplus(dt.float() + self.dt_bias.float()).clamp(*c.dt_limit))  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        D = self.D.view(c.n_heads, c.head_dim) if c.D_has_hdim else self.D
        z = z.unflatten(-1, (c.n_heads, c.head_dim))  # (b, l, h, p)
        if one_token:
            y, ssm = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state.ssm)  # (b, h, p)
            y = _gated(y[:, None], z)  # (b, 1, h, p)
        else:
            y, ssm = self.scan(x, dt, A, B, C, D, state.ssm, z)  # (b, l, h, p)
        return self.out_proj(self.norm(y.flatten(-2))), SSMLayerState(conv=conv, ssm=ssm)

    def scan(
        self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h: Tensor, z: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The SSD over a sequence (``ops.ssd_scan`` contract), y gated by SiLU(z) where z
        (b, l, h, p) is given: the fused kernel (the gate inside) for inference on the CPU, else
        the chunked scan (which autograd can go through)."""
        if self.fused_scan and x.device.type == "cpu" and not cpu.wants_grad(x, dt, A, B, C, D, h, z):
            return cpu.ssd_scan_fused(x, dt, A, B, C, D, h, z=z)
        y, h = ssd_scan(x, dt, A, B, C, D, h, self.scan_chunk)
        return (y if z is None else _gated(y, z)), h

    def step_weights(self, norm: Tensor) -> cpu.Mamba2LayerWeights:
        """This mixer, after the pre-norm of weight ``norm``, as ``layers_step`` takes it."""
        return cpu.Mamba2LayerWeights(
            norm, self.in_proj.matvec_operands(), self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
            self.norm.weight, self.out_proj.matvec_operands(),
        )

    def layers_step(
        self, residual: Tensor, weights: cpu.FusedLayers | list, conv: list[Tensor], ssm: list[Tensor], logits: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A decode step through a stack of layers like this one in one call (``ops.cpu.mamba2_layers_step``)."""
        c = self.config
        return cpu.mamba2_layers_step(residual, weights, conv, ssm, c.norm_eps, c.n_groups, c.dt_limit, logits)


def _gated(y: Tensor, z: Tensor) -> Tensor:
    """The SSD's output y (b, l, h, p) times SiLU(z) (b, l, h, p), in float32."""
    return y * F.silu(z.float())


class Mamba2LM(SSMLanguageModel):
    """Mamba-2 language model (``Mamba2ForCausalLM`` in transformers)."""

    def __init__(self, config: Mamba2Config):
        super().__init__(config, [Mamba2Mixer(config) for _ in range(config.n_layer)])
