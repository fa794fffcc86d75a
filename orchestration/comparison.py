"""`kdbench compare`: two finished studies side by side (distill_core.study_comparison), found
by preset name in the Dagster instance (the latest evaluation_table materialized with that
preset) or given as evaluation_table.parquet paths, and recorded as a materialization of the
`study_comparison` asset so that the comparison sits in the Dagster UI beside the studies."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from distill_core import statistics, study_comparison

STUDY_COMPARISON = dg.AssetSpec(
    "study_comparison", group_name="evaluation", kinds={"pingouin"},
    description="Two finished studies side by side per group and task: accuracies, within-study "
                "effects, the difference of differences with Welch's 95% CI. Written by "
                "`kdbench compare`, not by a run of the graph.")


def evaluation_table_of(study: str, instance: dg.DagsterInstance) -> tuple[str, Path]:
    """(name, path) of a study's evaluation table: `study` is a path to one, or a preset name
    whose latest evaluation_table materialization in `instance` is used."""
    path = Path(study)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"{study}: no such evaluation table")
        return path.parent.name, path
    records = instance.fetch_materializations(dg.AssetKey("evaluation_table"), limit=1000).records
    for record in records:  # newest first
        metadata = record.asset_materialization.metadata
        if "preset" in metadata and metadata["preset"].value == study:
            return study, Path(metadata["path"].value)
    raise LookupError(f"{study}: no evaluation_table materialized with preset {study!r} in this "
                      f"Dagster instance; run `kdbench demo --preset {study}` first, or pass the "
                      "path of an evaluation_table.parquet")


def compare(studies: list[str], instance: dg.DagsterInstance, out_root: Path) -> dict:
    """Compare study b = studies[1] against a = studies[0], written under
    `out_root`/comparisons/; the table and the paths. Records a materialization of
    `study_comparison`."""
    (name_a, path_a), (name_b, path_b) = (evaluation_table_of(s, instance) for s in studies)
    out_dir = Path(out_root) / "comparisons" / f"{name_a}--{name_b}"
    result = study_comparison.write_comparison(pd.read_parquet(path_a), pd.read_parquet(path_b),
                                               name_a, name_b, out_dir)
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=STUDY_COMPARISON.key, description=f"{name_b} against {name_a}",
        metadata={"a": name_a, "b": name_b, "a_table": dg.MetadataValue.path(str(path_a)),
                  "b_table": dg.MetadataValue.path(str(path_b)),
                  "path": dg.MetadataValue.path(str(result["paths"]["report"])),
                  "comparison": dg.MetadataValue.md(statistics.markdown_table(result["table"]))}))
    return result
