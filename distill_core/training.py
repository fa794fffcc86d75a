"""One trial, one (group, seed) student distilled from the teacher cache, as a recipe in
torchtune's shape: `setup` (device, data, models, optimizer, resume), `train_step`,
`save_checkpoint`, `finish`; and `train_student`, the Ray Tune function trainable that drives
it (reports, checkpoints, the trial's MLflow run).

Seed s fixes the student's init, the projector's init and the data order, identically for every
group, so groups are paired by seed. The trial reports with `ray.tune.report` every
`report_every` steps, checkpoints every `checkpoint_every` steps (safetensors only, optimizer
state included) and resumes from `ray.tune.get_checkpoint()` when Tune restarts it. Its final
student is a plain HF model directory that says by itself what produced it (kdbench.json).

The trial runs on the GPU Ray gave it, if any, in the preset's precision (distill_core.device),
and reads the cache from memory-mapped Arrow files (distill_core.cache_reader; on a GPU while
the previous step runs, batching.Prefetcher): its memory does not grow with the cache.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from distill_core.batching import BatchSchedule, Prefetcher
from distill_core.cache_reader import TeacherCacheReader
from distill_core.cross_vocab import VocabularyBridge
from distill_core.device import adamw, autocast, frozen_dtype, prepare, worker_device
from distill_core.models import init_model, load_causal_lm, load_lm_head, load_tokenizer
from distill_core.objective import Batch, LossWeights, distillation_loss, loss_weights, measured
from distill_core.storage import atomic_directory
from distill_core.student import DistillationStudent
from distill_core.teacher_cache import read_vocabulary_map
from distill_core.trial_cost import TrialMeter

if TYPE_CHECKING:  # the config needs pydantic; a step on its own (bench/gpu.py) does not
    from distill_core.config import ExperimentConfig

CHECKPOINT_META = "kdbench.json"


def build_student(cfg: ExperimentConfig, tokenizer, d_teacher: int, seed: int) -> DistillationStudent:
    """The student (float32 master weights) and its projector, as seed `seed` starts them."""
    if cfg.student.source == "hub":
        model = load_causal_lm(cfg.student.hub_id, cfg.student.revision)
    else:
        model = init_model(cfg.student, tokenizer, cfg.max_length, seed=seed)
    torch.manual_seed(seed + 1)  # projector init: per seed, the same for every group
    student = DistillationStudent(model, d_teacher)
    return student.train()


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.contiguous() for idx, slots in state["state"].items()
               for name, value in slots.items()}
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(state["param_groups"]))


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(directory: Path, student: DistillationStudent, optimizer, state: dict) -> None:
    student.model.save_pretrained(directory / "model", safe_serialization=True)
    save_file(student.hidden_state_projector.state_dict(), str(directory / "projector.safetensors"))
    _save_optimizer(optimizer, directory)
    (directory / "trainer_state.json").write_text(json.dumps(state))


def load_training_state(directory: Path, student: DistillationStudent, optimizer) -> dict:
    weights = {}
    for shard in sorted((directory / "model").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    student.model.load_state_dict(weights, strict=False)  # lm_head/embeddings are not tied here
    student.hidden_state_projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
    _load_optimizer(optimizer, directory)
    return json.loads((directory / "trainer_state.json").read_text())


def write_student(out_dir: Path, model, tokenizer, meta: dict, dtype: torch.dtype = torch.float32) -> None:
    """A student as a plain HF model dir (loadable with AutoModelForCausalLM) + kdbench.json
    saying what produced it, moved into place whole; weights in `dtype` (the precision it is
    evaluated in; training is over, so the model is converted in place)."""
    with atomic_directory(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def write_untrained_student(cfg: ExperimentConfig, tokenizer_dir: str, teacher_dir: str,
                            out_dir: Path, seed: int) -> None:
    """The student exactly as seed `seed`'s trials start: the reference for "no training"."""
    tokenizer = load_tokenizer(tokenizer_dir)
    d_teacher = json.loads((Path(teacher_dir) / "config.json").read_text())["hidden_size"]
    student = build_student(cfg, tokenizer, d_teacher, seed)
    write_student(out_dir, student.model, tokenizer, {"group": "untrained", "seed": seed},
                  dtype=frozen_dtype(cfg.precision))


