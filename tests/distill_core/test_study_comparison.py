"""Two studies side by side: Welch's difference of differences against hand values."""

import math

import numpy as np
import pandas as pd
from scipy import stats

from distill_core.study_comparison import compare_studies, welch, write_comparison


def _study(acc: dict[str, list[float]], task: str = "sst2") -> pd.DataFrame:
    rows = [{"model": f"{g}-seed{s}", "group": g, "seed": s, "task": task, "accuracy": a}
            for g, values in acc.items() for s, a in enumerate(values)]
    return pd.DataFrame(rows + [{"model": "teacher", "group": "teacher", "seed": -1, "task": task,
                                 "accuracy": 0.9}])


def test_welch_against_scipy():
    a, b = np.array([.1, .2, .15, .12]), np.array([.3, .25, .4])
    out = welch(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert math.isclose(out["diff"], b.mean() - a.mean())
    assert math.isclose(out["p"], ref.pvalue, rel_tol=1e-9)
    ci = ref.confidence_interval(0.95)
    assert math.isclose(out["ci_low"], ci.low, rel_tol=1e-9) and math.isclose(out["ci_high"], ci.high, rel_tol=1e-9)


def test_difference_of_differences_per_group_and_its_reference():
    a = _study({"task_only": [.50, .52, .51], "black_box": [.60, .63, .61], "hidden_state": [.61, .63, .62]})
    b = _study({"task_only": [.55, .50, .52], "black_box": [.66, .60, .62], "hidden_state": [.76, .71, .73],
                "attention": [.6, .6, .6]})
    table = compare_studies(a, b).set_index("group")
    assert list(table.index) == ["black_box", "hidden_state", "task_only"]  # both ran; study order
    hs = table.loc["hidden_state"]
    ea, eb = np.array([.01, 0, .01]), np.array([.10, .11, .11])  # against black_box, per seed
    assert hs["reference"] == "black_box"
    assert math.isclose(hs["effect_a"], ea.mean()) and math.isclose(hs["effect_b"], eb.mean())
    assert math.isclose(hs["diff_of_diffs"], eb.mean() - ea.mean())
    assert math.isclose(hs["dod_p"], stats.ttest_ind(eb, ea, equal_var=False).pvalue, rel_tol=1e-9)
    assert hs["dod_ci_low"] > 0  # the gain is larger in b, beyond its uncertainty
    bb = table.loc["black_box"]
    assert bb["reference"] == "task_only"
    assert math.isclose(bb["effect_a"], np.mean([.10, .11, .10]))
    assert math.isclose(bb["mean_b"], np.mean([.66, .60, .62]))
    assert np.isnan(table.loc["task_only", "diff_of_diffs"])  # the control has no reference


def test_the_comparison_is_written_as_markdown_and_csv(tmp_path):
    a = _study({"task_only": [.5, .6, .55], "black_box": [.6, .7, .62]})
    out = write_comparison(a, a, "tiny", "tiny-same-vocab", tmp_path)
    assert "# tiny-same-vocab against tiny" in out["paths"]["report"].read_text()
    csv = pd.read_csv(out["paths"]["csv"])
    assert csv.set_index("group").loc["black_box", "diff_of_diffs"] == 0
