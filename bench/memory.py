"""A trial's peak memory reading a teacher cache, and the same cache 10 times as large, side by
side in one run; and how long reading a batch takes beside a training step.
Prints one JSON object.
  usage: python bench/memory.py [--rows N] [--steps S] [--times K]
         python bench/memory.py --teacher-dir DIR --cache-dirs A B C   (caches already built)

Without caches given, the tiny preset's teacher shape is initialised (what it learned does not
matter to memory) and the three tasks' caches are built with Ray Data from `--rows` rows a task.
The large cache is the same rows `--times` over (ids made unique), written as the cache build
writes (Parquet shards, their Arrow IPC copies, manifest). Each trial runs in a fresh process
(DistillationRecipe, group `combined`, its batches read as the trial reads them), the same
number of steps, so both read the same number of rows:
- `rss_mb_*`: the process's peak resident set (VmHWM, see process_memory), pages of the mapped cache it touched
  included (those are the OS page cache's, shared by every trial on the node);
- `anon_mb_*`: its private memory (RssAnon) at the end: what the trial itself holds;
- `peak_anon_mb_*`: the highest private memory sampled (every 5 ms) while the trial ran: what
  it held at its peak, transient copies included, without the mapped cache's pages;
- `batch_read_s` / `step_s`: mean seconds to read and decode a step's batch (no prefetching, to
  see its cost) and to take the step, in the large-cache process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def tile_cache(source: Path, target: Path, times: int) -> Path:
    """A complete cache holding every row of `source` `times` over (ids suffixed ~k)."""
    from distill_core.storage import atomic_directory
    from distill_core.teacher_cache import MANIFEST, VOCABULARY_MAP, arrow_copy, read_manifest

    manifest = read_manifest(source)
    table = pa.concat_tables([pq.read_table(source / name) for name in manifest["files"]])
    with atomic_directory(target) as tmp:
        files = []
        for k in range(times):
            ids = pc.binary_join_element_wise(table["id"], pa.scalar(f"~{k}"), "")
            files.append(tmp / f"tile-{k:04d}.parquet")
            pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", ids), files[-1])
        arrows = [arrow_copy(f) for f in files]
        shutil.copy(source / VOCABULARY_MAP, tmp / VOCABULARY_MAP)
        (tmp / MANIFEST).write_text(json.dumps({
            **manifest, "rows": manifest["rows"] * times, "files": [f.name for f in files],
            "bytes": sum(f.stat().st_size for f in files), "arrow_files": [f.name for f in arrows],
            "arrow_bytes": sum(f.stat().st_size for f in arrows), "tiled_from": str(source)}))
    return target


def run_trial(config: dict) -> dict:
    """In this process: a trial's steps, timed; its peak and private memory."""
    from process_memory import PrivatePeak, anon_mb, peak_rss_mb  # bench/, the script's own folder

    from distill_core.training import DistillationRecipe

    recipe = DistillationRecipe(config)
    recipe.setup()
    reads, steps = [], []
    with PrivatePeak(every_s=0.005) as private:
        for step in range(recipe.cfg.distill.steps):
            start = time.perf_counter()
            batch = recipe.data.batch(recipe.schedule.batch(step))
            read = time.perf_counter()
            recipe.train_step(step, batch.to(recipe.device))
            reads.append(read - start)
            steps.append(time.perf_counter() - read)
    return {"rss_mb": peak_rss_mb(), "anon_mb": anon_mb(), "peak_anon_mb": private.mb,
            "batch_read_s": sum(reads) / len(reads), "step_s": sum(steps) / len(steps)}


