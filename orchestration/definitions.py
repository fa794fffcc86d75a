"""The Dagster code location (workspace.yaml points here)."""

import dagster as dg

from orchestration import assets
from orchestration.comparison import STUDY_COMPARISON
from orchestration.resources import ExperimentResource, MLflowResource, RayResource
from orchestration.sources import eval_files, train_files

all_assets = [assets.train_examples, assets.eval_examples, assets.teacher_model,
              assets.teacher_cache_asset, assets.student_checkpoints, assets.evaluation_table,
              assets.comparison_report]
sources = [train_files, eval_files]

# Periodic re-evaluation of every checkpoint (the models do not change: nothing is retrained).
reevaluate = dg.define_asset_job("reevaluate", selection=["evaluation_table", "comparison_report"])
weekly_reevaluation = dg.ScheduleDefinition(name="weekly_reevaluation", job=reevaluate,
                                            cron_schedule="0 3 * * 1",
                                            default_status=dg.DefaultScheduleStatus.STOPPED)
# Evaluates the assets' automation conditions once a minute; on by default in `dagster dev`.
automation = dg.AutomationConditionSensorDefinition(
    "kdbench_automation", target=dg.AssetSelection.all(include_sources=True),
    minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)


def resources(preset: str = "tiny", overrides_json: str = "{}", storage_root: str = "",
              tracking_uri: str = "", artifact_root: str = "", ray_address: str = "") -> dict:
    """The graph's resources. Empty settings are read where their tools read them: the
    storage root from KDBENCH_STORAGE_ROOT (else the current directory), MLflow from
    MLFLOW_TRACKING_URI (else sqlite:///mlflow.db), the Ray cluster from RAY_ADDRESS (else a
    local Ray)."""
    return {"experiment": ExperimentResource(preset=preset, overrides_json=overrides_json,
                                             storage_root=storage_root),
            "ray_cluster": RayResource(address=ray_address),
            "mlflow": MLflowResource(tracking_uri=tracking_uri, artifact_root=artifact_root)}


defs = dg.Definitions(
    assets=[*sources, *all_assets, STUDY_COMPARISON], jobs=[reevaluate], schedules=[weekly_reevaluation],
    sensors=[automation],
    resources=resources(preset=dg.EnvVar("KDBENCH_PRESET").get_value("tiny")),
)
