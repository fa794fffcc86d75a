"""Bad input: each kind gives a clear error that names the input, and nothing already written
is lost or left half-written. One test a kind, most of them a row of the table below."""

from __future__ import annotations

import errno
import json
import shutil

import pandas as pd
import pytest
import torch

from distill_core import real_datasets as real
from distill_core.config import ConfigError, load_config
from distill_core.encoding import encode_example
from distill_core.models import load_causal_lm, load_tokenizer
from distill_core.storage import atomic_directory, write_parquet_atomic
from distill_core.tasks import load_task_splits


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


DATA_FILES = [  # (kind, file under the data dir, its text, task, split, the error's words)
    ("malformed SST-2 row", "sst2/dev.tsv", "sentence\tlabel\nfine . \t1\nno tab\n", "sst2", "dev",
     r"dev.tsv:3: expected 'sentence<TAB>label'"),
    ("SST-2 label out of range", "sst2/dev.tsv", "sentence\tlabel\nfine . \t2\n", "sst2", "dev",
     r"dev.tsv:2: label '2' is not 0 or 1"),
    ("wrong columns", "sst2/dev.tsv", "text\tgold\nfine . \t1\n", "sst2", "dev",
     r"dev.tsv:1: expected the header 'sentence<TAB>label'"),
    ("empty file", "sst2/dev.tsv", "sentence\tlabel\n", "sst2", "dev", r"sst2 dev in .*: no rows"),
    ("MMLU row with 5 fields", "mmlu/test/x_test.csv", "q,1,2,3,A\n", "mmlu", "test",
     r"x_test.csv:1: 5 fields, expected 6"),
    ("GSM8K line that is not JSON", "gsm8k/test.jsonl", '{"question": "1+1?",\n', "gsm8k", "test",
     r"test.jsonl:1: not JSON"),
    ("GSM8K answer without ####", "gsm8k/test.jsonl",
     json.dumps({"question": "1+1?", "answer": "2"}) + "\n", "gsm8k", "test",
     r"test.jsonl:1: the answer has no '#### <number>'"),
    ("GSM8K record without a question", "gsm8k/test.jsonl", json.dumps({"answer": "#### 2"}) + "\n",
     "gsm8k", "test", r"test.jsonl:1: expected an object with 'question' and 'answer'"),
]


@pytest.mark.parametrize("kind,relative,text,task,split,message", DATA_FILES,
                         ids=[row[0] for row in DATA_FILES])
def test_bad_data_files_name_file_and_line(tmp_path, kind, relative, text, task, split, message):
    _write(tmp_path, relative, text)
    with pytest.raises(ValueError, match=message):
        real.load_local(task, tmp_path, split)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gsm8k train: no file .*gsm8k/train.jsonl"):
        real.load_local("gsm8k", tmp_path, "train")


def test_unknown_task_is_named():
    cfg = load_config("tiny", {})
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        load_task_splits("squad", cfg.data)


@pytest.mark.parametrize("overrides,field", [
    ({"distill.lr": -1.0}, "distill.lr"),
    ({"data.source": "local"}, "data.dir"),
    ({"cache.attention_queries": "some"}, "cache.attention_queries"),
    ({"data.fewshot": {"sst2": 9, "mmlu": 0, "gsm8k": 0}}, "fewshot.sst2=9"),
])
def test_out_of_range_config_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_a_model_dir_without_weights_is_named(tiny_teacher_dir, tmp_path):
    empty = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match=f"{empty}: no \\*.safetensors weights"):
        load_causal_lm(empty)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: a 'gpt2' model; kdbench needs a Llama"):
        load_causal_lm(tmp_path)


