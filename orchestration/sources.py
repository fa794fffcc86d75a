"""The datasets' files as observable source assets: their data version is a hash of the files'
content (distill_core.tasks.source_version), so editing an evaluation file makes
`eval_examples` stale, and the automation conditions re-run what depends on it, and only that.
Dagster observes them every `OBSERVE_MINUTES` (the daemon) or on "Observe sources" in the UI."""

from __future__ import annotations

import dagster as dg

from distill_core import tasks
from distill_core.config import TASKS
from orchestration.partitions import task_partitions
from orchestration.resources import ExperimentResource

OBSERVE_MINUTES = 10


def _versions(experiment: ExperimentResource, role: str) -> dg.DataVersionsByPartition:
    data = experiment.config().data
    return dg.DataVersionsByPartition({t: tasks.source_version(t, data, role) for t in TASKS})


@dg.observable_source_asset(partitions_def=task_partitions, group_name="data",
                            auto_observe_interval_minutes=OBSERVE_MINUTES,
                            description="the files a task's training rows are read from")
def train_files(experiment: ExperimentResource):
    return _versions(experiment, "train")


@dg.observable_source_asset(partitions_def=task_partitions, group_name="data",
                            auto_observe_interval_minutes=OBSERVE_MINUTES,
                            description="the files a task's evaluation rows and shots are read from")
def eval_files(experiment: ExperimentResource):
    return _versions(experiment, "eval")
