"""This process's memory, from /proc/self/status (Linux).

Peak memory is VmHWM, the high-water mark of the process's own address space. Not
getrusage's ru_maxrss: Linux carries that across exec, so a child started by a large parent
reports the parent's peak as its own when its own is lower.
"""

from __future__ import annotations

from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The peak resident set of this process since it started (VmHWM)."""
    return _status_mb("VmHWM")


def anon_mb() -> float:
    """The process's private memory now (RssAnon): not the pages of mapped files it touched."""
    return _status_mb("RssAnon")
