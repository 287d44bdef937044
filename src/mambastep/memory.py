"""Resident memory of this process, for live reports and constant-memory checks; and the
placement of a model's weights in transparent huge pages."""

from __future__ import annotations

import mmap
import os
import resource
import sys
import weakref

import torch
from torch import nn

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes (from /proc/self/statm).

    Where there is no /proc (macOS), this is the peak resident size from getrusage,
    which never goes down.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except FileNotFoundError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS.

    Returns False where the OS does not allow it (then ``peak_rss_bytes`` keeps the old peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_field_bytes(path: str, field: str) -> int | None:
    """A "field: N kB" line of a /proc file, in bytes; None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size since the last ``reset_peak_rss`` (or the start), in bytes."""
    peak = _proc_field_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_memory() -> int | None:
    """Bytes the system can still give without swapping (psutil's ``available``, on every
    platform psutil supports); None where it cannot tell, which callers take as no limit."""
    import psutil  # only when asked: importing it costs every process that never asks

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


_HUGE_PAGE_BYTES = 2 << 20  # a transparent huge page on x86-64 (and on arm64 with 4 KiB pages)
_ALIGN = 64  # bytes: each tensor in an arena starts on a cache line
# The live arenas place_in_huge_pages made: (payload address, payload bytes) by mapping.
_arenas: weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int]] = weakref.WeakKeyDictionary()


def huge_pages_available() -> bool:
    """Whether memory that asks for transparent huge pages gets them here (Linux, THP not "never")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read() and hasattr(mmap, "MADV_HUGEPAGE")
    except OSError:
        return False


def _arena_of(t: torch.Tensor) -> mmap.mmap | None:
    address = t.data_ptr()
    return next((a for a, (start, size) in list(_arenas.items()) if start <= address < start + size), None)


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether ``t`` lies in memory ``place_in_huge_pages`` made."""
    return _arena_of(t) is not None


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def place_in_huge_pages(module: nn.Module, min_bytes: int = 4 * _HUGE_PAGE_BYTES) -> int:
    """Move ``module``'s CPU parameters and buffers into one anonymous mapping backed by
    transparent huge pages (2 MiB); returns the bytes moved.

    A decode step streams every weight from memory. With 4 KiB pages that costs a TLB miss
    every 4 KiB, and the CPU's prefetchers stop at every page's end; with huge pages decode
    steps run faster (BENCHMARKS.md). Each tensor keeps its identity (its
    ``.data`` moves), so tied weights and optimizers are unaffected, and its old storage is
    freed unless something else holds it. A tensor that shares its storage with another one
    stays where it is: moving it would break the sharing.

    Nothing moves where the kernel gives no huge pages, for less than ``min_bytes`` in all
    (a few huge pages would mostly hold nothing), or when the tensors already fill the arenas
    they are in. Tensors in an arena that also holds tensors no longer in use (replaced by
    ``quantize_int8``, say) move to a new one, so the old one is freed.
    """
    if not huge_pages_available():
        return 0
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers()) if t.device.type == "cpu" and t.numel()}
    placed: dict[mmap.mmap, int] = {}  # arena -> bytes of module's tensors in it
    in_arenas: list[torch.Tensor] = []
    storages: dict[int, list[torch.Tensor]] = {}  # storage address -> tensors outside arenas
    for t in tensors.values():
        arena = _arena_of(t)
        if arena is not None:
            placed[arena] = placed.get(arena, 0) + _aligned(t.nbytes)
            in_arenas.append(t)
        else:
            storages.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    fresh = [  # tensors alone in a storage of their own size
        t
        for t, *others in storages.values()
        if not others and t.is_contiguous() and t.nbytes == t.untyped_storage().nbytes()
    ]
    if not fresh and all(used == _arenas[arena][1] for arena, used in placed.items()):
        return 0
    moving = fresh + in_arenas
    total = sum(_aligned(t.nbytes) for t in moving)
    if total < min_bytes:
        return 0
    mapping = mmap.mmap(-1, total + _HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    with torch.inference_mode(False), torch.no_grad():
        arena = torch.frombuffer(mapping, dtype=torch.uint8)
        offset = (-arena.data_ptr()) % _HUGE_PAGE_BYTES  # the payload starts on a huge page
        _arenas[mapping] = (arena.data_ptr() + offset, total)
        for t in moving:
            view = arena[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.data = view
            offset += _aligned(t.nbytes)
    return total
