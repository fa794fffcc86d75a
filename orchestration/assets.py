"""The study's asset graph. Each asset reads its inputs' paths from lineage, calls distill_core,
writes under a path derived from the versions that produced it, and describes the result."""


import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd
from mlflow.entities import Metric

from distill_core import (cache_size, evaluation, grid, learning_curve, statistics, study_report, tasks,
                          teacher_cache, teacher_training)
from distill_core.config import TASKS
from distill_core.models import load_tokenizer
from distill_core.storage import write_parquet_atomic
from distill_core.training import CHECKPOINT_META, write_untrained_student
from orchestration import checks, console
from orchestration.sources import eval_files, train_files
from orchestration.lineage import dir_bytes, file_sha256, upstream
from orchestration.partitions import task_partitions
from orchestration.resources import ExperimentResource, MLflowResource, RayResource
from orchestration.versions import code_version_of


# Declarative automation: an asset that exists re-runs when what it reads has changed, once
# every upstream blocking check has passed; never while it or an upstream is in progress. A
# request "handles" the change: a failed run is not retried until the inputs change again. A
# missing asset is never started by automation (a fresh `dagster dev` does not run the study).
_GUARDS = (~dg.AutomationCondition.missing() & ~dg.AutomationCondition.any_deps_missing()
           & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress()
           & dg.AutomationCondition.all_deps_blocking_checks_passed())
FOLLOW_UPSTREAM = (dg.AutomationCondition.any_deps_updated().since_last_handled() & _GUARDS) \
    .with_label("inputs changed")
# The evaluation also re-runs on a new evaluation code version (the report follows it).
FOLLOW_UPSTREAM_OR_CODE = ((dg.AutomationCondition.any_deps_updated()
                            | dg.AutomationCondition.code_version_changed()).since_last_handled()
                           & _GUARDS).with_label("inputs or evaluation code changed")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _examples(context, experiment: ExperimentResource, splits: tuple[str, ...]):
    cfg = experiment.config()
    task = context.partition_key
    loaded = tasks.load_task_splits(task, cfg.data)
    generated = loaded.splits
    out_dir = experiment.root() / "examples" / task / _key(cfg.data.model_dump())
    paths = {s: write_parquet_atomic(generated[s], out_dir / f"{s}.parquet") for s in splits}
    main = generated[splits[0]]
    version = file_sha256(*paths.values())[:16]
    metadata = {
        "path": dg.MetadataValue.path(str(paths[splits[0]])),
        "rows": len(main),
        "bytes": sum(p.stat().st_size for p in paths.values()),
        "sha256": version,
        "subjects": dg.MetadataValue.json(main["subject"].value_counts().to_dict()),
        "preview": dg.MetadataValue.md(statistics.markdown_table(main[["id", "prompt", "answer"]].head(3))),
    }
    if main["label"].notna().any():
        metadata["label_balance"] = dg.MetadataValue.json(
            {str(int(k)): int(v) for k, v in main["label"].value_counts().sort_index().items()})
    for s in splits[1:]:
        metadata[f"{s}_path"] = dg.MetadataValue.path(str(paths[s]))
        metadata[f"{s}_rows"] = len(generated[s])
    if cfg.data.source != "synthetic":
        # Malformed source rows (data.bad_rows: skip): how many, and where.
        metadata["skipped_rows"] = len(loaded.skipped)
        metadata["skipped"] = dg.MetadataValue.md(
            "\n".join(f"- {w}" for w in loaded.skipped[:50]) or "none")
    problems = [f"{s}: {p}" for s in splits for p in tasks.row_problems(generated[s])]
    balance = metadata.get("label_balance", dg.MetadataValue.json({}))
    return dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(version),
        check_results=[checks.result(checks.EXAMPLES[0], problems, label_balance=balance)])


