"""The Dagster code location (workspace.yaml points here)."""

import dagster as dg

from orchestration import assets
from orchestration.resources import ExperimentResource, MLflowResource, RayResource

all_assets = [assets.train_examples, assets.eval_examples, assets.teacher_model,
              assets.teacher_cache_asset, assets.student_checkpoints, assets.evaluation_table,
              assets.comparison_report]


def resources(preset: str = "tiny", overrides_json: str = "{}", artifacts_dir: str = "artifacts",
              tracking_uri: str = "sqlite:///mlflow.db", artifact_root: str = "mlruns",
              ray_address: str = "") -> dict:
    return {"experiment": ExperimentResource(preset=preset, overrides_json=overrides_json,
                                             artifacts_dir=artifacts_dir),
            "ray_cluster": RayResource(address=ray_address),
            "mlflow": MLflowResource(tracking_uri=tracking_uri, artifact_root=artifact_root)}


defs = dg.Definitions(
    assets=all_assets,
    resources=resources(preset=dg.EnvVar("KDBENCH_PRESET").get_value("tiny")),
)
