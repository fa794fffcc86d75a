"""Whole-or-absent writes when the writer is killed half-way: no readable partial cache is
left, the next write clears what the dead writer left, and a live writer's work is untouched."""

import socket
import subprocess
import sys

import pandas as pd
import pytest

from distill_core.storage import atomic_directory, write_parquet_atomic
from distill_core.teacher_cache import read_teacher_cache

# Writes half a cache into the temporary directory, says so, and waits to be killed.
WRITER = """
import sys, time
from pathlib import Path
from distill_core.storage import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "part-0.parquet").write_bytes(b"half a shard")
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(target):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_killed_cache_write_leaves_nothing_readable_and_the_next_write_clears_it(tmp_path):
    target = tmp_path / "cache"
    killed = _writer(target)
    alive = None
    try:
        alive = _writer(target)
        killed.kill()  # SIGKILL: no cleanup runs
        killed.wait()
        assert not target.exists()
        with pytest.raises(FileNotFoundError, match="not a complete teacher cache"):
            read_teacher_cache(target)
        assert len(list(tmp_path.iterdir())) == 2  # both writers' temporaries

        for _ in range(2):  # the second write replaces a complete cache
            with atomic_directory(target) as tmp:
                (tmp / "manifest.json").write_text("{}")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left[-1] == "cache" and len(left) == 2, left
        assert f"-{alive.pid}-" in left[0]  # the live writer's temporary is kept
    finally:
        for proc in (killed, alive):
            if proc is not None:
                proc.kill()
                proc.wait()
                proc.stdout.close()


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_a_dead_writers_parquet_temporary_is_cleared(tmp_path):
    leftover = tmp_path / f".table.parquet.tmp-{socket.gethostname()}-{_dead_pid()}-parquet"
    leftover.write_bytes(b"half a table")
    write_parquet_atomic(pd.DataFrame({"a": [1]}), tmp_path / "table.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_a_writer_killed_while_replacing_a_cache_leaves_the_previous_one_in_place(tmp_path):
    # Killed after moving the previous cache aside, before moving its own in: no `cache`.
    aside = tmp_path / f".cache.old-{socket.gethostname()}-{_dead_pid()}-x1" / "cache"
    aside.mkdir(parents=True)
    (aside / "manifest.json").write_text('{"previous": true}')
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "cache"):
            raise RuntimeError("this write fails too")
    assert (tmp_path / "cache" / "manifest.json").read_text() == '{"previous": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
