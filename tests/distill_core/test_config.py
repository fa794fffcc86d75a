"""Every shipped preset validates; bad values fail before any compute, naming the field."""

import pytest

from distill_core.config import CONFIGS_DIR, ConfigError, load_config


SHAPES_ONLY = {"paper-shapes"}  # proves the paper's shapes on a CPU, not its statistics: 1 seed
# The GPU presets run the control as an option (its cost: README); the others always run it.
CONTROL_OPTIONAL = {"paper", "paper-same-vocab", "paper-shapes"}
STUDY = {"black_box", "hidden_state", "attention", "combined"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert set(cfg.distill.groups) == (STUDY if preset in CONTROL_OPTIONAL else STUDY | {"task_only"})
    assert cfg.distill.seeds == (1 if preset in SHAPES_ONLY else 7)
    header = (CONFIGS_DIR / f"{preset}.yaml").read_text().split("\nname:")[0]
    assert f"--preset {preset}" in header  # the header says how to run it


@pytest.mark.parametrize("override, field", [
    ({"distill.groups": ["black_box", "white_box"]}, "distill.groups"),
    ({"distill.beta_kd": -1.0}, "distill.beta_kd"),
    ({"distill.gamma_attn": -0.1}, "distill.gamma_attn"),
    ({"distill.seeds": 0}, "distill.seeds"),
    ({"student.hidden_size": None}, "student"),
    ({"teacher.source": "hub", "teacher.hub_id": None}, "teacher"),
    ({"data.train_size": {"sst2": 10, "mmlu": 10}}, "data.train_size"),
    ({"distill.resources_per_trial": {"cpu": 1, "GPU": 1}}, "distill.resources_per_trial"),
    ({"distill.resources_per_trial": {"cpu": 1, "head_node": -1}}, "distill.resources_per_trial"),
    ({"distill.checkpoint_every": 30, "distill.report_every": 20}, "distill"),
    ({"distill.alpha_task": 0.0, "distill.beta_kd": 0.0}, "distill"),
    ({"distill.lerning_rate": 0.1}, "distill.lerning_rate"),
    ({"student.tokenizer": None}, "student"),
    ({"teacher.tokenizer.kind": "wordpiece"}, "teacher.tokenizer.kind"),
    ({"distill.kd_across_vocab": "nearest"}, "distill.kd_across_vocab"),
    ({"distill.attention_loss": "cosine"}, "distill.attention_loss"),
    ({"cache.logits": "full"}, "cache.logits"),
    ({"cache.budget_gib": 0}, "cache.budget_gib"),
    ({"student.num_heads": 2, "student.num_kv_heads": 2}, "(top level)"),
    ({"precision": "fp16"}, "precision"),
    ({"distill.labelled_rows": {"sst2": 1, "mmlu": 1}}, "distill.labelled_rows"),
    ({"distill.labelled_rows": {"sst2": -1, "mmlu": 1, "gsm8k": 1}}, "distill.labelled_rows"),
    ({"cache.batch_tokens": 0}, "cache.batch_tokens"),
    ({"eval.batch_tokens": 8}, "eval.batch_tokens"),
    ({"eval.resources_per_model": {"cpu": 1, "gpu": -1}}, "eval.resources_per_model"),
    ({"eval.resources_per_model": {"cpu": 0}}, "eval.resources_per_model"),
    ({"student.tokenizer_from": "../shared/tokenizers/llama2-spm"}, "student"),  # and tokenizer
    ({"teacher.source": "hub", "teacher.hub_id": "x/y"}, "teacher"),  # with a tokenizer to train
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", override)
    assert f"  {field}" in str(err.value), str(err.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config("nope")


def test_overrides_reach_the_typed_config():
    cfg = load_config("tiny", {"distill.seeds": 2, "distill.groups": ["black_box", "combined"]})
    assert cfg.seeds == [0, 1]
    assert cfg.distill.groups == ["black_box", "combined"]


def test_head_averaged_attention_allows_different_head_counts():
    cfg = load_config("tiny", {"student.num_heads": 2, "student.num_kv_heads": 2,
                               "distill.attention_heads": "mean"})
    assert cfg.student.num_heads != cfg.teacher.num_heads


def test_tiny_pair_uses_two_tokenizer_families_of_different_sizes():
    cfg = load_config("tiny")
    assert cfg.teacher.tokenizer.kind == "byte_level_bpe"
    assert cfg.student.tokenizer.kind == "sentencepiece_bpe"
    assert cfg.teacher.tokenizer.vocab_size != cfg.student.tokenizer.vocab_size


def test_a_tokenizer_can_be_named_by_path_instead_of_trained():
    cfg = load_config("tiny", {"student.tokenizer": None,
                               "student.tokenizer_from": "../shared/tokenizers/llama2-spm"})
    assert cfg.student.tokenizer is None and cfg.student.tokenizer_from.endswith("llama2-spm")


def test_a_preset_extends_another_section_by_section(tmp_path):
    base = (CONFIGS_DIR / "tiny.yaml").read_text()
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "child.yaml").write_text(
        "extends: base\nname: child\nstudent:\n  hidden_size: 64\ndistill:\n  groups: [black_box]\n")
    child, parent = load_config(str(tmp_path / "child.yaml")), load_config("tiny")
    assert child.name == "child" and child.student.hidden_size == 64
    assert child.student.num_layers == parent.student.num_layers  # the rest of the section kept
    assert child.distill.groups == ["black_box"] and child.distill.steps == parent.distill.steps
    same = load_config("tiny-same-vocab")
    assert same.student.tokenizer == same.teacher.tokenizer
    assert same.model_dump(exclude={"name", "student"}) == parent.model_dump(exclude={"name", "student"})
    (tmp_path / "loop.yaml").write_text("extends: loop\nname: loop\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "loop.yaml"))
