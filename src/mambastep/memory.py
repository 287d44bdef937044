"""Resident memory of this process, for live reports and constant-memory checks."""

from __future__ import annotations

import os
import resource
import sys

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


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable of /proc/meminfo); 0 where that is unknown."""
    return _proc_field_bytes("/proc/meminfo", "MemAvailable") or 0
