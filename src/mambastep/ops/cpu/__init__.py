"""Fused CPU kernels, compiled once with PyTorch's C++ extension tools and cached.

The first use builds them (about half a minute, logged) into PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions);
later processes load the built library in well under a second. They are for
inference: they compute no gradients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("selective_scan.cpp")]
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-mprefer-vector-width=512"]
_NAME = "mambastep_cpu"
_module = None


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
            "loading the fused CPU kernels" + ("" if built else " (compiling them once: about 30 s)")
        )
        _module = load(name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
    return _module


def selective_scan_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """The Mamba-1 selective scan in one fused pass (same contract as ``ops.selective_scan``).

    Args:
        x: (b, l, e), dt: (b, l, e), A: (e, n), B: (b, l, n), C: (b, l, n), D: (e,) or None,
        state: (b, e, n). Any float dtype; computed in float32.

    Returns:
        y: (b, l, e) float32; state: (b, e, n) float32 after the last token.
    """
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    D = torch.empty(0) if D is None else f32(D)
    y, state = kernels().selective_scan_fused(f32(x), f32(dt), f32(A), f32(B), f32(C), D, f32(state))
    return y, state
