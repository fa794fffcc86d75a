"""The study's grid: every group x every seed, one Ray Tune run of `train_student`."""

from __future__ import annotations

from pathlib import Path

from distill_core.config import ExperimentConfig
from distill_core.training import train_student


def param_space(cfg: ExperimentConfig, **paths) -> dict:
    """Tune's param_space: the config as plain JSON, the paths a trial reads and writes, and
    the grid over groups and seeds (`paths`: cache_dirs, teacher_dir, student_tokenizer_dir,
    output_dir, cache_version, code_version, mlflow)."""
    from ray import tune

    return {"experiment": cfg.model_dump(mode="json"), **paths,
            "group": tune.grid_search(list(cfg.distill.groups)),
            "seed": tune.grid_search(cfg.seeds)}


def run_grid(cfg: ExperimentConfig, storage_dir: Path, run_name: str, space: dict,
             max_failures: int = 2, callbacks: list | None = None, tune_output: bool = False):
    """Fit the grid; an interrupted run of the same `run_name` is resumed, not restarted, and
    a trial whose process dies is retried from its last checkpoint up to `max_failures` times.
    Returns Tune's ResultGrid.

    Tune's own console output (its configuration table, progress tables, TensorBoard hint) is
    off unless `tune_output`: the study reports its progress itself (grid_progress, through
    `callbacks`). Tune's newer output engine prints its banners even at verbose=0; its classic
    reporter prints nothing there."""
    import os

    from ray import tune

    if not tune_output:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tune when the run starts, in this process

    trainable = tune.with_resources(train_student, dict(cfg.distill.resources_per_trial))
    storage_dir = Path(storage_dir).resolve()
    experiment_dir = storage_dir / run_name
    if tune.Tuner.can_restore(str(experiment_dir)):
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable,
                                   resume_unfinished=True, restart_errored=True)
        # The restored run config carries the callbacks it was pickled with (stripped of
        # their outputs, see GridProgress.__getstate__): this run's take their place.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True),  # no re-import of torch per trial
            run_config=tune.RunConfig(
                name=run_name, storage_path=str(storage_dir), verbose=1 if tune_output else 0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    return tuner.fit()


def grid_problems(trials, groups: list[str], seeds: list[int]) -> list[str]:
    """What a finished grid lacks: `trials` (rows with group, seed, path) must hold one
    checkpoint (weights and its CHECKPOINT_META) for every group x seed, and nothing else."""
    from distill_core.training import CHECKPOINT_META

    expected = {(g, s) for g in groups for s in seeds}
    done = {(r.group, r.seed) for r in trials.itertuples()
            if (Path(r.path) / "model.safetensors").is_file() and (Path(r.path) / CHECKPOINT_META).is_file()}
    problems = [f"{g}-seed{s}: no finished checkpoint" for g, s in sorted(expected - done)]
    return problems + [f"{g}-seed{s}: not in the grid" for g, s in sorted(done - expected)]
