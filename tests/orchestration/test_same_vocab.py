"""The tiny same-vocabulary study on a reduced grid: one tokenizer for teacher and student, so
every token is its own chunk and L_KD is the exact KL; the report says so."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from distill_core.cache_reader import TeacherCacheReader
from orchestration.definitions import resources
from orchestration.study import materialize_study

OVERRIDES = {
    "distill.groups": ["black_box", "task_only"], "distill.seeds": 2, "distill.steps": 10,
    "distill.report_every": 5, "distill.checkpoint_every": 10, "distill.batch_size": 8,
    "distill.curve_every": 0, "teacher.train_epochs": 1,
    "data.train_size": {"sst2": 48, "mmlu": 48, "gsm8k": 48},
    "data.eval_size": {"sst2": 8, "mmlu": 8, "gsm8k": 4},
}


def test_the_same_vocabulary_study_trains_with_the_exact_kl(tmp_path, ray_local):
    res = resources(preset="tiny-same-vocab", overrides_json=json.dumps(OVERRIDES),
                    storage_root=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                    artifact_root=str(tmp_path / "mlruns"))
    with dg.instance_for_test() as instance:
        metadata = materialize_study(res, instance, log=lambda *_: None, verbose=False)
        (record,) = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("teacher_cache"), asset_partitions=["sst2"]), limit=1).records
    teacher = metadata["teacher_model"]
    assert (Path(teacher["path"]) / "tokenizer.json").read_bytes() == \
        (Path(teacher["student_tokenizer"]) / "tokenizer.json").read_bytes()
    cache = record.asset_materialization.metadata["path"].value
    reader = TeacherCacheReader([cache], "all", 0, 96, 4)
    assert reader.batch(list(range(4))).chunks_are_tokens
    report = metadata["comparison_report"]
    assert report["kd_path"] == "exact"
    assert "L_KD: the exact same-vocabulary KL" in Path(report["path"]).read_text()
    trials = pd.read_parquet(metadata["student_checkpoints"]["manifest"])
    assert len(trials) == 4 and trials["kd_unmapped_mass"].isna().all()  # nothing to map
