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
    """A trial's child run. A trial that Tune restarts after its process died continues the
    same run: `start` finds it by its parent and tags, and steps already logged are not logged
    again (the restarted trial recomputes them identically from its seed and checkpoint)."""

    # Every report logs it, so its history says how far the run got.
    PROGRESS_METRIC = "loss"

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        history = _retry(self.client.get_metric_history, run_id, self.PROGRESS_METRIC)
        self.last_logged_step = max((m.step for m in history), default=0)

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, parent_run_id: str, name: str,
              params: dict, tags: dict) -> "TrialRun":
        client = MlflowClient(tracking_uri)
        query = " and ".join(f"tags.`{k}` = '{v}'"
                             for k, v in {"mlflow.parentRunId": parent_run_id, **tags}.items())
        found = _retry(client.search_runs, [experiment_id], query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            _retry(client.update_run, run_id, status="RUNNING")
        else:
            run_id = _retry(client.create_run, experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": parent_run_id, **tags}).info.run_id
            _retry(client.log_batch, run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return cls(tracking_uri, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.last_logged_step:
            return
        now = int(time.time() * 1000)
        _retry(self.client.log_batch, self.run_id,
               metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        self.last_logged_step = step

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        _retry(self.client.log_artifacts, self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, self.run_id, status)
