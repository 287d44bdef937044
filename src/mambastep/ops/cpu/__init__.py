"""Fused CPU kernels, compiled once with PyTorch's C++ extension tools and cached.

The first use builds them (about a minute on two cores, logged) into PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions);
later processes load the built library in well under a second.

``matvec`` is the product of a few activation rows with a weight matrix stored
as float32, bfloat16 or int8 (with a scale per row): the matrix-vector products
of a decode step, reading each weight once at memory speed. It is a PyTorch
operator (``torch.ops.mambastep.matvec``), so ``torch.compile`` keeps it in its graph.
``mamba_layers_step`` and ``mamba2_layers_step`` are the decode step of a whole stack of
Mamba-1 or Mamba-2 layers in one call: norms, matvecs and the state update per layer,
residual adds (eager steps only), on the layers' weights as ``FusedLayers`` prepares them.

``ssd_scan_fused`` is the Mamba-2 scan over a prompt, token by token in one fused pass
(inference only). ``causal_conv_silu`` is a prompt's causal conv and SiLU in one pass,
``rms_norm`` an RMSNorm in one pass (inference only).

``selective_scan_fused`` is differentiable: when grad mode is on and an input
requires grad, its forward also saves the state every ``CHECKPOINT_CHUNK``
tokens and a fused C++ backward recomputes each chunk's states from those
checkpoints (memory l / CHECKPOINT_CHUNK times the state, never (l, e, n)).
Otherwise it takes the inference kernel, which saves nothing and can also apply the
softplus of Δ and the SiLU(z) gate.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

log = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("selective_scan.cpp", "ssd_scan.cpp", "causal_conv.cpp", "matvec.cpp", "mamba_step.cpp")
]
_HEADERS = [Path(__file__).with_name("vector_math.h")]
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-mprefer-vector-width=512"]
_NAME = "mambastep_cpu"
_module = None

CHECKPOINT_CHUNK = 64  # tokens between the states saved for the backward
# A fused decode step writes a layer's next SSM state of at least this many bytes into memory
# reused from earlier steps' states (once nothing holds them), not a fresh block: glibc maps
# blocks above 32 MiB anew on every allocation, and their page faults cost a Mamba-2 model at
# batch 64 half its step. Smaller blocks glibc's own heap reuses.
STATE_REUSE_BYTES = 32 << 20


def kernels():
    """The compiled extension module, built on first use.

    Raises:
        RuntimeError: no C++ compiler, or the build failed (the message says why).
    """
    global _module
    if _module is None:
        from torch.utils.cpp_extension import _get_build_directory, load

        built = any(Path(_get_build_directory(_NAME, verbose=False)).glob(f"{_NAME}*.so"))
        (log.info if built else log.warning)(
            "loading the fused CPU kernels" + ("" if built else " (compiling them once: about a minute)")
        )
        # PyTorch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag.
        headers = hashlib.sha256(b"".join(p.read_bytes() for p in _HEADERS)).hexdigest()[:16]
        _module = load(
            name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=[*_FLAGS, f"-DMAMBASTEP_HEADERS={headers}"],
            extra_ldflags=["-fopenmp"],
        )
        torch.library.register_fake("mambastep::matvec", _matvec_shape)
        register_flop_formula(torch.ops.mambastep.matvec)(_matvec_flops)
    return _module


def available() -> bool:
    """Whether the kernels are built (building them if need be); logs why when they are not."""
    try:
        kernels()
    except (RuntimeError, OSError, ImportError) as err:
        log.warning("fused CPU kernels unavailable, using PyTorch's operators: %s", err)
        return False
    return True


@cache
def computes_in(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies and convolves ``dtype`` natively: always for float32 and
    float64; bfloat16 and float16 through oneDNN's kernels for them, which need AVX-512 (BF16,
    FP16) or AMX. Elsewhere PyTorch's CPU matmul and conv in those dtypes are slow reference
    loops (10 to 300 times slower than float32), so callers compute in float32 instead."""
    if dtype in (torch.float32, torch.float64):
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


