"""The whole graph, materialized in-process on a reduced grid (2 groups x 2 seeds, a few steps),
with a local Ray and MLflow on a temporary sqlite file; the outputs are checked, not just run."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from distill_core.config import TASKS
from orchestration.definitions import all_assets, resources, sources
from orchestration.study import materialize_study

OVERRIDES = {
    "distill.groups": ["task_only", "black_box", "combined"], "distill.seeds": 2, "distill.steps": 20,
    "distill.report_every": 5, "distill.checkpoint_every": 10, "distill.batch_size": 8,
    "teacher.train_epochs": 2,
    "data.train_size": {"sst2": 120, "mmlu": 120, "gsm8k": 120},
    "data.eval_size": {"sst2": 24, "mmlu": 24, "gsm8k": 12},
    "distill.labelled_rows": {"sst2": 30, "mmlu": 30, "gsm8k": 30},
}
TRIALS = 3 * 2


SECRET = "hf_kdbench_test_secret_value"


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        # A token in the environment, as a user with hub access has one: it must appear nowhere.
        env.setenv("HF_TOKEN", SECRET)
        res = resources(overrides_json=json.dumps(OVERRIDES), storage_root=str(root),
                        tracking_uri=uri, artifact_root=str(root / "mlruns"))
        console = io.StringIO()  # what `kdbench demo` would print (not a terminal)
        with dg.instance_for_test() as instance:  # sets DAGSTER_HOME: other processes can open it
            with contextlib.redirect_stdout(console):
                metadata = materialize_study(res, instance, log=print, verbose=False)
            yield {"root": root, "uri": uri, "metadata": metadata, "instance": instance,
                   "resources": res, "console": console.getvalue().splitlines()}


def test_the_console_shows_stages_and_every_finished_trial_and_nothing_else(study):
    lines = study["console"]
    for asset in ("train_examples [sst2]", "eval_examples [gsm8k]", "teacher_model", "teacher_cache [mmlu]",
                  "student_checkpoints", "evaluation_table", "comparison_report"):
        assert sum(line.startswith(asset) for line in lines) == 1, (asset, lines)
    finished = [line for line in lines if "student_checkpoints: trial " in line and " done: " in line]
    assert len(finished) == TRIALS, lines  # one line per trial, as it finishes, with the grid's state
    assert {f"trial {k}/{TRIALS} done" for k in range(1, TRIALS + 1)} == {line.split(": ")[1] for line in finished}
    assert all("L_task" in line and "trials done" in line for line in finished)
    assert any(f"grid finished: {TRIALS} of {TRIALS} trials" in line for line in lines)
    assert any("teacher_model: teacher step" in line for line in lines)
    # Dagster's event stream (STEP_START, ...) and run ids stay out of the study's console.
    assert not any("STEP_START" in line or "RUN_SUCCESS" in line for line in lines), lines
    assert len(lines) < 40, lines


def test_every_asset_and_partition_is_materialized_with_its_code_version(study):
    instance = study["instance"]
    for name in ("train_examples", "eval_examples", "teacher_cache"):
        assert instance.get_materialized_partitions(dg.AssetKey(name)) == set(TASKS), name
    for name in ("train_examples", "eval_examples", "teacher_model", "teacher_cache",
                 "student_checkpoints", "evaluation_table", "comparison_report"):
        records = instance.fetch_materializations(dg.AssetKey(name), limit=100).records
        assert records, name
        for record in records:
            tags = record.asset_materialization.tags
            assert tags["dagster/code_version"], name
            # Versions the assets computed from what they hold, not Dagster's default.
            assert tags["dagster/data_version_is_user_provided"] == "true", name
    cache = study["metadata"]["student_checkpoints"]
    assert cache["trials"] == TRIALS


def test_secrets_in_the_environment_reach_neither_mlflow_nor_dagster(study):
    client = MlflowClient(study["uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        assert SECRET not in json.dumps([run.data.params, run.data.tags], default=str)
    assert SECRET not in json.dumps(study["metadata"], default=str)
    for path in study["root"].rglob("*.json"):  # kdbench.json, manifests, trial configs
        assert SECRET not in path.read_text(errors="ignore"), path


def test_every_asset_check_ran_and_passed(study):
    ran = {(c["asset"], c["partition"], c["check"]): c["passed"] for c in study["metadata"]["asset_checks"]}
    expected = {(a, t, "rows_valid") for a in ("train_examples", "eval_examples") for t in TASKS}
    expected |= {("teacher_cache", t, "cache_valid") for t in TASKS}
    expected |= {("student_checkpoints", None, "every_trial_finished"),
                 ("evaluation_table", None, "complete")}
    assert set(ran) == expected and all(ran.values()), ran


def test_mlflow_has_a_parent_run_with_one_child_per_trial(study):
    client = MlflowClient(study["uri"])
    experiment = client.get_experiment_by_name("kdbench-tiny")
    parent_id = study["metadata"]["student_checkpoints"]["mlflow_parent_run_id"]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == TRIALS
    assert {(c.data.params["group"], c.data.params["seed"]) for c in children} == \
        {(g, s) for g in ("task_only", "black_box", "combined") for s in ("0", "1")}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"lr", "alpha_task", "beta_kd", "gamma_hidden", "gamma_attn"} <= set(child.data.params)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "L_KD")]
        assert steps == [5, 10, 15, 20]
        assert {f"eval_{t}_accuracy" for t in TASKS} <= set(child.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert "checkpoint/model.safetensors" in artifacts
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert "report" in {a.path for a in client.list_artifacts(parent_id)}


def test_evaluation_table_covers_every_checkpoint_and_the_references(study):
    table = pd.read_parquet(study["metadata"]["evaluation_table"]["path"])
    students = table[table["seed"] >= 0]
    assert len(students) == TRIALS * 3
    assert set(table[table["seed"] < 0]["model"]) == {"teacher", "untrained_student"}
    assert len(table) == TRIALS * 3 + 2 * 3
    assert table.groupby("task")["n"].first().to_dict() == {"sst2": 24, "mmlu": 24, "gsm8k": 12}
    assert table["accuracy"].between(0, 1).all()
    # The checkpoints the table names are the grid's, loadable as plain HF models.
    path = pd.read_parquet(study["metadata"]["student_checkpoints"]["manifest"])["path"].iloc[0]
    assert AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).config.num_hidden_layers == 2


def test_report_statistics_agree_with_the_table(study):
    report = study["metadata"]["comparison_report"]
    table = pd.read_parquet(study["metadata"]["evaluation_table"]["path"])
    students = table[table["seed"] >= 0]
    out_dir = __import__("pathlib").Path(report["path"]).parent
    summary = pd.read_csv(out_dir / "summary.csv")
    expected = students.groupby(["task", "group"])["accuracy"].mean()
    for r in summary.itertuples():
        assert r.mean == pytest.approx(expected[(r.task, r.group)])
    pairwise = pd.read_csv(out_dir / "pairwise.csv")
    assert set(pairwise["task"]) == set(TASKS) and set(pairwise["group"]) == {"combined"}
    text = (out_dir / "report.md").read_text()
    assert all(f"## {t}" in text for t in TASKS)
    assert len(report["verdicts"]) == len(report["control_verdicts"]) == 3
    # The control opens the report, and each task's section: did the teacher help at all?
    assert text.index("## Did distilling from the teacher help?") < text.index("## sst2")
    for task in TASKS:
        section = text[text.index(f"## {task}"):]
        assert section.index("**Did the teacher help?**") < section.index("**White-box.**")
    control = pd.read_csv(out_dir / "control.csv").set_index("task")
    wide = students.pivot_table(index=["task", "seed"], columns="group", values="accuracy")
    for task in TASKS:
        diff = (wide.loc[task, "black_box"] - wide.loc[task, "task_only"]).mean()
        assert control.loc[task, "mean_diff"] == pytest.approx(diff)
    assert set(pairwise["group"]) == {"combined"}  # the control is not a white-box group
    # What the study was: two tokenizers, so L_KD mapped across vocabularies; the labels.
    assert report["kd_path"] == "map" and "mean unmapped teacher mass 0." in text
    assert "sst2 30 of 120" in text
    # What each group cost: time and throughput measured; the cache each group reads grows
    # with the signals it needs (task_only: none; combined: hidden states and attention).
    cost = pd.read_csv(out_dir / "cost.csv").set_index("group")
    assert (cost["train_s"] > 0).all() and (cost["tokens_per_s"] > 0).all()
    assert (cost["peak_memory_mb"] > 50).all()
    assert cost.loc["task_only", "cache_mb"] < cost.loc["black_box", "cache_mb"] < cost.loc["combined", "cache_mb"]
    assert cost.loc["task_only", "gain_sst2"] == 0
    assert cost.loc["black_box", "gain_sst2"] == pytest.approx(control.loc["sst2", "mean_diff"])
    # Learning curves: every trial scored its validation rows at its last step (20).
    curves = pd.read_parquet(study["metadata"]["student_checkpoints"]["curves"])
    assert set(curves["step"]) == {20} and len(curves[["group", "seed"]].drop_duplicates()) == TRIALS
    assert {"val_loss", "val_sst2_accuracy", "val_gsm8k_loss"} <= set(curves["metric"])
    assert "## Learning curves" in text and (out_dir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_complete_cache_is_reused_as_it_is_when_materialized_again(study):
    instance = study["instance"]
    gsm8k = dg.AssetRecordsFilter(asset_key=dg.AssetKey("teacher_cache"), asset_partitions=["gsm8k"])

    def latest():
        (record,) = instance.fetch_materializations(gsm8k, limit=1).records
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    before = latest()
    manifest = Path(before["path"]) / "manifest.json"
    written = manifest.stat().st_mtime_ns
    result = dg.materialize([*sources, *all_assets], selection=["teacher_cache"], partition_key="gsm8k",
                            resources=study["resources"], instance=instance)
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    assert latest() == before and manifest.stat().st_mtime_ns == written


# Materializes student_checkpoints alone, in a process of its own (as a Dagster run worker
# does), against the study's instance and the test's Ray cluster.
GRID_RUN = """
import json, sys
import dagster as dg
from orchestration.definitions import all_assets, resources, sources
with dg.DagsterInstance.get() as instance:
    dg.materialize([*sources, *all_assets], selection=["student_checkpoints"],
                   resources=resources(**json.loads(sys.argv[1])), instance=instance)
