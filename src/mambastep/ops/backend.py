"""The one choice of kernels: a ``Backend``, resolved once per model and device from its
``EngineSettings``, which every op function reads.

An op takes mambastep's own kernel (a ``mambastep::`` operator, ``ops.library``) where its
backend turns that kernel on and the call suits it (no gradient wanted, a dtype it reads);
else PyTorch's operators. The models pass their backend along and never ask which kernel ran.

Adding a device's kernels: register its implementations of the ``mambastep::`` schemas and
turn them on for that device in ``resolve``.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from mambastep.ops.cpu import build
from mambastep.settings import EngineSettings


@dataclass(frozen=True)
class Backend:
    """The kernels the ops take on one device.

    device: the device type the backend was resolved for ("cpu", "cuda", ...).
    sequence_kernels: mambastep's kernels for a prompt's sequence operations: the scans and
        the causal conv with its SiLU (also where a gradient is wanted), RMSNorm (where none
        is); else the chunked PyTorch scans and PyTorch's operators.
    matvec_kernel: mambastep's matvec for products with a few activation rows, and the
        decode step of a whole stack of layers in one call.
    onednn_prompts: oneDNN's matmul for wide float32 prompt products (CPU).
    triton_kernels: the Triton kernels (``ops.triton``) for the scans, the state updates and the
        conv step, where no gradient is wanted (CUDA).
    scan_chunk: tokens per block of the chunked PyTorch scans.
    """

    device: str = "cpu"
    sequence_kernels: bool = False
    matvec_kernel: bool = False
    onednn_prompts: bool = False
    triton_kernels: bool = False
    scan_chunk: int = 64

    def __str__(self) -> str:
        kernels = {True: "mambastep", False: "torch"}
        return (
            f"{self.device}: scans {kernels[self.sequence_kernels]}, matvec {kernels[self.matvec_kernel]}, "
            f"prompt matmul {'onednn' if self.onednn_prompts else 'torch'}, "
            f"triton {'on' if self.triton_kernels else 'off'}"
        )


TORCH = Backend()  # PyTorch's operators for everything: the default of every op function


def resolve(settings: EngineSettings, device: torch.device | str) -> Backend:
    """The backend that ``settings`` choose for tensors on ``device``.

    "auto" takes mambastep's kernels where the device has them (on the CPU: where the C++
    kernels build; a failed build is one logged line). An explicit "cpp" is a promise:

    Raises:
        RuntimeError: "cpp" was asked for and the C++ kernels do not build here.
        ValueError: "cpp" was asked for on a device other than the CPU, or "onednn" from a
            PyTorch built without oneDNN.
    """
    device = torch.device(device)
    return Backend(
        device=device.type,
        sequence_kernels=_takes_cpp("scan", settings.scan, device),
        matvec_kernel=_takes_cpp("matvec", settings.matvec, device),
        onednn_prompts=device.type == "cpu" and uses_onednn(settings.prompt_matmul),
        triton_kernels=device.type == "cuda" and settings.scan != "torch" and _has_triton(),
        scan_chunk=settings.scan_chunk,
    )


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def load_triton():
    """``ops.triton``, imported on first use (triton is needed on a GPU only)."""
    from mambastep.ops import triton

    return triton


def takes_triton(backend: Backend, state: Tensor, *inputs: Tensor | None) -> bool:
    """Whether a scan or a step takes the Triton kernels: where the backend has them, for a
    float32 state and inputs the kernels read, when no gradient is wanted."""
    return (
        backend.triton_kernels
        and state.dtype == torch.float32
        and all(t is None or t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in inputs)
        and not wants_grad(state, *inputs)
    )


def _takes_cpp(name: str, setting: str, device: torch.device) -> bool:
    if setting == "torch":
        return False
    if device.type != "cpu":
        if setting == "cpp":
            raise ValueError(f"{name}='cpp': the C++ kernels run on the CPU, not on {device}; choose 'auto' or 'torch'")
        return False
    if setting == "cpp":
        build.load()
        return True
    return build.available()


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _native_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this CPU multiplies and convolves natively (see ``computes_in``)."""
    native = {torch.float32, torch.float64}
    if torch.backends.mkldnn.is_available():
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            native.add(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            native.add(torch.float16)
    return frozenset(native)


# Asked once, at import: a decode step asks for every product, also inside torch.compile's
# trace, which reads a constant set where it would warn about a cached function.
NATIVE_DTYPES = _native_dtypes()


def computes_in(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies and convolves ``dtype`` natively: always for float32 and
    float64; bfloat16 and float16 through oneDNN's kernels for them, which need AVX-512 (BF16,
    FP16) or AMX. Elsewhere PyTorch's CPU matmul and conv in those dtypes are slow reference
    loops, so the ops compute in float32 instead."""
    return dtype in NATIVE_DTYPES


@cache
def mkl_tuned_here() -> bool:
    """Whether PyTorch's float32 matmul (MKL on x86) runs its fastest kernels on this CPU:
    everywhere but on x86 CPUs not made by Intel, for which MKL picks slower code paths."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # vendor unknown: keep PyTorch's default
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")), "")
    return vendor in ("", "GenuineIntel")


def uses_onednn(prompt_matmul: str) -> bool:
    """Whether the ``prompt_matmul`` setting ("auto", "onednn" or "torch") picks oneDNN's
    matmul: "onednn" always, "auto" where MKL is not tuned for this CPU.

    Raises:
        ValueError: "onednn" from a PyTorch built without oneDNN.
    """
    if prompt_matmul == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError("prompt_matmul='onednn': this PyTorch was built without oneDNN")
    return prompt_matmul == "onednn" or (
        prompt_matmul == "auto" and torch.backends.mkldnn.is_available() and not mkl_tuned_here()
    )
