"""The student's optimizer step, kdbench's against a plain Hugging Face SFT step and a naive
offline-KD step, side by side in one run, each variant in a fresh process. Prints one JSON object.
  usage: python bench/step.py [--data ../shared/data] [--steps 10] [--warmup 3]
         python bench/step.py --shapes tiny --steps 3 --warmup 1      (a quick run, as the tests)

Shapes (`--shapes`, both by default):
- `bench`: teacher Llama hidden 512 / 6 layers / 8 heads / 2 KV heads / intermediate 1408,
  student hidden 256 / 4 layers / 8 heads / 4 KV heads / intermediate 704, one shared
  vocabulary of 8,000 tokens (byte-level BPE trained here on GSM8K and SST-2 text from --data),
  batches of 8 rows of ~256 tokens, every position distilled;
- `tiny`: the tiny preset's teacher, student, tokenizers (two vocabularies: L_KD mapped across
  them), rows and batch size.
The teacher is random (what it knows does not change the step's cost); its signals are cached
as the graph caches them (TeacherSignals; Parquet, Arrow IPC copies, vocabulary map).

Variants, each `--warmup` untimed steps then `--steps` timed, 2 threads, the same batches, in
`--repeats` processes a variant run round robin (its figures: the fastest process's; peak
memory: the median):
- `sft`: the student as LlamaForCausalLM with `labels=input_ids` (pads ignored): logits at every
  position, HF's cross-entropy, backward, clipping, AdamW. Batches already in memory.
- `naive_kd` (bench shapes: one vocabulary): the student's logits at every position,
  cross-entropy on the answer tokens plus F.kl_div between log_softmaxes at T over the distilled
  positions, times T^2, against full-vocabulary fp32 teacher logits held in memory.
- every group: kdbench's trial loop (DistillationRecipe: batches read from the memory-mapped
  cache by the prefetch thread, distillation_loss, backward, clipping, AdamW). A step is the
  wall time between two steps' ends, waiting for its batch included. A report step (every
  `report_every`, where terms a group does not train on are measured) is timed apart, and
  `step_s` is the mean step at the preset's report_every (50).
Peak memory is the process's peak resident set (VmHWM, see process_memory) (model, optimizer, batches, the cache pages
it touched; for naive_kd the teacher logits it holds).

Keys: `<shapes>.<variant>.{step_s, report_step_s, rss_mb}` and, per shapes, the ratios
`task_only_over_sft`, `black_box_over_sft`, `naive_kd_over_sft`, `combined_over_black_box`,
`combined_rss_over_black_box`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("task_only", "black_box", "hidden_state", "attention", "combined")
REPORT_EVERY = 50  # the tiny preset's
BENCH_SHAPES = {
    "teacher": dict(source="init", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
                    intermediate_size=1408, tokenizer={"kind": "byte_level_bpe", "vocab_size": 8000}),
    "student": dict(source="init", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                    intermediate_size=704, tokenizer={"kind": "byte_level_bpe", "vocab_size": 8000}),
    "vocab_size": 8000, "row_tokens": 256, "batch_size": 8,
}


# --- set-up (parent process) ------------------------------------------------------------------

def long_rows(tokenizer, texts, n_rows: int, length: int):
    """`n_rows` training rows of at most `length` tokens (BOS and EOS included), each
    consecutive texts joined and cut at a word boundary; its last quarter is the answer."""
    import pandas as pd

    texts, rows = iter(texts), []
    for i in range(n_rows):
        text = ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < length:
            text += next(texts) + "\n\n"
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        body = length - 4  # BOS, EOS, and room for a cut that re-tokenizes one token longer
        cut = text.rfind(" ", 0, offsets[body - 1][1])
        answer_start = text.rfind(" ", 0, offsets[body * 3 // 4][0])
        rows.append({"id": f"row{i:04d}", "task": "gsm8k", "prompt": text[:answer_start],
                     "answer": text[answer_start:cut]})
    return pd.DataFrame(rows)


def write_setup(root: Path, teacher_cfg, tokenizer, student_tokenizer, rows, max_length: int,
                teacher_seed: int = 0) -> dict:
    """A random teacher, both tokenizers and the rows' cache under `root`."""
    import torch

    from distill_core.cross_vocab import vocabulary_map
    from distill_core.models import init_model
    from distill_core.teacher_cache import TeacherSignals, aligned_rows, training_contexts, write_cache

    teacher_dir = root / "teacher"
    teacher = init_model(teacher_cfg, tokenizer, max_length, seed=teacher_seed).eval()
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student_tokenizer.save_pretrained(root / "student_tokenizer")
    aligned = aligned_rows(training_contexts(rows), student_tokenizer, tokenizer, max_length, "answer")
    signals = TeacherSignals.around(teacher)
    with torch.inference_mode():
        tables = {f"part-{i:03d}": signals.signals(aligned.slice(i, 16)) for i in range(0, len(aligned), 16)}
    manifest = write_cache(root / "cache", tables, vocabulary_map(tokenizer, student_tokenizer))
    return {"teacher_dir": str(teacher_dir), "student_tokenizer_dir": str(root / "student_tokenizer"),
            "cache_dir": str(root / "cache"), "rows": manifest["rows"], "max_length": max_length,
            "tokens_per_row": round(sum(len(i) for i in aligned["input_ids"].to_pylist()) / len(aligned), 1)}


