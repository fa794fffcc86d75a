"""lm-evaluation-harness as the oracle of kdbench's evaluation. One checkpoint with decisive
margins (random weights drawn wide: confident, varied predictions, and digits made likely so
that GSM8K's filters have numbers to extract), with a byte-level BPE tokenizer that adds no BOS
by default (the case where "always BOS" and the harness disagree), is scored by `kdbench eval`
(saved as an HF folder, as a user's checkpoint) and by the harness's Python API, on the same
local release files. The harness's task
configs are its own YAMLs (lm_eval/tasks/...), loaded with its own loader, with only the data
source pointed at the local files. Per example: the same option chosen (and the same
log-likelihoods) on SST-2 and two MMLU subjects, the same generation and the same strict and
flexible matches on GSM8K (5 shots drawn by the harness's sampler)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from distill_core import real_datasets as real

lm_eval = pytest.importorskip("lm_eval")

SUBJECTS = ["high_school_physics", "high_school_geography"]
LIMIT = {"sst2": 40, "mmlu": 25, "gsm8k": 6}  # examples a task (a subject, for MMLU)
MAX_NEW_TOKENS = 24
MAX_LENGTH = 4096


@pytest.fixture(scope="module")
def checkpoint(shared_data):
    """A random Llama over a byte-level BPE trained on the tasks' text, without BOS."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_core.tokenizer_training import train_byte_level_bpe

    texts = [r["prompt"] + r["answer"] for task, split in (("sst2", "dev"), ("gsm8k", "train"))
             for r in real.load_local(task, shared_data, split).rows[:400]]
    texts += [r["description"] + r["prompt"] + r["answer"] for r in
              real.load_local("mmlu", shared_data, "dev", subjects=SUBJECTS).rows]
    tokenizer = train_byte_level_bpe(texts, 1200)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    # This tokenizer adds nothing in front of a text (asked directly, not through kdbench).
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
        initializer_range=0.4, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    digits = [i for t, i in tokenizer.get_vocab().items() if any(c.isdigit() for c in t)]
    with torch.no_grad():  # numbers for GSM8K's filters to find
        model.lm_head.weight[digits] *= 2.5
    return model, tokenizer


def _harness_task(name: str, yaml_path: Path, **data) -> dict:
    """The harness's own task config (its YAML, includes resolved by its loader), reading its
    data from local files instead of the hub."""
    config = _load(yaml_path)
    config.pop("tag", None)
    config.pop("group", None)
    return {**config, **data, "task": name}


def _mmlu_docs(dataset):
    """The release csv's rows as the hub's cais/mmlu rows: question, choices, answer index.
    (A new column, renamed: `datasets` keeps a mapped column's old type under its old name.)"""
    return dataset.map(lambda r: {"question": r["question"], "choices": [r["A"], r["B"], r["C"], r["D"]],
                                  "answer_index": "ABCD".index(r["answer"].strip())},
                       remove_columns=dataset.column_names).rename_column("answer_index", "answer")


