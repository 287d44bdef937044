"""One decode step through a whole stack of Mamba-1 or Mamba-2 layers in one call.

Per layer: RMSNorm, the mixer's step (its products through the matvec kernel, the causal
conv step, SiLU, softplus, the state update, the gate) and the residual add; then, if asked,
the final RMSNorm and the output layer. An eager decode step made of ~35 small operators per
layer spends as much time calling them as computing; this makes it one call per step.

The layers' weights go to the kernel as one flat list per layer, prepared once
(``PreparedStack``): the linear layers' weights as stored (matvec reads them), the small
tensors (norms, conv, biases, D) as float32, and A_log as the decay rates A = -exp(A_log).
Each entry is named (``MambaLayerWeights.entries``...), and the names are checked against the
kernel's own list before the first step, so a list in another order is an error, not a
wrong result.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from mambastep.ops.backend import Backend, wants_grad
from mambastep.ops.kernels import f32
from mambastep.ops.products import MATVEC_DTYPES

Operands = tuple[Tensor, Tensor | None, Tensor | None]  # a linear layer as matvec takes it: weight, scale, bias
Entries = list[tuple[str, Tensor | None]]
# A step writes a layer's next SSM state of at least this many bytes into memory reused from
# earlier steps' states (once nothing holds them), not a fresh block: glibc maps blocks above
# 32 MiB anew on every allocation, and their page faults cost a Mamba-2 model at batch 64 half
# its step. Smaller blocks glibc's own heap reuses.
STATE_REUSE_BYTES = 32 << 20


def takes_stack_step(residual: Tensor, weight: Tensor, backend: Backend) -> bool:
    """Whether a step of ``residual`` (b, l, d) through layers whose linear weights are like
    ``weight`` goes in one call: one float32 token per sequence, whatever the batch, where the
    backend has the matvec kernel and it reads the weights, outside torch.compile (which traces
    the layers' own operations) and when no gradient is wanted."""
    return (
        backend.matvec_kernel
        and residual.shape[1] == 1
        and residual.dtype == torch.float32
        and weight.dtype in MATVEC_DTYPES
        and not torch.compiler.is_compiling()
        and not wants_grad(residual, weight)
    )


class MambaLayerWeights(NamedTuple):
    """One Mamba-1 layer (``models.mamba``) as the step takes it."""

    norm: Tensor  # (d,) the pre-norm's weight
    in_proj: Operands
    conv_weight: Tensor  # (e, 1, k) or (e, k)
    conv_bias: Tensor | None  # (e,)
    x_proj: Operands  # without a bias
    dt_proj: Operands  # with its bias, added inside the softplus
    A_log: Tensor  # (e, n)
    D: Tensor | None  # (e,)
    out_proj: Operands

    kind = "mamba"

    def entries(self, prepare: PreparedStack) -> Entries:
        """The layer's named entries in the kernel's order, small tensors made by ``prepare``."""
        f = prepare.float32
        x_w, x_s, _ = self.x_proj
        dt_w, dt_s, dt_b = self.dt_proj
        return [
            ("norm", f(self.norm)),
            *_prepared(prepare, "in_proj", self.in_proj),
            ("conv.taps", prepare.conv_taps(self.conv_weight)),
            ("conv.bias", f(self.conv_bias)),
            ("x_proj.weight", x_w),
            ("x_proj.scale", x_s),
            ("dt_proj.weight", dt_w),
            ("dt_proj.scale", dt_s),
            ("dt_proj.bias", f(dt_b)),
            ("A", prepare.decay_rates(self.A_log)),
            ("D", f(self.D)),
            *_prepared(prepare, "out_proj", self.out_proj),
        ]


class Mamba2LayerWeights(NamedTuple):
    """One Mamba-2 layer (``models.mamba2``) as the step takes it."""

    norm: Tensor  # (d,) the pre-norm's weight
    in_proj: Operands  # d -> z (e), x B C (c = e + 2gn), dt (h)
    conv_weight: Tensor  # (c, 1, k) or (c, k)
    conv_bias: Tensor | None  # (c,)
    dt_bias: Tensor  # (h,)
    A_log: Tensor  # (h,)
    D: Tensor | None  # (h,) or (e,)
    gate_norm: Tensor  # (e,) the gated RMSNorm's weight
    out_proj: Operands

    kind = "mamba2"

    def entries(self, prepare: PreparedStack) -> Entries:
        """The layer's named entries in the kernel's order, small tensors made by ``prepare``."""
        f = prepare.float32
        return [
            ("norm", f(self.norm)),
            *_prepared(prepare, "in_proj", self.in_proj),
            ("conv.taps", prepare.conv_taps(self.conv_weight)),
            ("conv.bias", f(self.conv_bias)),
            ("dt_bias", f(self.dt_bias)),
            ("A", prepare.decay_rates(self.A_log)),
            ("D", f(self.D)),
            ("gate_norm", f(self.gate_norm)),
            *_prepared(prepare, "out_proj", self.out_proj),
        ]


class HeadWeights(NamedTuple):
    """A model's last steps: the final RMSNorm, then the output layer."""

    norm: Tensor  # (d,) the final norm's weight
    out: Operands  # (vocab, d) the output layer as matvec takes it

    kind = "head"

    def entries(self, prepare: PreparedStack) -> Entries:
        return [("norm", prepare.float32(self.norm)), *_prepared(prepare, "out", self.out)]


def _prepared(prepare: PreparedStack, name: str, operands: Operands) -> Entries:
    """A linear layer's entries: its weight and scale as stored, its bias as float32."""
    weight, scale, bias = operands
    return [(f"{name}.weight", weight), (f"{name}.scale", scale), (f"{name}.bias", prepare.float32(bias))]


@cache
def _kernel_names(kind: str) -> tuple[str, ...]:
    return tuple(torch.ops.mambastep.cpu_layers_step_params(kind))


def _checked(entries: Entries, kind: str) -> list[Tensor | None]:
    """The tensors of ``entries``, once their names are those the kernel reads, in its order.

    Raises:
        RuntimeError: the names differ (a list built for another version of the kernel).
    """
    names = tuple(name for name, _ in entries)
    if names != _kernel_names(kind):
        raise RuntimeError(f"the {kind} layers step reads {_kernel_names(kind)}, but was given {names}")
    return [t for _, t in entries]


class _Registrations:
    """Counts parameters, buffers and submodules assigned to any module since import: a
    ``PreparedStack`` built before a layer was replaced (``quantize_int8``, say) is stale."""

    count = 0

    @classmethod
    def bump(cls, *args) -> None:
        cls.count += 1


for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_Registrations.bump)


