"""Hardware profiles for the roofline: peak rate per primitive class, memory bandwidth, memory sizes.

Built in: datasheet figures of common parts; ``calibrate()`` measures this
machine; ``Hardware.from_file`` reads a user's own part (an ASIC sketch) from
JSON with the same keys as ``Hardware.to_dict``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mambastep.families.accounting import PRIMITIVES

COMPUTE_PRIMITIVES = PRIMITIVES[:-1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HardwareError(ValueError):
    """A hardware profile that cannot be used as written."""


@dataclass(frozen=True)
class Hardware:
    """What the roofline needs to know about a part.

    dtype: the precision the peaks are quoted for; weights, activations and KV caches
        use it (the SSM state stays float32, as in mambastep).
    bandwidth: main-memory bytes/s (HBM, DRAM).
    peak: FLOP/s per compute primitive class (a nonlinearity counts one per value).
    on_chip_bytes: memory that keeps the recurrent state between steps; when the whole
        state of the batch fits, its reads and writes cost no main-memory traffic.
    memory_bytes: main-memory capacity (0 if unknown).
    source: where the figures come from.
    """

    name: str
    dtype: str
    bandwidth: float
    peak: dict[str, float]
    on_chip_bytes: int = 0
    memory_bytes: int = 0
    source: str = ""

    def __post_init__(self):
        where = f"hardware {self.name!r}"
        if self.dtype not in DTYPES:
            raise HardwareError(f"{where}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not isinstance(self.peak, dict) or set(self.peak) != set(COMPUTE_PRIMITIVES):
            raise HardwareError(
                f"{where}: peak must give FLOP/s for exactly {list(COMPUTE_PRIMITIVES)}, got {self.peak!r}"
            )
        for name, value in [("bandwidth", self.bandwidth), *((f"peak.{k}", v) for k, v in self.peak.items())]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise HardwareError(f"{where}: {name} must be a positive number, got {value!r}")
        for name in ("on_chip_bytes", "memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HardwareError(f"{where}: {name} must be a non-negative integer, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> Hardware:
        if not isinstance(raw, dict):
            raise HardwareError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - names), sorted({"name", "dtype", "bandwidth", "peak"} - set(raw))
        if unknown or missing:
            raise HardwareError(
                f"{where}: unknown key(s) {unknown}, missing key(s) {missing}; keys are {sorted(names)}"
            )
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Hardware:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HardwareError(f"{path}: cannot read a hardware profile ({err})") from None
        return cls.from_dict(raw, str(path))


def _gpu(name: str, tensor: float, fp32: float, sfu: float, bandwidth: float, memory: float, source: str) -> Hardware:
    """Matrix products on tensor cores; dot products, elementwise work and norms on the fp32
    CUDA cores (the SSM state is fp32); nonlinearities on the special-function units."""
    peak = dict(matmul=tensor, matvec=tensor, dot=fp32, elementwise=fp32, nonlinear=sfu, norm=fp32)
    # on_chip_bytes = 0: the shipped kernels read the state from HBM at every step.
    return Hardware(name, "bfloat16", bandwidth, peak, 0, int(memory), source)


BUILTIN_HARDWARE: dict[str, Hardware] = {
    "a100": _gpu(
        "a100",
        312e12,
        19.5e12,
        108 * 16 * 1.41e9,
        2.039e12,
        80e9,
        "NVIDIA A100 SXM4 80GB datasheet: dense bf16 tensor, fp32, HBM2e; SFU: 108 SMs x 16/clk x 1.41 GHz",
    ),
    "h100": _gpu(
        "h100",
        989e12,
        66.9e12,
        132 * 16 * 1.98e9,
        3.35e12,
        80e9,
        "NVIDIA H100 SXM5 datasheet: dense bf16 tensor, fp32, HBM3; SFU: 132 SMs x 16/clk x 1.98 GHz",
    ),
    "h200": _gpu(
        "h200",
        989e12,
        66.9e12,
        132 * 16 * 1.98e9,
        4.8e12,
        141e9,
        "NVIDIA H200 SXM datasheet: H100 compute, HBM3e; SFU: 132 SMs x 16/clk x 1.98 GHz",
    ),
    "cpu": Hardware(
        "cpu",
        "float32",
        89.6e9,
        dict(matmul=896e9, matvec=896e9, dot=448e9, elementwise=448e9, nonlinear=60e9, norm=448e9),
        0,
        int(64e9),
        "a nominal 8-core AVX2 desktop at 3.5 GHz (2 FMA x 8 fp32 lanes per core), dual-channel DDR5-5600; "
        "exp/softplus/SiLU take ~15 instructions per value. Use --calibrate for this machine.",
    ),
}


def get_hardware(name_or_file: str) -> Hardware:
    """A built-in profile by name, or a JSON file.

    Raises:
        FileNotFoundError: a file name (a .json name, or one with a folder) where there is no file.
        HardwareError: neither a known name nor a readable profile file.
    """
    if name_or_file in BUILTIN_HARDWARE:
        return BUILTIN_HARDWARE[name_or_file]
    path = Path(name_or_file)
    if path.exists():
        return Hardware.from_file(path)
    if path.suffix == ".json" or len(path.parts) > 1:
        raise FileNotFoundError(f"no hardware profile file at {name_or_file}: it does not exist")
    raise HardwareError(f"no hardware {name_or_file!r}: give one of {sorted(BUILTIN_HARDWARE)} or a JSON file")


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first touch of fresh memory is slow
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def total_memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """This CPU, to print beside measured figures: its model name, logical cores, and which of
    the vector instruction sets the kernels care about (``VECTOR_FLAGS``) it reports."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return {"cpu": name, "cores": os.cpu_count(), "isa": [f for f in VECTOR_FLAGS if f in flags]}


