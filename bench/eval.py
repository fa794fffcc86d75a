"""Evaluation throughput: the batched scorer and batched greedy generation against a naive
one-example-one-choice-at-a-time loop, in one run, on the real files by the harness's prompts.
Prints one JSON object.   usage: python bench/eval.py [--data-dir DIR] [--limit N]

The model is a tiny Llama (the tiny preset's teacher sizes, 1,024 positions) with a byte-level
BPE trained here on the rows; throughput does not depend on what the weights learned, and both
ways score the same examples with the same model, one thread each. The bench also checks that
both ways give the same predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from distill_core import real_datasets as real
from distill_core.config import load_config
from distill_core.evaluation import (choice_loglikelihoods, greedy_generate,
                                     naive_choice_loglikelihoods)
from distill_core.models import init_model
from distill_core.tasks import render_prompt, select_shots
from distill_core.tokenizer_training import train_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=os.environ.get("KDBENCH_SHARED_DATA", str(DEFAULT_DATA)))
    parser.add_argument("--limit", type=int, default=64, help="examples a task")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data_dir)
    cfg = load_config("tiny", {})
    subjects = ["high_school_mathematics", "high_school_chemistry"]
    tasks = {}
    for task in ("sst2", "mmlu", "gsm8k"):
        rows = real.load_local(task, data, real.EVAL_SPLIT[task], subjects=subjects).rows[:args.limit]
        pool = real.fewshot_pool(task, real.load_local(task, data, real.FEWSHOT_SPLIT[task],
                                                       subjects=subjects).rows)
        shots = 5 if task == "mmlu" else 0  # GSM8K zero-shot: generation cost, not context
        tasks[task] = (rows, [render_prompt(r, select_shots(r, pool, shots)) for r in rows])
    texts = [c + (r["answer"] or "") for rows, contexts in tasks.values() for r, c in zip(rows, contexts)]
    tokenizer = train_tokenizer(cfg.teacher.tokenizer.model_copy(update={"vocab_size": 2000}), texts)
    model = init_model(cfg.teacher, tokenizer, 1024, seed=0).eval()
    report = {"examples_a_task": args.limit, "batch_size": args.batch_size, "threads": 1}
    for task in ("sst2", "mmlu"):
        rows, contexts = tasks[task]
        options = [list(r["choices"]) for r in rows]
        start = time.perf_counter()
        naive = naive_choice_loglikelihoods(model, tokenizer, contexts, options, 1024)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = choice_loglikelihoods(model, tokenizer, contexts, options, args.batch_size, 1024)
        batched_s = time.perf_counter() - start
        same = [max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                for a, b in zip(naive, batched)]
        report[task] = {"naive_examples_per_s": round(len(rows) / naive_s, 1),
                        "batched_examples_per_s": round(len(rows) / batched_s, 1),
                        "speedup": round(naive_s / batched_s, 2),
                        "same_predictions": sum(same) / len(same)}
    rows, contexts = tasks["gsm8k"]
    contexts = contexts[:16]
    start = time.perf_counter()
    single = [greedy_generate(model, tokenizer, [c], 48, 1, 1024)[0] for c in contexts]
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = greedy_generate(model, tokenizer, contexts, 48, args.batch_size, 1024)
    batched_s = time.perf_counter() - start
    report["gsm8k_generation"] = {"examples": len(contexts), "max_new_tokens": 48,
                                  "naive_examples_per_s": round(len(contexts) / naive_s, 2),
                                  "batched_examples_per_s": round(len(contexts) / batched_s, 2),
                                  "speedup": round(naive_s / batched_s, 2),
                                  "same_outputs": sum(a == b for a, b in zip(single, batched)) / len(contexts)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
