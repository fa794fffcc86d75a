"""DistillationStudent: the student LM plus what white-box distillation trains beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill_core.final_layer_attention import capture_final_attention


@dataclass
class StudentOutputs:
    hidden: torch.Tensor            # [B, T, d_student], final layer, after the final norm
    attention: torch.Tensor | None  # [B, H, T or Q, T] final-layer attention probabilities


class DistillationStudent(nn.Module):
    """Wraps a causal LM and owns `hidden_state_projector = Linear(d_student, d_teacher)`, which
    maps student states into the teacher's space for L_align_hidden (trained, then discarded:
    the saved student is a plain HF model)."""

    def __init__(self, model, d_teacher: int):
        super().__init__()
        self.model = model
        self.hidden_state_projector = nn.Linear(model.config.hidden_size, d_teacher)

    def enable_gradient_checkpointing(self) -> None:
        """Every decoder layer but the last recomputed in the backward pass (non-reentrant).
        The last layer keeps its activations: the final-layer attention hook runs inside it,
        and a recomputation would run after the hook is gone (torch then finds fewer saved
        tensors than the forward made) or, reentrant, capture probabilities without autograd.
        One layer's activations of 22 is the price."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model.model.layers[-1].gradient_checkpointing = False

    def forward(self, input_ids, attention_mask, with_attention: bool = False,
                query_positions: torch.Tensor | None = None) -> StudentOutputs:
        """Hidden states (and attention: every row, or with `query_positions` [B, Q] only
        those rows); logits come from `logits`, for the positions a loss needs only: the
        vocabulary projection is the costliest op of a small model."""
        # No KV cache: nothing generates here, and it would hold every layer's keys and values.
        if not with_attention and query_positions is None:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return StudentOutputs(out.last_hidden_state, None)
        with capture_final_attention(self.model, attention_mask, query_positions) as captured:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return StudentOutputs(out.last_hidden_state, captured["probs"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
