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
