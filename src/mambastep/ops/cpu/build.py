"""Build the C++ CPU kernels once, cache them, and load them into this process.

The library is compiled with PyTorch's extension tools in a separate Python process, so the
build never depends on what this process imported before (setuptools refuses to start where
the standard library's ``distutils`` was imported first, as ``pip`` does). It is cached under
``$TORCH_EXTENSIONS_DIR/mambastep/`` (by default ``~/.cache/torch_extensions/mambastep/``), named by
a hash of its sources, flags, PyTorch and Python, and of the CPU's instruction-set flags for the
builds that take them from the CPU (``-march=native``): a cache shared by machines (a home
folder on a network drive, a container image built elsewhere) holds one build per kind of CPU,
never one that another CPU cannot run. A process that finds it there loads it in
well under a second, without the build tools. A build says so in one line, and in a terminal a
second line counts the seconds until it ends.

``MAMBASTEP_CPU_ISA`` chooses the instruction set of the build: "native" (the default: this
CPU's widest, AMX tiles included), "avx512" (the AMX tiles switched off), "avx2" (AVX-512
switched off too) or "portable" (neither AVX2 nor AVX-512: the kernels' plain loops). The
tests build every one the CPU can run, so every branch of the kernels is compiled and tested.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import torch
from tqdm import tqdm

from mambastep.ops import library  # noqa: F401  (the schemas the library implements)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [
    HERE / name
    for name in (
        "selective_scan.cpp",
        "ssd_scan.cpp",
        "causal_conv.cpp",
        "matvec.cpp",
        "amx_matmul.cpp",
        "amx_ssd.cpp",
        "mamba_step.cpp",
    )
]
HEADERS = [HERE / "vector_math.h", HERE / "amx_matmul.h"]
COMMON_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "native": ["-march=native", "-mprefer-vector-width=512"],
    "avx512": ["-march=native", "-mprefer-vector-width=512", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"],
    "avx2": ["-march=native", "-mno-avx512f"],  # also switches off every AVX-512 extension
    "portable": ["-march=x86-64-v2"] if X86 else [],
}
ISA_ENV = "MAMBASTEP_CPU_ISA"
BUILD_TIMEOUT_S = 1800


def requested_isa() -> str:
    """The instruction set ``MAMBASTEP_CPU_ISA`` asks for ("native" where it is not set).

    Raises:
        ValueError: a value that is not a known instruction set.
    """
    isa = os.environ.get(ISA_ENV, "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}: choose one of {', '.join(ISA_FLAGS)}")
    return isa


@cache
def cpu_flags() -> str:
    """This CPU's feature flags as Linux lists them (/proc/cpuinfo), sorted; elsewhere what
    ``platform.processor()`` says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    named = (line.split(":", 1) for line in lines if ":" in line)
    flags = next((value for key, value in named if key.strip() in ("flags", "Features")), "")  # x86, Arm
    return " ".join(sorted(set(flags.split())))


def library_path(isa: str) -> Path:
    """Where the library of instruction set ``isa`` is (or will be) built for this CPU."""
    flags = COMMON_FLAGS + ISA_FLAGS[isa]
    digest = hashlib.sha256()
    for part in [
        *(p.read_bytes() for p in SOURCES + HEADERS),
        " ".join(flags).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        (cpu_flags() if "-march=native" in flags else "").encode(),
    ]:
        digest.update(part)
    name = f"mambastep_cpu_{isa}_{digest.hexdigest()[:16]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions")).expanduser()
    return root / "mambastep" / name / f"{name}.so"


def _compile(path: Path, isa: str) -> None:
    """Compile the library into ``path`` in a fresh Python process.

    Raises:
        RuntimeError: no C++ compiler, or the build failed; the message ends with the compiler's output.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "import sys\n"
        "from torch.utils.cpp_extension import load\n"
        "name, directory, flags, *sources = sys.argv[1:]\n"
        "load(name=name, sources=sources, build_directory=directory, extra_cflags=flags.split(),\n"
        "     extra_ldflags=['-fopenmp'], is_python_module=False)\n"
    )
    flags = " ".join(COMMON_FLAGS + ISA_FLAGS[isa])
    command = [sys.executable, "-c", script, path.stem, str(path.parent), flags, *map(str, SOURCES)]
    try:
        done = run_with_clock(command, f"compiling the CPU kernels ({isa})", BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not build the CPU kernels: {err}") from None
    if done.returncode != 0 or not path.is_file():
        output = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError("could not build the CPU kernels:\n" + "\n".join(output[-20:]))


def run_with_clock(command: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``command`` to its end with its output captured, as ``subprocess.run`` does; meanwhile, in
    a terminal, a line on stderr says ``what`` is running and for how long, updated every second.

    Raises:
        OSError: the command could not start.
        subprocess.TimeoutExpired: it ran over ``timeout_s`` seconds (it is killed).
    """
    deadline = time.monotonic() + timeout_s
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process,
        tqdm(desc=what, bar_format="{desc}: {elapsed} elapsed", disable=None) as clock,
    ):
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise subprocess.TimeoutExpired(command, timeout_s) from None
                    clock.refresh()
        except BaseException:  # the timeout, or an interrupt: the command does not outlive the wait
            process.kill()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


_outcome: str | Exception | None = None  # the loaded build's instruction set, or why it failed


def load() -> str:
    """Load the CPU kernels into this process, building them first where they are not cached;
    return the instruction set the loaded build uses ("avx512", "avx2" or "portable"). A
    failure is remembered: a process tries once.

    Raises:
        RuntimeError: the build failed (the message says why).
        ValueError: ``MAMBASTEP_CPU_ISA`` names no known instruction set.
    """
    global _outcome
    if _outcome is None:
        try:
            _outcome = _load()
        except (RuntimeError, OSError, ValueError) as err:
            _outcome = err
    if isinstance(_outcome, Exception):
        raise _outcome
    return _outcome


def _load() -> str:
    isa = requested_isa()
    path = library_path(isa)
    if not path.is_file():
        log.warning("compiling the CPU kernels (%s) once: about a minute", isa)
        _compile(path, isa)
    torch.ops.load_library(str(path))
    built = torch.ops.mambastep.cpu_kernels_isa()
    log.info("loaded the CPU kernels (%s) from %s", built, path)
    return built


@cache
def available() -> bool:
    """Whether the CPU kernels load (building them if need be); logs one line why where they do not."""
    try:
        load()
    except (RuntimeError, OSError, ValueError) as err:
        log.warning("the CPU kernels are unavailable, PyTorch's operators run instead: %s", err)
        return False
    return True