class DistillationStep:
    """One optimizer step of a group's objective: the student's forward in `precision` (under
    bf16 autocast, fp32 master weights), the loss, a NaN check naming `name`, backward,
    gradient clipping at 1.0, the optimizer's step."""

    def __init__(self, student: DistillationStudent, teacher_head: torch.nn.Module | None,
                 vocab: VocabularyBridge, weights: LossWeights, optimizer: torch.optim.Optimizer,
                 precision: str, name: str):
        self.student, self.teacher_head, self.vocab = student, teacher_head, vocab
        self.weights, self.optimizer, self.precision, self.name = weights, optimizer, precision, name
        self.device = next(student.parameters()).device

    def __call__(self, batch: Batch, lr: float, measure_all: bool, step: int = 0) -> dict[str, float]:
        """The loss and each term's value, before the update."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with autocast(self.device, self.precision):
            loss, terms = distillation_loss(self.student, self.teacher_head, batch, self.weights,
                                            self.vocab, measure_all)
        values = measured(loss, terms)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"trial {self.name}: loss is {values['loss']} at step {step} (terms "
                f"{ {k: v for k, v in values.items() if k != 'loss'} }); lower distill.lr or "
                "check the teacher cache")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        return values


class DistillationRecipe:
    """A trial's parts, each usable alone: `setup` builds everything (and restores a
    checkpoint), `batches` yields each remaining step's batch on the device, `train_step`
    takes one optimizer step, `save_checkpoint` writes what resuming needs, `finish` writes the
    final student. `config` is the trial's Tune config (distill_core.grid.param_space)."""

    def __init__(self, config: dict):
        from distill_core.config import ExperimentConfig

        self.config = config
        self.cfg = ExperimentConfig.model_validate(config["experiment"])
        self.group, self.seed = config["group"], int(config["seed"])
        self.name = f"{self.group}-seed{self.seed}"
        self.step = 0              # steps done
        self.resumed: dict = {}    # what the checkpoint carried beside the step

    def setup(self, checkpoint_dir: Path | None = None) -> None:
        cfg, dcfg = self.cfg, self.cfg.distill
        self.device = worker_device()
        prepare(self.device, threads=max(1, int(dcfg.resources_per_trial.get("cpu", 1))),
                deterministic=True)
        frozen = frozen_dtype(cfg.precision)
        teacher_dir = self.config["teacher_dir"]
        self.tokenizer = load_tokenizer(self.config["student_tokenizer_dir"])
        teacher_config = json.loads((Path(teacher_dir) / "config.json").read_text())
        d_teacher = teacher_config["hidden_size"]
        self.data = TeacherCacheReader(self.config["cache_dirs"], dcfg.distill_positions,
                                       self.tokenizer.pad_token_id, d_teacher,
                                       teacher_config["num_attention_heads"], signal_dtype=frozen,
                                       labelled_rows=dcfg.labelled_rows)
        # The teacher's lm_head rebuilds its exact logits from the cached hidden states; a
        # top-k cache carries its logit signal itself.
        self.teacher_head = None if self.data.top_k else load_lm_head(teacher_dir, frozen, self.device)
        self.schedule = BatchSchedule(self.data.tasks, dcfg.batch_size, self.seed)
        self.weights = loss_weights(self.group, dcfg)
        self.student = build_student(cfg, self.tokenizer, d_teacher, self.seed).to(self.device)
        if dcfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.vocab = VocabularyBridge(read_vocabulary_map(Path(self.config["cache_dirs"][0])),
                                      self.student.model.config.vocab_size).to(self.device)
        self.optimizer = adamw(self.student.parameters(), dcfg.lr, dcfg.weight_decay, self.device)
        self.distill_step = DistillationStep(self.student, self.teacher_head, self.vocab, self.weights,
                                          self.optimizer, cfg.precision, self.name)
        if checkpoint_dir is not None:
            state = load_training_state(Path(checkpoint_dir), self.student, self.optimizer)
            self.step = state.pop("step")
            self.resumed = state

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first 5% of steps, then cosine decay to 0."""
        dcfg = self.cfg.distill
        warmup = max(1, dcfg.steps // 20)
        return dcfg.lr * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / dcfg.steps)))

    def batches(self) -> Iterator[tuple[int, Batch]]:
        """(step, its batch on the device) for every step left; step s's rows depend only on
        (seed, s). On a GPU the next batches are read, decoded and pinned while a step runs.
        On a CPU they are read between steps: the step itself keeps every core the trial has
        busy, and a reading thread beside it stalls torch's threads (bench/step.py: a step
        ~10% slower with the thread, for a 3 ms read)."""
        def host_batch(step: int) -> Batch:
            return self.data.batch(self.schedule.batch(step)).pin(self.device)

        steps = range(self.step, self.cfg.distill.steps)
        ahead = Prefetcher(host_batch, steps) if self.device.type == "cuda" else \
            ((step, host_batch(step)) for step in steps)
        for step, batch in ahead:
            yield step, batch.to(self.device)

    def measures_all(self, step: int) -> bool:
        """Terms the group does not train on are measured on the last step of each report
        window (objective.distillation_loss); the window's other steps compute only its own."""
        done, dcfg = step + 1, self.cfg.distill
        return done % dcfg.report_every == 0 or done == dcfg.steps

    def train_step(self, step: int, batch: Batch) -> dict[str, float]:
        """Step `step` on its batch; the loss and each term's value."""
        values = self.distill_step(batch, self.lr_at(step), self.measures_all(step), step)
        self.step = step + 1
        return values

    def validation_rows(self) -> dict:
        """{task: held-out rows} the learning curve scores (empty: no curve)."""
        import pandas as pd

        if not self.cfg.distill.curve_every:
            return {}
        paths = self.config.get("validation_paths") or {}
        rows = {task: pd.read_parquet(path) for task, path in paths.items()}
        return {task: frame for task, frame in rows.items() if len(frame)}

    def validate(self, validation: dict) -> dict[str, float]:
        """The learning curve's point now (learning_curve.validation_metrics)."""
        from distill_core.learning_curve import validation_metrics

        cfg = self.cfg
        return validation_metrics(self.student.model, self.tokenizer, validation,
                                  max_length=cfg.max_length, max_new_tokens=cfg.eval.max_new_tokens,
                                  batch_size=cfg.eval.batch_size, precision=cfg.precision)

    def save_checkpoint(self, directory: Path, extra: dict) -> None:
        """Weights, projector, optimizer state and the step (with `extra`) in `directory`."""
        save_training_state(directory, self.student, self.optimizer, {"step": self.step, **extra})

    def finish(self, extra_meta: dict) -> Path:
        """The final student as a plain HF dir under output_dir, in the preset's precision."""
        dcfg, config = self.cfg.distill, self.config
        out_dir = Path(config["output_dir"]) / self.name
        meta = {"group": self.group, "seed": self.seed, "weights": self.weights.as_dict(),
                "steps": dcfg.steps, "lr": dcfg.lr, "precision": self.cfg.precision,
                "cache_version": config["cache_version"], "code_version": config["code_version"],
                "teacher_dir": config["teacher_dir"], **extra_meta}
        write_student(out_dir, self.student.model, self.tokenizer, meta,
                      dtype=frozen_dtype(self.cfg.precision))
        return out_dir


