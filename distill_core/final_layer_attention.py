"""Final-layer attention probabilities without switching the model to eager attention.

With sdpa, `output_attentions=True` yields nothing, and eager attention in every layer costs
memory and time for probabilities we need from one layer only. Instead a forward hook on the
last layer's `self_attn` recomputes softmax(Q K^T / sqrt(d) + mask) from that layer's own
inputs: exact (the same projections and rotary embedding as the layer), differentiable, and the
extra work is one layer's Q/K projections and score matrix. Given the query positions that are
wanted (the teacher cache keeps a few rows a sequence), only those rows are computed.

The hooked layer must not be under gradient checkpointing (see
DistillationStudent.enable_gradient_checkpointing): its backward rerun would find the hook gone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

from distill_core.device import without_autocast


def attention_probabilities(attn, hidden_states, position_embeddings, attention_mask,
                            query_positions=None):
    """Float32 attention probabilities of `attn` (a LlamaAttention): [B, H, T, T], or with
    `query_positions` ([B, Q] token indices, -1 = no query) only those rows, [B, H, Q, T].

    attention_mask: [B, T] with 1 for real tokens; keys that are padding or in the future get
    probability 0. Rows of padding queries are not meaningful.
    """
    b, t, _ = hidden_states.shape
    shape = (b, t, -1, attn.head_dim)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    if query_positions is None:
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        positions = torch.arange(t, device=hidden_states.device).expand(b, t)
    else:
        positions = query_positions.clamp_min(0)
        rows = torch.arange(b, device=hidden_states.device)[:, None]
        q = attn.q_proj(hidden_states[rows, positions])                        # [B, Q, H*d]
        q = q.view(b, positions.shape[1], -1, attn.head_dim).transpose(1, 2)   # [B, H, Q, d]
        cos_b, sin_b = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # [1, T, d] when shared
        cos_q, sin_q = cos_b[rows, positions].unsqueeze(1), sin_b[rows, positions].unsqueeze(1)
        q = q * cos_q + rotate_half(q) * sin_q  # apply_rotary_pos_emb, at the queries' positions
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    k = repeat_kv(k, attn.num_key_value_groups)
    with without_autocast(hidden_states.device.type):  # float32 under bf16 too
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling  # [B, H, Q, T]
        keys = torch.arange(t, device=scores.device)
        allowed = (keys[None, None, :] <= positions[:, :, None]) & attention_mask.bool()[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


@contextmanager
def capture_final_attention(model, attention_mask, query_positions=None):
    """Within the block, forward passes of `model` (a LlamaForCausalLM) store the final layer's
    attention probabilities (see attention_probabilities) in the yielded dict under "probs"."""
    attn = model.model.layers[-1].self_attn
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        store["probs"] = attention_probabilities(module, hidden, kwargs["position_embeddings"],
                                                 attention_mask, query_positions)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
