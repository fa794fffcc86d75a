"""Next-token distributions across two vocabularies (for L_KD when teacher and student
tokenizers differ), compared at chunk ends where both models predict the same next text.

- `vocabulary_map` + `project_to_student`: each teacher token is carried to the student token
  its text starts with (the longest such student token, leading space included). Assumes the next-token event
  "text starting with s" is what the student's token s stands for; several teacher tokens can
  land on one student token (their mass adds up). Teacher tokens whose text the student cannot
  start (special tokens, empty text) are unmappable: their mass is reported and the rest is
  renormalized, so the target is a distribution over the student's vocabulary.
- `uld_distance`: Universal Logit Distillation (Boizard et al., 2024): the L1 distance between
  both distributions' probabilities sorted in decreasing order (the shorter one padded with
  zeros). Vocabulary-free; it matches the shape of the distribution, not which token is which.
"""

from __future__ import annotations

import re

import torch

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_texts(tokenizer) -> list[str | None]:
    """The text every token stands for, its leading space included (None: special, or a byte
    that is only part of a character). Decoded after an anchor token, because SentencePiece
    decoders drop the leading space of a sequence's first token."""
    special = set(tokenizer.all_special_ids)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    prefix = tokenizer.decode(anchor)
    out: list[str | None] = []
    for tid in range(len(tokenizer)):
        text = None if tid in special else tokenizer.decode(anchor + [tid])
        if text is not None and text.startswith(prefix):
            text = text[len(prefix):]
        out.append(text if text and "\ufffd" not in text else None)
    return out


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> torch.Tensor:
    """[V_teacher] student id for every teacher id, -1 where the token cannot be mapped: the
    longest student token that the teacher token's text starts with (leading space included,
    so a word-initial teacher token lands on a word-initial student token). One vocabulary on
    both sides maps every token to itself."""
    special = set(teacher_tokenizer.all_special_ids)
    mapping = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
        regular = [t for t in range(len(teacher_tokenizer)) if t not in special]
        mapping[regular] = torch.tensor(regular)
        return mapping
    by_text: dict[str, int] = {}
    texts = token_texts(student_tokenizer)
    pieces = student_tokenizer.convert_ids_to_tokens(list(range(len(texts))))
    # A byte-fallback token (`<0x37>`) has the same text as the piece `7`, but the student
    # only ever sees the piece: pieces take precedence.
    order = sorted(range(len(texts)), key=lambda sid: bool(BYTE_TOKEN.fullmatch(pieces[sid] or "")))
    for sid in order:
        if texts[sid] is not None:
            by_text.setdefault(texts[sid], sid)
    for tid, text in enumerate(token_texts(teacher_tokenizer)):
        if text is None:
            continue
        for length in range(len(text), 0, -1):
            if text[:length] in by_text:
                mapping[tid] = by_text[text[:length]]
                break
    return mapping


def project_to_student(teacher_probs: torch.Tensor, mapping: torch.Tensor,
                       student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_probs [N, V_teacher] -> (probs over the student vocabulary [N, V_student],
    the unmappable mass [N] that was renormalized away)."""
    mapping = mapping.to(teacher_probs.device)
    mappable = torch.nonzero(mapping >= 0).squeeze(-1)
    return _project(teacher_probs, mappable, mapping[mappable], student_vocab)


def _project(teacher_probs, mappable, targets, student_vocab):
    """project_to_student given the mappable teacher ids and their student ids (index lists:
    no boolean mask, so nothing waits on the device)."""
    kept = teacher_probs.index_select(1, mappable)
    out = torch.zeros(teacher_probs.shape[0], student_vocab, dtype=teacher_probs.dtype,
                      device=teacher_probs.device)
    out.index_add_(1, targets, kept)
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


class VocabularyBridge:
    """How a trial turns the teacher's next-token distribution into an L_KD target: the
    vocabulary map (from the cache) and whether both models share one vocabulary (then L_KD is
    the plain, exact KL)."""

    def __init__(self, mapping: torch.Tensor, student_vocab: int):
        self.mapping = mapping.long()
        self.student_vocab = student_vocab
        mapped = self.mapping >= 0
        self.same = (len(mapping) == student_vocab and bool(mapped.any())
                     and bool((self.mapping[mapped] == torch.nonzero(mapped).squeeze(-1)).all()))
        self._mappable = torch.nonzero(mapped).squeeze(-1)
        self._targets = self.mapping[self._mappable]

    def to(self, device: torch.device) -> "VocabularyBridge":
        """The map's index tensors on `device` (where the trial's logits are)."""
        self._mappable, self._targets = self._mappable.to(device), self._targets.to(device)
        return self

    @property
    def teacher_vocab(self) -> int:
        return len(self.mapping)

    def to_student(self, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, V_teacher] -> (target over the student's vocabulary, unmappable mass [N])."""
        return _project(teacher_probs, self._mappable, self._targets, self.student_vocab)

    def topk_probs(self, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher distribution [N, V_teacher] that top-k log-probabilities [N, k] give at
        `temperature`: renormalized over the k tokens (truncation puts the tail's mass on them)."""
        probs = torch.softmax(logprobs.float() / temperature, -1)
        dense = probs.new_zeros(ids.shape[0], self.teacher_vocab)
        return dense.scatter_add_(1, ids.long(), probs)
