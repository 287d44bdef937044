"""Building and loading the C++ CPU kernels: whatever the process imported before, and a
failed build falls back (auto) or fails clearly (cpp)."""

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from mambastep import ops
from mambastep.ops.cpu import build
from mambastep.settings import EngineSettings

# What pip leaves behind: setuptools then refuses to start in this process (an AssertionError
# from its distutils hack), and a build through PyTorch's extension tools with it.
POISON = "import pip._internal.locations"


def _run(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )


def test_a_process_that_imported_distutils_first_loads_the_kernels(cpp):
    done = _run(f"""
        {POISON}
        from mambastep import ops
        from mambastep.settings import EngineSettings
        print(ops.resolve(EngineSettings(), "cpu").sequence_kernels)
    """)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stderr[-2000:]


def test_a_process_that_imported_distutils_first_builds_the_kernels(tmp_path):
    """The build runs in a fresh process: a small library, built from such a process."""
    source = tmp_path / "isa.cpp"
    source.write_text(
        textwrap.dedent("""
        #include <torch/library.h>
        std::string isa() { return "tiny"; }
        TORCH_LIBRARY_IMPL(mambastep, CompositeExplicitAutograd, m) { m.impl("cpu_kernels_isa", &isa); }
    """)
    )
    done = _run(
        f"""
        {POISON}
        from pathlib import Path
        from mambastep.ops.cpu import build
        build.SOURCES[:], build.HEADERS[:] = [Path({str(source)!r})], []
        print(build.load())
    """,
        TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"),
        MAMBASTEP_CPU_ISA="portable",
    )
    assert done.returncode == 0 and done.stdout.split() == ["tiny"], done.stderr[-2000:]


def test_a_failed_build_falls_back_in_one_line_or_fails_when_asked_for(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("could not build the CPU kernels: no C++ compiler")

    monkeypatch.setattr(build, "_outcome", None)
    monkeypatch.setattr(build, "_load", no_compiler)
    build.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            backend = ops.resolve(EngineSettings(), "cpu")
            ops.resolve(EngineSettings(), "cpu")  # tried once: the failure is remembered
        assert not backend.sequence_kernels and not backend.matvec_kernel
        lines = [r for r in caplog.records if "CPU kernels are unavailable" in r.getMessage()]
        assert len(lines) == 1 and "no C++ compiler" in lines[0].getMessage()
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            ops.resolve(EngineSettings(scan="cpp"), "cpu")
    finally:
        build.available.cache_clear()


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_build_shows_how_long_it_has_run_in_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    command = [sys.executable, "-c", "import time; time.sleep(1.5); print('built')"]
    done = build.run_with_clock(command, "compiling", 60)
    assert done.returncode == 0 and done.stdout == "built\n"
    # Shown at the start, again after each second the command ran, and at its end.
    assert sys.stderr.getvalue().count("compiling: 00:") >= 3


def test_a_build_shows_no_clock_outside_a_terminal_nor_when_the_kernels_are_cached(cpp, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert build.run_with_clock([sys.executable, "-c", "print('built')"], "compiling", 60).stdout == "built\n"
    monkeypatch.setattr(sys, "stderr", Terminal())
    build._load()  # the library is cached: loaded, not compiled
    assert sys.stderr.getvalue() == ""


def test_a_build_that_runs_too_long_is_stopped():
    with pytest.raises(subprocess.TimeoutExpired):
        build.run_with_clock([sys.executable, "-c", "import time; time.sleep(60)"], "compiling", 0.5)


def test_an_unknown_instruction_set_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MAMBASTEP_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="MAMBASTEP_CPU_ISA='avx9000': choose one of native, avx512, avx2, portable"):
        build.requested_isa()


def test_cpp_on_another_device_is_refused():
    with pytest.raises(ValueError, match="the C\\+\\+ kernels run on the CPU, not on meta"):
        ops.resolve(EngineSettings(scan="cpp"), "meta")
    assert not ops.resolve(EngineSettings(), "meta").sequence_kernels  # auto: PyTorch's operators there


def test_a_build_from_the_cpu_is_cached_per_kind_of_cpu(monkeypatch):
    """A cache folder shared by two machines never hands one a library built for the other's
    instruction sets; the portable build suits both."""
    here = {isa: build.library_path(isa) for isa in build.ISA_FLAGS}
    assert build.cpu_flags() and len(set(here.values())) == len(here)
    monkeypatch.setattr(build, "cpu_flags", lambda: "avx avx2 fma sse4_2")
    other = {isa: build.library_path(isa) for isa in build.ISA_FLAGS}
    assert other["portable"] == here["portable"]
    assert all(other[isa] != here[isa] for isa in ("native", "avx512", "avx2"))
    assert other == {isa: build.library_path(isa) for isa in build.ISA_FLAGS}
