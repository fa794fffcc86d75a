import dagster as dg

from distill_core.config import TASKS

task_partitions = dg.StaticPartitionsDefinition(list(TASKS))
