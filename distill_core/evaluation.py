"""Evaluation of a causal LM on the unified rows, by the lm-evaluation-harness protocols.

Multiple choice (SST-2, MMLU): the option with the highest log-likelihood of its continuation
given the context (description + k shots + prompt) wins. Batched, and where every option is one
token that extends the context's own tokenization (" A".." D", " negative"/" positive" for most
tokenizers) the context runs once for all options and the options are read from its last
next-token distribution; otherwise all options of a batch go through one forward.
Math (GSM8K): batched greedy generation with the KV cache until the harness's stop strings,
then strict-match (``#### N``) and flexible-extract (last number) against the reference.

Batches hold at most `batch_size` rows and, given `batch_tokens`, at most that many padded
tokens, rows of like length together (batching.token_batches). A model runs on the device its
tensors are on (the GPU Ray gave the evaluation, if any), in the dtype it was loaded in.
"""

from __future__ import annotations

import torch

from distill_core.batching import token_batches
from distill_core.encoding import bos_prefix, encode_examples, pad_batch
from distill_core.tasks import (gsm8k_flexible, gsm8k_normalize, gsm8k_strict, render_prompt,
                                select_shots)

STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")  # the harness's gsm8k `until`


def _score_rows(model, ids_list, mask_list, pad_id) -> list[float]:
    ids, attn = (t.to(model.device) for t in pad_batch(ids_list, pad_id))
    targets = pad_batch(mask_list, 0)[0].to(model.device)
    # Logits only where a target token is predicted (position t predicts t + 1): the vocabulary
    # projection at every position of a 5-shot prompt is most of a small model's work.
    keep = targets[:, 1:].bool().any(0).nonzero().squeeze(1)
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep, use_cache=False).logits
    token_lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:][:, keep, None]).squeeze(-1)
    return (token_lp * targets[:, 1:][:, keep]).sum(-1).tolist()


@torch.inference_mode()
def choice_loglikelihoods(model, tokenizer, contexts: list[str], choices: list[list[str]],
                          batch_size: int, max_length: int, row_ids=None,
                          truncated: set | None = None,
                          batch_tokens: int | None = None) -> list[list[float]]:
    """log p(choice | context) for every choice of every context (sum over its tokens).
    `truncated`, if given, receives the indices of the contexts cut to fit max_length."""
    flat = [(i, c, x) for i, (c, xs) in enumerate(zip(contexts, choices)) for x in xs]
    names = [row_ids[i] if row_ids is not None else str(i) for i, _, _ in flat]
    encoded = encode_examples(tokenizer, [c for _, c, _ in flat], [x for _, _, x in flat],
                              10**9, names)
    # EOS is the encoder's end marker, not part of the option being scored. Longer than the
    # model: the context is cut from the left, as the harness does (the option is kept).
    seqs = [(e.input_ids[:-1][-max_length:], e.answer_mask[:-1][-max_length:]) for e in encoded]
    if truncated is not None:
        truncated.update(i for (i, _, _), e in zip(flat, encoded) if len(e.input_ids) - 1 > max_length)
    for (_, _, x), (_, mask), name in zip(flat, seqs, names):
        if x and not any(mask):
            raise ValueError(f"row {name}: the option {x!r} alone exceeds max_length={max_length}")
    per_example: dict[int, list[int]] = {}
    for j, (i, _, _) in enumerate(flat):
        per_example.setdefault(i, []).append(j)
    shared, separate = [], []
    for i, js in per_example.items():
        prefixes = {tuple(seqs[j][0][:-1]) for j in js}
        one_token = all(sum(seqs[j][1]) == 1 and seqs[j][1][-1] == 1 for j in js)
        (shared if one_token and len(prefixes) == 1 else separate).append(i)
    scores = [0.0] * len(flat)
    contexts_of = [seqs[per_example[i][0]][0][:-1] for i in shared]
    for part in token_batches([len(r) for r in contexts_of], batch_size, batch_tokens):
        batch = [shared[k] for k in part]  # one row an example: its context
        rows = [contexts_of[k] for k in part]
        ids, attn = (t.to(model.device) for t in pad_batch(rows, tokenizer.pad_token_id))
        last = attn.sum(1) - 1
        keep = torch.unique(last)  # only the contexts' last positions need logits
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep, use_cache=False).logits
        at = torch.searchsorted(keep, last)
        logprobs = torch.log_softmax(logits[torch.arange(len(batch), device=at.device), at].float(), -1)
        options = [[seqs[j][0][-1] for j in per_example[i]] for i in batch]
        read = logprobs.gather(1, pad_batch(options, 0)[0].to(logprobs.device)).tolist()
        for b, i in enumerate(batch):
            for o, j in enumerate(per_example[i]):
                scores[j] = read[b][o]
    rows = [j for i in separate for j in per_example[i]]
    for part in token_batches([len(seqs[j][0]) for j in rows], batch_size, batch_tokens):
        batch = [rows[k] for k in part]  # one row a choice
        for j, v in zip(batch, _score_rows(model, [seqs[j][0] for j in batch],
                                           [seqs[j][1] for j in batch], tokenizer.pad_token_id)):
            scores[j] = v
    return [[scores[j] for j in per_example[i]] for i in range(len(contexts))]


