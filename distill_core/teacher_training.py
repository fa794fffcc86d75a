"""Train the tiny preset's teacher: a small Llama LM fitted to the training rows of all tasks,
so that it knows the tasks and the student has something to learn from it.

The loss is next-token CE on every token (the teacher is a language model of the task text, so
its distributions at prompt positions carry knowledge too), with the answer tokens' mean and
the prompt tokens' mean weighted equally: otherwise the one-token answers of the
classification tasks are a few percent of the gradient."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from distill_core.config import ExperimentConfig
from distill_core.device import adamw, autocast, frozen_dtype, prepare, worker_device
from distill_core.encoding import encode_examples, pad_batch
from distill_core.models import init_model, load_tokenizer
from distill_core.storage import atomic_directory
from distill_core.teacher_cache import training_contexts
from distill_core.tokenizer_training import model_tokenizer


def train_teacher(contexts, tokenizer, cfg: ExperimentConfig, log=lambda step, total, loss: None):
    """contexts: DataFrame with id, context, answer (see teacher_cache.training_contexts).
    On this process's GPU if it has one, in the preset's precision (float32 master weights
    under bf16 autocast); the model comes back on the CPU."""
    tcfg = cfg.teacher
    device = worker_device()
    prepare(device)
    model = init_model(tcfg, tokenizer, cfg.max_length, seed=tcfg.seed).to(device)
    encoded = encode_examples(tokenizer, contexts["context"], contexts["answer"], cfg.max_length,
                              contexts["id"])
    generator = torch.Generator().manual_seed(tcfg.seed)
    steps_per_epoch = math.ceil(len(encoded) / tcfg.batch_size)
    total = steps_per_epoch * tcfg.train_epochs
    optimizer = adamw(model.parameters(), tcfg.lr, 0.01, device)
    warmup = max(1, total // 20)
    log_every = max(1, math.ceil(total / 5))  # five lines, whatever the preset's size
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    step, loss_value = 0, float("nan")
    for _ in range(tcfg.train_epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), tcfg.batch_size):
            chosen = [encoded[i] for i in order[start:start + tcfg.batch_size]]
            ids, mask = (t.to(device) for t in pad_batch([e.input_ids for e in chosen], tokenizer.pad_token_id))
            answer = pad_batch([e.answer_mask for e in chosen], 0)[0].to(device)
            with autocast(device, cfg.precision):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            # On rows of the vocabulary (contiguous), as L_task: the [B, V, T] layout is slower.
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                 reduction="none").view(ids.shape[0], -1)
            is_answer, is_prompt = answer[:, 1:], mask[:, 1:] * (1 - answer[:, 1:])
            loss = ((ce * is_answer).sum() / is_answer.sum().clamp_min(1)
                    + (ce * is_prompt).sum() / is_prompt.sum().clamp_min(1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            loss_value = loss.item()
            if (step % log_every == 0 and step < total) or step == total:
                log(step, total, loss_value)
    model.eval()
    return model.cpu(), {"steps": step, "final_loss": loss_value}


def prepare_teacher(cfg: ExperimentConfig, train_rows, out_dir, log=lambda step, total, loss: None) -> dict:
    """The teacher_model asset's work: a local HF dir holding the frozen teacher with its
    tokenizer and, under `student_tokenizer/`, the student's tokenizer. tiny: train both
    tokenizers (different families and sizes, as the real pair's) and the teacher on
    `train_rows` (all tasks); init: a random teacher of the preset's sizes (paper-shapes),
    held in the preset's precision; hub: download the pinned revision's safetensors once.
    A tokenizer named by hub id or local path is loaded instead of trained."""
    out_dir = Path(out_dir)
    contexts = training_contexts(pd.concat(train_rows, ignore_index=True))
    texts = list(contexts["context"] + contexts["answer"])
    with atomic_directory(out_dir) as tmp:
        if cfg.teacher.source == "hub":
            from huggingface_hub import snapshot_download

            snapshot_download(cfg.teacher.hub_id, revision=cfg.teacher.revision, local_dir=tmp,
                              allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
            check_declared_sizes(cfg.teacher, tmp / "config.json")
            info = {"source": cfg.teacher.hub_id, "revision": cfg.teacher.revision}
            if cfg.teacher.tokenizer_from:  # a tokenizer named in the preset replaces the model's own
                model_tokenizer(cfg.teacher, texts).save_pretrained(tmp)
        else:
            tokenizer = model_tokenizer(cfg.teacher, texts)
            started = time.perf_counter()
            if cfg.teacher.source == "init":
                model = init_model(cfg.teacher, tokenizer, cfg.max_length, seed=cfg.teacher.seed,
                                   dtype=frozen_dtype(cfg.precision))
                info = {"random_init": True}
            else:
                model, info = train_teacher(contexts, tokenizer, cfg, log)
                info["train_seconds"] = round(time.perf_counter() - started, 1)
            info["parameters"] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        # The student's tokenizer spec equal to the teacher's: one tokenizer for both (the
        # same-vocabulary pair, exact L_KD), not a second one trained alike.
        same = cfg.student.tokenizer is not None and cfg.student.tokenizer == cfg.teacher.tokenizer
        student_tokenizer = load_tokenizer(tmp) if same else model_tokenizer(cfg.student, texts)
        student_tokenizer.save_pretrained(tmp / "student_tokenizer")
        info["teacher_vocab"] = len(load_tokenizer(tmp))
        info["student_vocab"] = len(student_tokenizer)
    return info


def check_declared_sizes(model_cfg, config_json: Path) -> None:
    """A hub model's sizes, where the preset declares them (for `kdbench estimate`), must be
    the downloaded config's: otherwise the estimate and the budget check were of another model."""
    import json

    actual = json.loads(Path(config_json).read_text())
    names = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}
    for ours, theirs in names.items():
        declared = getattr(model_cfg, ours, None)
        if declared is not None and actual.get(theirs) != declared:
            raise ValueError(f"{model_cfg.hub_id}@{model_cfg.revision}: config.json has "
                             f"{theirs}={actual.get(theirs)}, the preset declares {ours}={declared}")
