"""Mamba-1: the selective SSM (S6) mixer and its language model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep import ops
from mambastep.models.config import MambaConfig
from mambastep.models.linear import Linear
from mambastep.models.lm import SSMLanguageModel
from mambastep.models.state import SSMLayerState
from mambastep.ops.backend import Backend
from mambastep.ops.stack_step import MambaLayerWeights, PreparedStack, mamba_stack_step


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

    def add_ssm_parameters(self) -> None:
        """S6: Δ, B and C are projections of the input (x_proj, then dt_proj for Δ)."""
        e, n, r = self.config.d_inner, self.config.d_state, self.config.dt_rank
        self.x_proj = Linear(e, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """The paper's initialisation: A = -(1..n) per channel (S4D-real), D = 1,
        dt log-uniform in [dt_min, dt_max] through the dt_proj bias."""
        self.A_log.copy_(s4d_real_log_A(*self.A_log.shape))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -(self.config.dt_rank**-0.5), self.config.dt_rank**-0.5)
        self.dt_proj.bias.copy_(dt_bias_init(self.config.d_inner, dt_min, dt_max))

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SSMLayerState:
        c = self.config
        return SSMLayerState.zeros(batch_size, (c.d_conv - 1, c.d_inner), (c.d_inner, c.d_state), dtype, device=device)

    def forward(self, u: Tensor, state: SSMLayerState, backend: Backend) -> tuple[Tensor, SSMLayerState]:
        """Args: u (b, l, d), state, backend. Returns: (b, l, d) and the next state."""
        x, z = self.in_proj(u, backend).chunk(2, dim=-1)  # (b, l, e) each
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (e, k), (e,)
        x, conv = ops.causal_conv_silu(x, weight, bias, state.conv, backend=backend)  # (b, l, e)
        y, ssm = self.ssm(x, state.ssm, z, backend)  # (b, l, e)
        return self.out_proj(y.to(u.dtype), backend), SSMLayerState(conv=conv, ssm=ssm)

    def ssm(self, x: Tensor, h: Tensor, z: Tensor | None, backend: Backend) -> tuple[Tensor, Tensor]:
        """The selective SSM over x (b, l, e) from state h (b, e, n): y (b, l, e) float32 and
        the next state; y gated by SiLU(z) (b, l, e) where z is given.

        The softplus of Δ is left to the scan (which may fuse it), unless a hook watches
        ``dt_probe``, which must then see Δ."""
        n, r = self.config.d_state, self.config.dt_rank
        dt, B, C = self.x_proj(x, backend).split([r, n, n], dim=-1)  # (b, l, r), (b, l, n), (b, l, n)
        dt = self.dt_proj(dt, backend)  # (b, l, e): Δ before its softplus
        A = -torch.exp(self.A_log.float())  # (e, n)
        if self.dt_probe._forward_hooks:
            return ops.selective_scan(x, self.dt_probe(F.softplus(dt)), A, B, C, self.D, h, z=z, backend=backend)
        return ops.selective_scan(x, dt, A, B, C, self.D, h, z=z, dt_softplus=True, backend=backend)

    def step_weights(self, norm: Tensor) -> MambaLayerWeights:
        """This mixer, after the pre-norm of weight ``norm``, as ``stack_step`` takes it."""
        return MambaLayerWeights(
            norm,
            self.in_proj.operands(),
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.operands(),
            self.dt_proj.operands(),
            self.A_log,
            self.D,
            self.out_proj.operands(),
        )

    def stack_step(
        self, residual: Tensor, stack: PreparedStack, conv: list[Tensor], ssm: list[Tensor], logits: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A decode step through a stack of layers like this one in one call (``ops.stack_step``)."""
        return mamba_stack_step(residual, stack, conv, ssm, self.config.norm_eps, logits)


class MambaLM(SSMLanguageModel):
    """Mamba-1 language model (``MambaForCausalLM`` in transformers)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config, [MambaMixer(config) for _ in range(config.n_layer)])


def s4d_real_log_A(e: int, n: int) -> Tensor:
    """log of S4D-real's A = -(1..n), the same for every channel: (e, n)."""
    return torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)


def dt_bias_init(size: int, dt_min: float, dt_max: float) -> Tensor:
    """Biases whose softplus is log-uniform in [dt_min, dt_max]: (size,)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