def module_assignments() -> int:
    """How many parameters, buffers and submodules have been assigned to any module since
    import: whatever was derived from a module tree before the count moved may be stale."""
    return _Registrations.count


class PreparedStack:
    """A stack of layers' weights (and optionally the head) as the step takes them, prepared once.

    A model keeps one while ``current()``: no parameter, buffer or submodule has been assigned
    anywhere since, and every tensor it derived something from still has the same storage and
    has not been modified in place.
    """

    def __init__(
        self, layers: Sequence[MambaLayerWeights] | Sequence[Mamba2LayerWeights], head: HeadWeights | None = None
    ):
        self._sources: list[tuple[Tensor, int, int]] = []  # (tensor, data_ptr, version) of what was derived from
        self._tracked = True  # False once a source is an inference tensor, which keeps no version
        self._registrations = module_assignments()
        self.count = len(layers)
        self.params = [t for layer in layers for t in _checked(layer.entries(self), layer.kind)]
        self.head = (
            [] if head is None else _checked(head.entries(self), head.kind)
        )  # empty: the step returns the residual

    def float32(self, t: Tensor | None) -> Tensor | None:
        """``t`` as contiguous float32: itself when it already is, else a copy derived from it."""
        if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
            return t
        self._track(t)
        return f32(t)

    def conv_taps(self, weight: Tensor) -> Tensor:
        """A depthwise conv's weight (c, 1, k) or (c, k) as (k, c) float32 taps: tap j of every
        channel contiguous, as the step's loops over channels read them."""
        self._track(weight)
        return weight.reshape(weight.shape[0], -1).t().float().contiguous()

    def decay_rates(self, A_log: Tensor) -> Tensor:
        """A = -exp(A_log) in float32, as the mixers' forward computes it."""
        self._track(A_log)
        return -torch.exp(A_log.float())

    def _track(self, source: Tensor) -> None:
        if source.is_inference():
            self._tracked = False
        else:
            self._sources.append((source, source.data_ptr(), source._version))

    def current(self) -> bool:
        """Whether these weights still match the parameters they were prepared from."""
        return (
            self._tracked
            and self._registrations == module_assignments()
            and all(t.data_ptr() == ptr and t._version == version for t, ptr, version in self._sources)
        )


