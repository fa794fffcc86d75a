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
    # On rows of the vocabulary ([B*T, V], contiguous): the [B, V, T] layout cross_entropy
    # takes for sequences strides across the vocabulary, ~3x slower.
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, vocab).float(), labels.reshape(-1), reduction="none")
    return _masked_mean(ce.view(labels.shape), mask)


def L_KD(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
         temperature: float, teacher_scaled: bool = False) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) per position, times T^2 (Hinton et al., 2015,
    so that gradients keep their scale as T changes), averaged where `mask` [B, T] is 1.
    Both logits [B, T, V] over the same vocabulary; `teacher_scaled`: the teacher's are
    already divided by T."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    scaled = teacher_logits.float() if teacher_scaled else teacher_logits.float() / temperature
    log_p_teacher = F.log_softmax(scaled, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def L_align_hidden(projected_student: torch.Tensor, teacher_hidden: torch.Tensor,
                   mask: torch.Tensor | None, normalized: bool = False) -> torch.Tensor:
    """MSE between the projected student states and the teacher's [B, T, D], averaged over the
    dimensions and the positions where `mask` [B, T] is 1 (None: every position, as one fused
    op, forward and backward). `normalized` divides by the
    teacher's mean square over the same positions, so that the term's weight does not depend
    on the teacher's scale (1.0 = as far off as predicting zeros)."""
    teacher = teacher_hidden.float()
    if teacher.numel() == 0:  # no positions: 0, as an empty mask gives
        return projected_student.sum() * 0.0
    if mask is None:
        mse = F.mse_loss(projected_student.float(), teacher)
    else:
        mse = _masked_mean((projected_student.float() - teacher).pow(2).mean(-1), mask)
    if not normalized:
        return mse
    scale = teacher.pow(2).mean() if mask is None else _masked_mean(teacher.pow(2).mean(-1), mask)
    return mse / scale.clamp_min(1e-12)


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


def task_and_kd(logits: torch.Tensor, kd_target: torch.Tensor, target_is_logits: bool,
                task_rows: torch.Tensor, labels: torch.Tensor, temperature: float,
                w_task: float, w_kd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w_task * L_task + w_kd * L_KD over one set of student logits, and both terms' values.

    logits [N, V]: the student's rows; the first Nk are distilled against `kd_target` [Nk, V]
    (the teacher's logits already divided by T, or its distribution over the student's
    vocabulary); `task_rows` [Nt] index the rows whose next token is `labels` [Nt]. L_task and
    L_KD are L_task's and L_KD's (or L_KD_across_vocab's `map`) definitions above, averaged
    over their rows. Computed a few rows at a time (see _TaskAndKD): the same numbers, without
    [N, V] temporaries."""
    return _TaskAndKD.apply(logits, kd_target, target_is_logits, task_rows, labels, temperature,
                            w_task, w_kd)


def _chunk_rows(logits: torch.Tensor) -> int:
    """Rows a chunk: ~2 MB of float32 on a CPU (the chunk's softmax, target and gradient stay
    in cache), ~256 MB on a GPU (few kernel launches, bounded temporaries)."""
    elements = 2**19 if logits.device.type == "cpu" else 2**26
    return max(1, elements // logits.shape[1])


class _TaskAndKD(torch.autograd.Function):
    """The forward computes the gradient too, chunk by chunk: for distilled rows
    w_kd * T / Nk * (softmax(s / T) * sum(p_t) - p_t), for task rows
    w_task / Nt * (softmax(s) - onehot(label)), into one [N, V] buffer that the backward
    scales by the incoming gradient. Autograd's chain (log_softmax, subtraction, product, sum,
    the gather of task rows and its scatter back) would write several [N, V] tensors: on a CPU
    each is a pass through memory and fresh pages, ~70% of a small model's step beyond the
    matmuls (bench/step.py). The losses must be the last use of their gradient (backward once)."""

    @staticmethod
    def forward(ctx, logits, kd_target, target_is_logits, task_rows, labels, temperature, w_task, w_kd):
        n, _ = logits.shape
        nk, nt = kd_target.shape[0], task_rows.shape[0]
        chunk = _chunk_rows(logits)
        make = torch.empty if (w_kd > 0 and nk == n) else torch.zeros  # every row written, or not
        grad = make(logits.shape, dtype=torch.float32, device=logits.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        kd_scale = w_kd * temperature / max(nk, 1)  # d(w_kd T^2 mean KL) / d s, beside (p_s - p_t)
        for i in range(0, nk, chunk):  # the distilled rows come first; task-only rows may follow
            end = min(i + chunk, nk)
            log_p_s = F.log_softmax(logits[i:end].float() / temperature, dim=-1)
            if target_is_logits:
                log_p_t = F.log_softmax(kd_target[i:end].float(), dim=-1)
                p_t = log_p_t.exp()
                kl_sum += (log_p_t - log_p_s).mul_(p_t).sum()
            else:
                p_t = kd_target[i:end].float()
                kl_sum += (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum()
            if w_kd > 0:
                out = grad[i:end]
                torch.exp(log_p_s, out=out)
                out.mul_(p_t.sum(-1, keepdim=True) * kd_scale).add_(p_t, alpha=-kd_scale)
        task_scale = w_task / max(nt, 1)
        for i in range(0, nt, chunk):
            rows, label = task_rows[i:i + chunk], labels[i:i + chunk, None]
            log_p = F.log_softmax(logits[rows].float(), dim=-1)
            ce_sum -= log_p.gather(1, label).sum()
            if w_task > 0:
                g = log_p.exp_().scatter_add_(1, label, torch.full_like(label, -1, dtype=log_p.dtype))
                grad.index_add_(0, rows, g, alpha=task_scale)
        l_task = ce_sum / max(nt, 1)
        l_kd = kl_sum / max(nk, 1) * temperature**2
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        ctx.mark_non_differentiable(l_task, l_kd)
        return w_task * l_task + w_kd * l_kd, l_task, l_kd

    @staticmethod
    def backward(ctx, grad_out, _task, _kd):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out).to(ctx.dtype), None, None, None, None, None, None, None
