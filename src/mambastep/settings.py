"""Engine settings: how a model runs, kept apart from what the model is (its config)
and from how tokens are chosen (SamplingParams).

The settings name what they choose; ``ops.backend.resolve`` turns them, once per model and
device, into the ``Backend`` that the op functions read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("mambastep")

SCAN_KERNELS = ("auto", "cpp", "torch")
MATVEC_KERNELS = ("auto", "cpp", "torch")
PROMPT_MATMULS = ("auto", "onednn", "torch")
DECODE_BACKENDS = ("auto", "eager", "compiled", "graphs")
# Values that were renamed, with their new name: an old value is an error that names the new one.
RENAMED = {"fused": "cpp"}


@dataclass(frozen=True)
class EngineSettings:
    """How a loaded model runs.

    scan: the kernels of a prompt's sequence operations: the Mamba-1 and Mamba-2 scans, the
        causal conv with its SiLU, and the RMSNorms. "cpp" is mambastep's C++ kernels for the
        CPU (built on first use; the scans and the conv with their own backward passes for
        training, the RMSNorms inference only: where gradients are needed they take PyTorch's
        operators).
        They run the conv and SiLU in one pass, the softplus of Δ and the SiLU(z) gate inside
        the scan, and the float32 RMSNorms in one pass. "torch" is the chunked PyTorch scans
        and PyTorch's operators (any device); "auto" the C++ kernels on the CPU where they
        build, PyTorch's operators elsewhere.
    matvec: the products of the linear layers with a few activation rows (decode steps: up
        to 16 rows for weights PyTorch multiplies natively, 64 for int8 weights and for
        bfloat16 ones on CPUs without native bfloat16). "cpp" is mambastep's C++ kernel that
        reads float32, bfloat16 or int8 weights once at memory speed (CPU, inference), and with
        it an eager Mamba or Mamba-2 decode step, of any batch, runs all its layers in one C++
        call; "torch" PyTorch's linear and operators; "auto" the C++ kernel on the CPU where
        it builds.
    prompt_matmul: the float32 products of prompts (many rows) on the CPU, in linear layers of
        at least 1,024 outputs. "onednn" is oneDNN's matmul, "torch" PyTorch's linear (MKL on
        x86), "auto" oneDNN on x86 CPUs not made by Intel, for which MKL picks slower code
        paths, else PyTorch's.
    decode: "compiled" runs each decode step through torch.compile, which traces the layers'
        own operations: every process traces the step at its first one (seconds), and the first
        process on a machine also compiles it (tens of seconds; Inductor caches that on disk,
        in ``TORCHINDUCTOR_CACHE_DIR``). "eager" starts at once, and where the matvec kernel
        runs, takes the whole stack of an SSM in one C++ call, as fast per token as the
        compiled step or faster; without that kernel the compiled step is faster and repays its
        start after some hundreds to thousands of tokens (BENCHMARKS.md). "graphs" replays
        each step of a Mamba or Mamba-2 model on a CUDA GPU from CUDA graphs, one per bucket
        of batch sizes, captured at its first step (``models.cuda_graphs``); elsewhere it is
        an error. "auto": graphs where they apply (also not while a hook watches a mixer's
        Δ), else eager.
    threads: intra-op threads (None keeps PyTorch's default).
    huge_pages: ``configure`` moves the model's CPU weights into transparent huge pages (Linux;
        ``memory.place_in_huge_pages``): a decode step streams every weight, and TLB misses
        cost it less from 2 MiB pages. It costs a copy of the weights once, and the weights of
        a loaded checkpoint become private memory instead of pages of the file's mapping;
        during the copy both are resident (the file's pages are clean: the kernel can drop
        them). False keeps them where loading put them. Weights made later (``.to(dtype)``)
        are not moved until the next ``configure``; ``quantize_int8`` moves its int8 weights
        where the float ones were.
    scan_chunk: tokens per block of the chunked PyTorch scans.
    prefill_piece: tokens per piece when a long prompt is prefilled; bounds activation memory.
    """

    scan: Literal["auto", "cpp", "torch"] = "auto"
    matvec: Literal["auto", "cpp", "torch"] = "auto"
    prompt_matmul: Literal["auto", "onednn", "torch"] = "auto"
    decode: Literal["auto", "eager", "compiled", "graphs"] = "auto"
    threads: int | None = None
    huge_pages: bool = True
    scan_chunk: int = 64
    prefill_piece: int = 512

    def __post_init__(self):
        for name, allowed in (
            ("scan", SCAN_KERNELS),
            ("matvec", MATVEC_KERNELS),
            ("prompt_matmul", PROMPT_MATMULS),
            ("decode", DECODE_BACKENDS),
        ):
            value = getattr(self, name)
            if value in RENAMED and RENAMED[value] in allowed:
                raise ValueError(f"{name}={value!r} is now called {RENAMED[value]!r}: use {name}={RENAMED[value]!r}")
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("scan_chunk", "prefill_piece"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False, got {self.huge_pages!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
