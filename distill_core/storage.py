"""Writes that are whole or absent: a reader never sees a half-written file or directory.

A write goes to a hidden sibling named after its target, this host and this process
(`.<name>.tmp-<host>-<pid>-...`) and is renamed into place when complete. A writer killed
half-way (SIGKILL, an OOM kill, a lost machine) leaves that sibling behind, never the target;
the next write of the same target on the same host removes the siblings of writers that are
no longer alive (a half-written teacher cache can be tens of GiB)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

_KINDS = ("tmp", "old")


def _sibling_prefix(path: Path, kind: str, pid: int | None = None) -> str:
    """`.<name>.<kind>-<host>-<pid>-`; without a pid, what every writer's on this host starts with."""
    return f".{path.name}.{kind}-{socket.gethostname()}-" + (f"{pid}-" if pid is not None else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_dead_writers(path: Path) -> list[Path]:
    """Removes what writers of `path` on this host left behind when they died; returns it. A
    writer killed between moving the previous `path` aside and moving its own into place left
    no `path` at all: the previous one is put back first."""
    path = Path(path)
    removed = []
    for kind in _KINDS:
        prefix = _sibling_prefix(path, kind)
        for left in sorted(path.parent.glob(f"{prefix}*")):
            pid = left.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not path.exists() and (left / path.name).exists():
                os.replace(left / path.name, path)
            # Another writer may be clearing the same leftovers: gone is as good as removed.
            shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
            removed.append(left)
    return removed


@contextmanager
def _atomic_file(path: Path):
    """Yields a temporary sibling file; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_dead_writers(path)
    tmp = path.with_name(_sibling_prefix(path, "tmp", os.getpid()) + "file")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> Path:
    with _atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_text_atomic(text: str, path: Path) -> Path:
    with _atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_directory(path: Path):
    """Yields a temporary sibling directory; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_dead_writers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path, "tmp", os.getpid()), dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path, "old", os.getpid()), dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
