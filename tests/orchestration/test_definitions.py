"""The code location loads, with the seven assets and the two observed data sources, their
partitions and code versions."""

import dagster as dg

from orchestration.definitions import defs

ASSETS = {"train_examples", "eval_examples", "teacher_model", "teacher_cache",
          "student_checkpoints", "evaluation_table", "comparison_report"}


SOURCES = {"train_files", "eval_files"}
EXTERNAL = {"study_comparison"}  # written by `kdbench compare`, not by a run of the graph


def test_definitions_load_with_the_seven_assets():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS | SOURCES | EXTERNAL
    assert {k.to_user_string() for k in graph.observable_asset_keys} == SOURCES
    assert not graph.get(dg.AssetKey("study_comparison")).is_materializable


def test_partitions_and_lineage():
    graph = defs.resolve_asset_graph()
    partitioned = {k.to_user_string() for k in graph.get_all_asset_keys()
                   if graph.get(k).partitions_def is not None}
    assert partitioned == {"train_examples", "eval_examples", "teacher_cache"} | SOURCES
    assert graph.get(dg.AssetKey("teacher_cache")).partitions_def.get_partition_keys() == \
        ["sst2", "mmlu", "gsm8k"]
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("evaluation_table")).parent_keys}
    assert parents == {"student_checkpoints", "eval_examples", "teacher_model"}


def test_every_asset_has_a_code_version_from_its_distill_core_source(monkeypatch):
    import inspect

    from orchestration import versions

    graph = defs.resolve_asset_graph()
    by_asset = {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()
                if k.to_user_string() in ASSETS}
    assert all(by_asset.values()) and len(set(by_asset.values())) == 6  # the two example assets share
    assert by_asset["comparison_report"] == versions.code_version_of("statistics", "study_report", "trial_cost")
    report_before, tasks_before = versions.code_version_of("statistics"), versions.code_version_of("tasks")
    real = inspect.getsource
    monkeypatch.setattr(versions.inspect, "getsource", lambda m: real(m) + (
        "\n# an edit" if m.__name__ == "distill_core.statistics" else ""))
    assert versions.code_version_of("statistics") != report_before  # an edit there: stale
    assert versions.code_version_of("tasks") == tasks_before         # elsewhere: not


def test_every_path_comes_from_one_storage_root(monkeypatch, tmp_path):
    from orchestration.definitions import resources

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDBENCH_STORAGE_ROOT", raising=False)
    experiment = resources()["experiment"]  # one machine: the checkout (here: the cwd)
    assert experiment.root() == tmp_path / "artifacts" / "tiny"
    assert experiment.tune_storage() == tmp_path / "ray_results"
    monkeypatch.setenv("KDBENCH_STORAGE_ROOT", "shared/kdbench")  # made absolute once, here
    experiment = resources()["experiment"]
    assert experiment.root() == tmp_path / "shared" / "kdbench" / "artifacts" / "tiny"
    assert experiment.tune_storage() == tmp_path / "shared" / "kdbench" / "ray_results"
    explicit = resources(storage_root=str(tmp_path / "elsewhere"))["experiment"]
    assert explicit.tune_storage() == tmp_path / "elsewhere" / "ray_results"
