"""Engine settings: how a model runs, kept apart from what the model is (its config)
and from how tokens are chosen (SamplingParams)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("mambastep")

SCAN_KERNELS = ("auto", "fused", "torch")
MATVEC_KERNELS = ("auto", "fused", "torch")
PROMPT_MATMULS = ("auto", "onednn", "torch")
DECODE_BACKENDS = ("eager", "compiled")


@dataclass(frozen=True)
class EngineSettings:
    """How a loaded model runs.

    scan: the Mamba-1 and Mamba-2 scans over a sequence. "fused" is the compiled CPU kernels
        (CPU only, built on first use; Mamba-1's with its own backward pass for training,
        Mamba-2's inference only: where gradients are needed Mamba-2 takes the PyTorch scan),
        "torch" the chunked PyTorch scans (any device), "auto" the fused kernels on CPU and the
        PyTorch scans on other devices. For a prompt's inference the fused kernels also run the
        causal conv and SiLU in one pass, the softplus of Δ and the SiLU(z) gate inside the
        scan, and (float32) the RMSNorms in one pass.
    matvec: the products of the linear layers with a few activation rows (decode steps: up
        to 16 rows for weights PyTorch multiplies natively, 64 for int8 weights and for
        bfloat16 ones on CPUs without native bfloat16). "fused" is the CPU kernel that reads
        float32, bfloat16 or int8 weights once at memory speed (CPU only, inference only;
        built on first use), and with it an eager Mamba or Mamba-2 decode step, of any batch,
        runs all its layers in one fused call; "torch" PyTorch's linear and
        operators; "auto" the kernels on CPU.
    prompt_matmul: the float32 products of prompts (many rows) on the CPU, in linear layers of
        at least 1,024 outputs. "onednn" is oneDNN's matmul, "torch" PyTorch's linear (MKL on
        x86), "auto" oneDNN on x86 CPUs not made by Intel, for which MKL picks slower code paths
        (oneDNN 1.1-1.6x faster measured on an AMD EPYC), else PyTorch's.
    decode: "compiled" runs each decode step through torch.compile (a one-time compile
        of a few tens of seconds per model, cached on disk, then faster steps); "eager"
        starts at once.
    threads: intra-op threads (None keeps PyTorch's default).
    huge_pages: ``configure`` moves the model's CPU weights into transparent huge pages (Linux;
        ``memory.place_in_huge_pages``): a decode step streams every weight, and ran 1.02-1.17x
        faster from huge pages on an AMD EPYC (Zen 3). It costs a copy of the weights once (0.3 s
        per GB there, 1.3 s where the virtual machine first backs the memory), and the weights
        of a loaded checkpoint become private memory instead of pages of the file's mapping;
        during the copy both are resident (the file's pages are clean: the kernel can drop
        them). False keeps them where loading put them. Weights made later (``.to(dtype)``)
        are not moved until the next ``configure``; ``quantize_int8`` moves its int8 weights
        where the float ones were.
    scan_chunk: tokens per block of the chunked PyTorch scans.
    prefill_piece: tokens per piece when a long prompt is prefilled; bounds activation memory.
        512 ran prefills 1.01-1.20x faster than 256 on an AMD EPYC (Zen 3), 2 threads (fewer
        calls, and int8 or upcast bfloat16 weights converted half as often).
    """

    scan: Literal["auto", "fused", "torch"] = "auto"
    matvec: Literal["auto", "fused", "torch"] = "auto"
    prompt_matmul: Literal["auto", "onednn", "torch"] = "auto"
    decode: Literal["eager", "compiled"] = "eager"
    threads: int | None = None
    huge_pages: bool = True
    scan_chunk: int = 64
    prefill_piece: int = 512

    def __post_init__(self):
        if self.scan not in SCAN_KERNELS:
            raise ValueError(f"scan must be one of {SCAN_KERNELS}, got {self.scan!r}")
        if self.matvec not in MATVEC_KERNELS:
            raise ValueError(f"matvec must be one of {MATVEC_KERNELS}, got {self.matvec!r}")
        if self.prompt_matmul not in PROMPT_MATMULS:
            raise ValueError(f"prompt_matmul must be one of {PROMPT_MATMULS}, got {self.prompt_matmul!r}")
        if self.decode not in DECODE_BACKENDS:
            raise ValueError(f"decode must be one of {DECODE_BACKENDS}, got {self.decode!r}")
        for name in ("scan_chunk", "prefill_piece"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False, got {self.huge_pages!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
