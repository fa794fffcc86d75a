"""A trial's memory does not grow with the teacher cache: bench/memory.py runs the same trial
(same steps, same number of rows read) over the test's caches and over the same caches ten
times as large, each in a fresh process, and the peak resident set stays where it was."""

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
    # size or more; this one reads the same rows of either from the memory map.
    assert result["rss_mb_10x"] - result["rss_mb_1x"] < 0.25 * growth, result
    assert result["anon_mb_10x"] - result["anon_mb_1x"] < 0.25 * growth, result
    assert result["steps"] == result["rows_1x"] // 8
