"""The distillation objective of each group: which loss terms it adds, with the preset's weights.

| group        | loss                                                    |
| black_box    | a*L_task + b*L_KD                                       |
| hidden_state | a*L_task + b*L_KD + g1*L_align_hidden                   |
| attention    | a*L_task + b*L_KD + g2*L_align_attn                     |
| combined     | a*L_task + b*L_KD + g1*L_align_hidden + g2*L_align_attn |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from distill_core.config import GROUPS, DistillConfig
from distill_core.losses import L_KD, L_align_attn, L_align_hidden, L_task


@dataclass(frozen=True)
class LossWeights:
    alpha_task: float
    beta_kd: float
    gamma_hidden: float
    gamma_attn: float
    temperature: float
    hidden_normalized: bool = False

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def loss_weights(group: str, cfg: DistillConfig) -> LossWeights:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; groups are {list(GROUPS)}")
    return LossWeights(
        alpha_task=cfg.alpha_task,
        beta_kd=cfg.beta_kd,
        gamma_hidden=cfg.gamma_hidden if group in ("hidden_state", "combined") else 0.0,
        gamma_attn=cfg.gamma_attn if group in ("attention", "combined") else 0.0,
        temperature=cfg.temperature,
        hidden_normalized=cfg.hidden_loss == "normalized_mse",
    )


@dataclass
class Batch:
    """A training batch from the teacher cache; positions t predict token t+1."""
    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    task_mask: torch.Tensor        # [B, T] 1 where t+1 is an answer token (L_task)
    distill_mask: torch.Tensor     # [B, T] positions L_KD and L_align_hidden average over
    teacher_hidden: torch.Tensor   # [B, T, D_teacher], final layer after the final norm
    teacher_attention: torch.Tensor  # [B, H, Q, T] at the query positions below
    query_positions: torch.Tensor  # [B, Q] positions of those queries (-1 = padding)


def distillation_loss(student, teacher_lm_head: torch.nn.Module, batch: Batch,
                      w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and each term's value. Every term is computed, so every group logs the same
    four quantities (how far black_box drifts from the teacher's attention is a finding too);
    only the weighted ones reach the gradient."""
    out = student(batch.input_ids, batch.attention_mask, with_attention=True)
    # Logits only where L_task or L_KD look: [1, N, V] over the N selected positions.
    at = (batch.task_mask + batch.distill_mask) > 0
    labels = batch.input_ids.roll(-1, dims=1)[at][None]
    student_logits = student.logits(out.hidden[at])[None]
    with torch.no_grad():
        teacher_logits = teacher_lm_head(batch.teacher_hidden[at])[None]  # exact: see teacher_cache
    # L_task's cross-entropy only at answer positions: with distill_positions=all they are a
    # few of the N, and a [N, V] log-softmax is a large share of a small model's step.
    task = batch.task_mask[at].bool()
    terms = {"L_task": L_task(student_logits[:, task], labels[:, task],
                              torch.ones_like(labels[:, task])),
             "L_KD": L_KD(student_logits, teacher_logits, batch.distill_mask[at][None], w.temperature)}
    projected = student.hidden_state_projector(out.hidden)
    terms["L_align_hidden"] = L_align_hidden(projected, batch.teacher_hidden, batch.distill_mask,
                                             normalized=w.hidden_normalized)
    terms["L_align_attn"] = _attention_term(out.attention, batch)
    weighted = {"L_task": w.alpha_task, "L_KD": w.beta_kd, "L_align_hidden": w.gamma_hidden,
                "L_align_attn": w.gamma_attn}
    total = sum(weight * terms[name] for name, weight in weighted.items() if weight > 0)
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _attention_term(student_attention: torch.Tensor, batch: Batch) -> torch.Tensor:
    valid_query = batch.query_positions >= 0
    q_index = batch.query_positions.clamp_min(0)  # [B, Q]
    b, h, _, t = student_attention.shape
    gather = q_index[:, None, :, None].expand(b, h, q_index.shape[1], t)
    student_rows = student_attention.gather(2, gather)  # [B, H, Q, T]
    keys = torch.arange(t)[None, None, :]
    pair_mask = valid_query[:, :, None] & (keys <= q_index[:, :, None]) \
        & batch.attention_mask.bool()[:, None, :]
    return L_align_attn(student_rows, batch.teacher_attention, pair_mask)
