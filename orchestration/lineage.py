"""Reading what an upstream materialization recorded: downstream assets find their inputs by
the path lineage names (the upstream's latest materialization metadata), never by picking the
newest folder on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg


def upstream(context: dg.AssetExecutionContext, asset: str, partition: str | None = None) -> dict:
    """Metadata (plain values) of the latest materialization of `asset` (`partition`)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset),
                              asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    label = f"{asset}[{partition}]" if partition else asset
    if not records:
        raise dg.Failure(f"{label} has not been materialized yet; materialize it first")
    materialization = records[0].asset_materialization
    return {k: v.value for k, v in materialization.metadata.items()}


def file_sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if file.is_file():
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
