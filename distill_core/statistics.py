"""Comparison of the distillation groups, per task, with pingouin.

Seeds pair the groups (seed s: same student init, projector init and data order in every
group), so the tests are within-subject with seed as the subject:
- first the control: did distilling from the teacher help at all? `black_box` against
  `task_only` (the student on labels alone), per task, paired t-test and Wilcoxon, each
  Holm-corrected across the tasks, with Hedges' g, CIs and the smallest detectable difference;
- then the white-box question among the study's groups (the control left out):
  repeated-measures ANOVA over groups, and Friedman's test as the non-parametric check;
- each other group against the baseline (`black_box`): paired t-test and Wilcoxon signed-rank,
  each Holm-corrected across the comparisons of a task, Hedges' g, the t-based and a bootstrap
  95% CI of the mean paired difference, and the smallest difference these seeds could detect
  (80% power, two-sided alpha 0.05, at the observed sd of the differences);
- the share of the teacher - untrained-student gap each group recovers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pingouin as pg
from scipy import stats

from distill_core.study_design import ALL_GROUPS, CONTROL_GROUPS

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_RESAMPLES = 10_000


def _mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    if len(values) < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * stats.sem(values)
    return (float(values.mean() - half), float(values.mean() + half))


def summarize(students: pd.DataFrame) -> pd.DataFrame:
    """Per task and group: n seeds, mean, sd and the t-based 95% CI of the mean accuracy."""
    rows = []
    for (task, group), frame in students.groupby(["task", "group"], sort=False):
        acc = frame["accuracy"].to_numpy(dtype=float)
        low, high = _mean_ci(acc)
        rows.append({"task": task, "group": group, "n": len(acc), "mean": acc.mean(),
                     "sd": acc.std(ddof=1) if len(acc) > 1 else float("nan"),
                     "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def rm_anova(frame: pd.DataFrame) -> dict:
    """Repeated-measures ANOVA of accuracy over groups, seed as subject, for one task."""
    out = {"F": float("nan"), "ddof1": float("nan"), "ddof2": float("nan"),
           "p_unc": float("nan"), "ng2": float("nan")}
    if frame["group"].nunique() < 2 or frame["seed"].nunique() < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = pg.rm_anova(data=frame, dv="accuracy", within="group", subject="seed", detailed=True)
    effect, error = res.iloc[0], res.iloc[1]
    nan = float("nan")  # pingouin drops the columns it cannot compute (no variance)
    out.update(F=float(effect.get("F", nan)), ddof1=float(effect["DF"]), ddof2=float(error["DF"]),
               p_unc=float(effect.get("p_unc", nan)), ng2=float(effect.get("ng2", nan)))
    return out


def friedman(frame: pd.DataFrame) -> dict:
    """Friedman's test over groups with seed as the block, for one task."""
    out = {"friedman_Q": float("nan"), "friedman_p": float("nan")}
    wide = frame.pivot(index="seed", columns="group", values="accuracy").dropna()
    if wide.shape[1] < 2 or wide.shape[0] < 2 or np.ptp(wide.to_numpy()) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = pg.friedman(data=frame, dv="accuracy", within="group", subject="seed").iloc[0]
    out.update(friedman_Q=float(res["Q"]), friedman_p=float(res["p_unc"]))
    return out


