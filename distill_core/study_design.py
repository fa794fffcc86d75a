"""The study's fixed design: its three tasks and its groups.

Kept apart from `config` (pydantic) so that the modules a model run needs (models, objective,
evaluation, tasks) import with torch, transformers and the data libraries alone: bench/gpu.py
runs on a GPU machine that has nothing else.
"""

TASKS = ("sst2", "mmlu", "gsm8k")
GROUPS = ("black_box", "hidden_state", "attention", "combined")  # the study's groups
# task_only: L_task alone, no teacher: the control that says whether distillation helped at all.
CONTROL_GROUPS = ("task_only",)
ALL_GROUPS = GROUPS + CONTROL_GROUPS
