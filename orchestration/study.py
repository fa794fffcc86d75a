"""Materialize the whole asset graph in-process, in lineage order: what `kdbench demo` does and
what the end-to-end test checks. Partitioned assets run one run per task partition."""

from __future__ import annotations

import time

import dagster as dg

from distill_core.config import TASKS
from distill_core.grid_progress import duration
from orchestration import console
from orchestration.definitions import all_assets, sources

JOB = "__ephemeral_asset_job__"  # as dg.materialize names its job
STAGES = [(["train_examples", "eval_examples"], list(TASKS)),
          (["teacher_model"], [None]),
          (["teacher_cache"], list(TASKS)),
          (["student_checkpoints", "evaluation_table", "comparison_report"], [None])]


def materialize_study(resources: dict, instance: dg.DagsterInstance, log=print,
                      verbose: bool = True) -> dict[str, dict]:
    """Returns the latest materialization metadata of every asset (by asset name), and under
    "asset_checks" every check evaluation of the study's runs (asset, partition, check, passed).
    `log` gets a line per materialized asset (what it produced, how long its step took).
    Not `verbose`: Dagster's console shows the assets' own messages (INFO), one short line
    each (console.study_console), instead of the whole event stream."""
    evaluations = []
    for selection, partitions in STAGES:
        for partition in partitions:
            started = time.perf_counter()
            result = _materialize(selection, partition, resources, instance, verbose)
            stage_s = time.perf_counter() - started
            step_s = {e.step_key: e.event_specific_data.duration_ms / 1000
                      for e in result.all_events if e.is_step_success}
            for event in result.get_asset_materialization_events():
                metadata = {k: v.value for k, v in event.materialization.metadata.items()}
                label = event.asset_key.to_user_string() + (f" [{partition}]" if partition else "")
                took = duration(step_s.get(event.step_key, stage_s))
                log(f"{label:<28} {took:>7}  {console.describe(metadata)}")
            evaluations += [{"asset": e.asset_key.to_user_string(), "partition": partition,
                             "check": e.check_name, "passed": e.passed}
                            for e in result.get_asset_check_evaluations()]
    out = {key.to_user_string(): _latest_metadata(instance, key)
           for key in (a.key for a in all_assets) if not _partitioned(key)}
    return {**out, "asset_checks": evaluations}


def _materialize(selection, partition, resources, instance, verbose: bool):
    """dg.materialize, with the study's console logger unless `verbose` (materialize itself
    takes no loggers: its job is built here as it builds it)."""
    loggers = {} if verbose else {"study_console": console.study_console}
    defs = dg.Definitions(jobs=[dg.define_asset_job(JOB, selection=selection)],
                          assets=[*sources, *all_assets], resources=resources, loggers=loggers)
    run_config = None if verbose else {"loggers": {"study_console": {"config": {"log_level": "INFO"}}}}
    return defs.resolve_job_def(JOB).execute_in_process(run_config=run_config, instance=instance,
                                                        partition_key=partition)


def _partitioned(key: dg.AssetKey) -> bool:
    return key.to_user_string() in ("train_examples", "eval_examples", "teacher_cache")


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict:
    event = instance.get_latest_materialization_event(key)
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}
