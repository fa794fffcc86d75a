"""The comparison_report asset's work: the study's report, saying what the study was (the pair,
the L_KD path, the labels the students had) and what each group cost, around the statistics of
distill_core.statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from distill_core import statistics
from distill_core.cross_vocab import VocabularyBridge
from distill_core.study_design import ALL_GROUPS
from distill_core.teacher_cache import read_vocabulary_map
from distill_core.trial_cost import cache_bytes

if TYPE_CHECKING:
    from distill_core.config import ExperimentConfig


def kd_path(cache_dir: str, student_vocab: int, kd_across_vocab: str,
            unmapped_mass: float | None = None) -> dict:
    """Which L_KD the study's trials computed: the exact KL over one shared vocabulary, or
    across vocabularies (`map`: the teacher's distribution moved onto the student's tokens,
    `uld`: sorted-probability L1), with the mean teacher mass no student token starts."""
    bridge = VocabularyBridge(read_vocabulary_map(Path(cache_dir)), student_vocab)
    if bridge.same:
        return {"kd_path": "exact", "text": "L_KD: the exact same-vocabulary KL at every distilled "
                "position (teacher and student share one tokenizer)."}
    how = {"map": "the teacher's distribution mapped onto the student's vocabulary",
           "uld": "ULD's L1 between sorted probabilities"}[kd_across_vocab]
    mass = (f"; mean unmapped teacher mass {unmapped_mass:.4f}"
            if unmapped_mass is not None and not np.isnan(unmapped_mass) else "")
    return {"kd_path": kd_across_vocab, "unmapped_mass": unmapped_mass,
            "text": f"L_KD: across vocabularies ({bridge.teacher_vocab:,} teacher tokens, "
                    f"{student_vocab:,} student tokens), {how}{mass}."}


def labels_text(cfg: ExperimentConfig) -> str:
    labelled = cfg.distill.labelled_rows
    if labelled is None:
        return "Labels: every training row's answer is learned by L_task (the teacher saw the same rows)."
    sizes = cfg.data.train_size
    parts = ", ".join(f"{t} {min(labelled[t], sizes[t]):,} of {sizes[t]:,}" for t in labelled)
    return (f"Labels: the students learn the answers (L_task) of {parts} training rows; the "
            "teacher, trained on all of them, gives its signals on every row.")


def cost_table(students: pd.DataFrame, trials: pd.DataFrame, group_cache_bytes: dict[str, int]) -> pd.DataFrame:
    """Per group: median training wall time and student tokens/s over its seeds, the largest
    peak memory, the cache MB its signals need, and its mean accuracy gain over task_only per
    task (paired by seed), when the study ran the control."""
    rows = []
    wide = students.pivot_table(index=["task", "seed"], columns="group", values="accuracy")
    for group, frame in trials.groupby("group", sort=False):
        row = {"group": group, "train_s": frame["train_seconds"].median(),
               "tokens_per_s": frame["tokens_per_s"].median(),
               "peak_memory_mb": frame["peak_memory_mb"].max(),
               "cache_mb": group_cache_bytes.get(group, float("nan")) / 2**20}
        for task in students["task"].unique():
            gain = float("nan")
            if statistics.CONTROL in wide and group in wide:
                gain = float((wide.loc[task, group] - wide.loc[task, statistics.CONTROL]).mean())
            row[f"gain_{task}"] = gain
        rows.append(row)
    order = {g: i for i, g in enumerate(ALL_GROUPS)}
    return pd.DataFrame(rows).sort_values("group", key=lambda c: c.map(order)).reset_index(drop=True)


def curve_means(curves: pd.DataFrame) -> pd.DataFrame:
    """Per group and step, each validation metric's mean over the seeds (one column each)."""
    if curves.empty:
        return pd.DataFrame()
    wide = curves.pivot_table(index=["group", "step"], columns="metric", values="value", aggfunc="mean")
    order = {g: i for i, g in enumerate(ALL_GROUPS)}
    wide = wide.reset_index().sort_values(["group", "step"], key=lambda c: c.map(order) if c.name == "group" else c)
    metrics = ["val_loss"] + sorted(c for c in wide.columns if c.endswith("_accuracy"))
    return wide[["group", "step"] + [m for m in metrics if m in wide]].reset_index(drop=True)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """One panel per validation metric: each group's mean over seeds against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = curve_means(curves)
    metrics = [c for c in means.columns if c.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for group, frame in means.groupby("group", sort=False):
            ax.plot(frame["step"], frame[metric], marker="o", markersize=3, label=group)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("learning curves on held-out validation rows (mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study_report(cfg: ExperimentConfig, table: pd.DataFrame, trials: pd.DataFrame,
                       cache_dirs: list[str], student_vocab: int, out_dir: Path,
                       curves: pd.DataFrame | None = None) -> dict:
    """The report of a finished study: `table` the evaluation table (students: seed >= 0;
    the teacher and the untrained student: seed -1), `trials` the grid's manifest (cost and
    the trials' L_KD measures), `cache_dirs` the tasks' teacher caches, `curves` the trials'
    validation points (learning_curve.curves_table), if the study scored any."""
    students = table[table["seed"] >= 0]
    references = table[table["seed"] < 0]
    unmapped = trials["kd_unmapped_mass"].dropna() if "kd_unmapped_mass" in trials else pd.Series(dtype=float)
    path = kd_path(cache_dirs[0], student_vocab, cfg.distill.kd_across_vocab,
                   float(unmapped.mean()) if len(unmapped) else None)
    preamble = [f"Preset `{cfg.name}`: teacher {cfg.teacher.hub_id or 'trained here'} -> student "
                f"{cfg.student.hub_id or 'initialized here'}; {len(cfg.distill.groups)} groups x "
                f"{cfg.distill.seeds} seeds, {cfg.distill.steps} steps a trial.",
                "", path["text"], "", labels_text(cfg)]
    group_bytes = cache_bytes(list(trials["group"].unique()), cache_dirs, cfg.cache.logits)
    cost = cost_table(students, trials, group_bytes)
    sections = {"cost": ("What each group cost",
                         "Per group: median training wall time and student tokens a second over "
                         "its seeds, the largest peak memory of a trial (GPU: torch's peak "
                         "allocation; CPU: the trial process's peak resident set), the teacher "
                         "cache it reads (MB), and its mean accuracy gain over task_only per task.",
                         cost)}
    if curves is not None and not curves.empty:
        sections["curves"] = ("Learning curves",
                              "Each group's mean over seeds on the held-out validation rows "
                              f"(zero-shot), every {cfg.distill.curve_every} steps: `learning_curves.png`.",
                              curve_means(curves))
    report = statistics.write_report(
        students, references, out_dir,
        title=f"kdbench {cfg.name}: what each kind of teacher knowledge is worth",
        preamble=preamble, sections=sections)
    if "curves" in sections:
        report["paths"]["curves_plot"] = Path(out_dir) / "learning_curves.png"
        plot_curves(curves, report["paths"]["curves_plot"])
    return {**report, "kd_path": path}
