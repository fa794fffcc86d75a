"""train_student under a real Ray Tune: HF checkpoints, pairing by seed, and a trial killed by
SIGKILL that resumes from its checkpoint to the same final metrics."""

import json
import os
import signal

import pandas as pd
import pytest
import torch
from ray import tune
from transformers import AutoModelForCausalLM

from distill_core.config import TASKS
from distill_core.grid import param_space, run_grid
from distill_core.models import load_tokenizer
from distill_core.batching import BatchSchedule
from distill_core.training import build_student

STEPS = 20


def _space(cfg, caches, teacher_dir, out_dir):
    return param_space(cfg, cache_dirs=caches, teacher_dir=str(teacher_dir),
                       student_tokenizer_dir=str(teacher_dir / "student_tokenizer"),
                       output_dir=str(out_dir), cache_version="test", code_version="test",
                       mlflow=None)


class KillOnceAfterCheckpoint(tune.Callback):
    def __init__(self, at_step: int):
        self.at_step, self.killed_pid = at_step, None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed_pid is None and result["step"] == self.at_step:
            self.killed_pid = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


def test_grid_trains_loadable_students_and_a_killed_trial_resumes_exactly(
        tmp_path, tiny_config, tiny_caches, tiny_teacher_dir):
    cfg = tiny_config.model_copy(update={"distill": tiny_config.distill.model_copy(
        update={"groups": ["black_box", "combined"], "seeds": 1})})
    results = run_grid(cfg, tmp_path / "ray", "uninterrupted",
                       _space(cfg, tiny_caches, tiny_teacher_dir, tmp_path / "a"))
    assert not results.errors
    final = {r.config["group"]: r.metrics for r in results}
    assert set(final) == {"black_box", "combined"} and all(m["step"] == STEPS for m in final.values())
    history = {r.config["group"]: r.metrics_dataframe for r in results}
    assert list(history["combined"]["step"]) == [5, 10, 15, 20]
    # Same seed, same init and data: the groups differ only by their loss.
    assert final["black_box"]["L_align_hidden"] != final["combined"]["L_align_hidden"]

    student_dir = tmp_path / "a" / "combined-seed0"
    meta = json.loads((student_dir / "kdbench.json").read_text())
    assert meta["group"] == "combined" and meta["seed"] == 0
    assert meta["weights"]["gamma_attn"] == cfg.distill.gamma_attn > 0
    assert json.loads((tmp_path / "a" / "black_box-seed0" / "kdbench.json").read_text())[
        "weights"]["gamma_hidden"] == 0
    model = AutoModelForCausalLM.from_pretrained(student_dir, use_safetensors=True)
    assert model.config.hidden_size == cfg.student.hidden_size
    assert any(p.name.endswith(".safetensors") for p in student_dir.iterdir())

    combined_only = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"groups": ["combined"]})})
    killer = KillOnceAfterCheckpoint(at_step=10)
    resumed = run_grid(combined_only, tmp_path / "ray", "killed",
                       _space(combined_only, tiny_caches, tiny_teacher_dir, tmp_path / "b"),
                       max_failures=1, callbacks=[killer])
    assert killer.killed_pid is not None and not resumed.errors
    (trial,) = list(resumed)
    assert trial.metrics["pid"] != killer.killed_pid  # a new process finished the trial
    for key in ("loss", "L_task", "L_KD", "L_align_hidden", "L_align_attn"):
        assert trial.metrics[key] == final["combined"][key], key
    a = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "combined-seed0").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_fixes_init_and_data_order(tiny_config, tiny_teacher_dir):
    tok = load_tokenizer(tiny_teacher_dir)
    one, same, other = (build_student(tiny_config, tok, 96, s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(one[k], same[k]) for k in one)
    assert not torch.equal(one["hidden_state_projector.weight"], other["hidden_state_projector.weight"])
    tasks = ["sst2"] * 23 + ["gsm8k"] * 17
    one, same, other = BatchSchedule(tasks, 8, 3), BatchSchedule(tasks, 8, 3), BatchSchedule(tasks, 8, 4)
    assert [one.batch(s) for s in range(12)] == [same.batch(s) for s in range(12)]
    assert [one.batch(s) for s in range(6)] != [other.batch(s) for s in range(6)]
    assert one.per_epoch == 3 + 3
    epoch = [one.batch(s) for s in range(6)]
    assert sorted(i for b in epoch for i in b) == list(range(40))  # every row once an epoch
    assert all(len({tasks[i] for i in b}) == 1 for b in epoch)     # one task a batch
    assert [one.batch(s) for s in range(6, 12)] != epoch            # a new order next epoch


def test_a_nan_loss_fails_its_trial_naming_it_and_writes_no_checkpoint(
        tmp_path, tiny_config, tiny_caches, tiny_teacher_dir, nan_hidden):
    """A cache whose hidden states are NaN (written around the cache_valid check): the trial
    stops at its first step with an error that names it, and leaves no student behind."""
    import shutil

    corrupted = []
    for cache in tiny_caches:
        copy = tmp_path / "caches" / os.path.basename(cache)
        shutil.copytree(cache, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        for name in manifest["files"] + manifest["arrow_files"]:
            nan_hidden(copy / name)
        corrupted.append(str(copy))
    cfg = tiny_config.model_copy(update={"distill": tiny_config.distill.model_copy(
        update={"groups": ["black_box"], "seeds": 1})})
    results = run_grid(cfg, tmp_path / "ray", "nan", _space(cfg, corrupted, tiny_teacher_dir,
                                                             tmp_path / "out"), max_failures=0)
    (error,) = results.errors
    assert "trial black_box-seed0: loss is nan at step 0" in str(error)
    assert "check the teacher cache" in str(error)
    assert not (tmp_path / "out" / "black_box-seed0").exists()


def test_grid_problems_name_each_missing_or_unexpected_checkpoint(tmp_path):
    from distill_core.grid import grid_problems
    from distill_core.training import CHECKPOINT_META

    rows = []
    for group, seed, files in (("black_box", 0, ["model.safetensors", CHECKPOINT_META]),
                               ("black_box", 1, ["model.safetensors"]),  # no kdbench.json
                               ("combined", 9, ["model.safetensors", CHECKPOINT_META])):
        path = tmp_path / f"{group}-seed{seed}"
        path.mkdir()
        for name in files:
            (path / name).write_text("x")
        rows.append({"group": group, "seed": seed, "path": str(path)})
    assert grid_problems(pd.DataFrame(rows), ["black_box", "combined"], [0, 1]) == [
        "black_box-seed1: no finished checkpoint", "combined-seed0: no finished checkpoint",
        "combined-seed1: no finished checkpoint", "combined-seed9: not in the grid"]


def test_labelled_rows_limit_L_task_to_each_tasks_first_rows_and_keep_the_teachers_signals(
        tiny_config, tiny_caches, tiny_teacher_dir, trial_config, tmp_path):
    """distill.labelled_rows: L_task sees the answers of each task's first n rows (in the
    reader's id order); L_KD still learns on every row. A step on rows with no label gives
    task_only a zero loss (no NaN, no crash); black_box still learns from the teacher."""
    from distill_core.cache_reader import TeacherCacheReader
    from distill_core.training import DistillationRecipe

    tok = load_tokenizer(tiny_teacher_dir / "student_tokenizer")
    labelled = {"sst2": 5, "mmlu": 0, "gsm8k": 48}
    full = TeacherCacheReader(tiny_caches, "all", tok.pad_token_id, 96, 4)
    part = TeacherCacheReader(tiny_caches, "all", tok.pad_token_id, 96, 4, labelled_rows=labelled)
    for task, n in labelled.items():
        rows = [i for i, t in enumerate(part.tasks) if t == task]
        assert part.labelled[rows].tolist() == [True] * n + [False] * (len(rows) - n)
    sst2 = [i for i, t in enumerate(part.tasks) if t == "sst2"][3:9]  # 2 labelled, 4 not
    a, b = full.batch(sst2), part.batch(sst2)
    assert a.task_mask.sum(1).gt(0).all()
    assert b.task_mask.sum(1).gt(0).tolist() == [True, True, False, False, False, False]
    assert torch.equal(a.task_mask[:2], b.task_mask[:2])
    assert torch.equal(a.distill_mask, b.distill_mask) and torch.equal(a.input_ids, b.input_ids)

    unlabelled = [i for i, t in enumerate(part.tasks) if t == "mmlu"][:8]
    for group, kd_zero in (("task_only", True), ("black_box", False)):
        recipe = DistillationRecipe(trial_config(tiny_config, tiny_caches, tiny_teacher_dir, tmp_path,
                                                 group=group, labelled_rows=labelled))
        recipe.setup()
        values = recipe.train_step(0, recipe.data.batch(unlabelled))
        assert values["L_task"] == 0.0
        assert (values["loss"] == 0.0) is kd_zero
