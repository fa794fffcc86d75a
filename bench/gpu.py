"""The paper study's GPU check: on one GPU, the paper pair at full width and depth
(Meta-Llama-3-8B and TinyLlama-1.1B configurations, random weights built directly on the GPU
in bf16), the real tokenizers and real rows. Prints one JSON object (and writes it to --out).
  usage: python bench/gpu.py --tokenizers ../shared/tokenizers --data ../shared/data [--out F]
  on the device machine, which gets the checkout only (../shared stays behind):
         mkdir -p .gpu-check && cp -r ../shared/tokenizers ../shared/data .gpu-check/  # ignored
         run: python bench/gpu.py --tokenizers .gpu-check/tokenizers --data .gpu-check/data \
              --out $OUT/gpu.json        (carry: [.gpu-check]; about 3-5 minutes on an H200)
         python bench/gpu.py --device cpu --teacher-layers 1 --student-layers 1 --rows 8 \\
             --steps 2 --eval-rows 2 --max-new-tokens 4      (the code path, on a CPU)
Needs torch, transformers, tokenizers, safetensors, pyarrow, pandas, numpy and pyyaml only (no
Ray, Dagster or MLflow): the same distill_core code the cache actors, trials and evaluation
run, called directly. It never runs in the test suite.

What it measures, each on the same rows:
- cache: the cache actors' per-batch work (TeacherSignals.signals: the teacher forward with the
  final-layer attention hook, the gathers onto chunks, the Arrow rows), in batches of at most
  --cache-batch-tokens padded teacher tokens, beside a bare teacher forward over the same
  batches: tokens/s of each and their ratio.
- step: a trial's optimizer step (DistillationStep: bf16 autocast, fp32 master weights, fused
  AdamW) on batches read from a real cache written here (memory-mapped, as trials read it), for
  black_box and combined, with and without gradient checkpointing: student tokens/s, model
  FLOPs utilisation against --peak-tflops, peak GPU memory.
- eval: examples/s of MMLU 5-shot option scoring and of GSM8K 5-shot greedy generation (random
  weights never emit a stop string, so every row generates --max-new-tokens: an upper bound),
  for the student and the teacher, in bf16, batches of at most --eval-batch-tokens.
- paper: each stage's GPU-hours for configs/paper.yaml, extrapolated from the figures above.

Model FLOPs of a student step (MFU; recomputation under gradient checkpointing is not counted):
3 x forward, the forward being 2 x (decoder-layer parameters) per real token, 2 x L x d x n^2
for a sequence of n real tokens (causal QK^T and AV: half of 4 n^2 d), and 2 x d x V for every
position projected onto the vocabulary (answer tokens for L_task, distilled chunk ends for
L_KD). The teacher's lm_head on cached states and the losses are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # distill_core from this checkout, installed or not

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# bf16 dense peak of one GPU, TFLOP/s (vendor figures, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 rope_theta=500000.0, max_position_embeddings=8192)
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                    rope_theta=10000.0, max_position_embeddings=2048)
MMLU_SUBJECTS = ["high_school_biology", "high_school_chemistry", "high_school_computer_science",
                 "high_school_geography", "high_school_government_and_politics",
                 "high_school_macroeconomics", "high_school_mathematics",
                 "high_school_microeconomics", "high_school_physics", "high_school_psychology"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def build_llama(sizes: dict, layers: int, tokenizer, device, dtype):
    """A random Llama of `sizes` with `layers` decoder layers, built on `device` in `dtype`
    (nothing is made on the host first: an 8B model is 16 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**sizes, "num_hidden_layers": layers}, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def layer_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def training_rows(data_dir: Path, rows: int) -> dict[str, pd.DataFrame]:
    """`rows` training rows a task, as the graph's train_examples holds them."""
    from distill_core import real_datasets as real

    out = {}
    for task in ("sst2", "mmlu", "gsm8k"):
        loaded = real.load_local(task, data_dir, real.TRAIN_SPLIT[task],
                                 subjects=MMLU_SUBJECTS if task == "mmlu" else None).rows
        skip = 5 if task == "gsm8k" else 0  # GSM8K's first five are the shots
        out[task] = pd.DataFrame(loaded[skip:skip + rows])
    return out