def _gemv_bandwidth(gen: torch.Generator, repeats: int) -> float:
    matrix = torch.randn(8192, 8192, generator=gen)  # 256 MiB, far beyond any cache
    vector = torch.randn(8192, generator=gen)
    return matrix.nbytes / _best_seconds(lambda: torch.mv(matrix, vector), repeats)


def read_bandwidth(repeats: int = 5) -> float:
    """Main-memory read bandwidth in bytes/s: summing a 512 MiB tensor (a pure streaming read).

    This is the roofline's bandwidth; a GEMV (``calibrate``) reaches less of it.
    """
    big = torch.ones(128 << 20)
    return big.nbytes / _best_seconds(big.sum, repeats)


def matmul_peak(
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    budget_s: float = 0.2,
    product: Callable[[Tensor, Tensor], Tensor] = torch.mm,
) -> float:
    """Matrix-multiply FLOP/s in ``dtype`` of ``product`` (two n x n matrices in, n^3
    multiply-adds): n = 2048, or smaller (down to 256) where one product would take over
    ``budget_s`` seconds, as on a CPU without native kernels for ``dtype`` (PyTorch's bfloat16
    matmul is a slow reference loop on AVX2 CPUs)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 256, generator=gen).to(dtype) for _ in range(2))
    probe = _best_seconds(lambda: product(a, b), 1)
    n = 2048
    while n > 256 and probe * (n / 256) ** 3 > budget_s:
        n //= 2
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: product(a, b), repeats)


def calibrate(repeats: int = 5) -> Hardware:
    """Measure this machine in float32 with PyTorch's own kernels (a few seconds).

    bandwidth: a matrix-vector product over a 256 MiB matrix (reads it once, like a decode step);
    matmul: a 2048 x 2048 product; elementwise, dot and norm: a fused multiply-add over
    1M floats; nonlinear: exp over 1M floats; matvec takes the matmul peak.
    """
    gen = torch.Generator().manual_seed(0)
    steps = tqdm(total=4, desc="calibrating", leave=False, disable=None)
    bandwidth = _gemv_bandwidth(gen, repeats)
    steps.update()
    matmul = matmul_peak(torch.float32, repeats)
    steps.update()
    x, y, out = (torch.rand(1 << 20, generator=gen) for _ in range(3))
    elementwise = 2 * x.numel() / _best_seconds(lambda: torch.addcmul(x, y, x, out=out), 4 * repeats)
    steps.update()
    nonlinear = x.numel() / _best_seconds(lambda: torch.exp(x, out=out), 4 * repeats)
    steps.update()
    steps.close()
    peak = dict(
        matmul=matmul, matvec=matmul, dot=elementwise, elementwise=elementwise, nonlinear=nonlinear, norm=elementwise
    )
    return Hardware(
        "calibrated",
        "float32",
        bandwidth,
        peak,
        0,
        total_memory_bytes(),
        f"measured on this machine with {torch.get_num_threads()} threads: GEMV read bandwidth, "
        "2048^2 matmul, addcmul and exp over 1M floats",
    )
