"""The paper's code path at the paper pair's real shapes (configs/paper-shapes.yaml): the whole
graph materialized on a reduced grid (2 groups x 1 seed x 2 steps, a few rows a task, answer
positions only), in bf16 on the CPU, with the real tokenizers and datasets. Each check is one
that only the real shapes show."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill_core.cache_reader import TeacherCacheReader
from distill_core.cache_size import estimate_preset
from distill_core.config import TASKS, load_config
from distill_core.final_layer_attention import capture_final_attention
from distill_core.models import load_causal_lm, load_lm_head, load_tokenizer
from distill_core.teacher_cache import aligned_rows, read_manifest, read_vocabulary_map, training_contexts
from orchestration.definitions import resources
from orchestration.study import materialize_study


@pytest.fixture(scope="module")
def overrides(shared_data, shared_tokenizers):
    return {
        "data.dir": str(shared_data),
        "teacher.tokenizer_from": str(shared_tokenizers / "llama3"),
        "student.tokenizer_from": str(shared_tokenizers / "llama2-spm"),
        "distill.groups": ["black_box", "combined"], "distill.steps": 2, "distill.report_every": 1,
        "distill.checkpoint_every": 2, "distill.batch_size": 4,
        "data.train_size": {"sst2": 8, "mmlu": 8, "gsm8k": 8},
        "data.eval_size": {"sst2": 4, "mmlu": 4, "gsm8k": 2},
        "eval.max_new_tokens": 4,
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_local, overrides):
    root = tmp_path_factory.mktemp("paper-shapes")
    uri = f"sqlite:///{root}/mlflow.db"
    res = resources(preset="paper-shapes", overrides_json=json.dumps(overrides),
                    storage_root=str(root), tracking_uri=uri,
                    artifact_root=str(root / "mlruns"))
    with dg.instance_for_test() as instance:
        metadata = materialize_study(res, instance, log=lambda _: None)
        caches = {t: _latest(instance, "teacher_cache", t) for t in TASKS}
        train = {t: _latest(instance, "train_examples", t)["path"] for t in TASKS}
        yield {"root": root, "uri": uri, "metadata": metadata, "caches": caches, "train": train,
               "cfg": load_config("paper-shapes", overrides)}


def _latest(instance, asset, partition):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_the_graph_runs_at_the_real_shapes_and_every_check_passes(shapes):
    metadata = shapes["metadata"]
    assert all(c["passed"] for c in metadata["asset_checks"]), metadata["asset_checks"]
    teacher = metadata["teacher_model"]
    assert teacher["random_init"] and teacher["teacher_vocab"] == 128256 and teacher["student_vocab"] == 32000
    config = json.loads((Path(teacher["path"]) / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["vocab_size"]) == (4096, 32, 8, 14336, 128256)
    table = pd.read_parquet(metadata["evaluation_table"]["path"])
    assert len(table) == (2 + 2) * 3 and table["accuracy"].between(0, 1).all()


def test_the_vocabulary_map_carries_128k_teacher_tokens_onto_32k_student_tokens(shapes):
    for cache in shapes["caches"].values():
        mapping = read_vocabulary_map(Path(cache["path"]))
        assert mapping.shape == (128256,) and int(mapping.max()) < 32000
        coverage = float((mapping >= 0).float().mean())
        assert cache["vocabulary_map_coverage"] == pytest.approx(coverage, abs=1e-4)
        assert 0.9 < coverage < 1.0  # special tokens and partial UTF-8 bytes have no student token


def test_cache_bytes_per_token_agree_with_kdbench_estimate(shapes):
    estimated = estimate_preset(shapes["cfg"])  # as `kdbench estimate` computes it, apart
    for task, cache in shapes["caches"].items():
        written = read_manifest(Path(cache["path"]))
        expected = estimated["tasks"][task]
        assert written["rows"] == expected["rows"] and written["tokens"] == expected["student_tokens"]
        assert written["bytes"] == pytest.approx(expected["total_bytes"], rel=0.10), task
        # 4096 bf16 numbers a chunk: the hidden states are most of a cache of answer queries
        assert expected["bytes"]["hidden"] == 2 * 4096 * expected["chunks"]


def test_attention_over_32_query_heads_with_8_and_4_kv_heads(shapes):
    cfg = shapes["cfg"]
    metadata = shapes["metadata"]
    student_dir = Path(pd.read_parquet(metadata["student_checkpoints"]["manifest"])["path"].iloc[0])
    student = AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="sdpa")
    assert student.config.num_key_value_heads == 4
    reader = TeacherCacheReader([shapes["caches"]["gsm8k"]["path"]], "answer", 2, 4096, 32,
                                signal_dtype=torch.bfloat16)
    batch = reader.batch([0, 1])
    assert batch.teacher_attention.shape[:2] == (2, 32)  # the teacher's 32 heads over 8 KV heads
    queries = batch.query_chunks >= 0
    rows = batch.teacher_attention.float().sum(-1).transpose(1, 2)[queries]  # [rows, heads]
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=0.02, rtol=0)  # distributions
    with torch.no_grad(), capture_final_attention(student, batch.attention_mask) as captured:
        student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    probs = captured["probs"]
    assert probs.shape == (2, 32, batch.input_ids.shape[1], batch.input_ids.shape[1])
    real = batch.attention_mask.bool()
    torch.testing.assert_close(probs.sum(-1)[:, 0][real], torch.ones(int(real.sum())), atol=1e-5, rtol=0)
    assert cfg.distill.attention_heads == "per_head"


def test_the_projector_maps_2048_student_dims_onto_4096_teacher_dims(shapes):
    # In the trials' resumable checkpoints, under Tune's storage (the final student drops it).
    projectors = sorted((shapes["root"] / "ray_results").rglob("projector.safetensors"))
    assert len(projectors) == 2, projectors  # one a trial
    for path in projectors:
        weights = load_file(str(path))
        assert weights["weight"].shape == (4096, 2048) and weights["bias"].shape == (4096,)


def test_exact_kd_targets_come_through_the_128k_lm_head(shapes):
    """The cached hidden state at a chunk end, through the teacher's lm_head, is the teacher's
    own next-token logits there: L_KD's target over the full 128k vocabulary, with no top-k."""
    metadata = shapes["metadata"]
    teacher_dir = metadata["teacher_model"]["path"]
    teacher = load_causal_lm(teacher_dir, dtype=torch.bfloat16)
    head = load_lm_head(teacher_dir, torch.bfloat16)
    assert head.weight.shape == (128256, 4096)
    rows = pd.read_parquet(shapes["train"]["sst2"]).head(2)
    aligned = aligned_rows(training_contexts(rows), load_tokenizer(metadata["teacher_model"]["student_tokenizer"]),
                           load_tokenizer(teacher_dir), shapes["cfg"].max_length, "answer")
    reader = TeacherCacheReader([shapes["caches"]["sst2"]["path"]], "answer", 2, 4096, 32,
                                signal_dtype=torch.bfloat16)
    for i in range(len(aligned)):
        ends = aligned["teacher_chunk_ends"][i].as_py()
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([aligned["teacher_ids"][i].as_py()])).logits[0, ends]
            batch = reader.batch([reader.ids.index(aligned["id"][i].as_py())])
            rebuilt = head(batch.teacher_hidden[0, :len(ends)])
        assert (rebuilt.argmax(-1) == logits.argmax(-1)).float().mean() > 0.95
        torch.testing.assert_close(rebuilt.float(), logits.float(), atol=0.1, rtol=0.05)


