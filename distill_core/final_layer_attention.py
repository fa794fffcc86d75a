"""Final-layer attention probabilities without switching the model to eager attention.

With sdpa, `output_attentions=True` yields nothing, and eager attention in every layer costs
memory and time for probabilities we need from one layer only. Instead a forward hook on the
last layer's `self_attn` recomputes softmax(Q K^T / sqrt(d) + mask) from that layer's own
inputs: exact (the same projections and rotary embedding as the layer), differentiable, and the
extra work is one layer's Q/K projections and score matrix.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def attention_probabilities(attn, hidden_states, position_embeddings, attention_mask):
    """[B, H, T, T] float32 attention probabilities of `attn` (a LlamaAttention).

    attention_mask: [B, T] with 1 for real tokens; keys that are padding or in the future get
    probability 0. Rows of padding queries are not meaningful.
    """
    b, t, _ = hidden_states.shape
    shape = (b, t, -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling
    causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


@contextmanager
def capture_final_attention(model, attention_mask):
    """Within the block, forward passes of `model` (a LlamaForCausalLM) store the final layer's
    attention probabilities in the yielded dict under "probs"."""
    attn = model.model.layers[-1].self_attn
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        store["probs"] = attention_probabilities(module, hidden, kwargs["position_embeddings"],
                                                 attention_mask)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
