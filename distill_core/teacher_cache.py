"""The offline teacher cache: the teacher's signals on every training row, aligned to the
student's tokens, built once with Ray Data and read by every student trial.

Each row is tokenized by both models and aligned into chunks (distill_core.alignment): the
smallest spans of text both tokenizations cut at the same place. One Parquet row per example:
  id, task, input_ids (the student's, int32 list), answer_mask (int8 list), n_tokens,
  teacher_n_tokens, student_chunk_ends / teacher_chunk_ends (int32 lists: the last token of
      every chunk on each side; with one tokenizer both are 0..n-1);
  hidden: the teacher's final-layer hidden state at each chunk's last token, bf16 [C, D]. HF
      takes the last hidden state after the final norm, so the teacher's exact logits there are
      lm_head(hidden): the logit signal, exact over the full vocabulary, at D instead of V
      numbers a chunk;
  topk_ids (int32 list) / topk_logprobs (bf16 [C, k]): with cache.logits = topk only, the
      teacher's k most likely next tokens at each chunk end (a signal that needs no lm_head);
  attn_queries (int32 list: chunk indices) and attention: the teacher's final-layer attention
      from the last token of each kept chunk, summed over the tokens of every key chunk,
      bf16 [H, Q, C]: rows are distributions over chunks (all chunks, or those predicting an
      answer chunk), so storage is bounded by chunks, not by T x T.

The cache is written to a temporary sibling directory and renamed into place with a manifest
once complete (storage.atomic_directory); a directory without its manifest is never read.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from distill_core.alignment import AlignedExample, align_encoded
from distill_core.encoding import encode_examples
from distill_core.final_layer_attention import capture_final_attention
from distill_core.storage import atomic_directory

MANIFEST = "manifest.json"
VOCABULARY_MAP = "vocabulary_map.safetensors"
CACHE_SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("answer_mask", pa.list_(pa.int8())),
    ("n_tokens", pa.int32()), ("teacher_n_tokens", pa.int32()),
    ("student_chunk_ends", pa.list_(pa.int32())), ("teacher_chunk_ends", pa.list_(pa.int32())),
    ("hidden", pa.binary()), ("topk_ids", pa.list_(pa.int32())), ("topk_logprobs", pa.binary()),
    ("attn_queries", pa.list_(pa.int32())), ("attention", pa.binary()),
])
CACHE_FORMAT = 3  # 3: an Arrow IPC copy of every shard, for trials to memory-map
SIGNAL_COLUMNS = ("hidden", "topk_ids", "topk_logprobs", "attention")  # what the teacher adds


def bf16_tensor(data: bytes) -> torch.Tensor:
    """The flat bf16 tensor a signal column holds (copied: the tensor owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.bfloat16) if data else torch.zeros(
        0, dtype=torch.bfloat16)


def from_bf16_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return bf16_tensor(data).view(*shape).float()


def training_contexts(rows: pd.DataFrame) -> pd.DataFrame:
    """id, task, context and answer of every training row. Training is zero-shot, as an LM's
    fine-tuning data is; shots are an evaluation protocol (see evaluation.evaluate_task). The
    description (MMLU's subject line) is part of the context, as it is at evaluation."""
    description = rows["description"].fillna("") if "description" in rows else ""
    return pd.DataFrame({"id": rows["id"], "task": rows["task"],
                         "context": description + rows["prompt"], "answer": rows["answer"]})


def query_chunks(example: AlignedExample, which: str) -> list[int]:
    """Chunks whose last token's next-token prediction the distillation looks at: every chunk
    but the last (EOS), or those followed by a chunk holding answer tokens."""
    n = len(example)
    if which == "all":
        return list(range(n - 1))
    has_answer = example.chunk_has_answer
    return [c for c in range(n - 1) if has_answer[c + 1]]


def align_rows(contexts: pd.DataFrame, student_tokenizer, teacher_tokenizer,
               max_length: int) -> list[AlignedExample]:
    """Both tokenizations of every (context, answer) row, aligned."""
    ids = list(contexts["id"])
    student = encode_examples(student_tokenizer, contexts["context"], contexts["answer"],
                              max_length, [f"{i} (student tokens)" for i in ids])
    teacher = (student if teacher_tokenizer is student_tokenizer else
               encode_examples(teacher_tokenizer, contexts["context"], contexts["answer"],
                               max_length, [f"{i} (teacher tokens)" for i in ids]))
    return [align_encoded(s, t) for s, t in zip(student, teacher)]


ALIGNED_SCHEMA = pa.schema([f for f in CACHE_SCHEMA if f.name not in SIGNAL_COLUMNS]
                           + [("teacher_ids", pa.list_(pa.int32()))])


def aligned_rows(contexts: pd.DataFrame, student_tokenizer, teacher_tokenizer, max_length: int,
                 attention_queries: str) -> pa.Table:
    """The cache's rows before the teacher has run: both tokenizations aligned, the attention
    query chunks chosen, and the teacher's token ids to run it on (ALIGNED_SCHEMA). Computed
    once, on the driver: the size estimate and the budget check read it before any teacher
    compute, and the teacher's actors then only run the model."""
    examples = align_rows(contexts, student_tokenizer, teacher_tokenizer, max_length)
    return pa.Table.from_pydict({
        "id": [str(i) for i in contexts["id"]], "task": [str(t) for t in contexts["task"]],
        "input_ids": [e.student_ids for e in examples],
        "answer_mask": [e.answer_mask for e in examples],
        "n_tokens": [len(e.student_ids) for e in examples],
        "teacher_n_tokens": [len(e.teacher_ids) for e in examples],
        "student_chunk_ends": [e.student_chunk_ends for e in examples],
        "teacher_chunk_ends": [e.teacher_chunk_ends for e in examples],
        "attn_queries": [query_chunks(e, attention_queries) for e in examples],
        "teacher_ids": [e.teacher_ids for e in examples],
    }, schema=ALIGNED_SCHEMA)


def ragged_column(column: pa.ChunkedArray | pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """A list<int32> column as (flat values, per-row lengths), int64 tensors."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return torch.from_numpy(values), torch.from_numpy(lengths)


def _binary_rows(flat: torch.Tensor, lengths: torch.Tensor) -> pa.Array:
    """Consecutive runs of `flat` (lengths[i] elements for row i) as one bf16 binary value a
    row, built without a Python loop over the values."""
    data = flat.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths.numpy() * 2, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(lengths),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


class TeacherSignals:
    """Ray Data callable class: loads the teacher once per actor (on the GPU Ray gave it, if
    any, in the preset's precision), then maps batches of aligned rows (ALIGNED_SCHEMA, as
    Arrow) to cache rows (CACHE_SCHEMA). A batch runs in forwards of at most `batch_tokens`
    padded teacher tokens (rows of like length together); each forward's rows are gathered at
    once (no loop over tokens): at tiny scale the bookkeeping around the forward pass is what
    separates the cache build from a bare forward."""

    def __init__(self, teacher_dir: str, logits: str = "hidden", top_k: int = 32,
                 threads: int = 1, precision: str = "fp32", batch_tokens: int | None = None):
        from distill_core.device import frozen_dtype, prepare, worker_device
        from distill_core.models import load_causal_lm

        self.device = worker_device()
        prepare(self.device, threads)
        self._use(load_causal_lm(teacher_dir, dtype=frozen_dtype(precision), device=self.device),
                  logits, top_k, batch_tokens)

    @classmethod
    def around(cls, teacher, logits: str = "hidden", top_k: int = 32,
               batch_tokens: int | None = None) -> "TeacherSignals":
        """Around a teacher already loaded (on its device, in its dtype), as bench/gpu.py
        measures the actors' work without writing and reading an 8B model first."""
        signals = cls.__new__(cls)
        signals.device = teacher.device
        signals._use(teacher.eval(), logits, top_k, batch_tokens)
        return signals

    def _use(self, teacher, logits: str, top_k: int, batch_tokens: int | None) -> None:
        self.teacher = teacher
        self.pad_id = teacher.config.pad_token_id or 0
        self.top_k = min(top_k, teacher.config.vocab_size) if logits == "topk" else 0
        self.batch_tokens = batch_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distill_core.batching import token_batches

        lengths = pc.list_value_length(batch["teacher_ids"]).to_pylist()
        parts = token_batches(lengths, len(lengths), self.batch_tokens)
        if len(parts) <= 1:
            return self.signals(batch)
        out = pa.concat_tables([self.signals(batch.take(part)) for part in parts])
        return out.take(np.argsort(np.concatenate(parts), kind="stable"))  # the batch's order

    @torch.inference_mode()
    def signals(self, batch: pa.Table) -> pa.Table:
        """Cache rows of aligned rows, in one teacher forward."""
        dev = self.device
        token_ids, n_tokens = ragged_column(batch["teacher_ids"])
        ends, n_chunks = ragged_column(batch["teacher_chunk_ends"])
        queries, n_queries = ragged_column(batch["attn_queries"])
        b, t = len(n_tokens), int(n_tokens.max())
        rows = torch.arange(b)
        real = torch.arange(t)[None, :] < n_tokens[:, None]
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        ids[real] = token_ids
        chunk_row = rows.repeat_interleave(n_chunks)
        chunk_start = torch.cumsum(n_chunks, 0) - n_chunks
        # Query slots [B, Q]: the last token of every kept chunk (-1 pads the slots).
        query_row = rows.repeat_interleave(n_queries)
        query_start = torch.cumsum(n_queries, 0) - n_queries
        query_slot = torch.arange(len(queries)) - query_start[query_row]
        query_pos = torch.full((b, max(1, int(n_queries.max()))), -1, dtype=torch.long)
        query_pos[query_row, query_slot] = ends[chunk_start[query_row] + queries]
        mask = real.long().to(dev)
        with capture_final_attention(self.teacher, mask, query_pos.to(dev)) as captured:
            hidden = self.teacher.model(input_ids=ids.to(dev), attention_mask=mask,
                                        use_cache=False).last_hidden_state
        at_ends = hidden[chunk_row.to(dev), ends.to(dev)]                        # [sum C, D]
        if not bool(torch.isfinite(at_ends).all()):  # a broken teacher must not be cached
            bad = sorted({str(batch["id"][int(r)]) for r in chunk_row[~torch.isfinite(at_ends).all(-1).cpu()]})
            raise ValueError(f"teacher {self.teacher.name_or_path}: non-finite hidden states on rows {bad[:5]}")
        # Token -> chunk on the teacher's side: a chunk starts after each chunk end (padding
        # falls in a chunk past the row's last, dropped below).
        starts = torch.zeros(b, t + 1, dtype=torch.long)
        starts[chunk_row, ends + 1] = 1
        token_chunk = torch.cumsum(starts[:, :t], 1).to(dev)                     # [B, T]
        query_row_dev = query_row.to(dev)
        probs = captured["probs"][query_row_dev, :, query_slot.to(dev)]          # [N, H, T]
        heads = probs.shape[1]
        per_chunk = torch.zeros(len(queries), heads, int(n_chunks.max()) + 1, device=dev)
        per_chunk.scatter_add_(2, token_chunk[query_row_dev][:, None, :].expand_as(probs), probs)
        attention = torch.cat([  # each row's [H, Q, C], flattened
            per_chunk[s:s + q, :, :c].transpose(0, 1).reshape(-1)
            for s, q, c in zip(query_start.tolist(), n_queries.tolist(), n_chunks.tolist())]) \
            if len(queries) else torch.zeros(0)
        d = at_ends.shape[-1]
        columns = {name: batch[name] for name in ALIGNED_SCHEMA.names if name != "teacher_ids"}
        columns["hidden"] = _binary_rows(at_ends.reshape(-1), n_chunks * d)
        columns["attention"] = _binary_rows(attention, heads * n_queries * n_chunks)
        if self.top_k:
            logprobs = torch.log_softmax(self.teacher.lm_head(at_ends).float(), -1)
            top = logprobs.topk(self.top_k, dim=-1)
            offsets = pa.array(np.concatenate([[0], np.cumsum(n_chunks.numpy() * self.top_k)]),
                               pa.int32())
            columns["topk_ids"] = pa.ListArray.from_arrays(
                offsets, pa.array(top.indices.flatten().int().cpu().numpy()))
            columns["topk_logprobs"] = _binary_rows(top.values.flatten(), n_chunks * self.top_k)
        else:
            columns["topk_ids"] = pa.array([[]] * b, pa.list_(pa.int32()))
            columns["topk_logprobs"] = pa.array([b""] * b, pa.binary())
        # An explicit Arrow schema: plain lists and binary, readable by any Parquet reader
        # (numpy columns would become Ray's tensor extension type).
        return pa.Table.from_arrays([columns[n] for n in CACHE_SCHEMA.names], schema=CACHE_SCHEMA)


def cache_key(**identity) -> str:
    """Short hash of everything that determines a cache's content (teacher, tokenizer, data,
    settings): a change of any of them is a different cache."""
    blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_teacher_cache(aligned: pa.Table, out_dir: Path, *, teacher_dir: str,
                        student_tokenizer_dir: str, batch_size: int, actors: int,
                        num_gpus_per_actor: float, identity: dict, logits: str = "hidden",
                        top_k: int = 32, estimate: dict | None = None, precision: str = "fp32",
                        batch_tokens: int | None = None) -> dict:
    """Run the teacher over `aligned` (aligned_rows' table) with Ray Data and write the cache
    to `out_dir`. Returns the manifest. An existing complete cache is reused, not rebuilt. The
    vocabulary map from the teacher's tokens to the student's (for L_KD across vocabularies)
    is saved beside the shards, and every shard has an Arrow IPC copy (see arrow_copy)."""
    import ray
    from safetensors.torch import save_file

    from distill_core.cross_vocab import vocabulary_map
    from distill_core.models import load_tokenizer

    out_dir = Path(out_dir)
    if (existing := complete_manifest(out_dir)) is not None:
        return existing
    if aligned.schema.names != ALIGNED_SCHEMA.names:
        raise ValueError(f"teacher cache {out_dir}: rows have columns {aligned.schema.names}, "
                         f"not aligned_rows' {ALIGNED_SCHEMA.names}")
    mapping = vocabulary_map(load_tokenizer(teacher_dir), load_tokenizer(student_tokenizer_dir))
    # Several blocks, so that every actor of the pool gets work (one table = one block).
    n_blocks = max(actors, math.ceil(len(aligned) / (16 * batch_size)))
    step = math.ceil(len(aligned) / n_blocks)
    blocks = [aligned.slice(i, step) for i in range(0, len(aligned), step)]
    ds = ray.data.from_arrow(blocks).map_batches(
        TeacherSignals, fn_constructor_kwargs=dict(teacher_dir=teacher_dir, logits=logits, top_k=top_k,
                                                   precision=precision, batch_tokens=batch_tokens),
        batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=num_gpus_per_actor,
    )
    with atomic_directory(out_dir) as tmp:  # readers see a complete cache or none
        ds.write_parquet(str(tmp))
        files = sorted(tmp.glob("*.parquet"))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if rows != len(aligned):
            raise RuntimeError(f"teacher cache {out_dir}: wrote {rows} rows for {len(aligned)} inputs")
        # The IPC copies shard by shard, as Ray tasks: in parallel over the cluster's CPUs.
        arrow_files = ray.get([ray.remote(num_cpus=1)(arrow_copy).remote(f) for f in files])
        save_file({"teacher_to_student": mapping}, str(tmp / VOCABULARY_MAP))
        manifest = {"format": CACHE_FORMAT, "rows": rows, "files": [f.name for f in files],
                    "bytes": sum(f.stat().st_size for f in files),
                    "arrow_files": [f.name for f in arrow_files],
                    "arrow_bytes": sum(f.stat().st_size for f in arrow_files),
                    # The rows written are `aligned`'s (counted above): no second read.
                    "tokens": int(pc.sum(aligned["n_tokens"]).as_py() or 0),
                    "teacher_tokens": int(pc.sum(aligned["teacher_n_tokens"]).as_py() or 0),
                    "chunks": int(pc.sum(pc.list_value_length(aligned["student_chunk_ends"])).as_py() or 0),
                    "vocabulary_map_coverage": round(float((mapping >= 0).float().mean()), 4),
                    "estimate": estimate, "identity": identity}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def write_cache(out_dir: Path, shards: dict[str, pa.Table], mapping: torch.Tensor, **manifest) -> dict:
    """Signal tables (TeacherSignals' output) written as a complete cache without Ray: one
    Parquet shard a table (named by its key), its Arrow IPC copy, the vocabulary map and the
    manifest (`manifest` adds to it), moved into place whole. For tools that run the teacher
    themselves (bench/); the graph's caches come from build_teacher_cache."""
    from safetensors.torch import save_file

    with atomic_directory(Path(out_dir)) as tmp:
        files = []
        for name, table in shards.items():
            files.append(tmp / f"{name}.parquet")
            pq.write_table(table.select(CACHE_SCHEMA.names), files[-1])
        arrow_files = [arrow_copy(f) for f in files]
        save_file({"teacher_to_student": mapping}, str(tmp / VOCABULARY_MAP))
        manifest = {"format": CACHE_FORMAT, "rows": sum(len(t) for t in shards.values()),
                    "files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
                    "arrow_files": [f.name for f in arrow_files],
                    "arrow_bytes": sum(f.stat().st_size for f in arrow_files), **manifest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def arrow_copy(shard: Path, rows_per_batch: int = 256) -> Path:
    """The Parquet shard's rows as an uncompressed Arrow IPC file beside it, written a few
    hundred rows at a time. Trials memory-map these (distill_core.cache_reader): Parquet pages
    must be decoded into each reader's own memory, IPC buffers are read in place."""
    out = shard.with_suffix(".arrow")
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, CACHE_SCHEMA) as writer:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=rows_per_batch):
            writer.write_batch(batch)
    return out


