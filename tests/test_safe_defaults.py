"""Safe defaults: weights are safetensors only (a pickle checkpoint is refused, never
unpickled) and a checkpoint's remote code is never run. (Secrets stay out of MLflow and
Dagster: tests/orchestration/test_study.py; the UIs bind to 127.0.0.1:
tests/orchestration/test_ui.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill_core.models import load_causal_lm


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=16))


def test_a_pickle_checkpoint_is_refused_not_unpickled(tmp_path):
    model = _tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pickle format
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_causal_lm(tmp_path)


def test_a_checkpoints_remote_code_is_never_run(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    marker = tmp_path / "remote-code-ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        load_causal_lm(tmp_path)
    except ValueError as err:  # transformers may refuse outright: also safe
        assert "trust_remote_code" in str(err)
    assert not marker.exists()
