"""DistillationStudent: the student LM plus what white-box distillation trains beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill_core.final_layer_attention import capture_final_attention


@dataclass
class StudentOutputs:
    logits: torch.Tensor            # [B, T, V_student]
    hidden: torch.Tensor            # [B, T, d_student], final layer, after the final norm
    attention: torch.Tensor | None  # [B, H, T, T] final-layer attention probabilities


class DistillationStudent(nn.Module):
    """Wraps a causal LM and owns `hidden_state_projector = Linear(d_student, d_teacher)`, which
    maps student states into the teacher's space for L_align_hidden (trained, then discarded:
    the saved student is a plain HF model)."""

    def __init__(self, model, d_teacher: int):
        super().__init__()
        self.model = model
        self.hidden_state_projector = nn.Linear(model.config.hidden_size, d_teacher)

    def forward(self, input_ids, attention_mask, with_attention: bool = False) -> StudentOutputs:
        if not with_attention:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask)
            hidden = out.last_hidden_state
            return StudentOutputs(self.model.lm_head(hidden), hidden, None)
        with capture_final_attention(self.model, attention_mask) as captured:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        return StudentOutputs(self.model.lm_head(hidden), hidden, captured["probs"])
