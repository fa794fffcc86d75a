"""The offline teacher cache: the teacher's signals on every training row, built once with Ray
Data and read by every student trial.

One Parquet row per training example:
  id, task, input_ids (int32 list), answer_mask (int8 list), n_tokens,
  hidden: the teacher's final-layer hidden state at every position, bf16 bytes [T, D]. HF takes
      the last hidden state after the final norm, so the teacher's exact logits are
      lm_head(hidden): this is the logit signal too, exact over the full vocabulary, without
      storing V floats a token;
  attn_queries (int32 list) and attention: final-layer attention probabilities of those query
      positions, bf16 bytes [H, Q, T] (all positions, or only those predicting answer tokens).

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

from distill_core.encoding import encode_example, pad_batch
from distill_core.final_layer_attention import capture_final_attention
from distill_core.storage import atomic_directory

MANIFEST = "manifest.json"
CACHE_SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("answer_mask", pa.list_(pa.int8())),
    ("n_tokens", pa.int32()), ("hidden", pa.binary()),
    ("attn_queries", pa.list_(pa.int32())), ("attention", pa.binary()),
])
CACHE_FORMAT = 1


def to_bf16_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def bf16_tensor(data: bytes) -> torch.Tensor:
    """The flat bf16 tensor `to_bf16_bytes` wrote (copied: the tensor owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.bfloat16)


def from_bf16_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return bf16_tensor(data).view(*shape).float()


def training_contexts(rows: pd.DataFrame) -> pd.DataFrame:
    """id, task, context and answer of every training row. Training is zero-shot, as an LM's
    fine-tuning data is; shots are an evaluation protocol (see evaluation.evaluate_task)."""
    return pd.DataFrame({"id": rows["id"], "task": rows["task"], "context": rows["prompt"],
                         "answer": rows["answer"]})


def query_positions(answer_mask: list[int], n_tokens: int, which: str) -> list[int]:
    """Positions t whose next token the loss looks at: every t < n-1, or those predicting an
    answer token."""
    if which == "all":
        return list(range(n_tokens - 1))
    return [t for t in range(n_tokens - 1) if answer_mask[t + 1]]


class TeacherSignals:
    """Ray Data callable class: loads the teacher once per actor, then maps batches of
    (id, task, context, answer) to cache rows."""

    def __init__(self, teacher_dir: str, tokenizer_dir: str, max_length: int,
                 attention_queries: str, threads: int = 1):
        from distill_core.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = load_causal_lm(teacher_dir).to(self.device)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_length = max_length
        self.attention_queries = attention_queries

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        encoded = [encode_example(self.tokenizer, c, a, self.max_length, i)
                   for c, a, i in zip(batch["context"], batch["answer"], batch["id"])]
        ids, mask = pad_batch([e.input_ids for e in encoded], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with capture_final_attention(self.teacher, mask) as captured:
            hidden = self.teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        probs = captured["probs"]
        out: dict[str, list] = {k: [] for k in CACHE_SCHEMA.names}
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            queries = query_positions(e.answer_mask, n, self.attention_queries)
            out["id"].append(str(batch["id"][i]))
            out["task"].append(str(batch["task"][i]))
            out["input_ids"].append(e.input_ids)
            out["answer_mask"].append(e.answer_mask)
            out["n_tokens"].append(n)
            out["hidden"].append(to_bf16_bytes(hidden[i, :n].cpu()))
            out["attn_queries"].append(queries)
            out["attention"].append(to_bf16_bytes(probs[i, :, queries, :n].cpu()))
        # An explicit Arrow schema: plain lists and binary, readable by any Parquet reader
        # (numpy columns would become Ray's tensor extension type).
        return pa.Table.from_pydict(out, schema=CACHE_SCHEMA)


def assert_same_vocabulary(teacher_dir: str, tokenizer_dir: str) -> None:
    """This cache feeds the teacher the student's token ids, which is only right when both
    use one vocabulary; pairs with different tokenizers need token alignment first."""
    from distill_core.models import load_tokenizer

    teacher_vocab = load_tokenizer(teacher_dir).get_vocab()
    student_vocab = load_tokenizer(tokenizer_dir).get_vocab()
    if teacher_vocab != student_vocab:
        raise ValueError(f"teacher tokenizer ({teacher_dir}, {len(teacher_vocab)} tokens) and "
                         f"student tokenizer ({tokenizer_dir}, {len(student_vocab)} tokens) "
                         "differ: this cache needs one shared vocabulary")


def cache_key(**identity) -> str:
    """Short hash of everything that determines a cache's content (teacher, tokenizer, data,
    settings): a change of any of them is a different cache."""
    blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_teacher_cache(contexts: pd.DataFrame, out_dir: Path, *, teacher_dir: str,
                        tokenizer_dir: str, max_length: int, attention_queries: str,
                        batch_size: int, actors: int, num_gpus_per_actor: float,
                        identity: dict) -> dict:
    """Run the teacher over `contexts` with Ray Data and write the cache to `out_dir`.
    Returns the manifest. An existing complete cache is reused, not rebuilt."""
    import ray

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        return read_manifest(out_dir)
    assert_same_vocabulary(teacher_dir, tokenizer_dir)
    # Several blocks, so that every actor of the pool gets work (one DataFrame = one block).
    n_blocks = max(actors, math.ceil(len(contexts) / (4 * batch_size)))
    blocks = [contexts.iloc[i::n_blocks] for i in range(n_blocks)]
    ds = ray.data.from_pandas([b for b in blocks if len(b)]).map_batches(
        TeacherSignals,
        fn_constructor_kwargs=dict(teacher_dir=teacher_dir, tokenizer_dir=tokenizer_dir,
                                   max_length=max_length, attention_queries=attention_queries),
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
        manifest = {"format": CACHE_FORMAT, "rows": rows, "files": [f.name for f in files],
                    "bytes": sum(f.stat().st_size for f in files),
                    "tokens": int(_column_sum(files, "n_tokens")), "identity": identity}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


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
