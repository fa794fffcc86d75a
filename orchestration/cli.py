"""The `kdbench` command line.

  kdbench demo [--preset NAME] [--set key=value ...]      materialize the whole asset graph
  kdbench estimate [--preset NAME] [--set key=value ...]  the teacher cache's size, as JSON
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
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    import dagster as dg

    from orchestration.definitions import resources
    from orchestration.study import materialize_study

    started = time.perf_counter()
    res = resources(preset=args.preset, overrides_json=json.dumps(overrides))
    with dg.DagsterInstance.get() as instance:
        metadata = materialize_study(res, instance)
    report = metadata["comparison_report"]
    evaluated = metadata["evaluation_table"]
    print("\n" + "=" * 80)
    print(f"kdbench {cfg.name}: whole graph materialized in {time.perf_counter() - started:.0f} s\n")
    print("mean accuracy per group and task:\n" + evaluated["mean_accuracy"])
    print("verdicts:\n" + "\n".join(f"  - {v}" for v in report["verdicts"]))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="materialize the whole asset graph on a preset")
    p.add_argument("--preset", default="tiny", help="a name in configs/ or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.seeds=2")
    p.set_defaults(func=demo)
    p = sub.add_parser("estimate", help="print the teacher cache's size for a preset, as JSON")
    p.add_argument("--preset", default="tiny", help="a name in configs/ or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set cache.attention_queries=all")
    p.set_defaults(func=estimate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
