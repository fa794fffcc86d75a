"""The `kdbench` command line.

  kdbench demo [--preset NAME] [--set key=value ...] [--verbose]
                                                        materialize the whole asset graph
  kdbench estimate [--preset NAME] [--set key=value ...]  the teacher cache's size, as JSON
  kdbench compare A B                     study B against study A (preset names or
                                          evaluation_table.parquet paths)
  kdbench eval --checkpoint DIR --task TASK --data-dir DIR [--subjects a,b] [--limit N]
               [--predictions FILE]         one HF checkpoint on a real task, JSON last line
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def demo(args: argparse.Namespace) -> int:
    from distill_core.config import ConfigError, load_config

    overrides = _overrides(args.set)
    try:
        cfg = load_config(args.preset, overrides)  # fail on a bad preset before any compute
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.verbose:
        os.environ["KDBENCH_VERBOSE"] = "1"
    elif sys.stdout.isatty():  # the grid's progress is then redrawn in place (console.live_stream)
        os.environ["KDBENCH_LIVE"] = "1"
    import dagster as dg

    from orchestration import console

    console.instance_home()
    if not args.verbose:
        console.quiet_process()
    from orchestration.definitions import resources
    from orchestration.study import materialize_study

    started = time.perf_counter()
    print(f"kdbench {cfg.name}: materializing the asset graph (Dagster home {os.environ['DAGSTER_HOME']})")
    res = resources(preset=args.preset, overrides_json=json.dumps(overrides))
    with dg.DagsterInstance.get() as instance:
        metadata = materialize_study(res, instance, verbose=args.verbose)
    report = metadata["comparison_report"]
    evaluated = metadata["evaluation_table"]
    print("\n" + "=" * 80)
    print(f"kdbench {cfg.name}: whole graph materialized in {time.perf_counter() - started:.0f} s\n")
    print("mean accuracy per group and task:\n" + evaluated["mean_accuracy"])
    print("did distilling from the teacher help? (black_box vs task_only)\n"
          + "\n".join(f"  - {v}" for v in report["control_verdicts"]))
    print("white-box vs black-box:\n" + "\n".join(f"  - {v}" for v in report["verdicts"]))
    print(f"\nreport: {report['path']}\nplot:   {report['plot']}")
    print(f"MLflow parent run: {report['mlflow_parent_run']}")
    print("\nopen the UIs:  make ui   (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000)")
    return 0


def estimate(args: argparse.Namespace) -> int:
    from distill_core.cache_size import estimate_preset
    from distill_core.config import ConfigError, load_config

    try:
        cfg = load_config(args.preset, _overrides(args.set))
        print(json.dumps(estimate_preset(cfg), indent=2))
    except (ConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def compare(args: argparse.Namespace) -> int:
    """Two finished studies side by side: accuracies, effects, differences of differences."""
    import dagster as dg

    from orchestration import console
    from orchestration.comparison import compare as compare_studies
    from orchestration.resources import storage_root

    console.instance_home()
    with dg.DagsterInstance.get() as instance:
        try:
            result = compare_studies(args.studies, instance, storage_root("") / "artifacts")
        except (LookupError, FileNotFoundError) as err:
            print(err, file=sys.stderr)
            return 2
    print(result["markdown"])
    print(f"\nwritten: {result['paths']['report']}\n         {result['paths']['csv']}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """The paper's split of one real task (SST-2 dev, MMLU test, GSM8K test) by the harness's
    protocol, for any HF causal LM dir with its tokenizer."""
    from distill_core import real_datasets as real
    from distill_core.evaluation import evaluate_task
    from distill_core.models import load_causal_lm, load_tokenizer
    from distill_core.storage import write_text_atomic

    checkpoint, data_dir = Path(args.checkpoint), Path(args.data_dir)
    if not (checkpoint / "config.json").is_file():
        print(f"--checkpoint {checkpoint}: not an HF model folder (no config.json)", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"--limit {args.limit}: must be at least 1", file=sys.stderr)
        return 2
    subjects = [s for s in args.subjects.split(",") if s] if args.subjects else None
    shots = real.HARNESS_SHOTS[args.task] if args.shots is None else args.shots
    try:
        rows = real.load_local(args.task, data_dir, real.EVAL_SPLIT[args.task], subjects=subjects).rows
        # Zero-shot (SST-2's default) needs no pool: SST-2's is its 67k-row train file.
        pool = real.fewshot_pool(args.task, real.load_local(
            args.task, data_dir, real.FEWSHOT_SPLIT[args.task], subjects=subjects).rows) if shots else []
    except (FileNotFoundError, ValueError) as err:
        print(f"--data-dir {data_dir}: {err}", file=sys.stderr)
        return 2
    rows = rows[:args.limit] if args.limit else rows
    from distill_core.device import frozen_dtype, prepare, worker_device

    device = worker_device()
    prepare(device, args.threads)
    model = load_causal_lm(checkpoint, dtype=frozen_dtype(args.precision), device=device)
    tokenizer = load_tokenizer(checkpoint)
    started = time.perf_counter()
    try:
        result = evaluate_task(model, tokenizer, rows, pool, shots,
                               batch_size=args.batch_size, max_length=model.config.max_position_embeddings,
                               max_new_tokens=args.max_new_tokens, predictions=bool(args.predictions),
                               batch_tokens=args.batch_tokens)
    except ValueError as err:
        print(f"{args.task}: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    records = result.pop("predictions", None)
    if args.predictions:  # never a half-written predictions file
        write_text_atomic("".join(json.dumps(r) + "\n" for r in records), Path(args.predictions))
    print(json.dumps({"task": args.task, **result, "shots": shots, "checkpoint": str(checkpoint),
                      "device": str(device), "precision": args.precision,
                      "split": real.EVAL_SPLIT[args.task], "seconds": round(seconds, 2),
                      "examples_per_s": round(result["n"] / seconds, 2)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="materialize the whole asset graph on a preset")
    p.add_argument("--preset", default="tiny", help="a name in configs/ or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.seeds=2")
    p.add_argument("--verbose", action="store_true",
                   help="everything: Dagster's events, Ray's and Tune's own output, all warnings")
    p.set_defaults(func=demo)
    p = sub.add_parser("estimate", help="print the teacher cache's size for a preset, as JSON")
    p.add_argument("--preset", default="tiny", help="a name in configs/ or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set cache.attention_queries=all")
    p.set_defaults(func=estimate)
    p = sub.add_parser("compare", help="two finished studies side by side, per group and task")
    p.add_argument("studies", nargs=2, metavar="STUDY",
                   help="a preset name (its latest study in this Dagster instance) or the path "
                        "of an evaluation_table.parquet; the second is compared against the first")
    p.set_defaults(func=compare)
    p = sub.add_parser("eval", help="evaluate an HF checkpoint on a real task (JSON last line)")
    p.add_argument("--checkpoint", required=True, help="an HF causal LM folder with its tokenizer")
    p.add_argument("--task", required=True, choices=["sst2", "mmlu", "gsm8k"])
    p.add_argument("--data-dir", required=True, help="a folder laid out as ../shared/data")
    p.add_argument("--subjects", default=None, help="MMLU subjects, comma-separated (default: all found)")
    p.add_argument("--limit", type=int, default=None, help="the first N examples only")
    p.add_argument("--predictions", default=None, help="write per-example predictions (JSONL) here")
    p.add_argument("--shots", type=int, default=None, help="default: the harness's (0, 5, 5)")
    p.add_argument("--batch-size", type=int, default=16, help="rows a forward at most")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens a forward at most (rows of like length together)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the dtype the model is held in (on the GPU when there is one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation budget")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=evaluate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