@dg.asset(partitions_def=task_partitions, code_version=code_version_of("tasks", "real_datasets", "config"),
          group_name="data", kinds={"parquet"}, deps=[train_files],
          automation_condition=FOLLOW_UPSTREAM,
          check_specs=[checks.spec("train_examples", *checks.EXAMPLES)])
def train_examples(context: dg.AssetExecutionContext, experiment: ExperimentResource):
    """Unified training rows of one task (id, task, subject, prompt, answer, choices, label),
    and the held-out validation rows of the learning curves."""
    return _examples(context, experiment, ("train", "validation"))


@dg.asset(partitions_def=task_partitions, code_version=code_version_of("tasks", "real_datasets", "config"),
          group_name="data", kinds={"parquet"}, deps=[eval_files],
          automation_condition=FOLLOW_UPSTREAM,
          check_specs=[checks.spec("eval_examples", *checks.EXAMPLES)])
def eval_examples(context: dg.AssetExecutionContext, experiment: ExperimentResource):
    """Unified evaluation rows of one task, and the few-shot pool the prompts draw from."""
    return _examples(context, experiment, ("eval", "fewshot"))


@dg.asset(deps=[train_examples], group_name="teacher", kinds={"pytorch", "safetensors"},
          automation_condition=FOLLOW_UPSTREAM,
          code_version=code_version_of("teacher_training", "tokenizer_training", "models",
                                       "encoding", "teacher_cache"))
def teacher_model(context: dg.AssetExecutionContext, experiment: ExperimentResource):
    """The frozen teacher as an HF dir (tiny: trained here on train_examples; paper: the
    pinned hub revision), with the student's tokenizer beside it."""
    cfg = experiment.config()
    inputs = {t: upstream(context, "train_examples", t) for t in TASKS}
    identity = [cfg.teacher.model_dump(), cfg.student.model_dump(include={"tokenizer", "tokenizer_from"}),
                cfg.student.hub_id, cfg.student.revision, cfg.max_length, cfg.precision,
                {t: m["sha256"] for t, m in inputs.items()}]
    out_dir = experiment.root() / "teacher" / _key(identity)
    rows = [pd.read_parquet(inputs[t]["path"]) for t in TASKS]
    info = teacher_training.prepare_teacher(
        cfg, rows, out_dir,
        log=lambda step, total, loss: context.log.info(f"teacher step {step}/{total}: loss {loss:.4f}"))
    version = file_sha256(*sorted(out_dir.glob("*.safetensors")))[:16]
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(out_dir)),
                  "student_tokenizer": dg.MetadataValue.path(str(out_dir / "student_tokenizer")),
                  "weights_sha256": version, "bytes": dir_bytes(out_dir),
                  **{k: v for k, v in info.items() if v is not None}},
        data_version=dg.DataVersion(version))


@dg.asset(name="teacher_cache", partitions_def=task_partitions, deps=[train_examples, teacher_model],
          group_name="teacher", kinds={"ray", "parquet"}, automation_condition=FOLLOW_UPSTREAM,
          code_version=code_version_of("teacher_cache", "final_layer_attention", "encoding", "models",
                                       "alignment", "cross_vocab", "cache_size"),
          check_specs=[checks.spec("teacher_cache", *checks.CACHE)])