@pytest.fixture(scope="module")
def harness(checkpoint, shared_data):
    """Per task, the harness's logged samples by (doc_id, filter)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    csv = {"column_names": ["question", "A", "B", "C", "D", "answer"], "keep_default_na": False}
    configs = [
        _harness_task("oracle_sst2", tasks_dir / "glue" / "sst2" / "default.yaml",
                      dataset_path="csv", dataset_name=None,
                      dataset_kwargs={"data_files": {"train": str(shared_data / "sst2" / "train.tsv"),
                                                     "validation": str(shared_data / "sst2" / "dev.tsv")},
                                      "delimiter": "\t", "quoting": 3, "keep_default_na": False}),
        _harness_task("oracle_gsm8k", tasks_dir / "gsm8k" / "gsm8k.yaml", dataset_path="json",
                      dataset_name=None,
                      dataset_kwargs={"data_files": {"train": str(shared_data / "gsm8k" / "train.jsonl"),
                                                     "test": str(shared_data / "gsm8k" / "test.jsonl")}},
                      generation_kwargs={**_load(tasks_dir / "gsm8k" / "gsm8k.yaml")["generation_kwargs"],
                                         "max_gen_toks": MAX_NEW_TOKENS}),
    ]
    for subject in SUBJECTS:
        files = {split: str(shared_data / "mmlu" / split / f"{subject}_{split}.csv") for split in ("dev", "test")}
        configs.append(_harness_task(f"oracle_mmlu_{subject}", tasks_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml",
                                     dataset_path="csv", dataset_name=None,
                                     dataset_kwargs={"data_files": files, **csv}, process_docs=_mmlu_docs,
                                     num_fewshot=real.HARNESS_SHOTS["mmlu"]))  # the protocol's 5
    model, tokenizer = checkpoint
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=MAX_LENGTH, device="cpu")
    limits = {c["task"]: LIMIT["mmlu" if "mmlu" in c["task"] else c["task"].removeprefix("oracle_")]
              for c in configs}
    samples = {}
    for config in configs:  # one task a call: each its own limit
        out = simple_evaluate(model=lm, tasks=[config], limit=limits[config["task"]], log_samples=True,
                              bootstrap_iters=0)
        samples[config["task"]] = {(s["doc_id"], s["filter"]): s for s in out["samples"][config["task"]]}
    return samples


def _load(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml  # what the harness's task manager uses

    return load_yaml(path, resolve_func=True, recursive=True)


def _kdbench(checkpoint, tmp_path, shared_data, task: str, subject=None) -> list[dict]:
    """`kdbench eval` on the checkpoint saved as an HF folder: its per-example predictions."""
    import json

    from orchestration.cli import main

    model, tokenizer = checkpoint
    folder = tmp_path / "checkpoint"
    if not folder.exists():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    predictions = tmp_path / f"{task}-{subject}.jsonl"
    args = ["eval", "--checkpoint", str(folder), "--task", task, "--data-dir", str(shared_data),
            "--limit", str(LIMIT[task]), "--predictions", str(predictions),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "8"]
    assert main(args + (["--subjects", subject] if subject else [])) == 0
    return [json.loads(line) for line in predictions.read_text().splitlines()]


def _choices_agree(ours: list[dict], theirs: dict[tuple, dict]):
    assert len(ours) == len(theirs)
    for doc_id, record in enumerate(ours):
        harness_ll = [resp[0][0] for resp in theirs[(doc_id, "none")]["resps"]]
        torch.testing.assert_close(torch.tensor(record["scores"]), torch.tensor(harness_ll),
                                   atol=2e-3, rtol=1e-4)
        assert record["predicted"] == max(range(len(harness_ll)), key=harness_ll.__getitem__), doc_id


def test_sst2_choices_are_the_harness_choices(checkpoint, harness, shared_data, tmp_path):
    ours = _kdbench(checkpoint, tmp_path, shared_data, "sst2")
    _choices_agree(ours, harness["oracle_sst2"])
    assert 0 < sum(r["predicted"] for r in ours) < len(ours)  # varied predictions, not one label


def test_mmlu_choices_are_the_harness_choices(checkpoint, harness, shared_data, tmp_path):
    for subject in SUBJECTS:
        ours = _kdbench(checkpoint, tmp_path, shared_data, "mmlu", subject)
        _choices_agree(ours, harness[f"oracle_mmlu_{subject}"])
        assert len({r["predicted"] for r in ours}) > 1


def test_gsm8k_generations_and_matches_are_the_harness_ones(checkpoint, harness, shared_data, tmp_path):
    ours = _kdbench(checkpoint, tmp_path, shared_data, "gsm8k")
    theirs = harness["oracle_gsm8k"]
    assert len(ours) * 2 == len(theirs) == LIMIT["gsm8k"] * 2  # a sample a doc and filter
    for doc_id, record in enumerate(ours):
        strict, flexible = theirs[(doc_id, "strict-match")], theirs[(doc_id, "flexible-extract")]
        assert record["generated"] == strict["resps"][0][0], doc_id
        assert record["strict"] == strict["filtered_resps"][0], doc_id
        assert record["flexible"] == flexible["filtered_resps"][0], doc_id
    assert any(r["flexible"] != "[invalid]" for r in ours)  # the filters had numbers to find