@cache
def mkl_tuned_here() -> bool:
    """Whether PyTorch's float32 matmul (MKL on x86) runs its fastest kernels on this CPU:
    everywhere but on x86 CPUs not made by Intel, for which MKL picks slower code paths. On an
    AMD EPYC (Zen 3) oneDNN's matmul multiplied wide prompt products 1.2-1.6x faster."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # vendor unknown: keep PyTorch's default
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")), "")
    return vendor in ("", "GenuineIntel")


def uses_onednn(prompt_matmul: str) -> bool:
    """Whether the ``prompt_matmul`` engine setting ("auto", "onednn" or "torch") picks oneDNN's
    matmul: "onednn" always (an error where PyTorch was built without oneDNN), "auto" where
    MKL is not tuned for this CPU."""
    if prompt_matmul == "onednn" and not torch.backends.mkldnn.is_available():
        raise RuntimeError("prompt_matmul='onednn': this PyTorch was built without oneDNN")
    return prompt_matmul == "onednn" or (
        prompt_matmul == "auto" and torch.backends.mkldnn.is_available() and not mkl_tuned_here()
    )


def chosen(setting: str) -> bool:
    """Whether an engine setting ("auto", "fused" or "torch") picks these kernels: "fused"
    always, "auto" when they build on this machine."""
    return setting == "fused" or (setting == "auto" and available())


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _rows(t: Tensor, dims: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """``t`` in ``dtype`` with its last ``dims`` dimensions contiguous, its other strides kept
    (a copy only where they are not): what the kernels that read strided rows take."""
    t = t.to(dtype)
    inner = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:])):
        if stride != inner:
            return t.clone(memory_format=torch.contiguous_format)
        inner *= size
    return t


class _SelectiveScanFused(torch.autograd.Function):
    """The fused scan with its fused backward. Inputs as ``selective_scan_fused`` (D may be None)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, state, chunk):
        args = [_f32(t) for t in (x, dt, A, B, C)]
        D32 = torch.empty(0) if D is None else _f32(D)
        y, final, ckpt = kernels().selective_scan_fused_fwd(*args, D32, _f32(state), chunk)
        ctx.save_for_backward(*args, D32, ckpt)
        ctx.chunk = chunk
        ctx.inputs = [(t.dtype, t.shape) if t is not None else None for t in (x, dt, A, B, C, D, state)]
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh):
        x, dt, A, B, C, D32, ckpt = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dstate = kernels().selective_scan_fused_bwd(
            x, dt, A, B, C, D32, ckpt, _f32(gy), _f32(gh), ctx.chunk
        )
        # Partials per sequence (dA, dD) and per channel block (dB, dC), summed here.
        grads = [dx, ddt, dA.sum(0), dB.sum(1), dC.sum(1), dD.sum(0), dstate]
        out = [
            g.to(spec[0]).reshape(spec[1]) if spec is not None and needed else None
            for g, spec, needed in zip(grads, ctx.inputs, ctx.needs_input_grad)
        ]
        return (*out, None)


