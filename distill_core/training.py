"""train_student: the Ray Tune function trainable that distills one (group, seed) student from
the teacher cache.

Seed s fixes the student's init, the projector's init and the data order, identically for every
group, so groups are paired by seed. The trial reports with `ray.tune.report` every
`report_every` steps, checkpoints every `checkpoint_every` steps (safetensors only, optimizer
state included) and resumes from `ray.tune.get_checkpoint()` when Tune restarts it. Its final
student is a plain HF model directory that says by itself what produced it (kdbench.json).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from distill_core.config import ExperimentConfig
from distill_core.models import init_model, load_causal_lm, load_lm_head, load_tokenizer
from distill_core.objective import Batch, distillation_loss, loss_weights
from distill_core.storage import atomic_directory
from distill_core.student import DistillationStudent
from distill_core.alignment import chunk_of_token
from distill_core.cross_vocab import VocabularyBridge
from distill_core.teacher_cache import bf16_tensor, read_teacher_cache, read_vocabulary_map

CHECKPOINT_META = "kdbench.json"


class CacheData:
    """The concatenated teacher caches of all tasks, in a fixed order, batched on demand."""

    def __init__(self, cache_dirs: list[str], distill_positions: str, pad_id: int,
                 d_teacher: int, teacher_heads: int):
        self.rows = pd.concat([read_teacher_cache(Path(d)) for d in cache_dirs], ignore_index=True)
        self.pad_id, self.d_teacher, self.heads = pad_id, d_teacher, teacher_heads
        # Decoded once into tensors: a trial reads every row again and again for hundreds of
        # steps, and per-step decoding was ~10% of a tiny student's step.
        r = self.rows
        self._ids = [torch.as_tensor(x, dtype=torch.long) for x in r["input_ids"]]
        self._answer = [torch.as_tensor(x, dtype=torch.long) for x in r["answer_mask"]]
        self._ends = [torch.as_tensor(x, dtype=torch.long) for x in r["student_chunk_ends"]]
        self._token_chunk = [torch.as_tensor(chunk_of_token(list(x)), dtype=torch.long)
                             for x in r["student_chunk_ends"]]
        self._distill = [self._distilled_chunks(a, e, distill_positions)
                         for a, e in zip(self._answer, self._ends)]
        self._hidden = [bf16_tensor(h) for h in r["hidden"]]
        self._attention = [bf16_tensor(a) for a in r["attention"]]
        self._queries = [torch.as_tensor(q, dtype=torch.long) for q in r["attn_queries"]]
        self.top_k = len(r["topk_ids"].iloc[0]) // len(r["student_chunk_ends"].iloc[0]) if len(r) else 0
        if self.top_k:
            self._topk_ids = [torch.as_tensor(x, dtype=torch.long) for x in r["topk_ids"]]
            self._topk_logprobs = [bf16_tensor(x) for x in r["topk_logprobs"]]

    @staticmethod
    def _distilled_chunks(answer: torch.Tensor, ends: torch.Tensor, which: str) -> torch.Tensor:
        """Chunks whose prediction L_KD / L_align_hidden use: all but the last, or those
        followed by a chunk with answer tokens."""
        keep = torch.zeros(len(ends), dtype=torch.long)
        if which == "all":
            keep[:-1] = 1
        else:
            starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1] + 1])
            has_answer = torch.stack([answer[s:e + 1].any() for s, e in zip(starts, ends)])
            keep[:-1] = has_answer[1:].long()
        return keep

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int]) -> Batch:
        b, d, heads = len(indices), self.d_teacher, self.heads
        t = max(len(self._ids[r]) for r in indices)
        c = max(len(self._ends[r]) for r in indices)
        q_max = max(len(self._queries[r]) for r in indices) or 1
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attn = torch.zeros(b, t, dtype=torch.long)
        answer = torch.zeros(b, t, dtype=torch.long)
        token_chunk = torch.full((b, t), -1, dtype=torch.long)
        ends = torch.zeros(b, c, dtype=torch.long)
        distill = torch.zeros(b, c, dtype=torch.long)
        hidden = torch.zeros(b, c, d)
        attention = torch.zeros(b, heads, q_max, c)
        queries = torch.full((b, q_max), -1, dtype=torch.long)
        k = self.top_k
        topk_ids = torch.zeros(b, c, k, dtype=torch.long) if k else None
        topk_logprobs = torch.zeros(b, c, k) if k else None
        for i, row in enumerate(indices):
            n, m, q = len(self._ids[row]), len(self._ends[row]), self._queries[row]
            ids[i, :n] = self._ids[row]
            attn[i, :n] = 1
            answer[i, :n] = self._answer[row]
            token_chunk[i, :n] = self._token_chunk[row]
            ends[i, :m] = self._ends[row]
            distill[i, :m] = self._distill[row]
            hidden[i, :m] = self._hidden[row].view(m, d)
            queries[i, : len(q)] = q
            attention[i, :, : len(q), :m] = self._attention[row].view(heads, len(q), m)
            if k:
                topk_ids[i, :m] = self._topk_ids[row].view(m, k)
                topk_logprobs[i, :m] = self._topk_logprobs[row].view(m, k)
        task_mask = torch.zeros_like(answer)
        task_mask[:, :-1] = answer[:, 1:]
        return Batch(ids, attn, task_mask, ends, distill, token_chunk, hidden, attention, queries,
                     topk_ids, topk_logprobs)


class BatchSchedule:
    """Which rows form the batch at each step. A batch holds rows of one task (their lengths
    are alike, so little compute goes to padding); an epoch is every task's rows in seeded
    order, cut into batches, the batches in seeded order. Step s's batch depends only on
    (seed, s), so a resumed trial continues exactly where it stopped."""

    def __init__(self, tasks: list[str], batch_size: int, seed: int):
        self.by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(math.ceil(len(r) / batch_size) for r in self.by_task.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for rows in self.by_task.values():
                order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
                batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            self._epoch = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])
        return self._epoch[1]

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        return self._batches(epoch)[index]


def build_student(cfg: ExperimentConfig, tokenizer, d_teacher: int, seed: int) -> DistillationStudent:
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
    weights = load_file(str(next((directory / "model").glob("*.safetensors"))))
    student.model.load_state_dict(weights, strict=False)  # lm_head/embeddings are not tied here
    student.hidden_state_projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
    _load_optimizer(optimizer, directory)
    return json.loads((directory / "trainer_state.json").read_text())


def write_student(out_dir: Path, model, tokenizer, meta: dict) -> None:
    """A student as a plain HF model dir (loadable with AutoModelForCausalLM) + kdbench.json
    saying what produced it, moved into place whole."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def write_untrained_student(cfg: ExperimentConfig, tokenizer_dir: str, teacher_dir: str,
                            out_dir: Path, seed: int) -> None:
    """The student exactly as seed `seed`'s trials start: the reference for "no training"."""
    tokenizer = load_tokenizer(tokenizer_dir)
    d_teacher = json.loads((Path(teacher_dir) / "config.json").read_text())["hidden_size"]
    student = build_student(cfg, tokenizer, d_teacher, seed)
    write_student(out_dir, student.model, tokenizer, {"group": "untrained", "seed": seed})