def teacher_cache_asset(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                        ray_cluster: RayResource):
    """The teacher's signals on one task's training rows, aligned to the student's tokens
    (final hidden states at chunk ends, whose lm_head gives the exact logits; final-layer
    attention over chunks), written by Ray Data as Parquet. Estimated and checked against
    cache.budget_gib before the build."""
    from distill_core.models import load_tokenizer

    cfg = experiment.config()
    task = context.partition_key
    rows = upstream(context, "train_examples", task)
    teacher = upstream(context, "teacher_model")
    student_tokenizer = load_tokenizer(teacher["student_tokenizer"])
    # Identity: the teacher (weights hash; a hub teacher's id+revision are in its dir), the
    # student tokenizer's vocabulary, the data version, the cache settings and the precision the
    # teacher runs in (how the rows are batched is not part of it).
    identity = {"teacher": teacher["weights_sha256"], "teacher_source": teacher.get("source"),
                "teacher_revision": teacher.get("revision"),
                "student_tokenizer": _key(sorted(student_tokenizer.get_vocab().items())),
                "data": rows["sha256"], "cache": cfg.cache.model_dump(exclude={"actors", "batch_size",
                                                                           "batch_tokens", "budget_gib"}),
                "max_length": cfg.max_length, "precision": cfg.precision}
    key = teacher_cache.cache_key(**identity)
    out_dir = experiment.root() / "teacher_cache" / task / key
    contexts = teacher_cache.training_contexts(pd.read_parquet(rows["path"]))
    teacher_config = json.loads((Path(teacher["path"]) / "config.json").read_text())
    # A complete cache of this key is reused as it is: no alignment, no build.
    manifest = teacher_cache.complete_manifest(out_dir)
    if manifest is None:
        # Aligned once: the exact estimate, the budget check and the build all read these rows.
        aligned = teacher_cache.aligned_rows(contexts, student_tokenizer, load_tokenizer(teacher["path"]),
                                             cfg.max_length, cfg.cache.attention_queries)
        estimated = cache_size.estimate(
            {task: cache_size.shapes_from_aligned(aligned)}, teacher_config["hidden_size"],
            teacher_config["num_attention_heads"], cfg.cache, "exact shapes")
        cache_size.check_budget(estimated, f"teacher_cache[{task}]")
        manifest = teacher_cache.build_teacher_cache(
            aligned, out_dir, teacher_dir=teacher["path"],
            student_tokenizer_dir=teacher["student_tokenizer"], logits=cfg.cache.logits,
            top_k=cfg.cache.top_k, batch_size=cfg.cache.batch_size, actors=cfg.cache.actors,
            num_gpus_per_actor=cfg.cache.num_gpus_per_actor, identity=identity, estimate=estimated,
            precision=cfg.precision, batch_tokens=cfg.cache.batch_tokens)
    estimated = manifest["estimate"]  # what the build was checked against
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(out_dir)), "cache_key": key,
                  "rows": manifest["rows"], "tokens": manifest["tokens"],
                  "teacher_tokens": manifest["teacher_tokens"], "chunks": manifest["chunks"],
                  "bytes": manifest["bytes"],
                  "bytes_per_token": round(manifest["bytes"] / max(1, manifest["tokens"]), 1),
                  "estimated_bytes": estimated["total_bytes"],
                  "estimated_bytes_per_signal": dg.MetadataValue.json(estimated["bytes"]),
                  "estimated_bytes_per_token": dg.MetadataValue.json(estimated["bytes_per_token"]),
                  "vocabulary_map_coverage": manifest["vocabulary_map_coverage"],
                  "shards": len(manifest["files"])},
        data_version=dg.DataVersion(key),
        check_results=[checks.result(checks.CACHE[0], teacher_cache.cache_problems(
            out_dir, len(contexts), teacher_config["hidden_size"], teacher_config["num_attention_heads"]),
            vocabulary_map_coverage=manifest["vocabulary_map_coverage"])])




@dg.asset(deps=[teacher_cache_asset, teacher_model], group_name="students", kinds={"ray", "mlflow"},
          automation_condition=FOLLOW_UPSTREAM,
          code_version=code_version_of("training", "objective", "losses", "student", "grid",
                                       "final_layer_attention", "tracking", "models", "encoding",
                                       "alignment", "cross_vocab", "cache_reader", "batching", "trial_cost",
                                       "learning_curve"),
          check_specs=[checks.spec("student_checkpoints", *checks.GRID)])
