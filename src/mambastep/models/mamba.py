"""Mamba-1: the selective SSM (S6) mixer and its language model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.config import MambaConfig
from mambastep.models.linear import Linear, takes_matvec
from mambastep.models.lm import SSMLanguageModel
from mambastep.ops import causal_conv, causal_conv_step, cpu, selective_scan, selective_step
from mambastep.settings import EngineSettings
from mambastep.state import SSMLayerState


class MambaMixer(nn.Module):
    """in_proj -> causal conv -> SiLU -> selective scan, gated by SiLU(z) -> out_proj.

    An eager decode step whose products take the fused matvec kernel (``models.linear``) runs
    as one fused call (``ops.cpu.mamba_step``); see ``takes_fused_step``.
    """

    has_fused_step = True  # the S6 step of ``ops.cpu.mamba_step``; a mixer with another SSM says False

    def __init__(self, config: MambaConfig):
        super().__init__()
        d, e, k = config.d_model, config.d_inner, config.d_conv
        self.config = config
        self.in_proj = Linear(d, 2 * e, bias=config.bias)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=config.conv_bias)
        self.add_ssm_parameters()
        self.out_proj = Linear(e, d, bias=config.bias)
        self.dt_probe = nn.Identity()  # sees Δ (b, l, e): a hook here watches the selection (``mambastep inspect``)
        self.reset_ssm_parameters()
        self.scan_chunk = EngineSettings().scan_chunk
        self.fused_scan = False

    def add_ssm_parameters(self) -> None:
        """S6: Δ, B and C are projections of the input (x_proj, then dt_proj for Δ)."""
        e, n, r = self.config.d_inner, self.config.d_state, self.config.dt_rank
        self.x_proj = Linear(e, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))

    def configure(self, settings: EngineSettings) -> None:
        """Choose the scan: the fused CPU kernel (forward and backward) for inputs on the CPU."""
        self.scan_chunk = settings.scan_chunk
        self.fused_scan = settings.scan == "fused" or (settings.scan == "auto" and cpu.available())

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """The paper's initialisation: A = -(1..n) per channel (S4D-real), D = 1,
        dt log-uniform in [dt_min, dt_max] through the dt_proj bias."""
        self.A_log.copy_(_s4d_real_log_A(*self.A_log.shape))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.config.dt_rank**-0.5, self.config.dt_rank**-0.5)
        self.dt_proj.bias.copy_(_dt_bias_init(self.config.d_inner, dt_min, dt_max))

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SSMLayerState:
        c = self.config
        return SSMLayerState.zeros(batch_size, (c.d_conv - 1, c.d_inner), (c.d_inner, c.d_state), dtype, device=device)

    def forward(self, u: Tensor, state: SSMLayerState) -> tuple[Tensor, SSMLayerState]:
        """Args: u (b, l, d), state. Returns: (b, l, d) and the next state.

        One token (l == 1) takes the recurrent step (in one fused call where
        ``takes_fused_step``); longer inputs the chunked scan.
        """
        if self.takes_fused_step(u):
            return self._fused_step(u, state)
        xz = self.in_proj(u)  # (b, l, 2e)
        x, z = xz.chunk(2, dim=-1)  # (b, l, e) each
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (e, k), (e,)
        if u.shape[1] == 1:
            x, conv = causal_conv_step(x[:, 0], weight, bias, state.conv)  # (b, e)
            x = x[:, None]  # (b, 1, e)
        else:
            x, conv = causal_conv(x, weight, bias, state.conv)  # (b, l, e)
        y, ssm = self.ssm(F.silu(x), state.ssm)  # (b, l, e)
        y = y.to(z.dtype) * F.silu(z)
        return self.out_proj(y), SSMLayerState(conv=conv, ssm=ssm)

    def takes_fused_step(self, u: Tensor) -> bool:
        """Whether one token u (b, 1, d) goes through ``ops.cpu.mamba_step``: when the products
        take the matvec kernel, outside torch.compile (whose generated code fuses the small
        operations better: 4-7% faster there) and unless a hook watches ``dt_probe``."""
        return (
            self.has_fused_step
            and u.shape[1] == 1
            and takes_matvec(self.in_proj, u)
            and not torch.compiler.is_compiling()
            and not self.dt_probe._forward_hooks
        )

    def _fused_step(self, u: Tensor, state: SSMLayerState) -> tuple[Tensor, SSMLayerState]:
        """``forward`` for one token (u: (b, 1, d)) in one call of the fused CPU step."""
        y, conv, ssm = cpu.mamba_step(
            u[:, 0], *(m.matvec_operands() for m in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)),
            self.conv1d.weight[:, 0, :], self.conv1d.bias, self.A_log, self.D, state.conv, state.ssm,
        )  # (b, d), (b, k-1, e), (b, e, n)
        return y.to(u.dtype)[:, None], SSMLayerState(conv=conv.to(state.conv.dtype), ssm=ssm.to(state.ssm.dtype))

    def ssm(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The selective SSM over x (b, l, e) from state h (b, e, n): y (b, l, e) and the next state."""
        n, r = self.config.d_state, self.config.dt_rank
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)  # (b, l, r), (b, l, n), (b, l, n)
        dt = self.dt_probe(F.softplus(self.dt_proj(dt)))  # (b, l, e)
        return self.scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D, h)

    def scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrence (``ops.selective_scan`` contract) by the path that suits the input:
        the step for one token, the fused kernel on CPU, else the chunked scan."""
        if x.shape[1] == 1:
            y, h = selective_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, h)  # (b, e)
            return y[:, None], h
        if self.fused_scan and x.device.type == "cpu":
            return cpu.selective_scan_fused(x, dt, A, B, C, D, h)
        return selective_scan(x, dt, A, B, C, D, h, self.scan_chunk)


class MambaLM(SSMLanguageModel):
    """Mamba-1 language model (``MambaForCausalLM`` in transformers)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config, [MambaMixer(config) for _ in range(config.n_layer)])


def _s4d_real_log_A(e: int, n: int) -> Tensor:
    """log of S4D-real's A = -(1..n), the same for every channel: (e, n)."""
    return torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)


def _dt_bias_init(e: int, dt_min: float, dt_max: float) -> Tensor:
    """Biases whose softplus is log-uniform in [dt_min, dt_max]: (e,)."""
    dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus

