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
import pyarrow.parquet as pq
import torch

from distill_core.alignment import AlignedExample, align_encoded, chunk_of_token
from distill_core.encoding import encode_example, pad_batch
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
CACHE_FORMAT = 2


def to_bf16_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def bf16_tensor(data: bytes) -> torch.Tensor:
    """The flat bf16 tensor `to_bf16_bytes` wrote (copied: the tensor owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.bfloat16) if data else torch.zeros(
        0, dtype=torch.bfloat16)


def from_bf16_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return bf16_tensor(data).view(*shape).float()


def training_contexts(rows: pd.DataFrame) -> pd.DataFrame:
    """id, task, context and answer of every training row. Training is zero-shot, as an LM's
    fine-tuning data is; shots are an evaluation protocol (see evaluation.evaluate_task)."""
    return pd.DataFrame({"id": rows["id"], "task": rows["task"], "context": rows["prompt"],
                         "answer": rows["answer"]})


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
    out = []
    for c, a, i in zip(contexts["context"], contexts["answer"], contexts["id"]):
        student = encode_example(student_tokenizer, c, a, max_length, f"{i} (student tokens)")
        teacher = (student if teacher_tokenizer is student_tokenizer else
                   encode_example(teacher_tokenizer, c, a, max_length, f"{i} (teacher tokens)"))
        out.append(align_encoded(student, teacher))
    return out


class TeacherSignals:
    """Ray Data callable class: loads the teacher and both tokenizers once per actor, then maps
    batches of (id, task, context, answer) to cache rows."""

    def __init__(self, teacher_dir: str, student_tokenizer_dir: str, max_length: int,
                 attention_queries: str, logits: str = "hidden", top_k: int = 32,
                 threads: int = 1):
        from distill_core.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = load_causal_lm(teacher_dir).to(self.device)
        self.teacher_tokenizer = load_tokenizer(teacher_dir)
        self.student_tokenizer = load_tokenizer(student_tokenizer_dir)
        if self.student_tokenizer.get_vocab() == self.teacher_tokenizer.get_vocab():
            self.student_tokenizer = self.teacher_tokenizer  # one tokenizer: encode once
        self.max_length = max_length
        self.attention_queries = attention_queries
        self.top_k = top_k if logits == "topk" else 0

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        examples = align_rows(batch, self.student_tokenizer, self.teacher_tokenizer, self.max_length)
        ids, mask = pad_batch([e.teacher_ids for e in examples], self.teacher_tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with capture_final_attention(self.teacher, mask) as captured:
            hidden = self.teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        probs = captured["probs"]
        out: dict[str, list] = {k: [] for k in CACHE_SCHEMA.names}
        for i, e in enumerate(examples):
            n_t, ends = len(e.teacher_ids), torch.tensor(e.teacher_chunk_ends, device=self.device)
            queries = query_chunks(e, self.attention_queries)
            member = torch.zeros(n_t, len(e), device=self.device)
            member[torch.arange(n_t), torch.tensor(chunk_of_token(e.teacher_chunk_ends))] = 1.0
            attention = probs[i][:, ends[queries], :n_t] @ member  # [H, Q, C]
            at_ends = hidden[i, ends]
            out["id"].append(str(batch["id"][i]))
            out["task"].append(str(batch["task"][i]))
            out["input_ids"].append(e.student_ids)
            out["answer_mask"].append(e.answer_mask)
            out["n_tokens"].append(len(e.student_ids))
            out["teacher_n_tokens"].append(n_t)
            out["student_chunk_ends"].append(e.student_chunk_ends)
            out["teacher_chunk_ends"].append(e.teacher_chunk_ends)
            out["hidden"].append(to_bf16_bytes(at_ends.cpu()))
            if self.top_k:
                logprobs = torch.log_softmax(self.teacher.lm_head(at_ends).float(), -1)
                top = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
                out["topk_ids"].append(top.indices.flatten().int().tolist())
                out["topk_logprobs"].append(to_bf16_bytes(top.values.cpu()))
            else:
                out["topk_ids"].append([])
                out["topk_logprobs"].append(b"")
            out["attn_queries"].append(queries)
            out["attention"].append(to_bf16_bytes(attention.cpu()))
        # An explicit Arrow schema: plain lists and binary, readable by any Parquet reader
        # (numpy columns would become Ray's tensor extension type).
        return pa.Table.from_pydict(out, schema=CACHE_SCHEMA)


def cache_key(**identity) -> str:
    """Short hash of everything that determines a cache's content (teacher, tokenizer, data,
    settings): a change of any of them is a different cache."""
    blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_teacher_cache(contexts: pd.DataFrame, out_dir: Path, *, teacher_dir: str,
                        student_tokenizer_dir: str, max_length: int, attention_queries: str,
                        batch_size: int, actors: int, num_gpus_per_actor: float,
                        identity: dict, logits: str = "hidden", top_k: int = 32,
                        estimate: dict | None = None) -> dict:
    """Run the teacher over `contexts` with Ray Data and write the cache to `out_dir`.
    Returns the manifest. An existing complete cache is reused, not rebuilt. The vocabulary
    map from the teacher's tokens to the student's (for L_KD across vocabularies) is saved
    beside the shards."""
    import ray
    from safetensors.torch import save_file

    from distill_core.cross_vocab import vocabulary_map
    from distill_core.models import load_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        return read_manifest(out_dir)
    mapping = vocabulary_map(load_tokenizer(teacher_dir), load_tokenizer(student_tokenizer_dir))
    # Several blocks, so that every actor of the pool gets work (one DataFrame = one block).
    n_blocks = max(actors, math.ceil(len(contexts) / (4 * batch_size)))
    blocks = [contexts.iloc[i::n_blocks] for i in range(n_blocks)]
    ds = ray.data.from_pandas([b for b in blocks if len(b)]).map_batches(
        TeacherSignals,
        fn_constructor_kwargs=dict(teacher_dir=teacher_dir, student_tokenizer_dir=student_tokenizer_dir,
                                   max_length=max_length, attention_queries=attention_queries,
                                   logits=logits, top_k=top_k),
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=num_gpus_per_actor,
    )
    with atomic_directory(out_dir) as tmp:  # readers see a complete cache or none
        ds.write_parquet(str(tmp))
        files = sorted(tmp.glob("*.parquet"))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if rows != len(contexts):
            raise RuntimeError(f"teacher cache {out_dir}: wrote {rows} rows for {len(contexts)} inputs")
        save_file({"teacher_to_student": mapping}, str(tmp / VOCABULARY_MAP))
        manifest = {"format": CACHE_FORMAT, "rows": rows, "files": [f.name for f in files],
                    "bytes": sum(f.stat().st_size for f in files),
                    "tokens": int(_column_sum(files, "n_tokens")),
                    "teacher_tokens": int(_column_sum(files, "teacher_n_tokens")),
                    "chunks": int(_list_lengths(files, "student_chunk_ends")),
                    "vocabulary_map_coverage": round(float((mapping >= 0).float().mean()), 4),
                    "estimate": estimate, "identity": identity}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _list_lengths(files: list[Path], column: str) -> int:
    import pyarrow.compute as pc

    return sum(int(pc.sum(pc.list_value_length(pq.read_table(f, columns=[column]).column(0))).as_py() or 0)
               for f in files)


def read_vocabulary_map(cache_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(cache_dir) / VOCABULARY_MAP))["teacher_to_student"]


def _column_sum(files: list[Path], column: str) -> int:
    return sum(int(pq.read_table(f, columns=[column]).column(0).to_numpy().sum()) for f in files)


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
