"""Declarative automation, driven in-process against a temporary Dagster instance: a changed
evaluation file re-runs eval_examples -> evaluation_table -> comparison_report only; a changed
training file re-runs the cache and the grid too; a new evaluation code version re-runs the
evaluation and the report only; a failed run is not retried until its inputs change again.

The graph's state is made with runless materialization and check events (what the assets
record when they run), so each tick's requests are evaluated without training anything; the
data files are real copies of ../shared/data, observed by the real source assets."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from distill_core.config import TASKS
from orchestration import assets
from orchestration.definitions import all_assets, automation, resources, sources, weekly_reevaluation


@pytest.fixture()
def graph(tmp_path, shared_data):
    data = tmp_path / "data"
    shutil.copytree(shared_data, data)
    for path in data.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the copies are edited below
    res = resources(preset="real", overrides_json=json.dumps({"data.dir": str(data)}))
    with dg.instance_for_test() as instance:
        yield Graph(instance, res, data)


class Graph:
    def __init__(self, instance, res, data):
        self.instance, self.resources, self.data = instance, res, data
        self.cursor = None
        self.defs = self.definitions(all_assets)
        self.observe()
        for name in ("train_examples", "eval_examples"):
            for task in TASKS:
                self.materialized(name, task)
        self.materialized("teacher_model")
        for task in TASKS:
            self.materialized("teacher_cache", task)
        for name in ("student_checkpoints", "evaluation_table", "comparison_report"):
            self.materialized(name)
        assert self.tick() == set()  # everything is up to date

    def definitions(self, graph_assets):
        return dg.Definitions(assets=[*sources, *graph_assets], resources=self.resources,
                              jobs=[dg.define_asset_job("observe", selection=sources)])

    def observe(self):
        assert self.defs.get_job_def("observe").execute_in_process(instance=self.instance).success

    def materialized(self, name, partition=None):
        """What a successful run of the asset records: the materialization, its checks passed."""
        key = dg.AssetKey(name)
        self.instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        definition = next(a for a in all_assets if key in a.keys)
        for spec in definition.check_specs:
            self.instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=key, check_name=spec.name, passed=True))

    def tick(self) -> set[tuple[str, str | None]]:
        """One evaluation of the automation conditions: the (asset, partition) it requests."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance,
                                                   cursor=self.cursor)
        self.cursor = result.cursor
        out = set()
        for r in result.results:
            if r.true_subset.size:
                partitions = (r.true_subset.expensively_compute_partition_keys()
                              if r.key.to_user_string() in PARTITIONED else [None])
                out |= {(r.key.to_user_string(), p) for p in partitions}
        return out

    def run_until_quiet(self, limit: int = 8) -> set[tuple[str, str | None]]:
        """Tick, materialize what was requested, until nothing is: everything requested."""
        everything = set()
        for _ in range(limit):
            requested = self.tick()
            if not requested:
                return everything
            everything |= requested
            for name, partition in sorted(requested, key=lambda r: ORDER.index(r[0])):
                self.materialized(name, partition)
        raise AssertionError(f"automation did not settle in {limit} ticks: {everything}")

    def edit(self, relative: str):
        path = self.data / relative
        path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")


PARTITIONED = {"train_examples", "eval_examples", "teacher_cache"}
ORDER = ["train_examples", "eval_examples", "teacher_model", "teacher_cache",
         "student_checkpoints", "evaluation_table", "comparison_report"]


def test_a_changed_evaluation_file_reevaluates_only(graph):
    graph.edit("sst2/dev.tsv")
    graph.observe()
    assert graph.run_until_quiet() == {("eval_examples", "sst2"), ("evaluation_table", None),
                                       ("comparison_report", None)}


def test_a_changed_training_file_rebuilds_the_cache_and_the_grid(graph):
    graph.edit("mmlu/val/high_school_physics_val.csv")
    graph.observe()
    assert graph.run_until_quiet() == {
        ("train_examples", "mmlu"), ("teacher_model", None),
        *{("teacher_cache", t) for t in TASKS},  # a new teacher: every task's cache
        ("student_checkpoints", None), ("evaluation_table", None), ("comparison_report", None)}


def test_a_new_evaluation_code_version_reruns_evaluation_and_report_only(graph):
    changed = assets.evaluation_table.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version="changed"))
    graph.defs = graph.definitions([changed if a is assets.evaluation_table else a for a in all_assets])
    assert graph.run_until_quiet() == {("evaluation_table", None), ("comparison_report", None)}


def test_a_failed_run_is_not_retried_until_its_inputs_change(graph):
    graph.edit("gsm8k/test.jsonl")
    graph.observe()
    assert graph.tick() == {("eval_examples", "gsm8k")}
    # The run fails: nothing is recorded. The next ticks do not request it again.
    assert graph.tick() == set() and graph.tick() == set()
    graph.edit("gsm8k/test.jsonl")
    graph.observe()
    assert graph.tick() == {("eval_examples", "gsm8k")}


def test_the_automation_sensor_and_the_reevaluation_schedule_are_defined():
    from orchestration.definitions import defs

    repository = defs.get_repository_def()
    assert repository.get_sensor_def(automation.name).minimum_interval_seconds == 60
    schedule = repository.get_schedule_def(weekly_reevaluation.name)
    job = repository.get_job(schedule.job_name)
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "evaluation_table", "comparison_report"}


def test_automation_never_starts_a_study_from_nothing(tmp_path, shared_data):
    res = resources(preset="real", overrides_json=json.dumps({"data.dir": str(shared_data)}))
    defs = dg.Definitions(assets=[*sources, *all_assets], resources=res,
                          jobs=[dg.define_asset_job("observe", selection=sources)])
    with dg.instance_for_test() as instance:
        assert defs.get_job_def("observe").execute_in_process(instance=instance).success
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert result.total_requested == 0