"""


def _trial_states(experiment_dir: Path) -> dict[tuple[str, int], str]:
    """(group, seed) -> Tune status, from the newest experiment state Tune has saved."""
    for state in sorted(experiment_dir.glob("experiment_state-*.json"), reverse=True):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):  # being written
            continue
        states = {}
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            params = trial["evaluated_params"]
            states[(params["group"], int(params["seed"]))] = trial["status"]
        return states
    return {}


def test_a_grid_whose_run_was_killed_resumes_when_materialized_again(study, ray_local):
    """The process running the grid dies (SIGKILL, once a trial has finished): materializing
    student_checkpoints again resumes the Tune run. Finished trials are not trained again,
    every trial keeps one MLflow child run, and no step is logged twice."""
    root = study["root"]
    # Another grid over the study's caches: longer trials, so the kill lands mid-grid.
    overrides = {**OVERRIDES, "distill.steps": 80, "distill.report_every": 10,
                 "distill.checkpoint_every": 20}
    settings = dict(overrides_json=json.dumps(overrides), storage_root=str(root),
                    tracking_uri=study["uri"], artifact_root=str(root / "mlruns"),
                    ray_address=ray_local.get_runtime_context().gcs_address)
    tune_dir = root / "ray_results"
    earlier = set(tune_dir.iterdir())
    # Tune saves its experiment state every second here (default: adaptive, >= 10 s).
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log_path = root / "killed_grid.log"  # a file, not a pipe: a full pipe would stall the run
    with log_path.open("w") as log:
        driver = subprocess.Popen([sys.executable, "-c", GRID_RUN, json.dumps(settings)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, states, experiment_dir = time.monotonic() + 400, {}, None
        while time.monotonic() < deadline:
            assert driver.poll() is None, f"the grid's process ended by itself: {log_path.read_text()[-3000:]}"
            new = set(tune_dir.iterdir()) - earlier if tune_dir.exists() else set()
            if new:
                (experiment_dir,) = new
                states = _trial_states(experiment_dir)
                if "TERMINATED" in states.values():
                    break
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = {key for key, status in states.items() if status == "TERMINATED"}
    assert finished and len(finished) < len(states) == TRIALS, states
    # The dead run's trials end when Ray sees their driver gone: wait until they free the CPUs,
    # so that none of them still logs or writes while the grid resumes.
    deadline = time.monotonic() + 120
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the killed run's trials still hold the cluster's CPUs"
        time.sleep(0.5)

    grid_key = experiment_dir.name.removeprefix("tiny-")
    out_dir = root / "artifacts" / "tiny" / "students" / grid_key
    before = {key: _written(out_dir / f"{key[0]}-seed{key[1]}") for key in finished}

    res = resources(**settings)
    result = dg.materialize([*sources, *all_assets], selection=["student_checkpoints"],
                            resources=res, instance=study["instance"])
    assert result.success
    metadata = result.asset_materializations_for_node("student_checkpoints")[0].metadata
    assert metadata["grid_key"].value == grid_key and metadata["trials"].value == TRIALS
    assert set(tune_dir.iterdir()) - earlier == {experiment_dir}  # the same Tune run, restored
    for key, written in before.items():  # not trained again: the same files, untouched
        assert _written(out_dir / f"{key[0]}-seed{key[1]}") == written, key
    trials = pd.read_parquet(out_dir / "trials.parquet")
    assert trials["finished"].all() and len(trials) == TRIALS

    client = MlflowClient(study["uri"])
    parent_id = metadata["mlflow_parent_run_id"].value
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted((c.data.tags["group"], c.data.tags["seed"]) for c in children) == \
        sorted((g, str(s)) for g, s in states)  # one child run a trial, none left over
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(10, 81, 10)), (child.data.tags, steps)
    for key in finished:
        meta = json.loads((out_dir / f"{key[0]}-seed{key[1]}" / "kdbench.json").read_text())
        assert meta["mlflow_run_id"] in {c.info.run_id for c in children}


def _written(checkpoint: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in checkpoint.iterdir()}


def test_compare_puts_two_studies_side_by_side_and_records_it_in_dagster(study, tmp_path):
    """`kdbench compare`'s work: a study found by its preset in the instance, another given
    by path (here the same study with combined lifted by 0.1 on every seed)."""
    from orchestration.comparison import compare

    table = pd.read_parquet(study["metadata"]["evaluation_table"]["path"])
    lifted = table.assign(accuracy=table["accuracy"] + 0.1 * (table["group"] == "combined"))
    path = tmp_path / "lifted" / "evaluation_table.parquet"
    path.parent.mkdir()
    lifted.to_parquet(path)
    result = compare(["tiny", str(path)], study["instance"], tmp_path)
    rows = result["table"].set_index(["task", "group"])
    for task in TASKS:
        assert rows.loc[(task, "combined"), "diff"] == pytest.approx(0.1)
        assert rows.loc[(task, "combined"), "diff_of_diffs"] == pytest.approx(0.1)  # vs black_box
        assert rows.loc[(task, "black_box"), "diff_of_diffs"] == pytest.approx(0.0)  # vs task_only
    assert result["paths"]["report"].read_text().startswith("# lifted against tiny")
    (record,) = study["instance"].fetch_materializations(dg.AssetKey("study_comparison"), limit=1).records
    assert record.asset_materialization.metadata["a"].value == "tiny"
    with pytest.raises(LookupError, match="kdbench demo --preset paper"):
        compare(["paper", str(path)], study["instance"], tmp_path)