def setup_bench(root: Path, data_dir: Path, n_rows: int) -> dict:
    from distill_core import real_datasets as real
    from distill_core.config import ModelConfig
    from distill_core.tokenizer_training import train_byte_level_bpe

    texts = [r["prompt"] + r["answer"] for r in real.load_local("gsm8k", data_dir, "train").rows]
    texts += [r["prompt"] for r in real.load_local("sst2", data_dir, "train").rows[:20000]]
    tokenizer = train_byte_level_bpe(texts, BENCH_SHAPES["vocab_size"])
    rows = long_rows(tokenizer, texts, n_rows, BENCH_SHAPES["row_tokens"])
    setup = write_setup(root, ModelConfig(**BENCH_SHAPES["teacher"]), tokenizer, tokenizer, rows,
                        BENCH_SHAPES["row_tokens"] + 8)
    setup["overrides"] = {**{f"{model}.{k}": v for model in ("teacher", "student")
                             for k, v in BENCH_SHAPES[model].items() if k != "source"},
                          "distill.batch_size": BENCH_SHAPES["batch_size"], "max_length": setup["max_length"]}
    return setup


def setup_tiny(root: Path, n_rows: int) -> dict:
    import pandas as pd

    from distill_core.config import TASKS, load_config
    from distill_core.tasks import generate_task
    from distill_core.teacher_cache import training_contexts
    from distill_core.tokenizer_training import train_tokenizer

    cfg = load_config("tiny")
    data = pd.concat([generate_task(t, cfg.data)["train"] for t in TASKS], ignore_index=True)
    contexts = training_contexts(data)
    texts = list(contexts["context"] + contexts["answer"])
    tokenizer = train_tokenizer(cfg.teacher.tokenizer, texts)
    student_tokenizer = train_tokenizer(cfg.student.tokenizer, texts)
    rows = data.sample(n=n_rows, random_state=0).reset_index(drop=True)
    setup = write_setup(root, cfg.teacher, tokenizer, student_tokenizer, rows, cfg.max_length)
    setup["overrides"] = {}
    return setup


# --- one variant (child process) --------------------------------------------------------------

def trial_config(setup: dict, group: str, steps: int, report_every: int) -> dict:
    from distill_core.config import load_config

    cfg = load_config("tiny", {**setup["overrides"], "distill.steps": steps, "distill.distill_positions": "all",
                               "distill.report_every": report_every, "distill.checkpoint_every": report_every,
                               "distill.resources_per_trial": {"cpu": 2},
                               # every row labelled, no learning curve: the step alone is timed
                               "distill.labelled_rows": None, "distill.curve_every": 0})
    return {"experiment": cfg.model_dump(mode="json"), "cache_dirs": [setup["cache_dir"]],
            "teacher_dir": setup["teacher_dir"], "student_tokenizer_dir": setup["student_tokenizer_dir"],
            "output_dir": "unused", "cache_version": "bench", "code_version": "bench", "mlflow": None,
            "group": group, "seed": 0}


def run_group(setup: dict, group: str, warmup: int, steps: int) -> dict:
    """kdbench's trial loop over `warmup` + `steps` steps, the last a report step (as every
    report_every-th step of a trial is). Each step is timed from the previous step's end to its
    own: waiting for its batch is part of it."""
    from distill_core.training import DistillationRecipe

    recipe = DistillationRecipe(trial_config(setup, group, warmup + steps, report_every=warmup + steps))
    recipe.setup()
    ends = [time.perf_counter()]
    for step, batch in recipe.batches():
        recipe.train_step(step, batch)
        ends.append(time.perf_counter())
        assert recipe.measures_all(step) == (step == warmup + steps - 1)
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    return {"steps_s": seconds[warmup:-1], "report_step_s": seconds[-1]}


def _plain_batches(setup: dict, count: int, batch_size: int):
    from distill_core.batching import BatchSchedule
    from distill_core.cache_reader import TeacherCacheReader
    from distill_core.models import load_tokenizer

    tokenizer = load_tokenizer(setup["student_tokenizer_dir"])
    teacher = json.loads((Path(setup["teacher_dir"]) / "config.json").read_text())
    reader = TeacherCacheReader([setup["cache_dir"]], "all", tokenizer.pad_token_id,
                                teacher["hidden_size"], teacher["num_attention_heads"])
    schedule = BatchSchedule(reader.tasks, batch_size, seed=0)
    return tokenizer, [reader.batch(schedule.batch(s)) for s in range(count)]


