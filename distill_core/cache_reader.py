"""A trial's view of the teacher cache: rows read on demand from memory-mapped Arrow IPC files,
never the whole cache in the trial's own memory.

Beside every Parquet shard the cache build writes the same rows as an uncompressed Arrow IPC
file (teacher_cache.build_teacher_cache). A trial maps those files: a page is read from storage
when a batch first needs it and then stays in the OS page cache, one copy for every trial on
the node; the trial's own memory holds the rows of the batches in flight. A batch copies its
rows out of the map and decodes them into padded tensors (objective.Batch), all rows at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from distill_core.objective import Batch
from distill_core.teacher_cache import CACHE_SCHEMA, ragged_column, read_manifest


def open_mapped(cache_dir: Path) -> list[pa.RecordBatch]:
    """The record batches of a complete cache's Arrow IPC files, memory-mapped (nothing read)."""
    manifest = read_manifest(cache_dir)
    if "arrow_files" not in manifest:
        raise FileNotFoundError(f"{cache_dir}: a cache without Arrow IPC files (format "
                                f"{manifest.get('format')}); materialize teacher_cache again")
    batches = []
    for name in manifest["arrow_files"]:
        reader = pa.ipc.open_file(pa.memory_map(str(Path(cache_dir) / name), "r"))
        batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
    return batches


def _bf16_values(column: pa.ChunkedArray) -> tuple[torch.Tensor, np.ndarray]:
    """A binary column of bf16 signals: every row's values one after another (a flat bf16
    tensor that owns its memory) and each row's number of values."""
    array = column.combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
    data = array.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]] if data is not None else \
        np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(raw.copy()).view(torch.bfloat16), np.diff(offsets) // 2


