"""What `kdbench demo` prints: a line per stage (what it produced, how long it took), the study's
own messages (Dagster at INFO, one short line each), and the grid's progress
(distill_core.grid_progress). Dagster's event stream, Ray's and Ray Data's progress logs,
Tune's banners, MLflow's database messages and warnings a user cannot act on are shown only
with `--verbose` (KDBENCH_VERBOSE=1, which the demo's processes read).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import dagster as dg

VERBOSE_ENV = "KDBENCH_VERBOSE"
INSTANCE_TEMPLATE = Path(__file__).resolve().parent.parent / "dagster.yaml"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


LIVE_ENV = "KDBENCH_LIVE"


def live_stream():
    """Where a live progress line may be redrawn: the terminal `kdbench demo` was started on
    (it sets KDBENCH_LIVE when its output is one), opened directly. Inside a step Dagster has
    redirected the process's output into its captured logs (the terminal gets a copy, later),
    so standard output is no terminal there, and redraws would fill the captured log. None
    when there is no such terminal (CI, a log file, a run from the UI)."""
    if os.environ.get(LIVE_ENV) != "1" or verbose():
        return None
    try:
        return open("/dev/tty", "w", buffering=1)
    except OSError:
        return None


def instance_home() -> Path:
    """DAGSTER_HOME (default .dagster), holding the project's instance settings (dagster.yaml:
    telemetry off) unless it has its own."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(INSTANCE_TEMPLATE, home / "dagster.yaml")
    return home


class _StudyFormatter(logging.Formatter):
    """`    step: message`: the asset's own words, without the run id, pid and job name."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        text = meta.get("orig_message") or record.getMessage()
        step = meta.get("step_key")
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"    {step + ': ' if step else ''}{level}{text}"


@dg.logger(config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
           description="The study's messages, one short line each, on standard output.")
def study_console(init_context) -> logging.Logger:
    logger = logging.getLogger("kdbench.study")
    logger.setLevel(init_context.logger_config["log_level"])
    logger.propagate = False
    if not logger.handlers:
        handler = _Stdout()
        handler.setFormatter(_StudyFormatter())
        logger.addHandler(handler)
    return logger


class _Stdout(logging.StreamHandler):
    """To whatever sys.stdout is when a line is written (not when the handler was made)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def quiet_process() -> None:
    """In this process: the libraries' own progress displays and notices off, their loggers at
    WARNING (errors and real warnings still show)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's advice to checkpoint less often, given every few seconds by short trials.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for category in ("BetaWarning", "PreviewWarning", "SupersessionWarning"):
        if hasattr(dg, category):
            warnings.filterwarnings("ignore", category=getattr(dg, category))
    import ray.data
    import transformers

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    transformers.utils.logging.disable_progress_bar()
    for name in ("ray", "ray.tune", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data warns that progress bars are off (this function's doing) and, while its actor
    # pool holds every CPU of a small machine, that "the cluster has no available CPUs".
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def ray_logging_level() -> int:
    """What ray.init logs at ("Started a local Ray instance" is INFO)."""
    return logging.INFO if verbose() else logging.WARNING


def describe(metadata: dict) -> str:
    """A stage's result in a few words, from its materialization metadata."""
    parts = []
    for key, label in (("rows", "rows"), ("fewshot_rows", "shot pool rows"), ("parameters", "parameters"),
                       ("steps", "steps"), ("tokens", "tokens"), ("trials", "trials"), ("models", "models")):
        if isinstance(metadata.get(key), int | float):
            parts.append(f"{metadata[key]:,} {label}")
    if isinstance(metadata.get("final_loss"), float):
        parts.append(f"final loss {metadata['final_loss']:.3f}")
    if isinstance(metadata.get("verdicts"), list):
        parts.append(f"{len(metadata['verdicts'])} task verdicts")
    if isinstance(metadata.get("bytes"), int):
        size = metadata["bytes"]
        parts.append(f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB")
    return ", ".join(parts)