def measure_cache(teacher, teacher_tok, student_tok, rows, args, device, cache_dir: Path) -> dict:
    """The cache actors' work beside a bare forward, batch by batch; writes the cache rows as a
    complete cache in `cache_dir` (Parquet, Arrow IPC copies, manifest, vocabulary map)."""
    from distill_core.batching import token_batches
    from distill_core.cross_vocab import vocabulary_map
    from distill_core.teacher_cache import (TeacherSignals, aligned_rows, ragged_column,
                                            training_contexts, write_cache)

    signals = TeacherSignals.around(teacher, batch_tokens=args.cache_batch_tokens)
    cache_s = bare_s = 0.0
    tokens = 0
    shards, per_row = {}, {}
    with torch.inference_mode():
        for task, frame in rows.items():
            aligned = aligned_rows(training_contexts(frame), student_tok, teacher_tok,
                                   args.max_length, "answer")
            lengths = pc.list_value_length(aligned["teacher_ids"]).to_pylist()
            out = []
            per_row[task] = round(sum(lengths) / len(lengths), 1)
            for part in token_batches(lengths, len(lengths), args.cache_batch_tokens):
                batch = aligned.take(part)
                table, seconds = timed(lambda: signals.signals(batch), device)
                out.append(table)
                cache_s += seconds
                ids, n = ragged_column(batch["teacher_ids"])
                real = torch.arange(int(n.max()))[None, :] < n[:, None]
                padded = torch.full(real.shape, teacher.config.pad_token_id, dtype=torch.long)
                padded[real] = ids
                _, seconds = timed(lambda: teacher.model(input_ids=padded.to(device), use_cache=False,
                                                         attention_mask=real.long().to(device)), device)
                bare_s += seconds
                tokens += int(n.sum())
            shards[task] = pa.concat_tables(out)
    manifest = write_cache(cache_dir, shards, vocabulary_map(teacher_tok, student_tok), tokens=None)
    return {"teacher_tokens": tokens, "cache_tokens_per_s": round(tokens / cache_s, 1),
            "bare_forward_tokens_per_s": round(tokens / bare_s, 1),
            "ratio_cache_over_bare": round(bare_s / cache_s, 3),
            "bytes_per_teacher_token": round(manifest["bytes"] / tokens, 1),
            "teacher_tokens_per_row": per_row}


def step_flops(batch, student_layer_params: int, d: int, layers: int, vocab: int) -> float:
    lengths = batch.attention_mask.sum(1).double()
    forward = (2 * student_layer_params * float(lengths.sum()) + 2 * layers * d * float((lengths ** 2).sum())
               + 2 * d * vocab * (int(batch.task_mask.sum()) + int(batch.distill_mask.sum())))
    return 3 * forward


