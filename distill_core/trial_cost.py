"""What each kind of teacher knowledge costs: a trial's wall time, its student tokens a second
and its peak memory (TrialMeter), and the cache bytes a group's signals need (cache_bytes).

Peak memory is the device's: on a GPU torch's peak allocation on it, on a CPU the trial
process's peak resident set (VmHWM; pages of the memory-mapped cache it touched included).
Tune reuses a finished trial's worker process for the next, so the meter resets the peak when
its trial starts (Linux: writing 5 to /proc/self/clear_refs).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from distill_core.study_design import ALL_GROUPS


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak is then the process's since it began
        pass


def status_mb(field: str) -> float:
    """A size field of /proc/self/status (VmHWM, RssAnon, ...) in MB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


class TrialMeter:
    """Wall time and student tokens of a trial's steps, and its peak memory, carried across a
    resume by `state()` / `from_state()` (the checkpoint holds them)."""

    def __init__(self, device: torch.device, seconds: float = 0.0, tokens: int = 0,
                 peak_mb: float = 0.0):
        self.device, self.seconds, self.peak_mb = device, seconds, peak_mb
        self._tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        self._since = time.perf_counter()
        reset_peak_memory(device)

    @classmethod
    def from_state(cls, device: torch.device, state: dict | None) -> "TrialMeter":
        state = state or {}
        return cls(device, state.get("seconds", 0.0), state.get("tokens", 0), state.get("peak_mb", 0.0))

    def count(self, attention_mask: torch.Tensor) -> None:
        """A step's real (not padding) student tokens; summed on the device, no sync."""
        self._tokens += attention_mask.sum()

    @contextlib.contextmanager
    def excluding(self):
        """A block whose wall time is not the trial's training time (validation scoring)."""
        self.state()
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def state(self) -> dict:
        """seconds, tokens, tokens_per_s and peak_mb so far (one device sync)."""
        now = time.perf_counter()
        self.seconds += now - self._since
        self._since = now
        self.peak_mb = max(self.peak_mb, peak_memory_mb(self.device))
        tokens = int(self._tokens.item())
        return {"seconds": round(self.seconds, 3), "tokens": tokens, "peak_mb": round(self.peak_mb, 1),
                "tokens_per_s": round(tokens / self.seconds, 1) if self.seconds > 0 else float("nan")}


# Cache columns each group reads beyond the rows themselves (token ids, masks, chunk ends).
# L_KD needs the teacher's final hidden states (its lm_head rebuilds the exact logits) or,
# with cache.logits: topk, the top-k columns instead.
def signal_columns(group: str, logits: str = "hidden") -> tuple[str, ...]:
    if group not in ALL_GROUPS:
        raise ValueError(f"unknown group {group!r}; groups are {list(ALL_GROUPS)}")
    if group == "task_only":
        return ()
    kd = ("hidden",) if logits == "hidden" else ("topk_ids", "topk_logprobs")
    extra = {"black_box": (), "hidden_state": ("hidden",), "attention": ("attn_queries", "attention"),
             "combined": ("hidden", "attn_queries", "attention")}[group]
    return tuple(dict.fromkeys(kd + extra))


def column_bytes(cache_dirs: list[str]) -> dict[str, int]:
    """Bytes of each column over the caches' Arrow IPC files (the form trials read)."""
    import pyarrow as pa

    from distill_core.teacher_cache import read_manifest

    sizes: dict[str, int] = {}
    for cache_dir in cache_dirs:
        for name in read_manifest(Path(cache_dir))["arrow_files"]:
            with pa.memory_map(str(Path(cache_dir) / name), "r") as source:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    for column, field in zip(batch.columns, batch.schema):
                        sizes[field.name] = sizes.get(field.name, 0) + column.nbytes
    return sizes


def cache_bytes(groups: list[str], cache_dirs: list[str], logits: str = "hidden") -> dict[str, int]:
    """{group: the cache bytes its trials need}: the rows, plus its teacher signals."""
    from distill_core.teacher_cache import SIGNAL_COLUMNS

    sizes = column_bytes(cache_dirs)
    rows = sum(v for k, v in sizes.items() if k not in SIGNAL_COLUMNS + ("attn_queries",))
    return {g: rows + sum(sizes.get(c, 0) for c in signal_columns(g, logits)) for g in groups}
