"""A trial's learning curve: the student scored on held-out validation rows (train_examples'
`validation` split, never trained on) every distill.curve_every steps, reported through Tune
and to the trial's MLflow run.

Scoring must not change the training it observes: it runs without gradients, with the model in
eval mode and back, and puts the random state (CPU and CUDA) back as it found it; batches
depend only on (seed, step). A trial with curves ends with the same weights as one without
(tests/distill_core/test_learning_curve.py).
"""

from __future__ import annotations

import pandas as pd
import torch

from distill_core.device import autocast
from distill_core.encoding import encode_examples, pad_batch
from distill_core.evaluation import evaluate_task
from distill_core.losses import L_task
from distill_core.teacher_cache import training_contexts


def answer_loss(model, tokenizer, rows: pd.DataFrame, max_length: int, batch_size: int) -> float:
    """Mean cross-entropy of the answer tokens (L_task's definition) over `rows`."""
    contexts = training_contexts(rows)
    encoded = encode_examples(tokenizer, contexts["context"], contexts["answer"], max_length, contexts["id"])
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = pad_batch([e.input_ids for e in chunk], tokenizer.pad_token_id)
        answer = pad_batch([e.answer_mask for e in chunk], 0)[0]
        ids, mask, answer = (t.to(model.device) for t in (ids, mask, answer))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        tokens = int(answer[:, 1:].sum())  # L_task's mean over this batch's answer tokens, weighted
        total += float(L_task(logits, ids[:, 1:], answer[:, 1:])) * tokens
        count += tokens
    return total / max(count, 1)


@torch.no_grad()
def validation_metrics(model, tokenizer, validation: dict[str, pd.DataFrame], *, max_length: int,
                       max_new_tokens: int, batch_size: int, precision: str) -> dict[str, float]:
    """{val_loss, val_<task>_loss, val_<task>_accuracy}: zero-shot accuracy (option scoring, or
    greedy generation for the math task, as evaluation_table scores) and the answer loss on
    each task's validation rows; val_loss is the tasks' mean."""
    was_training = model.training
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        out: dict[str, float] = {}
        with autocast(model.device, precision):
            for task, rows in validation.items():
                if rows.empty:
                    continue
                scored = evaluate_task(model, tokenizer, rows.to_dict("records"), [], 0,
                                       batch_size=batch_size, max_length=max_length,
                                       max_new_tokens=max_new_tokens)
                out[f"val_{task}_accuracy"] = scored["accuracy"]
                out[f"val_{task}_loss"] = answer_loss(model, tokenizer, rows, max_length, batch_size)
        losses = [v for k, v in out.items() if k.endswith("_loss")]
        if losses:
            out["val_loss"] = sum(losses) / len(losses)
        return out
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def curves_table(histories: list[pd.DataFrame]) -> pd.DataFrame:
    """Long table (group, seed, step, metric, value) of the trials' validation reports, from
    their Tune result histories (one DataFrame a trial, with group, seed, step columns)."""
    frames = []
    for history in histories:
        columns = [c for c in history.columns if c.startswith("val_")]
        if not columns or history.empty:
            continue
        rows = history.dropna(subset=columns, how="all")
        frames.append(rows.melt(id_vars=["group", "seed", "step"], value_vars=columns,
                                var_name="metric", value_name="value").dropna(subset=["value"]))
    if not frames:
        return pd.DataFrame(columns=["group", "seed", "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True).drop_duplicates(["group", "seed", "step", "metric"], keep="last")