def measure_steps(cache_dir: Path, teacher, student_tok, args, device, peak_tflops) -> dict:
    from distill_core.batching import BatchSchedule
    from distill_core.cache_reader import TeacherCacheReader
    from distill_core.cross_vocab import VocabularyBridge
    from distill_core.device import adamw
    from distill_core.objective import LossWeights
    from distill_core.student import DistillationStudent
    from distill_core.teacher_cache import read_vocabulary_map
    from distill_core.training import DistillationStep

    reader = TeacherCacheReader([str(cache_dir)], "answer", student_tok.pad_token_id,
                                teacher.config.hidden_size, teacher.config.num_attention_heads,
                                signal_dtype=torch.bfloat16)
    schedule = BatchSchedule(reader.tasks, args.batch_size, seed=0)
    # Each task's batches apart (a trial's mix is the paper's, not these rows'): the first
    # `warmup` of each task untimed (allocator, kernels for its shapes), then `steps` timed.
    by_task: dict[str, list[list[int]]] = {}
    for s in range(schedule.per_epoch):
        rows = schedule.batch(s)
        by_task.setdefault(reader.tasks[rows[0]], []).append(rows)
    head = teacher.lm_head
    head_bytes = head.weight.numel() * head.weight.element_size()
    out = {}
    for group, (g_hidden, g_attn) in (("black_box", (0.0, 0.0)), ("combined", (1.0, 1.0))):
        for checkpointing in (False, True):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)  # the teacher, already there
            model = build_llama(TINYLLAMA_1B, args.student_layers, student_tok, device, torch.float32)
            student = DistillationStudent(model, teacher.config.hidden_size).to(device).train()
            if checkpointing:
                student.enable_gradient_checkpointing()
            vocab = VocabularyBridge(read_vocabulary_map(cache_dir), model.config.vocab_size).to(device)
            weights = LossWeights(1.0, 1.0, g_hidden, g_attn, temperature=2.0, kd_across_vocab="map")
            step = DistillationStep(student, head, vocab, weights,
                                    adamw(student.parameters(), 2e-5, 0.01, device), "bf16",
                                    f"{group}-gpu-check")
            seconds = flops = tokens = 0.0
            per_task = {}
            for task, batches in sorted(by_task.items()):
                task_s = 0.0
                # A task with fewer batches than that repeats them (timing needs shapes, not news).
                chosen = [batches[i % len(batches)] for i in range(args.warmup + args.steps)]
                for s, rows in enumerate(chosen):
                    batch = reader.batch(rows).pin(device).to(device)
                    _, t = timed(lambda: step(batch, 2e-5, measure_all=False), device)
                    if s >= args.warmup:
                        task_s += t
                        tokens += float(batch.attention_mask.sum())
                        flops += step_flops(batch, layer_params(model), model.config.hidden_size,
                                            args.student_layers, model.config.vocab_size)
                per_task[task] = round(task_s / args.steps, 4)
                seconds += task_s
            name = f"{group}{'_checkpointing' if checkpointing else ''}"
            # A trial holds the teacher's lm_head, not the whole teacher this process holds.
            peak = (torch.cuda.max_memory_allocated(device) - before + head_bytes) / 2**30 \
                if device.type == "cuda" else None
            out[name] = {"step_s_by_task": per_task, "tokens_per_s": round(tokens / seconds, 1),
                         "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if peak_tflops else None,
                         "peak_memory_gib": round(peak, 2) if peak is not None else None}
            del student, model, step, batch
    return out


def measure_eval(model, tokenizer, data_dir: Path, args) -> dict:
    from distill_core import real_datasets as real
    from distill_core.evaluation import choice_loglikelihoods, greedy_generate
    from distill_core.tasks import render_prompt, select_shots

    out = {}
    for task in ("mmlu", "gsm8k"):
        rows = real.load_local(task, data_dir, real.EVAL_SPLIT[task],
                               subjects=MMLU_SUBJECTS if task == "mmlu" else None).rows[:args.eval_rows]
        pool = real.fewshot_pool(task, real.load_local(task, data_dir, real.FEWSHOT_SPLIT[task],
                                                       subjects=MMLU_SUBJECTS if task == "mmlu" else None).rows)
        contexts = [render_prompt(r, select_shots(r, pool, 5)) for r in rows]
        device = model.device
        max_length = model.config.max_position_embeddings  # as the evaluation_table asset
        if task == "mmlu":
            _, seconds = timed(lambda: choice_loglikelihoods(
                model, tokenizer, contexts, [r["choices"] for r in rows], args.eval_batch_size,
                max_length, batch_tokens=args.eval_batch_tokens), device)
        else:
            _, seconds = timed(lambda: greedy_generate(
                model, tokenizer, contexts, args.max_new_tokens, args.eval_batch_size,
                max_length, batch_tokens=args.eval_batch_tokens), device)
        out[f"{task}_examples_per_s"] = round(len(rows) / seconds, 2)
    return out