def student_checkpoints(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                        ray_cluster: RayResource, mlflow: MLflowResource):
    """The groups x seeds grid, one Ray Tune run; each trial is a nested MLflow child run of
    this asset's parent run, and leaves an HF checkpoint dir."""
    cfg = experiment.config()
    caches = {t: upstream(context, "teacher_cache", t) for t in TASKS}
    teacher = upstream(context, "teacher_model")
    validation = {t: upstream(context, "train_examples", t).get("validation_path") for t in TASKS}
    code_version = context.assets_def.code_versions_by_key[context.asset_key]
    cache_version = _key({t: c["cache_key"] for t, c in caches.items()})
    grid_key = _key(cache_version, cfg.distill.model_dump(), cfg.student.model_dump(), code_version)
    out_dir = experiment.root() / "students" / grid_key
    mlflow.require_shared(ray_cluster.nodes())
    experiment_id = mlflow.experiment_id(f"kdbench-{cfg.name}")
    client = mlflow.client()
    parent_id = mlflow.grid_parent_run(experiment_id, grid_key, context.run.run_id, params={
        "preset": cfg.name, "groups": ",".join(cfg.distill.groups), "seeds": cfg.distill.seeds,
        "cache_version": cache_version, "code_version": code_version, "teacher": teacher["path"]})
    space = grid.param_space(
        cfg, cache_dirs=[caches[t]["path"] for t in TASKS], teacher_dir=teacher["path"],
        student_tokenizer_dir=teacher["student_tokenizer"], output_dir=str(out_dir),
        cache_version=cache_version, code_version=code_version,
        validation_paths={t: p for t, p in validation.items() if p},
        mlflow={"tracking_uri": mlflow.resolved_uri(), "experiment_id": experiment_id,
                "parent_run_id": parent_id})
    live = console.live_stream()
    try:
        from distill_core.grid_progress import GridProgress  # imports Ray Tune

        # On a terminal the live line shows each finished trial; the run log gets its line at
        # DEBUG then (the UI shows it, the console at INFO does not repeat it).
        progress = GridProgress(len(cfg.distill.groups) * cfg.distill.seeds, cfg.distill.steps,
                                log=context.log.info, live=live,
                                trial_log=context.log.debug if live else context.log.info)
        results = grid.run_grid(cfg, experiment.tune_storage(), f"{cfg.name}-{grid_key}", space,
                                callbacks=[progress], tune_output=console.verbose())
    except Exception:
        client.set_terminated(parent_id, "FAILED")
        raise
    finally:
        if live is not None:
            live.close()
    trials = []
    for result in results:
        group, seed = result.config["group"], result.config["seed"]
        path = out_dir / f"{group}-seed{seed}"
        meta = json.loads((path / CHECKPOINT_META).read_text()) if path.exists() else {}
        cost, final = meta.get("cost", {}), meta.get("final_metrics", {})
        trials.append({"group": group, "seed": seed, "path": str(path), "finished": result.error is None
                       and path.exists(), "mlflow_run_id": meta.get("mlflow_run_id"),
                       "final_loss": (result.metrics or {}).get("loss"),
                       "node_id": (result.metrics or {}).get("node_id"),  # where it finished
                       "train_seconds": cost.get("seconds"), "tokens": cost.get("tokens"),
                       "tokens_per_s": cost.get("tokens_per_s"), "peak_memory_mb": cost.get("peak_mb"),
                       "kd_unmapped_mass": final.get("kd_unmapped_mass")})
    table = pd.DataFrame(trials).sort_values(["group", "seed"])
    curves = learning_curve.curves_table([
        r.metrics_dataframe.assign(group=r.config["group"], seed=r.config["seed"])
        for r in results if r.metrics_dataframe is not None and "step" in r.metrics_dataframe])
    curves_path = write_parquet_atomic(curves, out_dir / "curves.parquet")
    untrained = out_dir / "untrained"
    write_untrained_student(cfg, teacher["student_tokenizer"], teacher["path"], untrained, cfg.seeds[0])
    manifest = write_parquet_atomic(table, out_dir / "trials.parquet")
    failed = table[~table["finished"]]
    client.set_terminated(parent_id, "FAILED" if len(failed) else "FINISHED")
    if len(failed):
        raise dg.Failure(f"{len(failed)} of {len(table)} trials did not finish: "
                         f"{failed[['group', 'seed']].to_dict('records')}")
    problems = grid.grid_problems(table, cfg.distill.groups, cfg.seeds)
    return dg.MaterializeResult(
        check_results=[checks.result(checks.GRID[0], problems, trials=len(table))],
        metadata={"path": dg.MetadataValue.path(str(out_dir)), "trials": len(table),
                  "manifest": dg.MetadataValue.path(str(manifest)),
                  "curves": dg.MetadataValue.path(str(curves_path)), "curve_points": len(curves),
                  "untrained_student": dg.MetadataValue.path(str(untrained)),
                  "grid_key": grid_key, "cache_version": cache_version,
                  "mlflow_experiment_id": experiment_id, "mlflow_parent_run_id": parent_id,
                  "mlflow_parent_run": dg.MetadataValue.url(mlflow.run_url(experiment_id, parent_id)),
                  "final_loss": dg.MetadataValue.md(statistics.markdown_table(
                      table.pivot(index="seed", columns="group", values="final_loss").reset_index()))},
        data_version=dg.DataVersion(grid_key))


