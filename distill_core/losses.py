"""The four loss terms, as pure functions of tensors (names as in the study's table).

Shapes: B batch, T positions, V vocabulary, D hidden size, H heads, Q query positions, K keys.
Every `mask` selects the positions (or query/key pairs) a term averages over; a term whose mask
is empty is 0, so a batch without answer tokens cannot produce NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def L_task(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `labels` [B, T] under `student_logits` [B, T, V] where `mask` [B, T]
    is 1 (the answer tokens)."""
    ce = F.cross_entropy(student_logits.transpose(1, 2).float(), labels, reduction="none")
    return _masked_mean(ce, mask)


def L_KD(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
         temperature: float) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) per position, times T^2 (Hinton et al., 2015,
    so that gradients keep their scale as T changes), averaged where `mask` [B, T] is 1.
    Both logits [B, T, V] over the same vocabulary."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def L_align_hidden(projected_student: torch.Tensor, teacher_hidden: torch.Tensor,
                   mask: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """MSE between the projected student states and the teacher's [B, T, D], averaged over the
    dimensions and the positions where `mask` [B, T] is 1. `normalized` divides by the
    teacher's mean square over the same positions, so that the term's weight does not depend
    on the teacher's scale (1.0 = as far off as predicting zeros)."""
    teacher = teacher_hidden.float()
    se = (projected_student.float() - teacher).pow(2).mean(-1)
    mse = _masked_mean(se, mask)
    if not normalized:
        return mse
    return mse / _masked_mean(teacher.pow(2).mean(-1), mask).clamp_min(1e-12)


def L_align_attn(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """MSE between attention probabilities [B, H, Q, K], head i against head i, averaged over
    heads and the (query, key) pairs where `mask` [B, Q, K] is 1."""
    se = (student_attention.float() - teacher_attention.float()).pow(2).mean(1)
    return _masked_mean(se, mask)