def read_vocabulary_map(cache_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(cache_dir) / VOCABULARY_MAP))["teacher_to_student"]


def complete_manifest(cache_dir: Path) -> dict | None:
    """The manifest of a complete cache at `cache_dir`, or None: callers check it before they
    align the rows, which a complete cache does not need."""
    return read_manifest(cache_dir) if (Path(cache_dir) / MANIFEST).exists() else None


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{cache_dir}: not a complete teacher cache (no {MANIFEST})")
    return json.loads(path.read_text())


def read_teacher_cache(cache_dir: Path) -> pd.DataFrame:
    """All rows of a complete cache, sorted by id (a stable order for seeded shuffling)."""
    manifest = read_manifest(cache_dir)
    table = pd.concat([pq.read_table(Path(cache_dir) / f).to_pandas() for f in manifest["files"]])
    return table.sort_values("id", kind="stable").reset_index(drop=True)


STRUCTURE_COLUMNS = ["id", "n_tokens", "teacher_n_tokens", "student_chunk_ends",
                     "teacher_chunk_ends", "attn_queries"]


def _read_shard(path: Path, sample_rows: int) -> tuple[pa.Schema, int, dict, dict]:
    """(schema, rows, the structure columns whole, the signals of the first `sample_rows`
    rows) of a Parquet shard or of its Arrow IPC copy (memory-mapped)."""
    signals = ["hidden", "attention"]
    if path.suffix == ".arrow":
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        if not table.schema.equals(CACHE_SCHEMA):
            return table.schema, len(table), {}, {}
        return (table.schema, len(table), table.select(STRUCTURE_COLUMNS).to_pydict(),
                table.slice(0, sample_rows).select(signals).to_pydict())
    file = pq.ParquetFile(path)
    if not file.schema_arrow.equals(CACHE_SCHEMA):
        return file.schema_arrow, file.metadata.num_rows, {}, {}
    sample = next(file.iter_batches(batch_size=sample_rows, columns=signals), None)
    return (file.schema_arrow, file.metadata.num_rows, file.read(columns=STRUCTURE_COLUMNS).to_pydict(),
            sample.to_pydict() if sample is not None else {"hidden": [], "attention": []})