def measure(config: dict) -> dict:
    """run_trial in a fresh process (peak memory is per process)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", f.name], check=True,
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(root: Path, rows: int) -> tuple[Path, list[Path]]:
    import pandas as pd
    import ray

    from distill_core.config import TASKS, load_config
    from distill_core.models import init_model
    from distill_core.tasks import generate_task
    from distill_core.teacher_cache import aligned_rows, build_teacher_cache, training_contexts
    from distill_core.tokenizer_training import train_tokenizer

    cfg = load_config("tiny", {"data.train_size": {t: rows for t in TASKS}})
    data = {t: generate_task(t, cfg.data)["train"] for t in TASKS}
    contexts = training_contexts(pd.concat(list(data.values()), ignore_index=True))
    texts = list(contexts["context"] + contexts["answer"])
    teacher_dir = root / "teacher"
    tok, student_tok = train_tokenizer(cfg.teacher.tokenizer, texts), train_tokenizer(cfg.student.tokenizer, texts)
    init_model(cfg.teacher, tok, cfg.max_length, seed=0).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student_tok.save_pretrained(teacher_dir / "student_tokenizer")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    caches = []
    for task in TASKS:
        aligned = aligned_rows(training_contexts(data[task]), student_tok, tok, cfg.max_length,
                               cfg.cache.attention_queries)
        caches.append(root / "cache" / task)
        build_teacher_cache(aligned, caches[-1], teacher_dir=str(teacher_dir),
                            student_tokenizer_dir=str(teacher_dir / "student_tokenizer"),
                            batch_size=cfg.cache.batch_size, actors=cfg.cache.actors,
                            num_gpus_per_actor=0, identity={"bench": task})
    ray.shutdown()
    return teacher_dir, caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="training rows a task (built caches)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps a trial (default: as many as the 1x cache has batches)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--times", type=int, default=10, help="the large cache is this many times the small")
    parser.add_argument("--teacher-dir", type=Path, default=None)
    parser.add_argument("--cache-dirs", type=Path, nargs="*", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_trial(json.loads(Path(args.child).read_text()))))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from distill_core.config import load_config
    from distill_core.teacher_cache import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir, caches = ((args.teacher_dir, args.cache_dirs) if args.cache_dirs
                               else _build(root, args.rows))
        tiled = [tile_cache(c, root / "tiled" / c.name, args.times) for c in caches]
        rows = sum(read_manifest(c)["rows"] for c in caches)
        steps = args.steps or max(1, rows // args.batch_size)  # each trial reads `rows` rows at most
        cfg = load_config("tiny", {"distill.steps": steps, "distill.batch_size": args.batch_size,
                                   "distill.report_every": steps, "distill.checkpoint_every": steps,
                                   "distill.curve_every": 0})
        out = {"rows_1x": rows, "steps": steps, "batch_size": args.batch_size, "times": args.times}
        for label, dirs in (("1x", caches), (f"{args.times}x", tiled)):
            config = {"experiment": cfg.model_dump(mode="json"), "cache_dirs": [str(d) for d in dirs],
                      "teacher_dir": str(teacher_dir),
                      "student_tokenizer_dir": str(Path(teacher_dir) / "student_tokenizer"),
                      "output_dir": str(root / "out"), "cache_version": "bench", "code_version": "bench",
                      "mlflow": None, "group": "combined", "seed": 0}
            result = measure(config)
            manifests = [read_manifest(d) for d in dirs]
            out[f"cache_mb_{label}"] = round(sum(m["bytes"] + m["arrow_bytes"] for m in manifests) / 2**20, 1)
            out[f"rss_mb_{label}"] = round(result["rss_mb"], 1)
            out[f"anon_mb_{label}"] = round(result["anon_mb"], 1)
            out[f"peak_anon_mb_{label}"] = round(result["peak_anon_mb"], 1)
            out["batch_read_s"], out["step_s"] = round(result["batch_read_s"], 4), round(result["step_s"], 4)
        large = f"{args.times}x"
        out["rss_ratio"] = round(out[f"rss_mb_{large}"] / out["rss_mb_1x"], 3)
        out["read_over_step"] = round(out["batch_read_s"] / out["step_s"], 3)
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
