"""MLflow logging from inside a Ray Tune trial: each trial is a child run of the grid's parent
run (the `mlflow.parentRunId` tag is what nests it in the UI). Plain MlflowClient calls, so a
trial process needs only the tracking URI and the parent's ids."""

from __future__ import annotations

import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def _retry(fn, *args, attempts: int = 5, **kwargs):
    # Concurrent trials share one sqlite store; a writer can find it briefly locked.
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - mlflow wraps sqlite errors in several types
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class TrialRun:
    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, parent_run_id: str, name: str,
              params: dict, tags: dict) -> "TrialRun":
        client = MlflowClient(tracking_uri)
        run = _retry(client.create_run, experiment_id, run_name=name,
                     tags={"mlflow.parentRunId": parent_run_id, **tags})
        _retry(client.log_batch, run.info.run_id,
               params=[Param(k, str(v)) for k, v in params.items()])
        return cls(tracking_uri, run.info.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        _retry(self.client.log_batch, self.run_id,
               metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        _retry(self.client.log_artifacts, self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, self.run_id, status)