def test_a_tokenizer_without_offsets_is_refused(tmp_path, tiny_teacher_dir):
    # A folder whose tokenizer is only a slow (Python) one: no offsets, no alignment.
    from transformers import PreTrainedTokenizer

    class WordTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.vocab = {"<unk>": 0, "a": 1}
            super().__init__(unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return text.split()

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

    with pytest.raises(ValueError, match="a fast tokenizer \\(with offsets\\) is required"):
        from distill_core import models

        models._require_fast(WordTokenizer(), "word-tokenizer")


def test_a_row_longer_than_max_length_is_named(tiny_teacher_dir):
    tok = load_tokenizer(tiny_teacher_dir)
    with pytest.raises(ValueError, match=r"row r-7: \d+ tokens exceed max_length=8"):
        encode_example(tok, "a long prompt with many words in it", " yes", 8, "r-7")


def test_a_teacher_with_non_finite_outputs_is_not_cached(tiny_teacher_dir, tmp_path, tiny_data):
    from safetensors.torch import load_file, save_file

    from distill_core.teacher_cache import TeacherSignals, aligned_rows, training_contexts

    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    rows = training_contexts(tiny_data["sst2"]["train"].head(3))
    aligned = aligned_rows(rows, load_tokenizer(broken / "student_tokenizer"), load_tokenizer(broken),
                           256, "answer")
    with pytest.raises(ValueError, match="non-finite hidden states on rows") as err:
        TeacherSignals(str(broken))(aligned)
    assert str(rows["id"].iloc[0]) in str(err.value)


def test_a_full_disk_during_a_write_loses_nothing(tmp_path, monkeypatch):
    # A complete directory and a Parquet file are in place; the rewrite of each fails with
    # ENOSPC half-way: the old content is intact and no temporary is left behind.
    target = tmp_path / "cache"
    with atomic_directory(target) as tmp:
        (tmp / "part-0.parquet").write_bytes(b"old shard")
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target) as tmp:
            (tmp / "part-0.parquet").write_bytes(b"half of a new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "part-0.parquet").read_bytes() == b"old shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    table = tmp_path / "table.parquet"
    write_parquet_atomic(pd.DataFrame({"a": [1]}), table)

    def full(self, path, *args, **kwargs):
        open(path, "wb").write(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    with pytest.raises(OSError, match="No space left"):
        write_parquet_atomic(pd.DataFrame({"a": [2]}), table)
    monkeypatch.undo()
    assert pd.read_parquet(table)["a"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "table.parquet"]


def test_an_unreachable_mlflow_server_is_named(monkeypatch):
    from orchestration.resources import MLflowResource

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    resource = MLflowResource(tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(RuntimeError, match=r"MLflow tracking at http://127.0.0.1:9 is not reachable"):
        resource.experiment_id("kdbench-tiny")


def test_a_trial_that_cannot_reach_the_mlflow_server_names_it_and_its_node(
        monkeypatch, tmp_path, tiny_config, tiny_teacher_dir, trial_config):
    from distill_core.objective import loss_weights
    from distill_core.training import DistillationRecipe, _trial_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    recipe = DistillationRecipe(trial_config(tiny_config, [], tiny_teacher_dir, tmp_path, group="black_box"))
    recipe.weights = loss_weights("black_box", recipe.cfg.distill)  # what setup would set
    server = {"tracking_uri": "http://127.0.0.1:9", "experiment_id": "1", "parent_run_id": "p"}
    with pytest.raises(ConnectionError, match=r"trial black_box-seed0 on Ray node n-7: MLflow "
                                              r"tracking at http://127.0.0.1:9 is not reachable"):
        _trial_run(recipe, server, "n-7")


def test_several_nodes_refuse_a_tracking_file_and_name_the_server_they_need(monkeypatch):
    from orchestration.resources import MLflowResource

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = MLflowResource()  # sqlite:///mlflow.db
    local.require_shared(1)   # one machine: the file is fine
    with pytest.raises(RuntimeError, match=r"2 nodes, and MLflow tracks in sqlite:///.*mlflow.db: "
                                           r"trials on other nodes need an MLflow tracking server"):
        local.require_shared(2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")  # MLflow's own variable
    assert MLflowResource().resolved_uri() == "http://head:5000"
    MLflowResource().require_shared(8)


def test_an_unreachable_ray_address_is_named_at_once(monkeypatch, free_ports):
    import dagster as dg

    from orchestration.definitions import resources

    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # Ray's own variable, as users set it
    ray_cluster = resources()["ray_cluster"]
    with pytest.raises(ConnectionError, match=rf"Ray cluster at 127.0.0.1:{port} is not reachable"):
        ray_cluster.setup_for_execution(dg.build_init_resource_context())
    for wrong in ("head-node", "http://head-node:8265"):  # no port; the dashboard's address
        with pytest.raises(ValueError, match=rf"RayResource.address '{wrong}' is not host:port"):
            resources(ray_address=wrong)["ray_cluster"].setup_for_execution(
                dg.build_init_resource_context())


def test_kdbench_eval_refuses_a_limit_below_one(tiny_teacher_dir, shared_data, capsys):
    from orchestration.cli import main

    assert main(["eval", "--checkpoint", str(tiny_teacher_dir), "--task", "sst2",
                 "--data-dir", str(shared_data), "--limit", "0"]) == 2
    assert "--limit 0: must be at least 1" in capsys.readouterr().err