def train_student(config: dict) -> None:
    """Ray Tune function trainable; `config` is built by distill_core.grid.param_space."""
    from ray import tune

    from distill_core.tracking import TrialRun

    cfg = ExperimentConfig.model_validate(config["experiment"])
    group, seed = config["group"], int(config["seed"])
    dcfg = cfg.distill
    torch.set_num_threads(max(1, int(dcfg.resources_per_trial.get("cpu", 1))))
    torch.use_deterministic_algorithms(True, warn_only=True)

    tokenizer = load_tokenizer(config["student_tokenizer_dir"])
    teacher_config = json.loads((Path(config["teacher_dir"]) / "config.json").read_text())
    d_teacher, heads = teacher_config["hidden_size"], teacher_config["num_attention_heads"]
    data = CacheData(config["cache_dirs"], dcfg.distill_positions, tokenizer.pad_token_id,
                     d_teacher, heads)
    # The teacher's lm_head rebuilds its exact logits from the cached hidden states; a top-k
    # cache carries its logit signal itself.
    teacher_head = None if data.top_k else load_lm_head(config["teacher_dir"])
    schedule = BatchSchedule(list(data.rows["task"]), dcfg.batch_size, seed)
    weights = loss_weights(group, dcfg)

    student = build_student(cfg, tokenizer, d_teacher, seed)
    vocab = VocabularyBridge(read_vocabulary_map(Path(config["cache_dirs"][0])),
                             student.model.config.vocab_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    warmup = max(1, dcfg.steps // 20)

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / dcfg.steps))

    start_step, run_id, metrics = 0, None, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_state(Path(d), student, optimizer)
        start_step, run_id = state["step"], state.get("mlflow_run_id")
        metrics = state.get("metrics", {})

    mlflow_cfg = config.get("mlflow")
    run = None
    if mlflow_cfg and run_id:
        run = TrialRun(mlflow_cfg["tracking_uri"], run_id)
    elif mlflow_cfg:
        params = {"group": group, "seed": seed, "lr": dcfg.lr, "steps": dcfg.steps,
                  "batch_size": dcfg.batch_size, "distill_positions": dcfg.distill_positions,
                  "cache_version": config["cache_version"], **weights.as_dict()}
        run = TrialRun.start(mlflow_cfg["tracking_uri"], mlflow_cfg["experiment_id"],
                             mlflow_cfg["parent_run_id"], f"{group}-seed{seed}", params,
                             tags={"group": group, "seed": str(seed)})
        run_id = run.run_id

    window: dict[str, list[float]] = {}
    for step in range(start_step, dcfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = dcfg.lr * lr_factor(step)
        batch = data.batch(schedule.batch(step))
        # Unweighted attention is measured on the last step of each report window only.
        measure_all = (step + 1) % dcfg.report_every == 0 or step + 1 == dcfg.steps
        loss, terms = distillation_loss(student, teacher_head, batch, weights, vocab, measure_all)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"trial {group}-seed{seed}: loss is {loss.item()} at step {step} "
                                     f"(terms {terms}); lower distill.lr or check the teacher cache")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        for k, v in {"loss": loss.item(), **terms}.items():
            window.setdefault(k, []).append(v)
        done = step + 1
        if done % dcfg.report_every == 0 or done == dcfg.steps:
            metrics = {k: sum(v) / len(v) for k, v in window.items()}
            window = {}
            if run:
                run.log_metrics(metrics, step=done)
            # pid: which process runs the trial (operators and the fault-tolerance test use it)
            report = {**metrics, "step": done, "group": group, "seed": seed, "pid": os.getpid()}
            if done % dcfg.checkpoint_every == 0 or done == dcfg.steps:
                with tempfile.TemporaryDirectory() as d:
                    save_training_state(Path(d), student, optimizer,
                                        {"step": done, "mlflow_run_id": run_id,
                                         "metrics": metrics})
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
            else:
                tune.report(report)

    out_dir = Path(config["output_dir"]) / f"{group}-seed{seed}"
    meta = {"group": group, "seed": seed, "weights": weights.as_dict(), "steps": dcfg.steps,
            "lr": dcfg.lr, "cache_version": config["cache_version"],
            "code_version": config["code_version"], "teacher_dir": config["teacher_dir"],
            "final_metrics": metrics, "mlflow_run_id": run_id}
    write_student(out_dir, student.model, tokenizer, meta)
    if run:
        run.log_artifacts(str(out_dir), "checkpoint")
        run.finish()