def selective_scan_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor,
    z: Tensor | None = None, dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """The Mamba-1 selective scan in one fused pass (same contract as ``ops.selective_scan``),
    optionally with the softplus of Δ before it and the SiLU(z) gate after it.

    Differentiable with respect to every tensor input (gradients in each input's dtype); then
    the softplus and the gate run as PyTorch operators around the scan. When grad mode is off or
    no input requires grad it runs the inference kernel, which saves nothing, computes the
    softplus and the gate inside, and reads x, dt, B, C and z where they lie (rows at any
    stride, as slices of a projection's output).

    Args:
        x: (b, l, e), dt: (b, l, e), A: (e, n), B: (b, l, n), C: (b, l, n), D: (e,) or None,
        state: (b, e, n). Any float dtype; computed in float32.
        z: (b, l, e) or None: with it, y = (C · h + D x) SiLU(z).
        dt_softplus: dt is Δ before its softplus: Δ = softplus(dt), as ``F.softplus``.

    Returns:
        y: (b, l, e) float32; state: (b, e, n) float32 after the last token.
    """
    if wants_grad(x, dt, A, B, C, D, state, z):
        dt = F.softplus(dt) if dt_softplus else dt
        y, state = _SelectiveScanFused.apply(x, dt, A, B, C, D, state, CHECKPOINT_CHUNK)
        return (y if z is None else y * F.silu(z.float())), state
    D = torch.empty(0) if D is None else _f32(D)
    z = torch.empty(0) if z is None else _rows(z)
    return kernels().selective_scan_fused(
        _rows(x), _rows(dt), _f32(A), _rows(B), _rows(C), D, z, _f32(state), dt_softplus
    )


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU of the causal depthwise conv over a sequence (``ops.causal_conv`` contract, then
    SiLU) in one pass; inference only. Sums in float32, y rounded once to x's dtype.

    Args:
        x: (b, l, c) float32, bfloat16 or float16, read where it lies (rows at any stride, as a
        slice of in_proj's output); weight: (c, k); bias: (c,) or None; state: (b, k-1, c) the
        inputs before x.

    Returns:
        y: (b, l, c) contiguous; state: (b, k-1, c) the last k-1 inputs; both in x's dtype.

    Raises:
        RuntimeError: an input requires grad while grad mode is on (the kernel has no backward).
    """
    if wants_grad(x, weight, bias, state):
        raise RuntimeError("causal_conv_silu has no backward pass: use ops.causal_conv where gradients are needed")
    kernels()
    bias = torch.empty(0) if bias is None else _f32(bias)
    y, state = torch.ops.mambastep.causal_conv_silu(
        _rows(x, dtype=x.dtype), _f32(weight), bias, state.to(x.dtype).contiguous()
    )
    return y, state


def ssd_scan_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor, z: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The Mamba-2 scan in one fused pass (same contract as ``ops.ssd_scan``), optionally
    with the SiLU(z) gate after it; inference only.

    Each state entry is updated token by token in float32, as in ``reference.ssd_scan_ref``,
    so there is no chunk size: the result is the same for any split of the sequence. x, B, C
    and z are read where they lie (rows at any stride, as slices of in_proj's output).

    Args:
        x: (b, l, h, p), dt: (b, l, h) after softplus and clamping, A: (h,), B: (b, l, g, n),
        C: (b, l, g, n), D: (h,), (h, p) or None, state: (b, h, p, n). Any float dtype.
        z: (b, l, h, p) or None: with it, y = (h_t · C_t + D x_t) SiLU(z_t).

    Returns:
        y: (b, l, h, p) float32; state: (b, h, p, n) float32 after the last token.

    Raises:
        RuntimeError: an input requires grad while grad mode is on (the kernel has no backward).
    """
    if wants_grad(x, dt, A, B, C, D, state, z):
        raise RuntimeError("ssd_scan_fused has no backward pass: use ops.ssd_scan where gradients are needed")
    kernels()
    h, p = x.shape[2], x.shape[3]
    D = torch.empty(0) if D is None else _f32(D.reshape(h, -1).expand(h, p))  # (h, p)
    z = torch.empty(0) if z is None else _rows(z, 2)
    y, state = torch.ops.mambastep.ssd_scan(_rows(x, 2), _f32(dt), _f32(A), _rows(B, 2), _rows(C, 2), D, z, _f32(state))
    return y, state


def rms_norm(x: Tensor, weight: Tensor, eps: float, group: int) -> Tensor:
    """RMSNorm in one pass: x / sqrt(mean(x^2) + eps) * weight over each group of ``group``
    channels (as ``models.lm.RMSNorm``); float32 inputs, inference.

    Args:
        x: (..., d) float32; weight: (d,) float32; group: channels per group, dividing d.

    Returns:
        (..., d) float32.
    """
    kernels()
    return torch.ops.mambastep.rms_norm(x, weight, eps, group)


def _matvec_shape(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])  # the output's shape, for torch.compile


def _matvec_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]  # multiply-adds, for FlopCounterMode


