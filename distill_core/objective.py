"""The distillation objective of each group: which loss terms it adds, with the preset's weights.

| group        | loss                                                    |
| black_box    | a*L_task + b*L_KD                                       |
| hidden_state | a*L_task + b*L_KD + g1*L_align_hidden                   |
| attention    | a*L_task + b*L_KD + g2*L_align_attn                     |
| combined     | a*L_task + b*L_KD + g1*L_align_hidden + g2*L_align_attn |
| task_only    | a*L_task (the control: no teacher)                      |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

from distill_core.study_design import ALL_GROUPS

if TYPE_CHECKING:
    from distill_core.config import DistillConfig
from distill_core.cross_vocab import VocabularyBridge
from distill_core.device import pin, to_device, without_autocast
from distill_core.losses import L_KD, L_KD_across_vocab, L_align_attn, L_align_hidden, L_task


@dataclass(frozen=True)
class LossWeights:
    alpha_task: float
    beta_kd: float
    gamma_hidden: float
    gamma_attn: float
    temperature: float
    hidden_normalized: bool = False
    kd_across_vocab: str = "map"
    attention_heads: str = "per_head"
    attention_loss: str = "mse"

    def as_dict(self) -> dict[str, float | str | bool]:
        return asdict(self)


def loss_weights(group: str, cfg: DistillConfig) -> LossWeights:
    if group not in ALL_GROUPS:
        raise ValueError(f"unknown group {group!r}; groups are {list(ALL_GROUPS)}")
    return LossWeights(
        alpha_task=cfg.alpha_task,
        beta_kd=0.0 if group == "task_only" else cfg.beta_kd,
        gamma_hidden=cfg.gamma_hidden if group in ("hidden_state", "combined") else 0.0,
        gamma_attn=cfg.gamma_attn if group in ("attention", "combined") else 0.0,
        temperature=cfg.temperature,
        hidden_normalized=cfg.hidden_loss == "normalized_mse",
        kd_across_vocab=cfg.kd_across_vocab,
        attention_heads=cfg.attention_heads,
        attention_loss=cfg.attention_loss,
    )


@dataclass
class Batch:
    """A training batch from the teacher cache. Student positions t predict token t+1; chunk
    c (a span both tokenizations cut alike, see alignment) is represented on each side by its
    last token, whose prediction is the start of chunk c+1 on both sides."""
    input_ids: torch.Tensor        # [B, T] the student's tokens
    attention_mask: torch.Tensor   # [B, T]
    task_mask: torch.Tensor        # [B, T] 1 where t+1 is an answer token (L_task)
    chunk_ends: torch.Tensor       # [B, C] the student token ending each chunk (0 = padding)
    distill_mask: torch.Tensor     # [B, C] chunks L_KD and L_align_hidden average over
    token_chunk: torch.Tensor      # [B, T] the chunk of every student token (-1 = padding)
    teacher_hidden: torch.Tensor   # [B, C, D_teacher] at chunk ends, after the final norm
    teacher_attention: torch.Tensor  # [B, H, Q, C] from the query chunks below, over chunks
    query_chunks: torch.Tensor     # [B, Q] (-1 = padding)
    teacher_topk_ids: torch.Tensor | None = None       # [B, C, k] (cache.logits = topk)
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, C, k]

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def pin(self, device: torch.device) -> "Batch":
        """In page-locked memory when bound for a GPU (see device.pin)."""
        return self._map(lambda t: pin(t, device))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: to_device(t, device))


def distillation_loss(student, teacher_lm_head: torch.nn.Module | None, batch: Batch,
                      w: LossWeights, vocab: VocabularyBridge,
                      measure_all: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and each term's value (detached 0-dim tensors on the batch's device: read
    them together with `measured`, one device sync). Every term is computed, so every group
    logs the same four quantities (how far black_box drifts from the teacher's attention is a
    finding too); only the weighted ones reach the gradient. With `measure_all` False an
    unweighted L_align_attn is skipped: the attention hook is ~25% of a tiny student's step,
    and a trial measures the term on the steps it reports instead. Every tensor made here is
    made on the batch's device."""
    with_attention = measure_all or w.gamma_attn > 0
    out = student(batch.input_ids, batch.attention_mask, with_attention=with_attention)
    # L_task on the student's own answer tokens; the vocabulary projection only where needed.
    task = batch.task_mask.bool()
    labels = batch.input_ids.roll(-1, dims=1)[task]
    task_logits = student.logits(out.hidden[task])
    terms = {"L_task": L_task(task_logits[None], labels[None], torch.ones_like(labels)[None])}
    chunk_hidden = out.hidden.gather(1, batch.chunk_ends[..., None].expand(-1, -1, out.hidden.shape[-1]))
    at = batch.distill_mask.bool()
    terms["L_KD"], extra = _kd_term(student.logits(chunk_hidden[at]), teacher_lm_head, batch, at, w, vocab)
    projected = student.hidden_state_projector(chunk_hidden)
    terms["L_align_hidden"] = L_align_hidden(projected, batch.teacher_hidden, batch.distill_mask,
                                             normalized=w.hidden_normalized)
    if with_attention:
        terms["L_align_attn"] = _attention_term(out.attention, batch, w)
    weighted = {"L_task": w.alpha_task, "L_KD": w.beta_kd, "L_align_hidden": w.gamma_hidden,
                "L_align_attn": w.gamma_attn}
    total = sum(weight * terms[name] for name, weight in weighted.items() if weight > 0)
    return total, {**{k: v.detach() for k, v in terms.items()}, **extra}