def run_plain(setup: dict, variant: str, warmup: int, steps: int) -> dict:
    """A plain HF SFT step, or naive offline KD, on the trial's batches (held in memory)."""
    import torch
    import torch.nn.functional as F

    from distill_core.config import load_config
    from distill_core.device import adamw, prepare
    from distill_core.models import init_model, load_causal_lm

    cfg = load_config("tiny", setup["overrides"])
    device = torch.device("cpu")
    prepare(device, threads=2, deterministic=True)
    tokenizer, batches = _plain_batches(setup, warmup + steps, cfg.distill.batch_size)
    model = init_model(cfg.student, tokenizer, cfg.max_length, seed=0).train()
    optimizer = adamw(model.parameters(), cfg.distill.lr, cfg.distill.weight_decay, device)
    temperature = cfg.distill.temperature
    if variant == "naive_kd":
        teacher = load_causal_lm(setup["teacher_dir"])
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError("naive_kd needs one vocabulary (the bench shapes)")
        with torch.inference_mode():  # the naive cache: full-vocabulary fp32 logits, in memory
            teacher_logits = [teacher(b.input_ids, attention_mask=b.attention_mask).logits.float()
                              for b in batches]
        del teacher
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        if variant == "sft":
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                         use_cache=False).loss
        else:
            logits = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            task = batch.task_mask.bool()
            labels = batch.input_ids.roll(-1, dims=1)
            l_task = F.cross_entropy(logits[task], labels[task])
            # One vocabulary, one chunk a token: chunk c ends at token c.
            at = batch.distill_mask.bool()
            kl = F.kl_div(F.log_softmax(logits[:, :at.shape[1]][at] / temperature, -1),
                          F.log_softmax(teacher_logits[i][:, :at.shape[1]][at] / temperature, -1),
                          log_target=True, reduction="batchmean")
            loss = l_task + kl * temperature**2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"steps_s": times[warmup:], "report_step_s": None}


def child(spec: dict) -> dict:
    from process_memory import peak_rss_mb  # bench/, the script's own folder

    setup, variant = spec["setup"], spec["variant"]
    if variant in GROUPS:
        out = run_group(setup, variant, spec["warmup"], spec["steps"])
    else:
        out = run_plain(setup, variant, spec["warmup"], spec["steps"])
    step = statistics.median(out["steps_s"])
    report = out["report_step_s"]
    mean = step if report is None else ((REPORT_EVERY - 1) * step + report) / REPORT_EVERY
    return {"step_s": round(mean, 4), "median_step_s": round(step, 4),
            "report_step_s": None if report is None else round(report, 4),
            "rss_mb": round(peak_rss_mb(), 1)}


def measure(spec: dict) -> dict:
    """`child` in a fresh process (peak memory is per process)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode:
        raise RuntimeError(f"bench/step.py {spec['variant']}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(result: dict) -> dict:
    def r(a, b, key="step_s"):
        return round(result[a][key] / result[b][key], 3) if a in result and b in result else None

    return {"task_only_over_sft": r("task_only", "sft"), "black_box_over_sft": r("black_box", "sft"),
            "naive_kd_over_sft": r("naive_kd", "sft"),
            "combined_over_black_box": r("combined", "black_box"),
            "combined_rss_over_black_box": r("combined", "black_box", "rss_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="a folder laid out as ../shared/data (the bench shapes' text)")
    parser.add_argument("--shapes", nargs="+", choices=("bench", "tiny"), default=["bench", "tiny"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps a variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="processes a variant (round robin)")
    parser.add_argument("--variants", nargs="+", default=["sft", "naive_kd", *GROUPS])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the models and caches here, and reuse them on the next run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    out: dict = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": 2,
                 "report_every": REPORT_EVERY}
    with tempfile.TemporaryDirectory() as tmp:
        for shapes in args.shapes:
            # Enough rows that no batch repeats: a trial reads (warmup + steps) batches.
            batch = BENCH_SHAPES["batch_size"] if shapes == "bench" else 16
            n_rows = batch * (args.warmup + args.steps)
            root = (args.workdir or Path(tmp)) / shapes
            saved = root / "setup.json"  # from an earlier run with --workdir
            if saved.exists() and json.loads(saved.read_text())["rows"] >= n_rows:
                setup = json.loads(saved.read_text())
            else:
                shutil.rmtree(root, ignore_errors=True)
                setup = setup_bench(root, args.data, n_rows) if shapes == "bench" else setup_tiny(root, n_rows)
                (root / "setup.json").write_text(json.dumps(setup))
            result = {"tokens_per_row": setup["tokens_per_row"], "batch_size": batch}
            variants = [v for v in args.variants if not (v == "naive_kd" and shapes == "tiny")]
            # (no naive KL between two vocabularies.) Round robin, so that a slow spell of this
            # shared machine falls on every variant; each keeps its fastest process.
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for variant in variants:
                    runs.setdefault(variant, []).append(measure(
                        {"setup": setup, "variant": variant, "warmup": args.warmup, "steps": args.steps}))
            for variant, measured in runs.items():
                result[variant] = {**min(measured, key=lambda m: m["step_s"]),
                                   "rss_mb": round(statistics.median(m["rss_mb"] for m in measured), 1),
                                   "step_s_runs": [m["step_s"] for m in measured]}
            out[shapes] = {**result, **ratios(result)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
