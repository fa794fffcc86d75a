"""Evaluation of a causal LM on the unified rows.

Multiple choice (SST-2, MMLU shapes): the option with the highest log-likelihood of its
continuation given the k-shot context wins; all options of a batch go through one forward.
Math (GSM8K shape): batched greedy generation with the KV cache, then exact match of the number
after ``####`` against the row's target.
"""

from __future__ import annotations

import torch

from distill_core.encoding import encode_examples, pad_batch
from distill_core.tasks import final_number, render_prompt

STOP_STRINGS = ("Question:", "\n\n")


@torch.inference_mode()
def continuation_loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int,
                                max_length: int) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation)."""
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        encoded = encode_examples(tokenizer, [c for c, _ in chunk], [a for _, a in chunk], max_length)
        # EOS is the encoder's end marker, not part of the option being scored.
        ids, attn = pad_batch([e.input_ids[:-1] for e in encoded], tokenizer.pad_token_id)
        targets, _ = pad_batch([e.answer_mask[:-1] for e in encoded], 0)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
        token_lp = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores.extend((token_lp * targets[:, 1:]).sum(-1).tolist())
    return scores


@torch.inference_mode()
def greedy_generate(model, tokenizer, contexts: list[str], max_new_tokens: int,
                    batch_size: int) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        encoded = [[tokenizer.bos_token_id, *tokenizer(c, add_special_tokens=False)["input_ids"]]
                   for c in chunk]
        width = max(len(e) for e in encoded)
        # Left padding keeps every prompt's last token at the same position for generation.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            for stop in STOP_STRINGS:
                text = text.split(stop)[0]
            texts.append(text)
    return texts


def evaluate_task(model, tokenizer, rows: list[dict], shots: list[dict], *, batch_size: int,
                  max_length: int, max_new_tokens: int) -> dict:
    """accuracy and n for one task; `shots` are prepended to every prompt."""
    contexts = [render_prompt(r, shots) for r in rows]
    if rows[0]["choices"] is None:
        outputs = greedy_generate(model, tokenizer, contexts, max_new_tokens, batch_size)
        correct = [final_number(o) == r["target"] for o, r in zip(outputs, rows)]
    else:
        pairs = [(c, choice) for c, r in zip(contexts, rows) for choice in r["choices"]]
        scores = continuation_loglikelihoods(model, tokenizer, pairs, batch_size, max_length)
        correct, i = [], 0
        for r in rows:
            k = len(r["choices"])
            best = max(range(k), key=lambda j: scores[i + j])
            correct.append(best == int(r["label"]))
            i += k
    return {"accuracy": sum(correct) / len(correct), "n": len(correct)}


def evaluate_checkpoint(model_dir: str, tasks: dict[str, dict], *, batch_size: int,
                        max_length: int, max_new_tokens: int, threads: int = 1) -> dict[str, dict]:
    """Evaluate the HF model in `model_dir` (with its tokenizer) on every task.
    tasks: {task: {"rows": [...], "shots": [...]}} -> {task: {"accuracy", "n"}}."""
    from distill_core.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    return {task: evaluate_task(model, tokenizer, spec["rows"], spec["shots"],
                                batch_size=batch_size, max_length=max_length,
                                max_new_tokens=max_new_tokens)
            for task, spec in tasks.items()}


def evaluate_models(models: dict[str, str], tasks: dict[str, dict], *, batch_size: int,
                    max_length: int, max_new_tokens: int) -> dict[str, dict[str, dict]]:
    """Evaluate many model dirs in parallel, one Ray task (one CPU) per model.
    models: {name: dir} -> {name: {task: {"accuracy", "n"}}}."""
    import ray

    remote = ray.remote(num_cpus=1)(evaluate_checkpoint)
    tasks_ref = ray.put(tasks)
    futures = {name: remote.remote(path, tasks_ref, batch_size=batch_size, max_length=max_length,
                                   max_new_tokens=max_new_tokens)
               for name, path in models.items()}
    return dict(zip(futures, ray.get(list(futures.values()))))