def paper_gpu_hours(result: dict) -> dict:
    """configs/paper.yaml's stages on GPUs like this one, from the measured rates."""
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    train = paper["data"]["train_size"]
    per_row = result["cache"]["teacher_tokens_per_row"]
    cache = sum(train[t] * per_row[t] for t in train) / result["cache"]["cache_tokens_per_s"]
    distill = paper["distill"]
    trials = len(distill["groups"]) * distill["seeds"]
    checkpointing = "_checkpointing" if distill.get("gradient_checkpointing") else ""
    # A trial's steps are its epoch's batches: each task's share of them, one task a batch.
    batches = {t: math.ceil(n / distill["batch_size"]) for t, n in train.items()}
    share = {t: b / sum(batches.values()) for t, b in batches.items()}
    per_trial = {g: distill["steps"] * sum(share[t] * s for t, s in
                                           result["step"][f"{g}{checkpointing}"]["step_s_by_task"].items())
                 for g in ("black_box", "combined")}
    sizes = paper["data"]["eval_size"]
    ev = result["eval"]

    def per_model(rates):  # SST-2 scores one token an option, as MMLU: counted at MMLU's rate
        return ((sizes["sst2"] + sizes["mmlu"]) / rates["mmlu_examples_per_s"]
                + sizes["gsm8k"] / rates["gsm8k_examples_per_s"])

    evaluation = (trials + 1) * per_model(ev["student"]) + per_model(ev["teacher"])
    return {"cache": round(cache / 3600, 2),
            "grid_black_box_trial": round(per_trial["black_box"] / 3600, 2),
            "grid_combined_trial": round(per_trial["combined"] / 3600, 2),
            "grid": round(trials * (per_trial["black_box"] + per_trial["combined"]) / 2 / 3600, 1),
            "evaluation": round(evaluation / 3600, 2),
            "assumes": f"{trials} trials of {distill['steps']} steps x {distill['batch_size']} rows, "
                       f"batches by task as the paper's epoch ({ {t: round(v, 3) for t, v in share.items()} }), "
                       "the grid's time the mean of black_box and combined, eval sizes "
                       f"{sizes}, one GPU like this one a cache actor, trial or evaluated model; "
                       "checkpoint writes (~13 GB a save) not counted"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--tokenizers", type=Path, default=ROOT.parent / "shared" / "tokenizers",
                        help="a folder with llama3/ and llama2-spm/ (HF tokenizer files)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="a folder laid out as ../shared/data")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    parser.add_argument("--student-layers", type=int, default=TINYLLAMA_1B["num_hidden_layers"])
    parser.add_argument("--rows", type=int, default=128, help="training rows a task")
    parser.add_argument("--max-length", type=int, default=1024, help="as configs/paper.yaml")
    parser.add_argument("--cache-batch-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16, help="rows a training step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps a variant")
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-tokens", type=int, default=32768)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="as configs/paper.yaml")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"bf16 dense peak of the GPU (default by name: {PEAK_TFLOPS})")
    args = parser.parse_args()

    from distill_core.device import prepare
    from distill_core.models import load_tokenizer

    started = time.perf_counter()
    device = torch.device(args.device)
    prepare(device, deterministic=True)  # as a trial does (a no-op on CUDA)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    teacher_tok = load_tokenizer(args.tokenizers / "llama3")
    student_tok = load_tokenizer(args.tokenizers / "llama2-spm")
    result = {"device": name, "peak_tflops": peak, "torch": torch.__version__,
              "teacher_layers": args.teacher_layers, "student_layers": args.student_layers}
    teacher, seconds = timed(lambda: build_llama(LLAMA3_8B, args.teacher_layers, teacher_tok,
                                                 device, torch.bfloat16).eval().requires_grad_(False), device)
    result["teacher_build_s"] = round(seconds, 1)
    rows = training_rows(args.data, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        result["cache"] = measure_cache(teacher, teacher_tok, student_tok, rows, args, device, cache_dir)
        result["step"] = measure_steps(cache_dir, teacher, student_tok, args, device, peak)
    result["eval"] = {"teacher": measure_eval(teacher, teacher_tok, args.data, args)}
    del teacher
    student = build_llama(TINYLLAMA_1B, args.student_layers, student_tok, device,
                          torch.bfloat16).eval().requires_grad_(False)
    result["eval"]["student"] = measure_eval(student, student_tok, args.data, args)
    result["paper_gpu_hours"] = paper_gpu_hours(result)
    if (args.teacher_layers, args.student_layers) != (LLAMA3_8B["num_hidden_layers"],
                                                      TINYLLAMA_1B["num_hidden_layers"]):
        result["paper_gpu_hours"]["depth"] = "reduced: these are not the paper's costs"
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
