"""Llama-architecture models: built from a preset's sizes, or loaded from a hub id / local dir.

Loading is safetensors-only and never runs remote code: a checkpoint is data, not a program.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from distill_core.config import ModelConfig


def llama_config(cfg: ModelConfig, tokenizer, max_length: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def init_model(cfg: ModelConfig, tokenizer, max_length: int, seed: int,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights. Built in `dtype`
    directly (a full-width model in float32 first would need twice the memory)."""
    generator_state = torch.random.get_rng_state()
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        return LlamaForCausalLM(llama_config(cfg, tokenizer, max_length)).to(dtype)
    finally:
        torch.set_default_dtype(default_dtype)
        torch.random.set_rng_state(generator_state)


def load_causal_lm(source: str | Path, revision: str | None = None, dtype=torch.float32,
                   device: torch.device | str = "cpu"):
    """An HF causal LM from a local dir or hub id, safetensors only, in `dtype` on `device`
    (read into host memory, then moved: placing it straight on a GPU needs `accelerate`)."""
    path = Path(source)
    if path.exists() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights in this model directory")
    model = AutoModelForCausalLM.from_pretrained(
        str(source), revision=revision, dtype=dtype, use_safetensors=True,
        trust_remote_code=False, attn_implementation="sdpa",
    )
    if model.config.model_type != "llama":  # the final-layer attention hook is Llama's
        raise ValueError(f"{source}: a {model.config.model_type!r} model; kdbench needs a "
                         "Llama-architecture causal LM")
    return model.to(device).eval()


def _require_fast(tok, source):
    """Alignment and answer masks come from character offsets, which only fast (Rust)
    tokenizers give."""
    if not tok.is_fast:
        raise ValueError(f"{source}: a fast tokenizer (with offsets) is required")
    return tok


def load_tokenizer(source: str | Path, revision: str | None = None):
    tok = _require_fast(AutoTokenizer.from_pretrained(str(source), revision=revision,
                                                      trust_remote_code=False), source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok



def load_lm_head(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.nn.Linear:
    """Only the output projection of a saved model (for rebuilding its logits from cached
    hidden states), read from its safetensors without loading the rest, frozen, in `dtype` on
    `device`."""
    import json

    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    key = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():
                weight = f.get_tensor(key).to(dtype)
                head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                       device="meta", dtype=dtype)
                head.weight = torch.nn.Parameter(weight, requires_grad=False)
                return head.to(device).eval()
    raise FileNotFoundError(f"{model_dir}: no {key} in its safetensors files")