class TeacherCacheReader:
    """The rows of one or more complete teacher caches (the tasks' partitions), in a fixed
    order: the caches in the order given, each cache's rows by id (what step s's batch holds
    must not depend on how Ray Data sharded a cache).

    `signal_dtype`: the dtype the teacher's signals are handed over in (bf16, as cached, for a
    bf16 trial; float32 for fp32). `labelled_rows` ({task: n}, None: every row): the rows whose
    answers L_task learns, each task's first n in this order (ids are content hashes, so a
    fixed sample of the rows); on the others only the teacher's signals are learned."""

    def __init__(self, cache_dirs: list[str], distill_positions: str, pad_id: int,
                 d_teacher: int, teacher_heads: int, signal_dtype: torch.dtype = torch.float32,
                 labelled_rows: dict[str, int] | None = None):
        if distill_positions not in ("all", "answer"):
            raise ValueError(f"unknown distill_positions {distill_positions!r}; use all or answer")
        # Rows are addressed as (record batch, offset): a take on the whole (chunked) table
        # would first concatenate every column, i.e. copy the cache, for each batch.
        self._chunks: list[pa.RecordBatch] = []
        ids, tasks, order = [], [], []
        for cache_dir in cache_dirs:
            chunks = open_mapped(Path(cache_dir))
            cache_ids = [i for c in chunks for i in c.column("id").to_pylist()]
            order += sorted(range(len(ids), len(ids) + len(cache_ids)), key=lambda r: cache_ids[r - len(ids)])
            ids += cache_ids
            tasks += [t for c in chunks for t in c.column("task").to_pylist()]
            self._chunks += chunks
        self._starts = np.cumsum([0] + [c.num_rows for c in self._chunks])
        self._rows = np.asarray(order, dtype=np.int64)
        self.ids: list[str] = [ids[r] for r in order]
        self.tasks: list[str] = [tasks[r] for r in order]
        self.distill_positions, self.pad_id = distill_positions, pad_id
        self.d_teacher, self.heads, self.signal_dtype = d_teacher, teacher_heads, signal_dtype
        first = self._chunks[0].slice(0, 1).to_pydict() if ids else None
        self.top_k = (len(first["topk_ids"][0]) // len(first["student_chunk_ends"][0])) if first else 0
        self.labelled = np.ones(len(self.ids), dtype=bool)
        if labelled_rows is not None:
            seen: dict[str, int] = {}
            for i, task in enumerate(self.tasks):
                self.labelled[i] = seen.get(task, 0) < labelled_rows.get(task, 0)
                seen[task] = seen.get(task, 0) + 1
        self.all_labelled = bool(self.labelled.all())

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, indices: list[int]) -> pa.Table:
        """The rows at `indices` (in this reader's order), as zero-copy slices of the map."""
        positions = self._rows[np.asarray(indices, dtype=np.int64)]
        chunk = np.searchsorted(self._starts, positions, side="right") - 1
        return pa.Table.from_batches([self._chunks[c].slice(int(p - self._starts[c]), 1)
                                      for c, p in zip(chunk, positions)], schema=CACHE_SCHEMA)

    def batch(self, indices: list[int]) -> Batch:
        rows = self.rows(indices)
        b = len(indices)
        ids_flat, n_tokens = ragged_column(rows["input_ids"])
        ends_flat, n_chunks = ragged_column(rows["student_chunk_ends"])
        queries_flat, n_queries = ragged_column(rows["attn_queries"])
        t, c = int(n_tokens.max()), int(n_chunks.max())
        real = torch.arange(t)[None, :] < n_tokens[:, None]                  # [B, T]
        chunk_real = torch.arange(c)[None, :] < n_chunks[:, None]            # [B, C]
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        ids[real] = ids_flat
        answer = torch.zeros(b, t, dtype=torch.long)
        answer[real] = ragged_column(rows["answer_mask"])[0]
        ends = torch.zeros(b, c, dtype=torch.long)
        ends[chunk_real] = ends_flat
        # Token -> chunk: a chunk starts after each chunk end (-1 on padding).
        starts = torch.zeros(b, t + 1, dtype=torch.long)
        starts[torch.arange(b).repeat_interleave(n_chunks), ends_flat + 1] = 1
        token_chunk = torch.cumsum(starts[:, :t], 1).masked_fill(~real, -1)
        distill = self._distilled_chunks(answer, token_chunk, n_chunks, c)
        q_max = max(1, int(n_queries.max()))
        queries = torch.full((b, q_max), -1, dtype=torch.long)
        queries[torch.arange(q_max)[None, :] < n_queries[:, None]] = queries_flat
        hidden = torch.zeros(b, c, self.d_teacher, dtype=self.signal_dtype)
        hidden[chunk_real] = _bf16_values(rows["hidden"])[0].view(-1, self.d_teacher).to(self.signal_dtype)
        attention = torch.zeros(b, self.heads, q_max, c, dtype=self.signal_dtype)
        values, sizes = _bf16_values(rows["attention"])
        start = 0
        for i, (q, m, size) in enumerate(zip(n_queries.tolist(), n_chunks.tolist(), sizes.tolist())):
            attention[i, :, :q, :m] = values[start:start + size].view(self.heads, q, m)
            start += size
        topk_ids = topk_logprobs = None
        if k := self.top_k:
            topk_ids = torch.zeros(b, c, k, dtype=torch.long)
            topk_ids[chunk_real] = ragged_column(rows["topk_ids"])[0].view(-1, k)
            topk_logprobs = torch.zeros(b, c, k, dtype=self.signal_dtype)
            topk_logprobs[chunk_real] = _bf16_values(rows["topk_logprobs"])[0].view(-1, k).to(self.signal_dtype)
        task_mask = torch.zeros_like(answer)
        task_mask[:, :-1] = answer[:, 1:]
        if not self.all_labelled:
            task_mask[torch.from_numpy(~self.labelled[np.asarray(indices, dtype=np.int64)])] = 0
        chunks_are_tokens = c == t and bool(((token_chunk == torch.arange(t)) | ~real).all())
        return Batch(ids, real.long(), task_mask, ends, distill, token_chunk, hidden, attention,
                     queries, topk_ids, topk_logprobs, chunks_are_tokens)

    def _distilled_chunks(self, answer, token_chunk, n_chunks, c) -> torch.Tensor:
        """[B, C]: the chunks whose prediction L_KD / L_align_hidden use: every chunk but a
        row's last, or (`answer`) those followed by a chunk holding answer tokens."""
        before_last = torch.arange(c)[None, :] < (n_chunks - 1)[:, None]
        if self.distill_positions == "all":
            return before_last.long()
        has_answer = torch.zeros(answer.shape[0], c + 1, dtype=torch.long)
        has_answer.scatter_add_(1, token_chunk.clamp_min(0), answer * (token_chunk >= 0))
        return (before_last & (has_answer[:, 1:] > 0)).long()
