"""A trial's memory does not grow with the teacher cache: bench/memory.py runs the same trial
(same steps, same number of rows read) over the test's caches and over the same caches ten
times as large, each in a fresh process, and its private memory (at its peak and at the end)
stays where it was."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


def test_peak_memory_of_a_trial_does_not_grow_with_the_cache(tiny_caches, tiny_teacher_dir):
    out = subprocess.run([sys.executable, str(BENCH), "--teacher-dir", str(tiny_teacher_dir),
                          "--cache-dirs", *tiny_caches, "--times", "10", "--batch-size", "8"],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    growth = result["cache_mb_10x"] - result["cache_mb_1x"]
    assert growth > 9 * result["cache_mb_1x"] * 0.95  # the large cache is ten times the small
    # A trial that held the cache (or copied it to read a batch) would grow by the cache's
    # size or more, in private memory; this one reads the same rows of either from the map.
    assert result["peak_anon_mb_10x"] - result["peak_anon_mb_1x"] < 0.25 * growth, result
    assert result["anon_mb_10x"] - result["anon_mb_1x"] < 0.25 * growth, result
    # Its peak resident set also counts the mapped pages it touched (the OS page cache's,
    # shared), readahead around scattered rows included: less than one copy of the cache.
    assert result["rss_mb_10x"] - result["rss_mb_1x"] < 0.75 * growth, result
    assert result["steps"] == result["rows_1x"] // 8
