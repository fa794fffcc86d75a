"""bench/step.py keeps running: a one-step pass over the tiny preset's shapes (the tiny
preset's tokenizers, teacher and student shapes, its synthetic rows) prints every variant's
figures and the ratios the README quotes. No timing is asserted: figures come from full runs."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step.py"


def test_step_bench_measures_every_variant_it_is_asked_for(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--shapes", "tiny", "--steps", "2", "--warmup", "1",
                          "--repeats", "1", "--variants", "sft", "task_only", "black_box", "combined",
                          "--workdir", str(tmp_path)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout[out.stdout.index("{"):])["tiny"]
    for variant in ("sft", "task_only", "black_box", "combined"):
        figures = result[variant]
        assert figures["step_s"] > 0 and figures["rss_mb"] > 100, (variant, figures)
    assert result["sft"]["report_step_s"] is None and result["combined"]["report_step_s"] > 0
    for key in ("task_only_over_sft", "black_box_over_sft", "combined_over_black_box",
                "combined_rss_over_black_box"):
        assert result[key] > 0, key
    assert result["naive_kd_over_sft"] is None  # two vocabularies: no naive KL to compare with
    assert (tmp_path / "tiny" / "setup.json").exists()  # reused by the next run with --workdir
