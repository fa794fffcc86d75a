"""Shared fixtures: real (tiny) tokenizers and models made here, a local Ray, temp MLflow."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from distill_core.config import load_config

    return load_config("tiny", {
        "data.train_size": {"sst2": 48, "mmlu": 48, "gsm8k": 48},
        "data.eval_size": {"sst2": 16, "mmlu": 16, "gsm8k": 8},
        "teacher.train_epochs": 1, "distill.steps": 20, "distill.report_every": 5,
        "distill.checkpoint_every": 10, "distill.batch_size": 8,
        # Every row labelled and no learning curve: the tests that want them set them.
        "distill.labelled_rows": None, "distill.curve_every": 0,
        # Vocabularies small for 144 rows, so that the two tokenizers cut words differently
        # and chunks span several tokens (at the preset's sizes both keep these words whole).
        "teacher.tokenizer.vocab_size": 600, "student.tokenizer.vocab_size": 560,
    })


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    from distill_core.config import TASKS
    from distill_core.tasks import generate_task

    return {t: generate_task(t, tiny_config.data) for t in TASKS}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_config, tiny_data):
    """A tiny teacher (one epoch on 144 rows) and its tokenizer, saved as an HF dir."""
    from distill_core.teacher_training import prepare_teacher

    out = tmp_path_factory.mktemp("teacher") / "model"
    prepare_teacher(tiny_config, [d["train"] for d in tiny_data.values()], out)
    return out



@pytest.fixture(scope="session")
def build_cache():
    """Builds a teacher cache of task rows as the teacher_cache asset does: aligned on the
    driver, then the teacher in Ray Data actors."""
    from distill_core.models import load_tokenizer
    from distill_core.teacher_cache import aligned_rows, build_teacher_cache, training_contexts

    def build(rows, out, teacher_dir, *, attention_queries="answer", student_tokenizer_dir=None,
              **settings):
        student_dir = student_tokenizer_dir or teacher_dir / "student_tokenizer"
        aligned = aligned_rows(training_contexts(rows), load_tokenizer(student_dir),
                               load_tokenizer(teacher_dir), 256, attention_queries)
        args = dict(batch_size=16, actors=2, num_gpus_per_actor=0, identity={"test": 1})
        args.update(settings)
        return build_teacher_cache(aligned, out, teacher_dir=str(teacher_dir),
                                   student_tokenizer_dir=str(student_dir), **args)

    return build


@pytest.fixture(scope="session")
def tiny_caches(tmp_path_factory, ray_local, tiny_teacher_dir, tiny_data, build_cache):
    """The three tasks' teacher caches of the tiny teacher (cache dirs, in TASKS order)."""
    from distill_core.config import TASKS

    root = tmp_path_factory.mktemp("caches")
    for task in TASKS:
        build_cache(tiny_data[task]["train"], root / task, tiny_teacher_dir, identity={"task": task})
    return [str(root / t) for t in TASKS]


@pytest.fixture(scope="session")
def objective_parts(tiny_config, tiny_teacher_dir):
    """`objective_parts(cache_dir, tokenizer_dir, seed=0)`: what distillation_loss takes beside
    a batch, for the tiny teacher's cache at `cache_dir`: the cache's reader (every position
    distilled), a student as seed `seed` starts it, and the vocabulary bridge."""
    import json

    from distill_core.cache_reader import TeacherCacheReader
    from distill_core.cross_vocab import VocabularyBridge
    from distill_core.models import load_tokenizer
    from distill_core.teacher_cache import read_vocabulary_map
    from distill_core.training import build_student

    def make(cache_dir, tokenizer_dir, seed=0):
        tokenizer = load_tokenizer(tokenizer_dir)
        config = json.loads((tiny_teacher_dir / "config.json").read_text())
        data = TeacherCacheReader([str(cache_dir)], "all", tokenizer.pad_token_id, config["hidden_size"],
                                  config["num_attention_heads"])
        student = build_student(tiny_config, tokenizer, config["hidden_size"], seed=seed)
        vocab = VocabularyBridge(read_vocabulary_map(cache_dir), student.model.config.vocab_size)
        return data, student, vocab

    return make


@pytest.fixture(scope="session")
def trial_config():
    """`trial_config(cfg, caches, teacher_dir, out_dir, group=, seed=, **distill)`: one trial's
    Tune config, as grid.param_space makes it with `group` and `seed` chosen; `distill`
    overrides the preset's distill settings (e.g. precision lives at the top: pass a cfg)."""
    def make(cfg, caches, teacher_dir, out_dir, group="combined", seed=0, **distill) -> dict:
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update=distill)})
        return {"experiment": cfg.model_dump(mode="json"), "cache_dirs": list(caches),
                "teacher_dir": str(teacher_dir),
                "student_tokenizer_dir": str(teacher_dir / "student_tokenizer"),
                "output_dir": str(out_dir), "cache_version": "test", "code_version": "test",
                "mlflow": None, "group": group, "seed": seed}

    return make


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets' release files beside the checkout (../shared/data), or where
    KDBENCH_SHARED_DATA says."""
    from pathlib import Path

    path = Path(os.environ.get("KDBENCH_SHARED_DATA",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return path


@pytest.fixture(scope="session")
def shared_tokenizers():
    """The paper pair's real tokenizers beside the checkout (../shared/tokenizers: llama3/,
    llama2-spm/), or where KDBENCH_SHARED_TOKENIZERS says."""
    from pathlib import Path

    path = Path(os.environ.get("KDBENCH_SHARED_TOKENIZERS",
                               Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"))
    if not (path / "llama3").exists():
        pytest.skip(f"{path} has no llama3/")
    return path


@pytest.fixture(scope="session")
def nan_hidden():
    """Writes bf16 NaN over the cached hidden states of a shard's rows (all, or the first
    `rows`): a corrupted cache, as a disk or a foreign writer could leave it. The shard is a
    Parquet file or its Arrow IPC copy (what trials read). Returns its table as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def corrupt(shard, rows=None):
        arrow = shard.suffix == ".arrow"
        table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all() if arrow else pq.read_table(shard)
        hidden = table["hidden"].to_pylist()
        n = len(hidden) if rows is None else rows
        hidden = [bytes(bytearray(b"\xc0\x7f") * (len(h) // 2)) for h in hidden[:n]] + hidden[n:]
        broken = table.set_column(table.schema.get_field_index("hidden"), "hidden",
                                  pa.array(hidden, pa.binary()))
        written = shard.with_name(shard.name + ".corrupt")  # the table may map `shard` itself
        if arrow:
            with pa.OSFile(str(written), "wb") as sink, pa.ipc.new_file(sink, broken.schema) as writer:
                writer.write_table(broken)
        else:
            pq.write_table(broken, written)
        os.replace(written, shard)
        return table

    return corrupt


@pytest.fixture(scope="session")
def free_ports():
    """`free_ports(n)`: n different local ports nothing listens on (all held until all are chosen)."""
    import socket

    def choose(n: int = 1) -> list[int]:
        sockets = [socket.socket() for _ in range(n)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return [s.getsockname()[1] for s in sockets]
        finally:
            for s in sockets:
                s.close()

    return choose
