"""Code versions that mean something: the hash of the `distill_core` source an asset runs, so a
change there makes the asset stale in Dagster and a change elsewhere does not."""

from __future__ import annotations

import hashlib
import importlib
import inspect


def code_version_of(*module_names: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(module_names):
        module = importlib.import_module(f"distill_core.{name}")
        digest.update(name.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]