def cache_problems(cache_dir: Path, expected_rows: int, d_teacher: int, heads: int,
                   sample_rows: int = 512) -> list[str]:
    """What is wrong with a complete cache (empty when nothing): for the Parquet shards and
    their Arrow IPC copies (what trials read) alike, the schema, the row count against the
    input, every row's alignment covering both token sequences, and on the first
    `sample_rows` rows of each file signal sizes that match the chunks and finite signals
    (the actors refuse non-finite teacher outputs; this re-reads what was written). Only the
    small columns are read whole: the signals are nearly all of a cache's bytes."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    problems = []
    for kind in ("files", "arrow_files"):
        rows = 0
        for name in manifest.get(kind, []):
            schema, n, table, sample = _read_shard(cache_dir / name, sample_rows)
            if not schema.equals(CACHE_SCHEMA):
                problems.append(f"{name}: schema {schema} is not CACHE_SCHEMA")
                continue
            rows += n
            for i, rid in enumerate(table["id"]):
                s_ends, t_ends = table["student_chunk_ends"][i], table["teacher_chunk_ends"][i]
                c, q = len(s_ends), len(table["attn_queries"][i])
                if len(t_ends) != c or s_ends[-1] != table["n_tokens"][i] - 1 \
                        or t_ends[-1] != table["teacher_n_tokens"][i] - 1:
                    problems.append(f"{name} row {rid}: chunks do not cover both token sequences")
                elif i < len(sample["hidden"]):
                    hidden, attention = sample["hidden"][i], sample["attention"][i]
                    if len(hidden) != 2 * c * d_teacher or len(attention) != 2 * heads * q * c:
                        problems.append(f"{name} row {rid}: signal sizes do not match {c} chunks")
                    elif not (bool(torch.isfinite(bf16_tensor(hidden)).all())
                              and bool(torch.isfinite(bf16_tensor(attention)).all())):
                        problems.append(f"{name} row {rid}: non-finite teacher signals")
                if len(problems) >= 20:
                    return problems + ["(stopped after 20)"]
        if rows != expected_rows:
            problems.append(f"{kind}: {rows} rows for {expected_rows} inputs")
    return problems