def matvec(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """y = x W^T (times ``scale`` per output row for int8 weights) + bias, in float32.

    Meant for a few rows of x (a decode step: one per sequence): each weight is read once
    and converted to float32 in registers; the activations and sums are float32.

    Args:
        x: (..., k) any float dtype; weight: (n, k) float32, bfloat16 or int8;
        scale: (n,) for int8 weights, else None; bias: (n,) or None.

    Returns:
        (..., n) float32.
    """
    kernels()
    flat = _f32(x.reshape(-1, x.shape[-1]))  # (m, k)
    y = torch.ops.mambastep.matvec(flat, weight, scale, None if bias is None else _f32(bias))  # (m, n)
    return y.reshape(*x.shape[:-1], weight.shape[0])


Operands = tuple[Tensor, Tensor | None, Tensor | None]  # a linear layer as matvec takes it: weight, scale, bias


class MambaLayerWeights(NamedTuple):
    """One Mamba-1 layer (``models.mamba``) as ``mamba_layers_step`` takes it."""

    norm: Tensor  # (d,) the pre-norm's weight
    in_proj: Operands
    conv_weight: Tensor  # (e, 1, k) or (e, k)
    conv_bias: Tensor | None  # (e,)
    x_proj: Operands  # without a bias
    dt_proj: Operands  # with its bias, added inside the softplus
    A_log: Tensor  # (e, n)
    D: Tensor | None  # (e,)
    out_proj: Operands

    def params(self, derive: FusedLayers) -> list[Tensor | None]:
        """The flat list of ``MambaParam`` in mamba_step.cpp, its derived tensors made by ``derive``."""
        f32 = derive.float32
        (in_w, in_s, in_b), (x_w, x_s, _), (dt_w, dt_s, dt_b), (out_w, out_s, out_b) = self.in_proj, self.x_proj, self.dt_proj, self.out_proj
        return [
            f32(self.norm), in_w, in_s, f32(in_b), f32(self.conv_weight), f32(self.conv_bias), x_w, x_s, dt_w, dt_s,
            f32(dt_b), derive.decay_rates(self.A_log), f32(self.D), out_w, out_s, f32(out_b),
        ]


class Mamba2LayerWeights(NamedTuple):
    """One Mamba-2 layer (``models.mamba2``) as ``mamba2_layers_step`` takes it."""

    norm: Tensor  # (d,) the pre-norm's weight
    in_proj: Operands  # d -> z (e), x B C (c = e + 2gn), dt (h)
    conv_weight: Tensor  # (c, 1, k) or (c, k)
    conv_bias: Tensor | None  # (c,)
    dt_bias: Tensor  # (h,)
    A_log: Tensor  # (h,)
    D: Tensor | None  # (h,) or (e,)
    gate_norm: Tensor  # (e,) the gated RMSNorm's weight
    out_proj: Operands

    def params(self, derive: FusedLayers) -> list[Tensor | None]:
        """The flat list of ``Mamba2Param`` in mamba_step.cpp, its derived tensors made by ``derive``."""
        f32 = derive.float32
        (in_w, in_s, in_b), (out_w, out_s, out_b) = self.in_proj, self.out_proj
        return [
            f32(self.norm), in_w, in_s, f32(in_b), f32(self.conv_weight), f32(self.conv_bias), f32(self.dt_bias),
            derive.decay_rates(self.A_log), f32(self.D), f32(self.gate_norm), out_w, out_s, f32(out_b),
        ]


class _Registrations:
    """Counts parameters, buffers and submodules assigned to any module since import: a
    ``FusedLayers`` built before a layer was replaced (``quantize_int8``, say) is stale."""

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


class HeadWeights(NamedTuple):
    """A model's last steps as the fused decode step can take them: the final RMSNorm, then
    the output layer (``HeadParam`` in mamba_step.cpp)."""

    norm: Tensor  # (d,) the final norm's weight
    out: Operands  # (vocab, d) the output layer as matvec takes it

    def params(self, derive: FusedLayers) -> list[Tensor | None]:
        weight, scale, bias = self.out
        return [derive.float32(self.norm), weight, scale, derive.float32(bias)]


class FusedLayers:
    """A stack of layers' weights in the flat form a fused decode step takes, prepared once.

    The linear layers' weights stay as stored (matvec reads them); the small tensors (norms,
    conv, biases, D) become float32 and A_log becomes A = -exp(A_log), the float32 decay rates,
    so a step does not convert them again. A model keeps one while ``current()``: no parameter,
    buffer or submodule has been assigned anywhere since, and every tensor it derived something
    from still has the same storage and has not been modified in place.
    """

    def __init__(self, layers: Sequence[MambaLayerWeights] | Sequence[Mamba2LayerWeights], head: HeadWeights | None = None):
        self._sources: list[tuple[Tensor, int, int]] = []  # (tensor, data_ptr, version) of what was derived from
        self._tracked = True  # False once a source is an inference tensor, which keeps no version
        self._registrations = module_assignments()
        self.count = len(layers)
        self.params = [t for layer in layers for t in layer.params(self)]
        self.head = [] if head is None else head.params(self)  # empty: the step returns the residual

    def float32(self, t: Tensor | None) -> Tensor | None:
        """``t`` as contiguous float32: itself when it already is, else a copy derived from it."""
        if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
            return t
        self._track(t)
        return _f32(t)

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


def _layers_step(op: str, residual: Tensor, layers, conv_states, ssm_states, *args, logits: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    kernels()
    if not isinstance(layers, FusedLayers):
        layers = FusedLayers(layers)
    if logits and not layers.head:
        raise ValueError("logits=True needs layers prepared with a head (FusedLayers(..., head=HeadWeights(...)))")
    head = layers.head if logits else []
    out = getattr(torch.ops.mambastep, op)(residual, layers.params, head, list(conv_states), list(ssm_states), *args, STATE_REUSE_BYTES)
    n = layers.count
    return out[0], out[1 : 1 + n], out[1 + n :]


def mamba_layers_step(
    residual: Tensor, layers: FusedLayers | Sequence[MambaLayerWeights], conv_states: Sequence[Tensor],
    ssm_states: Sequence[Tensor], eps: float, logits: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One decode step through a stack of Mamba-1 layers in one call.

    Per layer: RMSNorm, in_proj, conv step, SiLU, x_proj, dt_proj (its bias inside the
    softplus), the selective state update with A = -exp(A_log), the D skip, the SiLU(z) gate,
    out_proj and the residual add; the products through ``matvec``, everything in float32.

    Args:
        residual: (b, d) float32, the residual stream entering the first layer; layers: each
        layer's weights, or a ``FusedLayers`` prepared from them; conv_states: (b, k-1, e) per
        layer; ssm_states: (b, e, n) per layer; eps: the norms' epsilon; logits: go on through
        the head ``layers`` was prepared with (the final norm, with ``eps``, and the output layer).

    Returns:
        the residual stream after the last layer (b, d) float32, or with ``logits`` the logits
        (b, vocab) float32; the next conv states and SSM states, each in the dtype of the state
        it replaces.
    """
    return _layers_step("mamba_layers_step", residual, layers, conv_states, ssm_states, eps, logits=logits)


def mamba2_layers_step(
    residual: Tensor, layers: FusedLayers | Sequence[Mamba2LayerWeights], conv_states: Sequence[Tensor],
    ssm_states: Sequence[Tensor], eps: float, n_groups: int, dt_limit: tuple[float, float], logits: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One decode step through a stack of Mamba-2 layers in one call.

    Per layer: RMSNorm, in_proj, conv step over x, B and C, SiLU, Δ = softplus(dt + dt_bias)
    clamped to ``dt_limit``, the state update with decay exp(-Δ exp(A_log)) per head, the D
    skip, the SiLU(z) gate, the gated RMSNorm over ``n_groups`` groups, out_proj and the
    residual add; the products through ``matvec``, everything in float32.

    Args:
        as ``mamba_layers_step``, with conv_states (b, k-1, e + 2gn) and ssm_states (b, h, p, n)
        per layer; n_groups: g; dt_limit: (low, high), high may be infinite.

    Returns:
        as ``mamba_layers_step``.
    """
    low, high = dt_limit
    high = min(high, torch.finfo(torch.float32).max)  # the kernel is built for finite math
    return _layers_step("mamba2_layers_step", residual, layers, conv_states, ssm_states, eps, n_groups, low, high, logits=logits)
