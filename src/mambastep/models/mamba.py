"""Mamba-1: the selective SSM (S6) mixer and its language model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.config import MambaConfig
from mambastep.models.linear import Linear
from mambastep.models.lm import SSMLanguageModel
from mambastep.ops import causal_conv_silu, causal_conv_step, cpu, selective_scan, selective_step
from mambastep.settings import EngineSettings
from mambastep.state import SSMLayerState


class MambaMixer(nn.Module):
    """in_proj -> causal conv -> SiLU -> selective scan, gated by SiLU(z) -> out_proj."""

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
        self.fused_scan = cpu.chosen(settings.scan)

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

        One token (l == 1) takes the recurrent step, longer inputs the chunked scan.
        """
        xz = self.in_proj(u)  # (b, l, 2e)
        x, z = xz.chunk(2, dim=-1)  # (b, l, e) each
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (e, k), (e,)
        if u.shape[1] == 1:
            x, conv = causal_conv_step(x[:, 0], weight, bias, state.conv)  # (b, e)
            x = F.silu(x[:, None])  # (b, 1, e)
        else:
            x, conv = causal_conv_silu(x, weight, bias, state.conv, self.fused_scan)  # (b, l, e)
        y, ssm = self.ssm(x, state.ssm, z)  # (b, l, e)
        return self.out_proj(y), SSMLayerState(conv=conv, ssm=ssm)

    def step_weights(self, norm: Tensor) -> cpu.MambaLayerWeights:
        """This mixer, after the pre-norm of weight ``norm``, as ``layers_step`` takes it."""
        return cpu.MambaLayerWeights(
            norm, self.in_proj.matvec_operands(), self.conv1d.weight, self.conv1d.bias, self.x_proj.matvec_operands(),
            self.dt_proj.matvec_operands(), self.A_log, self.D, self.out_proj.matvec_operands(),
        )

    def layers_step(
        self, residual: Tensor, weights: cpu.FusedLayers | list, conv: list[Tensor], ssm: list[Tensor], logits: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A decode step through a stack of layers like this one in one call (``ops.cpu.mamba_layers_step``)."""
        return cpu.mamba_layers_step(residual, weights, conv, ssm, self.config.norm_eps, logits)

    def ssm(self, x: Tensor, h: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The selective SSM over x (b, l, e) from state h (b, e, n): y (b, l, e) and the next state;
        y gated by SiLU(z) (b, l, e) in z's dtype where z is given.

        On the CPU's fused scan a prompt's softplus of Δ and gate run inside the kernel, unless a
        hook watches ``dt_probe`` (which must then see Δ)."""
        n, r = self.config.d_state, self.config.dt_rank
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)  # (b, l, r), (b, l, n), (b, l, n)
        dt = self.dt_proj(dt)  # (b, l, e): Δ before its softplus
        A = -torch.exp(self.A_log.float())  # (e, n)
        if self.fused_scan and x.device.type == "cpu" and x.shape[1] > 1 and not self.dt_probe._forward_hooks:
            y, h = cpu.selective_scan_fused(x, dt, A, B, C, self.D, h, z=z, dt_softplus=True)
            return (y if z is None else y.to(z.dtype)), h
        y, h = self.scan(x, self.dt_probe(F.softplus(dt)), A, B, C, self.D, h)
        return gate(y, z), h

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


def gate(y: Tensor, z: Tensor | None) -> Tensor:
    """The SSM's output y (b, l, e) gated by SiLU(z) (b, l, e), in z's dtype; y itself without z."""
    return y if z is None else y.to(z.dtype) * F.silu(z)


def _s4d_real_log_A(e: int, n: int) -> Tensor:
    """log of S4D-real's A = -(1..n), the same for every channel: (e, n)."""
    return torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)


def _dt_bias_init(e: int, dt_min: float, dt_max: float) -> Tensor:
    """Biases whose softplus is log-uniform in [dt_min, dt_max]: (e,)."""
    dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus

