"""The fast step computes what the study's formulas say: on fixed batches, for every group,
the loss, each term and every gradient (student and projector) equal those of a plain
reference written from the formulas with autograd (every position projected, full attention
maps aggregated with a chunk-membership matrix, log_softmax KL), with one tokenizer on both
sides and with two. Terms a group does not train on are measured on report steps only,
without gradients, and never change its gradient."""


import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from distill_core.config import ALL_GROUPS
from distill_core.cross_vocab import uld_distance
from distill_core.models import load_lm_head
from distill_core.objective import distillation_loss, loss_weights


def _mean(values, mask):
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1)


def reference_loss(student, head, batch, w, vocab):
    """The four terms from their definitions, every one with autograd, nothing skipped."""
    out = student(batch.input_ids, batch.attention_mask, with_attention=True)
    logits = student.logits(out.hidden)                                        # [B, T, V]
    labels = batch.input_ids.roll(-1, dims=1)
    terms = {"L_task": _mean(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none"),
                             batch.task_mask)}
    ends = batch.chunk_ends
    chunk_hidden = out.hidden.gather(1, ends[..., None].expand(-1, -1, out.hidden.shape[-1]))
    chunk_logits = logits.gather(1, ends[..., None].expand(-1, -1, logits.shape[-1]))
    log_p_s = F.log_softmax(chunk_logits / w.temperature, -1)
    with torch.no_grad():
        if batch.teacher_topk_ids is not None:
            p_t = vocab.topk_probs(batch.teacher_topk_ids.flatten(0, 1), batch.teacher_topk_logprobs.flatten(0, 1),
                                   w.temperature).view(*ends.shape, -1)
        else:
            p_t = F.softmax(head(batch.teacher_hidden) / w.temperature, -1)
        if not vocab.same and w.kd_across_vocab == "map":
            target, _ = vocab.to_student(p_t.flatten(0, 1))
            p_t = target.view(*ends.shape, -1)
    if w.kd_across_vocab == "uld" and not vocab.same:
        kd = uld_distance(log_p_s.exp().flatten(0, 1), p_t.flatten(0, 1)).view(ends.shape)
        terms["L_KD"] = _mean(kd, batch.distill_mask)
    else:
        kl = (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(-1)
        terms["L_KD"] = _mean(kl, batch.distill_mask) * w.temperature**2
    se = (student.hidden_state_projector(chunk_hidden) - batch.teacher_hidden).pow(2).mean(-1)
    terms["L_align_hidden"] = _mean(se, batch.distill_mask)
    b, h, t, _ = out.attention.shape
    q_chunk = batch.query_chunks.clamp_min(0)
    q_token = ends.gather(1, q_chunk)
    rows = out.attention.gather(2, q_token[:, None, :, None].expand(b, h, q_token.shape[1], t))
    member = F.one_hot(batch.token_chunk.clamp_min(0), ends.shape[1]).float()
    member = member * (batch.token_chunk >= 0)[..., None]
    pairs = (batch.query_chunks >= 0)[:, :, None] & \
        (torch.arange(ends.shape[1])[None, None] <= q_chunk[:, :, None])
    terms["L_align_attn"] = _mean((rows @ member[:, None] - batch.teacher_attention).pow(2).mean(1), pairs)
    weight = {"L_task": w.alpha_task, "L_KD": w.beta_kd, "L_align_hidden": w.gamma_hidden,
              "L_align_attn": w.gamma_attn}
    return sum(weight[k] * v for k, v in terms.items() if weight[k] > 0), terms


def _gradients(student, loss):
    student.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, ray_local, tiny_data, tiny_teacher_dir, build_cache):
    rows = pd.concat([tiny_data[t]["train"].head(6) for t in ("sst2", "mmlu", "gsm8k")], ignore_index=True)
    root = tmp_path_factory.mktemp("step")
    build_cache(rows, root / "one", tiny_teacher_dir, student_tokenizer_dir=tiny_teacher_dir, actors=1)
    build_cache(rows, root / "two", tiny_teacher_dir, actors=1)
    build_cache(rows, root / "topk", tiny_teacher_dir, actors=1, logits="topk", top_k=8)
    return {"one": (root / "one", tiny_teacher_dir), "two": (root / "two", tiny_teacher_dir / "student_tokenizer"),
            "topk": (root / "topk", tiny_teacher_dir / "student_tokenizer")}


@pytest.mark.parametrize("pair", ["one", "two", "topk"])
def test_loss_terms_and_gradients_are_the_formulas(caches, tiny_config, tiny_teacher_dir, objective_parts,
                                                     pair):
    cache_dir, tokenizer_dir = caches[pair]
    data, student, vocab = objective_parts(cache_dir, tokenizer_dir, seed=3)
    assert vocab.same == (pair == "one")
    head = load_lm_head(tiny_teacher_dir)
    batch = data.batch([0, 3, 7, 12, 16])
    assert batch.chunks_are_tokens == (pair == "one")
    groups = list(ALL_GROUPS) if pair != "topk" else ["black_box", "combined"]
    for group in groups:
        w = loss_weights(group, tiny_config.distill)
        ref_loss, ref_terms = reference_loss(student, head, batch, w, vocab)
        ref_grads = _gradients(student, ref_loss)
        for measure_all in (True, False):
            loss, terms = distillation_loss(student, head, batch, w, vocab, measure_all=measure_all)
            assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), (group, measure_all)
            trained = {k for k, v in {"L_task": w.alpha_task, "L_KD": w.beta_kd, "L_align_hidden": w.gamma_hidden,
                                      "L_align_attn": w.gamma_attn}.items() if v > 0}
            measured_terms = {k for k in terms if k.startswith("L_")}
            assert measured_terms == (set(ref_terms) if measure_all else trained), (group, measure_all)
            for name in measured_terms:
                assert float(terms[name]) == pytest.approx(float(ref_terms[name]), rel=1e-5, abs=1e-7), \
                    (group, name)
            grads = _gradients(student, loss)
            assert set(grads) == set(ref_grads), group
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7,
                                           msg=lambda m: f"{group} {name}: {m}")


def test_uld_across_vocabularies_is_the_formula(caches, tiny_config, tiny_teacher_dir, objective_parts):
    from dataclasses import replace

    cache_dir, tokenizer_dir = caches["two"]
    data, student, vocab = objective_parts(cache_dir, tokenizer_dir, seed=3)
    head = load_lm_head(tiny_teacher_dir)
    batch = data.batch([1, 4, 13])
    w = replace(loss_weights("black_box", tiny_config.distill), kd_across_vocab="uld")
    ref_loss, ref_terms = reference_loss(student, head, batch, w, vocab)
    ref_grads = _gradients(student, ref_loss)
    loss, terms = distillation_loss(student, head, batch, w, vocab, measure_all=False)
    assert float(terms["L_KD"]) == pytest.approx(float(ref_terms["L_KD"]), rel=1e-5)
    for name, grad in _gradients(student, loss).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7)
