"""Teacher-cache build throughput beside a bare teacher forward over the same batches, in one
run, on the tiny preset's shapes and its two tokenizers; and the bytes a (student) token each
signal takes on disk.
Prints one JSON object.   usage: python bench/cache.py [--rows N] [--actors K]

Both start from token ids: the rows are tokenized by both models and aligned first (on the
driver, as the teacher_cache asset does before its budget check), and that step is timed and
reported apart. The bare forward then runs the teacher over the teacher's token ids in the
cache's batches, using the whole machine (torch threads = cache actors), with the teacher
already loaded. The cache build runs `cache.actors` Ray Data actors of one thread each: the
final-layer attention hook, the gathers onto chunks, serialization and the Parquet write.
Ray's own start-up is not counted. The actors' start-up (a process each, importing torch and
transformers, loading the teacher) is counted in `ratio_cache_over_bare`: a fixed cost a build,
reported apart as `actor_start_s` (the same number of actors starting at once, outside a
build; inside one it is longer). `ratio_batch_work_one_thread` compares the
actors' per-batch work with the bare forward batch by batch, both on one thread in this process:
the cost of the cache's own bookkeeping, free of Ray and of start-up."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from distill_core.config import TASKS, load_config
from distill_core.encoding import pad_batch
from distill_core.models import init_model
from distill_core.tasks import generate_task
from distill_core.teacher_cache import (TeacherSignals, aligned_rows, build_teacher_cache,
                                        training_contexts)
from distill_core.tokenizer_training import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1500, help="training rows a task")
    parser.add_argument("--actors", type=int, default=None, help="cache actors (default: preset's)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    overrides = {"data.train_size": {t: args.rows for t in TASKS}}
    if args.actors:
        overrides["cache.actors"] = args.actors
    cfg = load_config("tiny", overrides)
    rows = pd.concat([generate_task(t, cfg.data)["train"] for t in TASKS], ignore_index=True)
    contexts = training_contexts(rows)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        texts = list(contexts["context"] + contexts["answer"])
        tok = train_tokenizer(cfg.teacher.tokenizer, texts)
        student_tok = train_tokenizer(cfg.student.tokenizer, texts)
        # Throughput does not depend on what the weights learned: an initialised teacher will do.
        init_model(cfg.teacher, tok, cfg.max_length, seed=0).save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        student_tok.save_pretrained(teacher_dir / "student_tokenizer")

        start = time.perf_counter()
        aligned = aligned_rows(contexts, student_tok, tok, cfg.max_length, cfg.cache.attention_queries)
        align_s = time.perf_counter() - start

        # One teacher for both measurements: the actor's own, as TeacherSignals loads it.
        signals = TeacherSignals(str(teacher_dir), logits=cfg.cache.logits, top_k=cfg.cache.top_k)
        teacher = signals.teacher
        torch.set_num_threads(cfg.cache.actors)
        encoded = aligned.column("teacher_ids").to_pylist()
        tokens = sum(len(e) for e in encoded)  # the teacher's tokens: what its forward costs
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(encoded), cfg.cache.batch_size):
                ids, mask = pad_batch(encoded[i:i + cfg.cache.batch_size], tok.pad_token_id)
                teacher.model(input_ids=ids, attention_mask=mask)
        bare_s = time.perf_counter() - start
        # The actors' per-batch work against the bare forward, both on one thread in this
        # process: what the hook, the gathers and the Arrow output add to each batch.
        torch.set_num_threads(1)
        timed = {"bare": 0.0, "signals": 0.0}
        with torch.inference_mode():
            for i in range(0, len(encoded), cfg.cache.batch_size):
                ids, mask = pad_batch(encoded[i:i + cfg.cache.batch_size], tok.pad_token_id)
                start = time.perf_counter()
                teacher.model(input_ids=ids, attention_mask=mask)
                timed["bare"] += time.perf_counter() - start
                start = time.perf_counter()
                signals(aligned.slice(i, cfg.cache.batch_size))
                timed["signals"] += time.perf_counter() - start

        import ray

        ray.init(num_cpus=cfg.cache.actors, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        manifest = build_teacher_cache(
            aligned, Path(tmp) / "cache", teacher_dir=str(teacher_dir),
            student_tokenizer_dir=str(teacher_dir / "student_tokenizer"),
            batch_size=cfg.cache.batch_size, actors=cfg.cache.actors, num_gpus_per_actor=0,
            identity={}, logits=cfg.cache.logits, top_k=cfg.cache.top_k)
        cache_s = time.perf_counter() - start
        # The build's fixed start-up: as many actors as the pool, each loading the teacher, at once.
        start = time.perf_counter()
        loader = ray.remote(num_cpus=1)(TeacherLoader)
        loaders = [loader.remote(str(teacher_dir)) for _ in range(cfg.cache.actors)]
        ray.get([a.ready.remote() for a in loaders])
        actor_start_s = time.perf_counter() - start
        ray.shutdown()

        per_column: dict[str, int] = {}
        for name in manifest["files"]:
            meta = pq.ParquetFile(Path(tmp) / "cache" / name).metadata
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    key = col.path_in_schema.split(".")[0]
                    per_column[key] = per_column.get(key, 0) + col.total_compressed_size
    student_tokens = manifest["tokens"]
    print(json.dumps({
        "rows": len(contexts), "teacher_tokens": tokens, "student_tokens": student_tokens,
        "chunks": manifest["chunks"], "actors": cfg.cache.actors,
        "align_tokens_per_s": round(tokens / align_s), "align_s": round(align_s, 2),
        "bare_forward_tokens_per_s": round(tokens / bare_s),
        "cache_build_tokens_per_s": round(tokens / cache_s),
        "ratio_cache_over_bare": round(bare_s / cache_s, 3),
        "ratio_batch_work_one_thread": round(timed["bare"] / timed["signals"], 3),
        "cache_build_s": round(cache_s, 2), "bare_forward_s": round(bare_s, 2),
        "actor_start_s": round(actor_start_s, 2),
        "bytes_per_student_token": {k: round(v / student_tokens, 1) for k, v in sorted(per_column.items())},
        "bytes_per_student_token_total": round(manifest["bytes"] / student_tokens, 1),
    }))


class TeacherLoader:
    """What a cache actor does before its first batch: import, load the teacher."""

    def __init__(self, teacher_dir: str):
        from distill_core.teacher_cache import TeacherSignals

        self.signals = TeacherSignals(teacher_dir)

    def ready(self) -> bool:
        return True


if __name__ == "__main__":
    main()
