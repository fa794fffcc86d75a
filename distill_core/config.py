"""The experiment config: one typed object, loaded from a preset YAML plus overrides.

Every value is checked when the config is built, so a bad preset fails before any compute
with a message that names the field (pydantic's `loc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASKS = ("sst2", "mmlu", "gsm8k")
GROUPS = ("black_box", "hidden_state", "attention", "combined")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

Task = Literal["sst2", "mmlu", "gsm8k"]
Group = Literal["black_box", "hidden_state", "attention", "combined"]


class _Strict(BaseModel):
    # A misspelt key in a preset is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _per_task(value: dict[str, int], field: str, minimum: int) -> dict[str, int]:
    missing = set(TASKS) - set(value)
    unknown = set(value) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in {field}; tasks are {list(TASKS)}")
    if missing:
        raise ValueError(f"{field} lacks task(s) {sorted(missing)}")
    for task, n in value.items():
        if n < minimum:
            raise ValueError(f"{field}.{task} must be >= {minimum}, got {n}")
    return value


class DataConfig(_Strict):
    source: Literal["synthetic"] = "synthetic"
    seed: int = 1234
    train_size: dict[str, int]
    eval_size: dict[str, int]
    fewshot_pool_size: int = Field(5, ge=0)
    fewshot: dict[str, int]

    @field_validator("train_size", "eval_size")
    @classmethod
    def _sizes(cls, v: dict[str, int], info) -> dict[str, int]:
        return _per_task(v, info.field_name, 1)

    @field_validator("fewshot")
    @classmethod
    def _shots(cls, v: dict[str, int]) -> dict[str, int]:
        return _per_task(v, "fewshot", 0)

    @model_validator(mode="after")
    def _pool_holds_shots(self) -> "DataConfig":
        for task, k in self.fewshot.items():
            if k > self.fewshot_pool_size:
                raise ValueError(f"fewshot.{task}={k} exceeds fewshot_pool_size={self.fewshot_pool_size}")
        return self


class TokenizerConfig(_Strict):
    kind: Literal["byte_level_bpe"] = "byte_level_bpe"
    vocab_size: int = Field(600, ge=300)


class ModelConfig(_Strict):
    """A Llama-architecture model: built from these sizes, or loaded from `hub_id`."""

    source: Literal["train", "init", "hub"]
    hub_id: str | None = None
    revision: str | None = None
    hidden_size: int | None = Field(None, ge=8)
    num_layers: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    train_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _complete(self) -> "ModelConfig":
        if self.source == "hub":
            if not self.hub_id:
                raise ValueError("source 'hub' needs hub_id (e.g. meta-llama/Meta-Llama-3-8B)")
            return self
        sizes = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        missing = [s for s in sizes if getattr(self, s) is None]
        if missing:
            raise ValueError(f"source '{self.source}' needs {missing} (or source: hub with hub_id)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class CacheConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0, ge=0)
    attention_queries: Literal["answer", "all"] = "answer"


class DistillConfig(_Strict):
    groups: list[Group] = Field(default_factory=lambda: list(GROUPS), min_length=1)
    seeds: int = Field(7, ge=1)
    alpha_task: float = Field(1.0, ge=0)
    beta_kd: float = Field(1.0, ge=0)
    gamma_hidden: float = Field(1.0, ge=0)
    gamma_attn: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    distill_positions: Literal["all", "answer"] = "all"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    report_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    resources_per_trial: dict[str, float] = Field(default_factory=lambda: {"cpu": 1})

    @field_validator("groups")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"groups repeat: {v}")
        return v

    @field_validator("resources_per_trial")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"cpu", "gpu"}
        if unknown:
            raise ValueError(f"resources_per_trial keys must be cpu/gpu, got {sorted(unknown)}")
        if any(n < 0 for n in v.values()) or v.get("cpu", 1) <= 0:
            raise ValueError(f"resources_per_trial needs cpu > 0 and gpu >= 0, got {v}")
        return v


class EvalConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)


class ExperimentConfig(_Strict):
    name: str = Field(min_length=1)
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    teacher: ModelConfig
    student: ModelConfig
    max_length: int = Field(256, ge=16)
    cache: CacheConfig = CacheConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _pair(self) -> "ExperimentConfig":
        t, s = self.teacher, self.student
        if t.source == "init":
            raise ValueError("teacher.source must be 'train' or 'hub': an untrained teacher teaches nothing")
        if s.source == "train":
            raise ValueError("student.source must be 'init' or 'hub': students are trained by the grid")
        if t.num_heads and s.num_heads and t.num_heads != s.num_heads:
            # L_align_attn compares head i with head i.
            raise ValueError(f"teacher.num_heads {t.num_heads} != student.num_heads {s.num_heads}")
        return self

    @property
    def seeds(self) -> list[int]:
        return list(range(self.distill.seeds))


class ConfigError(ValueError):
    """A preset or override that does not validate; the message names the field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = CONFIGS_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; presets are {known}")
    return path


def load_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a preset (a name in configs/ or a YAML path) with dotted-key overrides,
    e.g. ``{"distill.seeds": 2, "distill.groups": ["black_box", "combined"]}``."""
    path = preset_path(preset)
    tree = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"invalid config {path.name}:"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {field}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None
