"""The group comparison against hand-checked values, a planted effect, and a null one."""

import math

import numpy as np
import pandas as pd
from scipy import stats

from distill_core.statistics import compare_groups, write_report


def _table(effects: dict[str, float], noise: float = 0.02, seeds: int = 7, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    seed_effect = rng.normal(0, 0.05, seeds)  # seeds differ; pairing removes this
    rows = []
    for group, effect in effects.items():
        for s in range(seeds):
            rows.append({"task": "sst2", "group": group, "seed": s,
                         "accuracy": 0.6 + seed_effect[s] + effect + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_hand_checked_small_table():
    # black_box: 0.50 0.60 0.70; combined: 0.55 0.70 0.75 -> differences 0.05 0.10 0.05
    table = pd.DataFrame({"task": "t", "group": ["black_box"] * 3 + ["combined"] * 3,
                          "seed": [0, 1, 2] * 2, "accuracy": [.5, .6, .7, .55, .7, .75]})
    out = compare_groups(table)
    summary = out["summary"].set_index("group")
    assert math.isclose(summary.loc["black_box", "mean"], 0.6)
    assert math.isclose(summary.loc["black_box", "sd"], 0.1)
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # 0.2484
    assert math.isclose(summary.loc["black_box", "ci_high"], 0.6 + half, rel_tol=1e-9)
    pair = out["pairwise"].iloc[0]
    d = np.array([0.05, 0.10, 0.05])
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(3))  # 0.06667 / 0.02887 = 2.309
    assert math.isclose(pair["mean_diff"], d.mean(), rel_tol=1e-9)
    assert math.isclose(pair["t"], t_hand, rel_tol=1e-6)
    assert math.isclose(pair["p_unc"], 2 * stats.t.sf(t_hand, 2), rel_tol=1e-6)
    assert math.isclose(pair["p_holm"], pair["p_unc"])  # one comparison: Holm changes nothing
    half_d = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)  # CI of the mean difference
    assert math.isclose(pair["ci_low"], d.mean() - half_d, rel_tol=1e-9)
    assert math.isclose(pair["ci_high"], d.mean() + half_d, rel_tol=1e-9)
    # With two groups the rm-ANOVA F is the paired t squared.
    assert math.isclose(out["anova"].iloc[0]["F"], t_hand**2, rel_tol=1e-6)


def test_a_planted_effect_is_found_and_a_null_one_is_not():
    table = _table({"black_box": 0.0, "hidden_state": 0.0, "attention": 0.08, "combined": 0.0})
    out = compare_groups(table)
    pairs = out["pairwise"].set_index("group")
    assert pairs.loc["attention", "significant"]
    assert pairs.loc["attention", "hedges_g"] > 0.8
    assert pairs.loc["attention", "ci_low"] > 0
    assert not pairs.loc["hidden_state", "significant"]
    assert not pairs.loc["combined", "significant"]
    assert out["anova"].iloc[0]["p_unc"] < 0.05
    # Holm: p_holm >= p_unc, and monotone in the order of the raw p-values.
    assert (pairs["p_holm"] >= pairs["p_unc"] - 1e-12).all()


def test_null_table_across_many_draws_is_rarely_significant():
    hits = sum(compare_groups(_table({"black_box": 0, "combined": 0}, rng_seed=s))["pairwise"]
               .iloc[0]["significant"] for s in range(40))
    assert hits <= 6  # alpha = 0.05: about 2 of 40 expected


def test_report_files_and_verdicts(tmp_path):
    table = _table({"black_box": 0.0, "combined": 0.1})
    refs = pd.DataFrame({"model": ["teacher", "untrained_student"], "task": "sst2",
                         "accuracy": [0.9, 0.5]})
    out = write_report(table, refs, tmp_path, title="t")
    assert "combined is better than black_box" in out["verdicts"][0]
    text = (tmp_path / "report.md").read_text()
    assert "## sst2" in text and "teacher" in text
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(tmp_path / "pairwise.csv").shape[0] == 1
    null = write_report(_table({"black_box": 0.0, "combined": 0.0}, rng_seed=3), refs,
                        tmp_path / "null", title="t")
    assert "no significant difference" in null["verdicts"][0]


def test_friedman_wilcoxon_bootstrap_power_and_gap_against_hand_values():
    # Three groups, four seeds, the same order on every seed: ranks 1, 2, 3 on each block,
    # so Q = 12/(n k (k+1)) * sum R_j^2 - 3 n (k+1) = 0.25 * (16 + 64 + 144) - 48 = 8.
    acc = {"black_box": [.50, .60, .55, .65], "hidden_state": [.52, .63, .58, .66],
           "combined": [.56, .64, .60, .70]}
    table = pd.DataFrame([{"task": "t", "group": g, "seed": s, "accuracy": a}
                          for g, values in acc.items() for s, a in enumerate(values)])
    refs = pd.DataFrame({"model": ["teacher", "untrained_student"], "task": "t", "accuracy": [.9, .5]})
    out = compare_groups(table, references=refs)
    anova = out["anova"].iloc[0]
    assert math.isclose(anova["friedman_Q"], 8.0) and math.isclose(anova["friedman_p"], math.exp(-4))
    summary = out["summary"].set_index("group")
    assert math.isclose(summary.loc["combined", "gap_recovered"], (0.625 - 0.5) / 0.4)
    pair = out["pairwise"].set_index("group").loc["combined"]
    # Four positive differences: the exact two-sided signed-rank p is 2 / 2^4.
    assert math.isclose(pair["p_wilcoxon"], 2 / 16)
    diff = np.array(acc["combined"]) - np.array(acc["black_box"])
    assert pair["boot_ci_low"] <= diff.mean() <= pair["boot_ci_high"]
    assert diff.min() <= pair["boot_ci_low"] and pair["boot_ci_high"] <= diff.max()
    # The minimum detectable difference has 80% power, checked with the noncentral t.
    n, sd = len(diff), diff.std(ddof=1)
    nc = pair["mdd_80"] / sd * math.sqrt(n)
    crit = stats.t.ppf(0.975, n - 1)
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert math.isclose(power, 0.8, abs_tol=1e-3)


def test_the_verdict_says_what_a_null_result_could_have_detected(tmp_path):
    refs = pd.DataFrame({"model": ["teacher", "untrained_student"], "task": "sst2",
                         "accuracy": [0.9, 0.5]})
    out = write_report(_table({"black_box": 0.0, "hidden_state": 0.0}, rng_seed=3), refs, tmp_path, title="t")
    assert "hidden_state vs black_box: no significant difference" in out["verdicts"][0]
    assert "no control in this study" in out["control_verdicts"][0]
    assert "with 80% power" in out["verdicts"][0] and "Friedman" in out["verdicts"][0]
    assert {"p_wilcoxon_holm", "boot_ci_low", "mdd_80"} <= set(pd.read_csv(tmp_path / "pairwise.csv"))
    assert "gap_recovered" in pd.read_csv(tmp_path / "summary.csv")


def _tasks_table(effects: dict[str, dict[str, float]], seeds: int = 7) -> pd.DataFrame:
    """effects: {task: {group: effect}}, each task its own draw."""
    return pd.concat([_table(e, seeds=seeds, rng_seed=i).assign(task=task)
                      for i, (task, e) in enumerate(effects.items())], ignore_index=True)


def test_the_control_comes_first_tested_across_tasks_and_left_out_of_the_white_box_tests(tmp_path):
    """black_box vs task_only per task, Holm-corrected over the tasks; the report opens with
    it (a table, then each task's section), and the ANOVA and pairwise tests do not see it."""
    effects = {"sst2": {"task_only": 0.0, "black_box": 0.10, "combined": 0.10},
               "mmlu": {"task_only": 0.0, "black_box": 0.0, "combined": 0.0},
               "gsm8k": {"task_only": 0.0, "black_box": -0.10, "combined": -0.10}}
    table = _tasks_table(effects)
    refs = pd.DataFrame([{"model": m, "task": t, "accuracy": a} for t in effects
                         for m, a in (("teacher", 0.9), ("untrained_student", 0.5))])
    out = write_report(table, refs, tmp_path, title="t", preamble=["Regime: fewer labels."])
    control = out["tables"]["control"].set_index("task")
    assert control["significant"].tolist() == [True, False, True]
    assert control.loc["sst2", "mean_diff"] > 0.05 and control.loc["gsm8k", "mean_diff"] < -0.05
    # Holm over the three tasks: the smallest p times 3.
    assert math.isclose(control["p_holm"].min(), 3 * control["p_unc"].min())
    wide = table[table.task == "sst2"].pivot(index="seed", columns="group", values="accuracy")
    t_hand = stats.ttest_rel(wide["black_box"], wide["task_only"]).statistic
    assert math.isclose(control.loc["sst2", "t"], t_hand, rel_tol=1e-6)
    assert "helped" in out["control_verdicts"][0] and "hurt" in out["control_verdicts"][2]
    assert "no significant benefit" in out["control_verdicts"][1] and "80% power" in out["control_verdicts"][1]
    # The white-box tests are over black_box and combined only.
    assert set(out["tables"]["pairwise"]["group"]) == {"combined"}
    assert out["tables"]["anova"]["ddof1"].tolist() == [1.0, 1.0, 1.0]
    text = (tmp_path / "report.md").read_text()
    assert text.index("Regime: fewer labels.") < text.index("Did distilling from the teacher help?") \
        < text.index("## sst2")
    section = text[text.index("## sst2"):text.index("## mmlu")]
    assert section.index("**Did the teacher help?**") < section.index("**White-box.**")
    assert pd.read_csv(tmp_path / "control.csv").shape[0] == 3