def train_student(config: dict) -> None:
    """Ray Tune function trainable; `config` is built by distill_core.grid.param_space."""
    import ray
    from ray import tune

    recipe = DistillationRecipe(config)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            recipe.setup(Path(d))
    else:
        recipe.setup()
    node_id = ray.get_runtime_context().get_node_id()
    run = _trial_run(recipe, config.get("mlflow"), node_id)
    run_id = run.run_id if run else None
    dcfg = recipe.cfg.distill
    metrics = recipe.resumed.get("metrics", {})
    meter = TrialMeter.from_state(recipe.device, recipe.resumed.get("cost"))
    validation = recipe.validation_rows()
    window: dict[str, list[float]] = {}
    for step, batch in recipe.batches():
        for k, v in recipe.train_step(step, batch).items():
            window.setdefault(k, []).append(v)
        meter.count(batch.attention_mask)
        done = step + 1
        if done % dcfg.report_every and done != dcfg.steps:
            continue
        metrics = {k: sum(v) / len(v) for k, v in window.items()}
        window = {}
        curve = {}
        if validation and (done % dcfg.curve_every == 0 or done == dcfg.steps):
            with meter.excluding():
                curve = recipe.validate(validation)
        cost = meter.state()
        if run:
            run.log_metrics({**metrics, **curve, "tokens_per_s": cost["tokens_per_s"],
                             "peak_memory_mb": cost["peak_mb"]}, step=done)
        # Which process and which Ray node run the trial (operators and the fault-tolerance
        # tests use them).
        report = {**metrics, **curve, "step": done, "group": recipe.group, "seed": recipe.seed,
                  "pid": os.getpid(), "node_id": node_id, "train_seconds": cost["seconds"],
                  "tokens_per_s": cost["tokens_per_s"], "peak_memory_mb": cost["peak_mb"]}
        if done % dcfg.checkpoint_every == 0 or done == dcfg.steps:
            with tempfile.TemporaryDirectory() as d:
                recipe.save_checkpoint(Path(d), {"mlflow_run_id": run_id, "metrics": metrics, "cost": cost})
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(report)
    cost = meter.state()
    out_dir = recipe.finish({"final_metrics": metrics, "mlflow_run_id": run_id, "cost": cost})
    if run:
        run.log_metrics({"train_seconds": cost["seconds"]}, step=dcfg.steps)
        run.log_artifacts(str(out_dir), "checkpoint")
        run.finish()


def _trial_run(recipe: DistillationRecipe, mlflow_cfg: dict | None, node_id: str):
    """The trial's MLflow child run: the one its checkpoint names, else found or created. A
    tracking server this node cannot reach is named, with the node."""
    if not mlflow_cfg:
        return None
    from distill_core.tracking import TrialRun

    uri = mlflow_cfg["tracking_uri"]
    try:
        if run_id := recipe.resumed.get("mlflow_run_id"):
            return TrialRun(uri, run_id)
        dcfg = recipe.cfg.distill
        params = {"group": recipe.group, "seed": recipe.seed, "lr": dcfg.lr, "steps": dcfg.steps,
                  "batch_size": dcfg.batch_size, "distill_positions": dcfg.distill_positions,
                  "precision": recipe.cfg.precision, "cache_version": recipe.config["cache_version"],
                  **recipe.weights.as_dict()}
        return TrialRun.start(uri, mlflow_cfg["experiment_id"], mlflow_cfg["parent_run_id"],
                              recipe.name, params, tags={"group": recipe.group, "seed": str(recipe.seed)})
    except Exception as err:  # mlflow wraps connection errors in several types
        raise ConnectionError(f"trial {recipe.name} on Ray node {node_id}: MLflow tracking at "
                              f"{uri} is not reachable ({type(err).__name__}: {str(err)[:200]})") from err
