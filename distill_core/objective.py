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
from distill_core.losses import (L_KD, L_KD_across_vocab, L_align_attn, L_align_hidden, L_task,
                                 task_and_kd)


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
    # Every token is its own chunk (one tokenizer on both sides): chunk sums are the tokens.
    chunks_are_tokens: bool = False

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if not isinstance(getattr(self, f.name), bool)})

    def pin(self, device: torch.device) -> "Batch":
        """In page-locked memory when bound for a GPU (see device.pin)."""
        return self._map(lambda t: pin(t, device))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: to_device(t, device))


def distillation_loss(student, teacher_lm_head: torch.nn.Module | None, batch: Batch,
                      w: LossWeights, vocab: VocabularyBridge,
                      measure_all: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and each term's value (detached 0-dim tensors on the batch's device: read
    them together with `measured`, one device sync).

    The terms a group trains on (weight > 0) are computed on every step, with gradients. The
    others are measured, without gradients, where `measure_all` (a trial's report steps): there
    every group logs the same four quantities (how far black_box drifts from the teacher's
    attention, or task_only from its distribution, is a finding too), and no other step pays for
    them. Every tensor made here is made on the batch's device."""
    weights = {"L_task": w.alpha_task, "L_KD": w.beta_kd, "L_align_hidden": w.gamma_hidden,
               "L_align_attn": w.gamma_attn}
    trained = {name for name, weight in weights.items() if weight > 0}
    wanted = set(weights) if measure_all else trained
    b, t = batch.input_ids.shape
    # The final-layer attention rows of the cached query chunks' last tokens only.
    queries = batch.chunk_ends.gather(1, batch.query_chunks.clamp_min(0)) if "L_align_attn" in wanted else None
    out = student(batch.input_ids, batch.attention_mask, query_positions=queries)
    hidden = out.hidden.reshape(b * t, -1)
    # Flat positions: L_task's (t predicts answer token t+1, in the same row) and the
    # distilled chunk ends (L_KD, L_align_hidden).
    task_rows = batch.task_mask.reshape(-1).nonzero().squeeze(1)
    labels = batch.input_ids.reshape(-1)[task_rows + 1]
    at = batch.distill_mask.bool()
    chunk_rows = (batch.chunk_ends + torch.arange(b, device=at.device)[:, None] * t)[at]
    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    teacher_states = batch.teacher_hidden[at] if wanted & {"L_KD", "L_align_hidden"} else None
    target = (kd_target(teacher_lm_head, batch, at, teacher_states, w, vocab)
              if "L_KD" in wanted else None)
    if target is not None:
        extra = _kd_extra(target)
    total = None
    if {"L_task", "L_KD"} <= trained and target.kind != "uld":
        # Both from one projection of the union of their rows, and one fused pass.
        logits, task_slots = _shared_logits(student, hidden, task_rows, chunk_rows)
        total, terms["L_task"], terms["L_KD"] = task_and_kd(
            logits, target.values, target.kind == "logits", task_slots, labels, w.temperature,
            w.alpha_task, w.beta_kd)
    else:  # each alone; one of them is at most measured (report steps), without gradients
        if "L_task" in wanted:
            with torch.set_grad_enabled("L_task" in trained):
                task_logits = student.logits(hidden[task_rows])
                terms["L_task"] = L_task(task_logits[None], labels[None], torch.ones_like(labels)[None])
        if target is not None:
            with torch.set_grad_enabled("L_KD" in trained):
                terms["L_KD"] = _kd_term(student.logits(hidden[chunk_rows]), target, w)
    if "L_align_hidden" in wanted:
        with torch.set_grad_enabled("L_align_hidden" in trained):
            projected = student.hidden_state_projector(hidden[chunk_rows])
            terms["L_align_hidden"] = L_align_hidden(projected, teacher_states, None,
                                                     normalized=w.hidden_normalized)
    if "L_align_attn" in wanted:
        with torch.set_grad_enabled("L_align_attn" in trained):
            terms["L_align_attn"] = _attention_term(out.attention, batch, w)
    # The other trained terms, added in the table's order: a set's order changes from process
    # to process (string hashing), and so would the sum's rounding, and a resumed trial's.
    fused = {"L_task", "L_KD"} if total is not None else set()
    total = sum((weights[name] * terms[name] for name in weights if name in trained - fused),
                start=total if total is not None else 0.0)
    terms = {name: terms[name].detach() for name in weights if name in terms}  # the table's order
    return total, {**terms, **extra}


def _shared_logits(student, hidden: torch.Tensor, task_rows: torch.Tensor,
                   chunk_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary projection for L_task's and L_KD's positions, which mostly coincide
    (with every position distilled, every answer position is a chunk end): the chunk ends
    first, then the task positions that are not one. (logits, each task position's row)."""
    is_chunk_end = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    is_chunk_end[chunk_rows] = True
    rows = torch.cat([chunk_rows, task_rows[~is_chunk_end[task_rows]]])
    slot = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    slot[rows] = torch.arange(len(rows), device=hidden.device)
    return student.logits(hidden[rows]), slot[task_rows]


def measured(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """`loss` and `terms` as Python floats, read from the device at once."""
    values = torch.stack([loss.detach().float(), *(v.float() for v in terms.values())]).tolist()
    return dict(zip(["loss", *terms], values))


@dataclass
class KDTarget:
    """The teacher's side of L_KD at the N distilled chunk ends, a constant: its logits over
    the student's (one) vocabulary already divided by T (`logits`), or its distribution over
    the student's vocabulary (`probs`, mapped), or over its own (`uld`)."""
    kind: str
    values: torch.Tensor                     # [N, V]
    unmapped: torch.Tensor | None = None     # [N] teacher mass no student token starts


@torch.no_grad()
def kd_target(teacher_lm_head, batch: Batch, at, teacher_states, w: LossWeights,
              vocab: VocabularyBridge) -> KDTarget:
    if batch.teacher_topk_ids is None:
        # exact: see teacher_cache. 1/T on the states, not on the [N, V] logits (exact for T = 2).
        teacher_logits = teacher_lm_head(teacher_states / w.temperature)
        if vocab.same:
            return KDTarget("logits", teacher_logits)
        teacher_probs = torch.softmax(teacher_logits.float(), -1)
    else:
        teacher_probs = vocab.topk_probs(batch.teacher_topk_ids[at], batch.teacher_topk_logprobs[at],
                                         w.temperature)
    if w.kd_across_vocab == "map" or vocab.same:
        return KDTarget("probs", *vocab.to_student(teacher_probs))
    return KDTarget("uld", teacher_probs)


def _kd_term(student_logits, target: KDTarget, w: LossWeights) -> torch.Tensor:
    """L_KD at the N distilled chunk ends from student_logits [N, V_student]."""
    ones = student_logits.new_ones(student_logits.shape[0])
    if target.kind == "logits":  # one vocabulary, exact logits: the plain KL
        return L_KD(student_logits[None], target.values[None], ones[None], w.temperature, teacher_scaled=True)
    kind = "map" if target.kind == "probs" else "uld"
    return L_KD_across_vocab(student_logits, target.values, ones, w.temperature, kind)


def _kd_extra(target: KDTarget) -> dict[str, torch.Tensor]:
    if target.unmapped is None:
        return {}
    unmapped = target.unmapped
    return {"kd_unmapped_mass": unmapped.mean() if len(unmapped) else unmapped.new_zeros(())}


def _attention_term(student_rows: torch.Tensor, batch: Batch, w: LossWeights) -> torch.Tensor:
    """The student's final-layer attention rows at the query chunks' last tokens ([B, H, Q, T],
    see distillation_loss) aggregated onto chunks as the cache holds the teacher's: each key
    chunk's tokens summed."""
    c = batch.chunk_ends.shape[1]
    valid_query = batch.query_chunks >= 0
    q_chunk = batch.query_chunks.clamp_min(0)                       # [B, Q]
    if batch.chunks_are_tokens:  # one tokenizer: the sum over a chunk's one token is the row
        student_chunks = student_rows.float()
    else:
        member = torch.nn.functional.one_hot(batch.token_chunk.clamp_min(0), c).float()
        member = member * (batch.token_chunk >= 0)[..., None]       # [B, T, C]
        # Sums of probabilities: in float32 even under bf16 autocast.
        with without_autocast(student_rows.device.type):
            student_chunks = student_rows.float() @ member[:, None]  # [B, H, Q, C]
    # Key chunks up to the query's own (causal); those are real chunks of the row.
    chunks = torch.arange(c, device=q_chunk.device)
    pair_mask = valid_query[:, :, None] & (chunks[None, None, :] <= q_chunk[:, :, None])
    return L_align_attn(student_chunks, batch.teacher_attention, pair_mask,
                        heads=w.attention_heads, kind=w.attention_loss)