def bootstrap_ci(diff: np.ndarray, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (seeds resampled)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP_RESAMPLES, len(diff)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def minimum_detectable_difference(diff: np.ndarray) -> float:
    """The mean paired difference a paired t-test on this many seeds detects with 80% power
    (two-sided, alpha 0.05), at the observed sd of the differences."""
    if len(diff) < 3 or np.std(diff, ddof=1) == 0:
        return float("nan")
    d = pg.power_ttest(n=len(diff), power=POWER, alpha=ALPHA, contrast="paired")
    return float(d * np.std(diff, ddof=1))


def _holm(table: pd.DataFrame, column: str) -> pd.Series:
    out = pd.Series(float("nan"), index=table.index)
    testable = table[column].notna()
    if testable.any():
        out[testable] = pg.multicomp(table.loc[testable, column].to_numpy(), method="holm")[1]
    return out


def paired_vs_baseline(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every group of one task against `baseline`, paired by seed, Holm-corrected."""
    wide = frame.pivot(index="seed", columns="group", values="accuracy").dropna()
    others = [g for g in frame["group"].unique() if g != baseline]
    rows = []
    for group in others:
        x, y = wide[group].to_numpy(float), wide[baseline].to_numpy(float)
        diff = x - y
        row = {"group": group, "baseline": baseline, "n_pairs": len(diff),
               "mean_diff": diff.mean(), "ci_low": float("nan"), "ci_high": float("nan"),
               "boot_ci_low": float("nan"), "boot_ci_high": float("nan"),
               "t": float("nan"), "p_unc": float("nan"), "p_wilcoxon": float("nan"),
               "hedges_g": float("nan"), "mdd_80": float("nan")}
        if len(diff) >= 2 and np.ptp(diff) > 0:
            res = pg.ttest(x, y, paired=True).iloc[0]
            low, high = _mean_ci(diff)  # pingouin's CI95 is rounded to 2 decimals
            boot_low, boot_high = bootstrap_ci(diff)
            row.update(t=float(res["T"]), p_unc=float(res["p_val"]), ci_low=low, ci_high=high,
                       boot_ci_low=boot_low, boot_ci_high=boot_high,
                       hedges_g=float(pg.compute_effsize(x, y, paired=True, eftype="hedges")),
                       mdd_80=minimum_detectable_difference(diff))
            if np.any(diff != 0):
                # Exact signed-rank p-value (no ties at these sizes in general; scipy
                # falls back to the normal approximation with ties or zeros).
                row["p_wilcoxon"] = float(stats.wilcoxon(x, y).pvalue)
        elif len(diff) >= 2:  # identical differences: no variance, no test
            row.update(ci_low=diff.mean(), ci_high=diff.mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = _holm(table, "p_unc")
    table["p_wilcoxon_holm"] = _holm(table, "p_wilcoxon")
    table["significant"] = table["p_holm"] < ALPHA
    return table


def gap_recovered(summary: pd.DataFrame, references: pd.DataFrame) -> pd.Series:
    """(group mean - untrained student) / (teacher - untrained student), per summary row: 1 is
    the teacher's accuracy, 0 the untrained student's; NaN where there is no gap."""
    refs = references.pivot_table(index="task", columns="model", values="accuracy")
    out = []
    for r in summary.itertuples():
        try:
            teacher, untrained = refs.loc[r.task, "teacher"], refs.loc[r.task, "untrained_student"]
        except KeyError:
            out.append(float("nan"))
            continue
        gap = teacher - untrained
        out.append((r.mean - untrained) / gap if abs(gap) > 1e-12 else float("nan"))
    return pd.Series(out, index=summary.index, dtype=float)


CONTROL = "task_only"  # the student on labels alone
TREATED = "black_box"  # the least the teacher gives: its output distribution


def control_comparison(students: pd.DataFrame) -> pd.DataFrame:
    """Per task, `black_box` against `task_only`, paired by seed, Holm-corrected across the
    tasks (one family: "did the teacher help?"). Empty when either group is missing."""
    tables = []
    for task, frame in students.groupby("task", sort=False):
        pair = frame[frame["group"].isin([CONTROL, TREATED])]
        if set(pair["group"]) == {CONTROL, TREATED}:
            tables.append(paired_vs_baseline(pair, CONTROL).assign(task=task))
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    table = table[["task"] + [c for c in table.columns if c != "task"]]
    table["p_holm"] = _holm(table, "p_unc")
    table["p_wilcoxon_holm"] = _holm(table, "p_wilcoxon")
    table["significant"] = table["p_holm"] < ALPHA
    return table


def compare_groups(students: pd.DataFrame, baseline: str = "black_box",
                   references: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """students: one row per (task, group, seed) with `accuracy`; references: (model, task,
    accuracy) of the teacher and the untrained student, for the gap each group recovers.
    Returns {"summary", "control", "anova", "pairwise"} tables covering every task: the
    summary over every group, the control comparison (control_comparison), and the ANOVA
    and pairwise tests over the study's groups, the control left out (it answers another
    question, and its gap would swamp theirs)."""
    summary = summarize(students)
    if references is not None:
        summary["gap_recovered"] = gap_recovered(summary, references)
    control = control_comparison(students)
    study = students[~students["group"].isin(CONTROL_GROUPS)]
    anova, pairwise = [], []
    for task, frame in study.groupby("task", sort=False):
        if frame["group"].nunique() < 2:  # one study group: nothing to compare it with
            continue
        anova.append({"task": task, **rm_anova(frame), **friedman(frame)})
        if baseline in set(frame["group"]):
            pairs = paired_vs_baseline(frame, baseline)
            pairs.insert(0, "task", task)
            pairwise.append(pairs)
    return {"summary": summary, "control": control, "anova": pd.DataFrame(anova),
            "pairwise": pd.concat(pairwise, ignore_index=True) if pairwise else pd.DataFrame()}


def control_verdict(task: str, control: pd.DataFrame) -> str:
    """Did distilling from the teacher help on `task`: black_box vs task_only in words."""
    rows = control[control["task"] == task] if not control.empty else control
    if rows.empty:
        return (f"{task}: no control in this study (add {CONTROL} to distill.groups to learn "
                "whether distilling helped at all).")
    r = rows.iloc[0]
    ci = (f"95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if not np.isnan(r["ci_low"]) else "no CI")
    mdd = r.get("mdd_80", float("nan"))
    power = f"these seeds detect {mdd:.3f} or more with 80% power" if not np.isnan(mdd) else \
        "no test: the paired differences have no variance"
    if r["significant"]:
        word = "helped" if r["mean_diff"] > 0 else "hurt"
        return (f"{task}: distilling from the teacher {word}: {TREATED} - {CONTROL} = "
                f"{r['mean_diff']:+.3f} ({ci}; Holm p={r['p_holm']:.3g}, g={r['hedges_g']:.2f}; "
                f"{power}).")
    return (f"{task}: no significant benefit from the teacher: {TREATED} - {CONTROL} = "
            f"{r['mean_diff']:+.3f} ({ci}; {power}).")


def verdict(task: str, anova: dict, pairs: pd.DataFrame) -> str:
    """The white-box question on `task` in words: the ANOVA, Friedman, each group vs the
    baseline."""
    if anova is None:
        return f"{task}: one study group only; no comparison between groups."
    if np.isnan(anova["p_unc"]):
        head = f"{task}: the ANOVA is not computable (no variance across seeds or groups)."
    elif anova["p_unc"] < ALPHA:
        head = f"{task}: the groups differ (rm-ANOVA F={anova['F']:.2f}, p={anova['p_unc']:.3g})."
    else:
        head = (f"{task}: no significant difference between groups "
                f"(rm-ANOVA F={anova['F']:.2f}, p={anova['p_unc']:.3g}).")
    if not np.isnan(anova.get("friedman_p", float("nan"))):
        agree = (anova["friedman_p"] < ALPHA) == (anova["p_unc"] < ALPHA)
        head += (f" Friedman {'agrees' if agree else 'disagrees'} (Q={anova['friedman_Q']:.2f}, "
                 f"p={anova['friedman_p']:.3g}).")
    details = []
    for _, r in pairs.iterrows():
        if r["significant"]:
            word = "better" if r["mean_diff"] > 0 else "worse"
            details.append(f"{r['group']} is {word} than {r['baseline']} by {r['mean_diff']:+.3f} "
                           f"(Holm p={r['p_holm']:.3g}, g={r['hedges_g']:.2f})")
        else:
            mdd = r.get("mdd_80", float("nan"))
            power = (f"; these seeds detect {mdd:.3f} or more with 80% power"
                     if not np.isnan(mdd) else "")
            details.append(f"{r['group']} vs {r['baseline']}: no significant difference "
                           f"({r['mean_diff']:+.3f}{power})")
    return head + (" " + "; ".join(details) + "." if details else "")


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "—" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)\n"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(students: pd.DataFrame, references: pd.DataFrame, out_dir: Path,
                 title: str, baseline: str = "black_box", preamble: list[str] | None = None,
                 sections: dict[str, tuple[str, str, pd.DataFrame]] | None = None) -> dict:
    """Markdown + CSV + PNG of the comparison. references: rows (model, task, accuracy) for the
    teacher and the untrained student; `preamble`: lines under the title (what the study is);
    `sections`: {name: (heading, text, table)} put after the control (and `name`.csv).
    Returns paths, the tables, the control's verdicts and the white-box verdicts, per task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    students = _in_study_order(students)
    tables = compare_groups(students, baseline, references)
    verdicts, control_verdicts = [], []
    control = tables["control"]
    parts = [f"# {title}\n\n", *(f"{line}\n" for line in (preamble or [])),
             "\nAccuracy per group over seeds; seed is the pairing subject. "
             f"First the control, per task: `{TREATED}` vs `{CONTROL}` (the student on labels "
             "alone), did distilling from the teacher help at all; Holm-corrected across tasks. "
             f"Then the white-box groups, the control left out: repeated-measures ANOVA, Friedman "
             f"as the non-parametric check; each group vs `{baseline}` by paired t-test and "
             "Wilcoxon signed-rank, each Holm-corrected per task; Hedges' g; t-based and bootstrap "
             "95% CIs of the mean paired difference; `mdd_80`: the smallest difference these "
             "seeds detect with 80% power; `gap_recovered`: (group - untrained student) / "
             "(teacher - untrained student).\n",
             f"\n## Did distilling from the teacher help? ({TREATED} vs {CONTROL})\n",
             markdown_table(control[["task", "mean_diff", "ci_low", "ci_high", "p_holm",
                                     "p_wilcoxon_holm", "hedges_g", "mdd_80", "significant"]])
             if not control.empty else f"No `{CONTROL}` group in this study: the control is not run.\n"]
    for heading, text, table in (sections or {}).values():
        parts += [f"\n## {heading}\n", f"{text}\n\n" if text else "", markdown_table(table)]
    tables = {**tables, **{name: table for name, (_, _, table) in (sections or {}).items()}}
    anova_by_task = tables["anova"].set_index("task") if not tables["anova"].empty else None
    for task in students["task"].unique():
        anova = anova_by_task.loc[task].to_dict() if anova_by_task is not None and task in anova_by_task.index \
            else None
        pairs = tables["pairwise"][tables["pairwise"]["task"] == task] \
            if not tables["pairwise"].empty else pd.DataFrame()
        control_verdicts.append(control_verdict(task, control))
        verdicts.append(verdict(task, anova, pairs))
        refs = references[references["task"] == task][["model", "accuracy"]]
        parts += [f"\n## {task}\n", f"**Did the teacher help?** {control_verdicts[-1]}\n\n",
                  f"**White-box.** {verdicts[-1]}\n",
                  "\n### Groups\n", markdown_table(tables["summary"][tables["summary"]["task"] == task]
                                                   .drop(columns="task")),
                  "\n### References\n", markdown_table(refs),
                  "\n### Against the baseline\n",
                  markdown_table(pairs.drop(columns="task") if not pairs.empty else pairs)]
    markdown = "".join(parts)
    (out_dir / "report.md").write_text(markdown)
    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=False)
    plot_path = out_dir / "accuracy.png"
    plot_accuracy(students, references, plot_path)
    return {"markdown": markdown, "verdicts": verdicts, "control_verdicts": control_verdicts,
            "tables": tables,
            "paths": {"report": out_dir / "report.md", "plot": plot_path,
                      **{n: out_dir / f"{n}.csv" for n in tables}}}


