"""A trial's MLflow child run across restarts, on a temporary sqlite store: a trial restarted
after its process died continues its unfinished run, never logs a step twice, and a finished
run is never reopened."""

import pytest
from mlflow.tracking import MlflowClient

from distill_core.tracking import TrialRun


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("t", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(experiment_id, run_name="grid").info.run_id
    return uri, client, experiment_id, parent


def _start(store, seed="0"):
    uri, _, experiment_id, parent = store
    return TrialRun.start(uri, experiment_id, parent, f"combined-seed{seed}",
                          params={"group": "combined", "seed": seed},
                          tags={"group": "combined", "seed": seed})


def test_a_restarted_trial_continues_its_run_and_logs_no_step_twice(store):
    _, client, _, parent = store
    first = _start(store)
    first.log_metrics({"loss": 3.0}, step=10)
    first.log_metrics({"loss": 2.0}, step=20)  # then the process dies

    again = _start(store)  # the restarted trial, from step 0 or from a checkpoint
    assert again.run_id == first.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.0)):
        again.log_metrics({"loss": loss}, step=step)
    history = client.get_metric_history(again.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 3.0), (20, 2.0), (30, 1.0)]
    assert client.get_run(again.run_id).data.params == {"group": "combined", "seed": "0"}
    assert _start(store, seed="1").run_id != first.run_id  # another trial, another run
    children = client.search_runs([store[2]], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2


def test_a_finished_trial_run_is_not_reopened(store):
    done = _start(store)
    done.log_metrics({"loss": 1.0}, step=10)
    done.finish()
    fresh = _start(store)  # the same trial trained anew (its Tune state was deleted)
    assert fresh.run_id != done.run_id and fresh.last_logged_step == 0
