"""Mamba-1: the selective SSM (S6) mixer and its language model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.config import MambaConfig
from mambastep.models.lm import SSMLanguageModel
from mambastep.ops import causal_conv, causal_conv_step, selective_scan, selective_step
from mambastep.ops.cpu import kernels, selective_scan_fused
from mambastep.settings import EngineSettings, log
from mambastep.state import SSMLayerState


class MambaMixer(nn.Module):
    """in_proj -> causal conv -> SiLU -> selective scan, gated by SiLU(z) -> out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d, e, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
        self.config = config
        self.in_proj = nn.Linear(d, 2 * e, bias=config.bias)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, d, bias=config.bias)
        self.reset_ssm_parameters()
        self.scan_chunk = EngineSettings().scan_chunk
        self.fused_scan = False

    def configure(self, settings: EngineSettings) -> None:
        """Choose the prompt scan: the fused CPU kernel is used for inference on CPU only."""
        self.scan_chunk = settings.scan_chunk
        self.fused_scan = settings.scan == "fused" or (settings.scan == "auto" and _fused_kernels_build())

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """The paper's initialisation: A = -(1..n) per channel (S4D-real), D = 1,
        dt log-uniform in [dt_min, dt_max] through the dt_proj bias."""
        e, n = self.A_log.shape
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.config.dt_rank**-0.5, self.config.dt_rank**-0.5)
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SSMLayerState:
        c = self.config
        return SSMLayerState.zeros(batch_size, (c.d_conv - 1, c.d_inner), (c.d_inner, c.d_state), dtype, device=device)

    def forward(self, u: Tensor, state: SSMLayerState) -> tuple[Tensor, SSMLayerState]:
        """Args: u (b, l, d), state. Returns: (b, l, d) and the next state.

        One token (l == 1) takes the recurrent step; longer inputs the chunked scan.
        """
        n, r = self.config.d_state, self.config.dt_rank
        xz = self.in_proj(u)  # (b, l, 2e)
        x, z = xz.chunk(2, dim=-1)  # (b, l, e) each
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (e, k), (e,)
        A = -torch.exp(self.A_log.float())  # (e, n)
        one_token = u.shape[1] == 1
        if one_token:
            x, conv = causal_conv_step(x[:, 0], weight, bias, state.conv)  # (b, e)
            x = x[:, None]  # (b, 1, e)
        else:
            x, conv = causal_conv(x, weight, bias, state.conv)  # (b, l, e)
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)  # (b, l, r), (b, l, n), (b, l, n)
        dt = F.softplus(self.dt_proj(dt))  # (b, l, e)
        if one_token:
            y, ssm = selective_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, state.ssm)
            y = y[:, None]  # (b, 1, e)
        elif self.fused_scan and u.device.type == "cpu" and not torch.is_grad_enabled():
            y, ssm = selective_scan_fused(x, dt, A, B, C, self.D, state.ssm)  # (b, l, e)
        else:
            y, ssm = selective_scan(x, dt, A, B, C, self.D, state.ssm, self.scan_chunk)  # (b, l, e)
        y = y.to(z.dtype) * F.silu(z)
        return self.out_proj(y), SSMLayerState(conv=conv, ssm=ssm)


class MambaLM(SSMLanguageModel):
    """Mamba-1 language model (``MambaForCausalLM`` in transformers)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config, [MambaMixer(config) for _ in range(config.n_layer)])


def _fused_kernels_build() -> bool:
    """Whether the fused CPU kernels are available; the reason is logged when they are not."""
    try:
        kernels()
    except (RuntimeError, OSError, ImportError) as err:
        log.warning("fused CPU scan unavailable, using the PyTorch scan: %s", err)
        return False
    return True