def _in_study_order(students: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered as the study's table of groups (black_box first), then by seed."""
    rank = {g: i for i, g in enumerate(ALL_GROUPS)}
    order = students["group"].map(lambda g: rank.get(g, len(rank)))
    return students.assign(_rank=order).sort_values(["_rank", "group", "seed"], kind="stable") \
        .drop(columns="_rank")


def plot_accuracy(students: pd.DataFrame, references: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(students["task"].unique())
    groups = list(students["group"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        frame = students[students["task"] == task]
        for i, group in enumerate(groups):
            acc = frame[frame["group"] == group]["accuracy"].to_numpy(float)
            jitter = np.linspace(-0.12, 0.12, len(acc)) if len(acc) > 1 else np.zeros(1)
            ax.scatter(i + jitter, acc, s=14, alpha=0.6)
            low, high = _mean_ci(acc)
            ax.errorbar(i, acc.mean(), yerr=[[acc.mean() - low], [high - acc.mean()]]
                        if not np.isnan(low) else None, fmt="o", color="black", capsize=4)
        for _, ref in references[references["task"] == task].iterrows():
            ax.axhline(ref["accuracy"], linestyle="--", linewidth=1, color="gray")
            ax.text(0.99, ref["accuracy"], ref["model"], transform=ax.get_yaxis_transform(),
                    fontsize=7, color="gray", va="bottom", ha="right")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel("accuracy")
    fig.suptitle("accuracy per group (points: seeds; black: mean and 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