@dg.asset(deps=[student_checkpoints, eval_examples, teacher_model], group_name="evaluation",
          kinds={"ray", "parquet", "mlflow"}, automation_condition=FOLLOW_UPSTREAM_OR_CODE,
          code_version=code_version_of("evaluation", "encoding", "models", "tasks"),
          check_specs=[checks.spec("evaluation_table", *checks.EVALUATION)])
def evaluation_table(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                     ray_cluster: RayResource, mlflow: MLflowResource):
    """Every checkpoint, the teacher and the untrained student, on every task's eval split."""
    cfg = experiment.config()
    students = upstream(context, "student_checkpoints")
    teacher = upstream(context, "teacher_model")
    examples = {t: upstream(context, "eval_examples", t) for t in TASKS}
    trials = pd.read_parquet(students["manifest"])
    spec = {t: {"rows": pd.read_parquet(m["path"]).to_dict("records"),
                "pool": pd.read_parquet(m["fewshot_path"]).to_dict("records"),
                "shots": cfg.data.fewshot[t]}
            for t, m in examples.items()}
    models = {"teacher": teacher["path"], "untrained_student": students["untrained_student"],
              **{f"{r.group}-seed{r.seed}": r.path for r in trials.itertuples()}}
    scores = evaluation.evaluate_models(models, spec, batch_size=cfg.eval.batch_size,
                                        max_length=cfg.eval.max_length, max_new_tokens=cfg.eval.max_new_tokens,
                                        precision=cfg.precision, batch_tokens=cfg.eval.batch_tokens,
                                        resources=cfg.eval.resources_per_model)
    by_name = {f"{r.group}-seed{r.seed}": r for r in trials.itertuples()}
    rows = []
    for name, per_task in scores.items():
        trial = by_name.get(name)
        for task, s in per_task.items():
            rows.append({"model": name, "group": trial.group if trial else name,
                         "seed": int(trial.seed) if trial else -1, "task": task,
                         "accuracy": s["accuracy"], "n": s["n"],
                         "flexible_match": s.get("flexible_match"),
                         "mlflow_run_id": trial.mlflow_run_id if trial else students["mlflow_parent_run_id"]})
    table = pd.DataFrame(rows)
    subjects = pd.DataFrame([  # MMLU per subject, as the harness reports it
        {"model": name, "task": task, "subject": subject, **v}
        for name, per_task in scores.items() for task, s in per_task.items()
        for subject, v in s.get("per_subject", {}).items()],
        columns=["model", "task", "subject", "n", "accuracy"])
    key = _key(students["grid_key"], {t: m["sha256"] for t, m in examples.items()},
               context.assets_def.code_versions_by_key[context.asset_key])
    path = write_parquet_atomic(table, experiment.root() / "evaluation" / key / "evaluation_table.parquet")
    subjects_path = write_parquet_atomic(subjects, path.with_name("per_subject.parquet"))
    client = mlflow.client()
    now = int(time.time() * 1000)
    for run_id, frame in table.groupby("mlflow_run_id"):
        metrics = [Metric(f"eval_{r.task}_accuracy" if r.seed >= 0 else f"{r.model}_{r.task}_accuracy",
                          r.accuracy, now, 0) for r in frame.itertuples()]
        client.log_batch(run_id, metrics=metrics)
    pivot = table.groupby(["group", "task"])["accuracy"].mean().unstack("task").reset_index()
    return dg.MaterializeResult(
        check_results=[checks.result(checks.EVALUATION[0],
                                     evaluation.table_problems(table, list(models), list(TASKS)))],
        metadata={"path": dg.MetadataValue.path(str(path)), "rows": len(table), "preset": cfg.name,
                  "per_subject_path": dg.MetadataValue.path(str(subjects_path)),
                  "models": len(models), "mean_accuracy": dg.MetadataValue.md(statistics.markdown_table(pivot)),
                  "mlflow_parent_run_id": students["mlflow_parent_run_id"],
                  "mlflow_experiment_id": students["mlflow_experiment_id"]},
        data_version=dg.DataVersion(file_sha256(path)[:16]))


