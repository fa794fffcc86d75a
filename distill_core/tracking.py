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


def find_or_create_run(client: MlflowClient, experiment_id: str, name: str, tags: dict,
                       params: dict, reuse_finished: bool) -> str:
    """The run carrying all of `tags`, marked RUNNING again, or a new one with `params`.
    `reuse_finished=False` reopens only a run that never finished (its process died)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = [r for r in _retry(client.search_runs, [experiment_id], query)
             if reuse_finished or r.info.status != "FINISHED"]
    if found:
        run = found[0]
        _retry(client.update_run, run.info.run_id, status="RUNNING")
    else:
        run = _retry(client.create_run, experiment_id, run_name=name, tags=tags)
    if not run.data.params:  # new, or its creator died before logging them
        _retry(client.log_batch, run.info.run_id,
               params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


class TrialRun:
    """A trial's child run. A trial that Tune restarts after its process died continues the
    same run: `start` finds its unfinished run by parent and tags, and steps already logged are
    not logged again (the restarted trial recomputes them from its seed and checkpoint:
    identical on CPU)."""

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
        run_id = find_or_create_run(MlflowClient(tracking_uri), experiment_id, name,
                                    {"mlflow.parentRunId": parent_run_id, **tags}, params,
                                    reuse_finished=False)
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