def measured(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """`loss` and `terms` as Python floats, read from the device at once."""
    values = torch.stack([loss.detach().float(), *(v.float() for v in terms.values())]).tolist()
    return dict(zip(["loss", *terms], values))


def _kd_term(student_logits, teacher_lm_head, batch: Batch, at, w: LossWeights,
             vocab: VocabularyBridge) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_KD at the N distilled chunk ends: student_logits [N, V_student]. The teacher's side
    is a constant target (no gradient); the student's carries the gradient."""
    ones = student_logits.new_ones(student_logits.shape[0])
    with torch.no_grad():
        teacher_logits = teacher_probs = None
        if batch.teacher_topk_ids is None:
            teacher_logits = teacher_lm_head(batch.teacher_hidden[at])  # exact: see teacher_cache
        else:
            teacher_probs = vocab.topk_probs(batch.teacher_topk_ids[at],
                                             batch.teacher_topk_logprobs[at], w.temperature)
        if teacher_logits is not None and not vocab.same:
            teacher_probs = torch.softmax(teacher_logits.float() / w.temperature, -1)
        mapped = teacher_probs is not None and (w.kd_across_vocab == "map" or vocab.same)
        if mapped:
            target, unmapped = vocab.to_student(teacher_probs)
    if teacher_probs is None:  # one vocabulary, exact logits: the plain KL
        return L_KD(student_logits[None], teacher_logits[None], ones[None], w.temperature), {}
    if mapped:
        extra = {"kd_unmapped_mass": unmapped.mean() if len(unmapped) else ones.new_zeros(())}
        return L_KD_across_vocab(student_logits, target, ones, w.temperature, "map"), extra
    return L_KD_across_vocab(student_logits, teacher_probs, ones, w.temperature, "uld"), {}


def _attention_term(student_attention: torch.Tensor, batch: Batch, w: LossWeights) -> torch.Tensor:
    """The student's final-layer attention aggregated onto chunks as the cache holds the
    teacher's: rows at the query chunks' last tokens, summed over each key chunk's tokens."""
    b, h, t, _ = student_attention.shape
    c = batch.chunk_ends.shape[1]
    valid_query = batch.query_chunks >= 0
    q_chunk = batch.query_chunks.clamp_min(0)                       # [B, Q]
    q_token = batch.chunk_ends.gather(1, q_chunk)                   # [B, Q]
    rows = student_attention.gather(2, q_token[:, None, :, None].expand(b, h, q_token.shape[1], t))
    member = torch.nn.functional.one_hot(batch.token_chunk.clamp_min(0), c).float()
    member = member * (batch.token_chunk >= 0)[..., None]           # [B, T, C]
    # Sums of probabilities: in float32 even under bf16 autocast.
    with without_autocast(student_attention.device.type):
        student_rows = rows.float() @ member[:, None]               # [B, H, Q, C]
    # Key chunks up to the query's own (causal); those are real chunks of the row.
    chunks = torch.arange(c, device=q_chunk.device)
    pair_mask = valid_query[:, :, None] & (chunks[None, None, :] <= q_chunk[:, :, None])
    return L_align_attn(student_rows, batch.teacher_attention, pair_mask,
                        heads=w.attention_heads, kind=w.attention_loss)