@torch.inference_mode()
def naive_choice_loglikelihoods(model, tokenizer, contexts, choices, max_length) -> list[list[float]]:
    """The reference loop: one example, one choice, one forward at a time (for bench/eval.py
    and the tests: the batched scorer must give the same numbers)."""
    out = []
    for c, xs in zip(contexts, choices):
        row = []
        for x in xs:
            e = encode_examples(tokenizer, [c], [x], max_length)[0]
            row.append(_score_rows(model, [e.input_ids[:-1]], [e.answer_mask[:-1]],
                                   tokenizer.pad_token_id)[0])
        out.append(row)
    return out


@torch.inference_mode()
def greedy_generate(model, tokenizer, contexts: list[str], max_new_tokens: int,
                    batch_size: int, max_length: int | None = None,
                    truncated: set | None = None, batch_tokens: int | None = None) -> list[str]:
    """Greedy continuations until the stop strings; `truncated`, if given, receives the
    indices of the contexts cut to leave max_new_tokens of room in max_length. A batch's
    tokens count its prompts and the max_new_tokens each may generate."""
    if max_length is not None and max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt "
                         f"in max_length={max_length}")
    prefix = bos_prefix(tokenizer)
    encoded = [[*prefix, *ids] for ids in tokenizer(contexts, add_special_tokens=False)["input_ids"]]
    if max_length is not None:  # keep the context's end, as the harness does
        room = max_length - max_new_tokens
        if truncated is not None:
            truncated.update(k for k, e in enumerate(encoded) if len(e) > room)
        encoded = [e[-room:] for e in encoded]
    texts: list[str] = [""] * len(contexts)
    for part in token_batches([len(e) + max_new_tokens for e in encoded], batch_size, batch_tokens):
        chunk = [encoded[k] for k in part]
        width = max(len(e) for e in chunk)
        # Left padding keeps every prompt's last token at the same position for generation.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in chunk])
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in chunk])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, stop_strings=list(STOP_STRINGS),
                             tokenizer=tokenizer)
        for k, row in zip(part, out[:, width:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            for stop in STOP_STRINGS:
                text = text.split(stop)[0]
            texts[k] = text
    return texts


def evaluate_task(model, tokenizer, rows: list[dict], pool: list[dict], shots: int, *,
                  batch_size: int, max_length: int, max_new_tokens: int,
                  predictions: bool = False, batch_tokens: int | None = None) -> dict:
    """n and accuracy of one task; MMLU also per subject (micro-averaged overall), GSM8K
    strict-match (= accuracy) and flexible-extract. Each row's k shots come from `pool`
    (tasks.select_shots). With `predictions`, one record per example as well."""
    contexts = [render_prompt(r, select_shots(r, pool, shots)) for r in rows]
    records, truncated = [], set()  # contexts cut from the left: reported, never silent
    if rows[0]["choices"] is None:
        outputs = greedy_generate(model, tokenizer, contexts, max_new_tokens, batch_size, max_length,
                                  truncated, batch_tokens)
        for r, o in zip(rows, outputs):
            reference = gsm8k_normalize(r["answer"])
            strict, flexible = gsm8k_strict(o), gsm8k_flexible(o)
            records.append({"id": r["id"], "subject": r["subject"], "generated": o,
                            "strict": strict, "flexible": flexible, "reference": reference,
                            "correct": gsm8k_normalize(strict) == reference,
                            "flexible_correct": gsm8k_normalize(flexible) == reference})
    else:
        scores = choice_loglikelihoods(model, tokenizer, contexts, [list(r["choices"]) for r in rows],
                                       batch_size, max_length, [r["id"] for r in rows], truncated,
                                       batch_tokens)
        for r, s in zip(rows, scores):
            best = max(range(len(s)), key=s.__getitem__)
            records.append({"id": r["id"], "subject": r["subject"], "scores": s, "predicted": best,
                            "label": int(r["label"]), "correct": best == int(r["label"])})
    out = {"n": len(records), "accuracy": sum(x["correct"] for x in records) / len(records),
           "truncated": len(truncated)}
    if "flexible_correct" in records[0]:
        out["strict_match"] = out["accuracy"]
        out["flexible_match"] = sum(x["flexible_correct"] for x in records) / len(records)
    subjects = sorted({x["subject"] for x in records})
    if rows[0]["task"] == "mmlu":
        out["per_subject"] = {s: {"n": len(c), "accuracy": sum(c) / len(c)} for s in subjects
                              for c in [[x["correct"] for x in records if x["subject"] == s]]}
    if predictions:
        out["predictions"] = records
    return out


def evaluate_checkpoint(model_dir: str, tasks: dict[str, dict], *, batch_size: int,
                        max_length: int | None, max_new_tokens: int, threads: int = 1,
                        precision: str = "fp32", batch_tokens: int | None = None) -> dict[str, dict]:
    """Evaluate the HF model in `model_dir` (with its tokenizer) on every task, on this
    worker's GPU if it has one, held in the precision's dtype. Contexts are cut to
    `max_length`, or to the model's own context length (max_position_embeddings) when None.
    tasks: {task: {"rows": [...], "pool": [...], "shots": k}} -> {task: evaluate_task's dict}."""
    from distill_core.device import frozen_dtype, prepare, worker_device
    from distill_core.models import load_causal_lm, load_tokenizer

    device = worker_device()
    prepare(device, threads)
    model = load_causal_lm(model_dir, dtype=frozen_dtype(precision), device=device)
    tokenizer = load_tokenizer(model_dir)
    max_length = max_length or model.config.max_position_embeddings
    return {task: evaluate_task(model, tokenizer, spec["rows"], spec["pool"], spec["shots"],
                                batch_size=batch_size, max_length=max_length,
                                max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)
            for task, spec in tasks.items()}


def evaluate_models(models: dict[str, str], tasks: dict[str, dict], *, batch_size: int,
                    max_length: int | None, max_new_tokens: int, precision: str = "fp32",
                    batch_tokens: int | None = None,
                    resources: dict[str, float] | None = None) -> dict[str, dict[str, dict]]:
    """Evaluate many model dirs in parallel, one Ray task per model asking for `resources`
    (default one CPU; e.g. {cpu: 4, gpu: 1}: Ray spreads the models over the cluster's GPUs).
    models: {name: dir} -> {name: {task: {"accuracy", "n"}}}."""
    import ray

    resources = resources or {"cpu": 1}
    cpus = resources.get("cpu", 1)
    custom = {k: v for k, v in resources.items() if k not in ("cpu", "gpu")}
    remote = ray.remote(num_cpus=cpus, num_gpus=resources.get("gpu", 0),
                        resources=custom or None)(evaluate_checkpoint)
    tasks_ref = ray.put(tasks)
    futures = {name: remote.remote(path, tasks_ref, batch_size=batch_size, max_length=max_length,
                                   max_new_tokens=max_new_tokens, threads=max(1, int(cpus)),
                                   precision=precision, batch_tokens=batch_tokens)
               for name, path in models.items()}
    return dict(zip(futures, ray.get(list(futures.values()))))


def table_problems(table, models: list[str], tasks: list[str]) -> list[str]:
    """What is missing or wrong in an evaluation table (model, task, accuracy, n rows)."""
    have = set(zip(table["model"], table["task"]))
    problems = [f"{m} x {t}: not scored" for m in models for t in tasks if (m, t) not in have]
    bad = table[~table["accuracy"].between(0, 1) | (table["n"] < 1)]
    problems += [f"{r.model} x {r.task}: accuracy {r.accuracy} on n={r.n}" for r in bad.itertuples()]
    return problems
