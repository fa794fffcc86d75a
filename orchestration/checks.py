"""Asset checks, evaluated in the assets' own bodies (so partitioned assets are checked per
partition) from distill_core's validators. Blocking: a failed check stops what depends on the
asset in the same run, so a bad input cannot poison the cache, the grid or the report."""

from __future__ import annotations

import dagster as dg


def spec(asset: str, name: str, description: str) -> dg.AssetCheckSpec:
    # No partitions_def (in preview in Dagster 1.13): a result yielded by a partition's run
    # checks that partition, and a failure blocks that run's downstream steps.
    return dg.AssetCheckSpec(name, asset=asset, description=description, blocking=True)


def result(name: str, problems: list[str], **metadata) -> dg.AssetCheckResult:
    shown = "\n".join(f"- {p}" for p in problems[:20]) or "none"
    return dg.AssetCheckResult(check_name=name, passed=not problems,
                               metadata={"problems": dg.MetadataValue.md(shown),
                                         "problem_count": len(problems), **metadata})


EXAMPLES = ("rows_valid", "ids unique; no empty prompt or answer; labels index the choices; "
            "math rows have a target (label balance in the metadata)")
CACHE = ("cache_valid", "schema; one row per input; chunks cover both token sequences; signal "
         "sizes match the chunks; finite signals")
GRID = ("every_trial_finished", "one finished checkpoint (weights + kdbench.json) for every "
        "group x seed")
EVALUATION = ("complete", "every model x task scored, accuracies in [0, 1]")
