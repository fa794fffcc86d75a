"""Materialize the whole asset graph in-process, in lineage order: what `kdbench demo` does and
what the end-to-end test checks. Partitioned assets run one run per task partition."""

from __future__ import annotations

import dagster as dg

from distill_core.config import TASKS
from orchestration.definitions import all_assets, sources


def materialize_study(resources: dict, instance: dg.DagsterInstance, log=print) -> dict[str, dict]:
    """Returns the latest materialization metadata of every asset (by asset name), and under
    "asset_checks" every check evaluation of the study's runs (asset, partition, check, passed)."""
    evaluations = []
    steps = [(["train_examples", "eval_examples"], list(TASKS)),
             (["teacher_model"], [None]),
             (["teacher_cache"], list(TASKS)),
             (["student_checkpoints", "evaluation_table", "comparison_report"], [None])]
    for selection, partitions in steps:
        for partition in partitions:
            label = ", ".join(selection) + (f" [{partition}]" if partition else "")
            log(f"materializing {label}")
            result = dg.materialize([*sources, *all_assets], selection=selection, partition_key=partition,
                                    resources=resources, instance=instance)
            evaluations += [{"asset": e.asset_key.to_user_string(), "partition": partition,
                             "check": e.check_name, "passed": e.passed}
                            for e in result.get_asset_check_evaluations()]
    out = {key.to_user_string(): _latest_metadata(instance, key)
           for key in (a.key for a in all_assets) if not _partitioned(key)}
    return {**out, "asset_checks": evaluations}


def _partitioned(key: dg.AssetKey) -> bool:
    return key.to_user_string() in ("train_examples", "eval_examples", "teacher_cache")


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict:
    event = instance.get_latest_materialization_event(key)
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}
