"""Two finished studies side by side: per group and task, each study's accuracy, each study's
within-study effect (a white-box group's gain over black_box, black_box's over task_only, both
paired by seed), and the difference of those differences with its uncertainty.

"Does white-box help more when the vocabularies match?" is then a row of this table: the
hidden_state gain in the same-vocabulary study minus its gain in the cross-tokenizer study.
The two studies' students are independent samples (their seeds do not pair across studies:
different tokenizers start different students), so the difference of differences is tested
with Welch's t on the two studies' per-seed paired differences, with its 95% CI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from distill_core.statistics import CONTROL, TREATED, markdown_table
from distill_core.study_design import ALL_GROUPS, TASKS


def reference_of(group: str) -> str | None:
    """What a group's effect is measured against: black_box for the white-box groups, the
    control for black_box; the control has none."""
    if group == CONTROL:
        return None
    return CONTROL if group == TREATED else TREATED


def _paired_effects(students: pd.DataFrame, task: str, group: str, reference: str) -> np.ndarray:
    wide = students[students["task"] == task].pivot(index="seed", columns="group", values="accuracy")
    if group not in wide or reference not in wide:
        return np.array([])
    return (wide[group] - wide[reference]).dropna().to_numpy(float)


def welch(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """mean(b) - mean(a), its CI and Welch's p (a, b independent samples)."""
    out = {"diff": float(b.mean() - a.mean()) if len(a) and len(b) else float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan")}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        out.update(ci_low=out["diff"], ci_high=out["diff"])
        return out
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, df) * se
    out.update(ci_low=out["diff"] - half, ci_high=out["diff"] + half,
               p=float(2 * stats.t.sf(abs(out["diff"]) / se, df)))
    return out


def compare_studies(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """a, b: two studies' evaluation tables (students: seed >= 0). One row per group and task
    that both studies ran: each study's mean accuracy and its difference (b - a, Welch); each
    study's effect against the group's reference and the difference of differences."""
    a, b = a[a["seed"] >= 0], b[b["seed"] >= 0]
    rows = []
    groups = [g for g in ALL_GROUPS if g in set(a["group"]) and g in set(b["group"])]
    tasks = [t for t in TASKS if t in set(a["task"]) and t in set(b["task"])]
    for task in tasks:
        for group in groups:
            acc_a = a[(a["task"] == task) & (a["group"] == group)]["accuracy"].to_numpy(float)
            acc_b = b[(b["task"] == task) & (b["group"] == group)]["accuracy"].to_numpy(float)
            level = welch(acc_a, acc_b)
            row = {"task": task, "group": group, "mean_a": acc_a.mean(), "mean_b": acc_b.mean(),
                   "diff": level["diff"], "diff_ci_low": level["ci_low"], "diff_ci_high": level["ci_high"],
                   "diff_p": level["p"], "reference": reference_of(group) or "",
                   "effect_a": float("nan"), "effect_b": float("nan"), "diff_of_diffs": float("nan"),
                   "dod_ci_low": float("nan"), "dod_ci_high": float("nan"), "dod_p": float("nan")}
            reference = reference_of(group)
            if reference in groups:
                ea, eb = (_paired_effects(s, task, group, reference) for s in (a, b))
                dod = welch(ea, eb)
                row.update(effect_a=ea.mean() if len(ea) else float("nan"),
                           effect_b=eb.mean() if len(eb) else float("nan"), diff_of_diffs=dod["diff"],
                           dod_ci_low=dod["ci_low"], dod_ci_high=dod["ci_high"], dod_p=dod["p"])
            rows.append(row)
    return pd.DataFrame(rows)


def write_comparison(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str, out_dir: Path) -> dict:
    """compare_studies as Markdown and CSV under `out_dir`; returns the table and the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = compare_studies(a, b)
    text = (f"# {name_b} against {name_a}\n\n"
            f"Per task and group: mean accuracy in `{name_a}` (a) and `{name_b}` (b), their "
            "difference b - a with Welch's 95% CI and p; each study's effect of the group against "
            "its reference (white-box groups: black_box; black_box: task_only), paired by seed "
            "within the study; and the difference of differences (effect_b - effect_a) with "
            "Welch's 95% CI and p over the two studies' per-seed differences. The studies' "
            "students are independent: seeds do not pair across studies.\n\n" + markdown_table(table))
    (out_dir / "comparison.md").write_text(text)
    table.to_csv(out_dir / "comparison.csv", index=False)
    return {"table": table, "markdown": text,
            "paths": {"report": out_dir / "comparison.md", "csv": out_dir / "comparison.csv"}}
