"""Next-token distributions across two vocabularies (for L_KD when teacher and student
tokenizers differ), compared at chunk ends where both models predict the same next text.

- `vocabulary_map` + `project_to_student`: each teacher token is carried to the student token
  its text starts with (the student's first token of that text). Assumes the next-token event
  "text starting with s" is what the student's token s stands for; several teacher tokens can
  land on one student token (their mass adds up). Teacher tokens whose text the student cannot
  start (special tokens, empty text) are unmappable: their mass is reported and the rest is
  renormalized, so the target is a distribution over the student's vocabulary.
- `uld_distance`: Universal Logit Distillation (Boizard et al., 2024): the L1 distance between
  both distributions' probabilities sorted in decreasing order (the shorter one padded with
  zeros). Vocabulary-free; it matches the shape of the distribution, not which token is which.
"""

from __future__ import annotations

import torch


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> torch.Tensor:
    """[V_teacher] student id for every teacher id, -1 where the token cannot be mapped.
    One vocabulary on both sides maps every token to itself."""
    special = set(teacher_tokenizer.all_special_ids)
    mapping = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    same = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    for tid in range(len(teacher_tokenizer)):
        if tid in special:
            continue
        if same:
            mapping[tid] = tid
            continue
        text = teacher_tokenizer.decode([tid])
        if not text or "\ufffd" in text:  # empty, or a byte that is only part of a character
            continue
        ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            mapping[tid] = ids[0]
    return mapping


def project_to_student(teacher_probs: torch.Tensor, mapping: torch.Tensor,
                       student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_probs [N, V_teacher] -> (probs over the student vocabulary [N, V_student],
    the unmappable mass [N] that was renormalized away)."""
    mappable = mapping >= 0
    kept = teacher_probs[:, mappable]
    out = torch.zeros(teacher_probs.shape[0], student_vocab, dtype=teacher_probs.dtype,
                      device=teacher_probs.device)
    out.index_add_(1, mapping[mappable].to(teacher_probs.device), kept)
    mass = out.sum(-1, keepdim=True)
    return out / mass.clamp_min(1e-12), 1.0 - mass.squeeze(-1)


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """[N] L1 distance between the sorted probability vectors (ULD)."""
    s = student_probs.sort(-1, descending=True).values
    t = teacher_probs.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)
