"""Mamba-2: the SSD mixer (scalar decay per head) and its language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep import ops
from mambastep.models.config import Mamba2Config
from mambastep.models.linear import Linear
from mambastep.models.lm import RMSNorm, SSMLanguageModel
from mambastep.models.mamba import dt_bias_init
from mambastep.models.state import SSMLayerState
from mambastep.ops.backend import Backend
from mambastep.ops.stack_step import Mamba2LayerWeights, PreparedStack, mamba2_stack_step


class Mamba2Mixer(nn.Module):
    """in_proj -> [z, xBC, dt]; causal conv over x, B and C; SSD; gated RMSNorm -> out_proj."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        c = config
        self.config = c
        self.in_proj = Linear(c.d_model, c.d_inner + c.conv_dim + c.n_heads, bias=c.bias)
        self.conv1d = nn.Conv1d(
            c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1, bias=c.conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.empty(c.d_inner if c.D_has_hdim else c.n_heads))
        self.norm = RMSNorm(c.d_inner, c.norm_eps, group_size=c.norm_group_size)
        self.out_proj = Linear(c.d_inner, c.d_model, bias=c.bias)
        self.dt_probe = nn.Identity()  # sees Δ (b, l, h): a hook here watches the selection (``mambastep inspect``)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-2's initialisation: A uniform in [1, 16] per head, D = 1, dt log-uniform."""
        h = self.config.n_heads
        self.A_log.copy_(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(dt_bias_init(h, dt_min, dt_max))

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SSMLayerState:
        c = self.config
        return SSMLayerState.zeros(
            batch_size, (c.d_conv - 1, c.conv_dim), (c.n_heads, c.head_dim, c.d_state), dtype, device=device
        )

    def forward(self, u: Tensor, state: SSMLayerState, backend: Backend) -> tuple[Tensor, SSMLayerState]:
        """Args: u (b, l, d), state, backend. Returns: (b, l, d) and the next state."""
        c = self.config
        z, xBC, dt = self.in_proj(u, backend).split([c.d_inner, c.conv_dim, c.n_heads], dim=-1)  # (b, l, e|c|h)
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (c, k), (c,)
        xBC, conv = ops.causal_conv_silu(xBC, weight, bias, state.conv, backend=backend)  # (b, l, c)
        x, B, C = xBC.split([c.d_inner, c.n_groups * c.d_state, c.n_groups * c.d_state], dim=-1)
        x = x.unflatten(-1, (c.n_heads, c.head_dim))  # (b, l, h, p)
        B = B.unflatten(-1, (c.n_groups, c.d_state))  # (b, l, g, n)
        C = C.unflatten(-1, (c.n_groups, c.d_state))  # (b, l, g, n)
        # The clamp applies on every path, so a step always agrees with the scan.
        dt = self.dt_probe(F.softplus(dt.float() + self.dt_bias.float()).clamp(*c.dt_limit))  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        D = self.D.view(c.n_heads, c.head_dim) if c.D_has_hdim else self.D
        z = z.unflatten(-1, (c.n_heads, c.head_dim))  # (b, l, h, p)
        y, ssm = ops.ssd_scan(x, dt, A, B, C, D, state.ssm, z=z, backend=backend)  # (b, l, h, p)
        return self.out_proj(self.norm(y.flatten(-2), backend), backend), SSMLayerState(conv=conv, ssm=ssm)

    def step_weights(self, norm: Tensor) -> Mamba2LayerWeights:
        """This mixer, after the pre-norm of weight ``norm``, as ``stack_step`` takes it."""
        return Mamba2LayerWeights(
            norm,
            self.in_proj.operands(),
            self.conv1d.weight,
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight,
            self.out_proj.operands(),
        )

    def stack_step(
        self, residual: Tensor, stack: PreparedStack, conv: list[Tensor], ssm: list[Tensor], logits: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A decode step through a stack of layers like this one in one call (``ops.stack_step``)."""
        c = self.config
        return mamba2_stack_step(residual, stack, conv, ssm, c.norm_eps, c.n_groups, c.dt_limit, logits)


class Mamba2LM(SSMLanguageModel):
    """Mamba-2 language model (``Mamba2ForCausalLM`` in transformers)."""

    def __init__(self, config: Mamba2Config):
        super().__init__(config, [Mamba2Mixer(config) for _ in range(config.n_layer)])