def test_trials_log_finite_kd_and_the_unmapped_teacher_mass(shapes):
    client = MlflowClient(shapes["uri"])
    parent = shapes["metadata"]["student_checkpoints"]["mlflow_parent_run_id"]
    experiment = client.get_experiment_by_name("kdbench-paper-shapes")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.data.params["group"] for c in children} == {"black_box", "combined"}
    for child in children:
        assert child.data.params["precision"] == "bf16"
        kd = [m.value for m in client.get_metric_history(child.info.run_id, "L_KD")]
        assert len(kd) == 2 and all(torch.isfinite(torch.tensor(kd)))
        unmapped = client.get_metric_history(child.info.run_id, "kd_unmapped_mass")
        assert unmapped and all(0 <= m.value < 0.5 for m in unmapped)


def test_checkpoints_load_with_automodel_and_the_32000_token_tokenizer(shapes):
    from transformers import AutoTokenizer

    for path in pd.read_parquet(shapes["metadata"]["student_checkpoints"]["manifest"])["path"]:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = model.config
        assert (config.vocab_size, config.hidden_size, config.num_attention_heads,
                config.num_key_value_heads, config.intermediate_size, config.num_hidden_layers) == \
            (32000, 2048, 32, 4, 5632, 2)
        assert len(tokenizer) == 32000 and model.dtype == torch.bfloat16
        assert json.loads((Path(path) / "kdbench.json").read_text())["precision"] == "bf16"
        ids = tokenizer("Question: 2 + 3?", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape == (1, ids.shape[1], 32000)
