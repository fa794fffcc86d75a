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


def L_KD_across_vocab(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      mask: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """L_KD when the teacher's target is already a distribution over the student's vocabulary
    (`map`: KL(target || student), times T^2, as L_KD) or over its own (`uld`: L1 between the
    sorted probabilities, Boizard et al. 2024; vocabulary-free, no T^2 factor).
    student_logits [N, V_s], teacher_probs [N, V_s or V_t], mask [N]."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if kind == "map":
        target = teacher_probs.float()
        kl = (torch.xlogy(target, target) - target * log_p_student).sum(-1)
        return _masked_mean(kl, mask) * temperature**2
    if kind == "uld":
        from distill_core.cross_vocab import uld_distance

        return _masked_mean(uld_distance(log_p_student.exp(), teacher_probs.float()), mask)
    raise ValueError(f"unknown kd_across_vocab {kind!r}; use map or uld")


def L_align_attn(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                 mask: torch.Tensor, heads: str = "per_head", kind: str = "mse") -> torch.Tensor:
    """Attention rows [B, H, Q, K] of both models (distributions over the same K keys, or
    chunks), averaged over the (query, key) pairs where `mask` [B, Q, K] is 1.
    heads: `per_head` compares head i with head i; `mean` compares the head averages.
    kind: `mse` (mean over heads of the squared difference) or `kl` (KL(teacher || student)
    of each row, as MiniLM, averaged over heads and query rows; then `mask` [B, Q, K] selects
    the keys of a row, and a row counts where any of its keys does)."""
    student, teacher = student_attention.float(), teacher_attention.float()
    if heads == "mean":
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    elif student.shape[1] != teacher.shape[1]:
        raise ValueError(f"per-head L_align_attn needs equal head counts: student "
                         f"{student.shape[1]}, teacher {teacher.shape[1]} (use heads='mean')")
    if kind == "mse":
        return _masked_mean((student - teacher).pow(2).mean(1), mask)
    if kind == "kl":
        keys = mask[:, None].to(teacher.dtype)
        kl = (keys * (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(1e-8).log())).sum(-1)
        return _masked_mean(kl.mean(1), mask.any(-1))
    raise ValueError(f"unknown attention_loss {kind!r}; use mse or kl")
