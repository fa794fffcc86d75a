"""This process's memory, from /proc/self/status (Linux).

Peak memory is VmHWM, the high-water mark of the process's own address space. Not
getrusage's ru_maxrss: Linux carries that across exec, so a child started by a large parent
reports the parent's peak as its own when its own is lower.
"""

from __future__ import annotations

from distill_core.trial_cost import status_mb as _status_mb  # one reader of /proc/self/status


def peak_rss_mb() -> float:
    """The peak resident set of this process since it started (VmHWM)."""
    return _status_mb("VmHWM")


def anon_mb() -> float:
    """The process's private memory now (RssAnon): not the pages of mapped files it touched."""
    return _status_mb("RssAnon")


class PrivatePeak:
    """The highest private memory (RssAnon) seen while the block runs, sampled by a thread
    every `every_s`: what the process itself held at its peak, without the pages of mapped
    files it touched (VmHWM counts those, readahead around scattered reads included)."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.mb = every_s, anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.mb = max(self.mb, anon_mb())

    def __enter__(self) -> "PrivatePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, anon_mb())