@dg.asset(deps=[evaluation_table, student_checkpoints, teacher_cache_asset, teacher_model],
          group_name="evaluation", kinds={"pingouin", "mlflow"},
          automation_condition=FOLLOW_UPSTREAM,
          code_version=code_version_of("statistics", "study_report", "trial_cost"))
def comparison_report(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                      mlflow: MLflowResource):
    """What the study found, per task: first the control (black_box vs task_only: did the
    teacher help at all), then the white-box groups (rm-ANOVA and Friedman; paired t and
    Wilcoxon vs black_box, Holm-corrected; Hedges' g; t and bootstrap 95% CIs; the smallest
    difference the seeds detect; the teacher gap recovered); the L_KD path and each group's
    cost. Markdown, CSV and a PNG plot, also on the MLflow parent run."""
    cfg = experiment.config()
    evaluated = upstream(context, "evaluation_table")
    students = upstream(context, "student_checkpoints")
    teacher = upstream(context, "teacher_model")
    caches = [upstream(context, "teacher_cache", t)["path"] for t in TASKS]
    table = pd.read_parquet(evaluated["path"])
    trials = pd.read_parquet(students["manifest"])
    out_dir = experiment.root() / "report" / _key(evaluated["path"], students["manifest"],
                                                  context.assets_def.code_versions_by_key[context.asset_key])
    curves = pd.read_parquet(students["curves"]) if students.get("curves") else None
    report = study_report.write_study_report(cfg, table, trials, caches,
                                             len(load_tokenizer(teacher["student_tokenizer"])), out_dir,
                                             curves=curves)
    parent = evaluated["mlflow_parent_run_id"]
    client = mlflow.client()
    client.log_artifacts(parent, str(out_dir), "report")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(report["paths"]["report"])),
                  "plot": dg.MetadataValue.path(str(report["paths"]["plot"])),
                  **({"learning_curves": dg.MetadataValue.path(str(report["paths"]["curves_plot"]))}
                     if "curves_plot" in report["paths"] else {}),
                  "report": dg.MetadataValue.md(report["markdown"]),
                  "control_verdicts": dg.MetadataValue.json(report["control_verdicts"]),
                  "verdicts": dg.MetadataValue.json(report["verdicts"]),
                  "kd_path": report["kd_path"]["kd_path"],
                  "cost": dg.MetadataValue.md(statistics.markdown_table(report["tables"]["cost"])),
                  "mlflow_parent_run": dg.MetadataValue.url(
                      mlflow.run_url(evaluated["mlflow_experiment_id"], parent))},
        data_version=dg.DataVersion(file_sha256(report["paths"]["report"])[:16]))