def _stack_step(
    op, residual, stack, conv_states, ssm_states, *args, logits: bool
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    if not isinstance(stack, PreparedStack):
        stack = PreparedStack(stack)
    if logits and not stack.head:
        raise ValueError("logits=True needs a stack prepared with a head (PreparedStack(..., head=HeadWeights(...)))")
    out = op(
        residual,
        stack.params,
        stack.head if logits else [],
        list(conv_states),
        list(ssm_states),
        *args,
        STATE_REUSE_BYTES,
    )
    n = stack.count
    return out[0], out[1 : 1 + n], out[1 + n :]


def mamba_stack_step(
    residual: Tensor,
    stack: PreparedStack | Sequence[MambaLayerWeights],
    conv_states: Sequence[Tensor],
    ssm_states: Sequence[Tensor],
    eps: float,
    logits: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One decode step through a stack of Mamba-1 layers in one call.

    Per layer: RMSNorm, in_proj, conv step, SiLU, x_proj, dt_proj (its bias inside the
    softplus), the selective state update with A = -exp(A_log), the D skip, the SiLU(z) gate,
    out_proj and the residual add; everything in float32.

    Args:
        residual: (b, d) float32, the residual stream entering the first layer; stack: the
        layers' weights, or a ``PreparedStack`` of them; conv_states: (b, k-1, e) per layer;
        ssm_states: (b, e, n) per layer; eps: the norms' epsilon; logits: go on through the
        head ``stack`` was prepared with (the final norm, with ``eps``, and the output layer).

    Returns:
        the residual stream after the last layer (b, d) float32, or with ``logits`` the logits
        (b, vocab) float32; the next conv states and SSM states, each in the dtype of the state
        it replaces. The states given are left as they were.
    """
    return _stack_step(
        torch.ops.mambastep.mamba_layers_step, residual, stack, conv_states, ssm_states, eps, logits=logits
    )


def mamba2_stack_step(
    residual: Tensor,
    stack: PreparedStack | Sequence[Mamba2LayerWeights],
    conv_states: Sequence[Tensor],
    ssm_states: Sequence[Tensor],
    eps: float,
    n_groups: int,
    dt_limit: tuple[float, float],
    logits: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One decode step through a stack of Mamba-2 layers in one call.

    Per layer: RMSNorm, in_proj, conv step over x, B and C, SiLU, Δ = softplus(dt + dt_bias)
    clamped to ``dt_limit``, the state update with decay exp(-Δ exp(A_log)) per head, the D
    skip, the SiLU(z) gate, the gated RMSNorm over ``n_groups`` groups, out_proj and the
    residual add; everything in float32.

    Args:
        as ``mamba_stack_step``, with conv_states (b, k-1, e + 2gn) and ssm_states (b, h, p, n)
        per layer; n_groups: g; dt_limit: (low, high), high may be infinite.

    Returns:
        as ``mamba_stack_step``.
    """
    low, high = dt_limit
    high = min(high, torch.finfo(torch.float32).max)  # the kernel is built for finite math
    op = torch.ops.mambastep.mamba2_layers_step
    return _stack_step(op, residual, stack, conv_states, ssm_states, eps, n_groups, low, high, logits=logits)
