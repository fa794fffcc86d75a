"""The chunk-aligned objective: with one tokenizer on both sides it is the plain same-vocab
objective (every token its own chunk, exact KL); with two it is finite and trains."""


import pandas as pd
import pytest
import torch

from distill_core.losses import L_KD, L_align_attn, L_align_hidden, L_task
from distill_core.models import load_lm_head
from distill_core.objective import LossWeights, distillation_loss, measured


@pytest.fixture(scope="module")
def rows(tiny_data):
    return pd.concat([tiny_data["sst2"]["train"].head(12), tiny_data["gsm8k"]["train"].head(12)],
                     ignore_index=True)


@pytest.mark.parametrize("queries", ["all", "answer"])
def test_identical_tokenizers_give_exactly_the_plain_losses(tmp_path, ray_local, tiny_config,
                                                            tiny_teacher_dir, rows, queries, build_cache,
                                                            objective_parts):
    cache = tmp_path / "same"
    build_cache(rows, cache, tiny_teacher_dir, attention_queries=queries,
                student_tokenizer_dir=tiny_teacher_dir, actors=1)
    data, student, vocab = objective_parts(cache, tiny_teacher_dir)
    assert vocab.same
    head = load_lm_head(tiny_teacher_dir)
    w = LossWeights(1, 1, 1, 1, temperature=2.0)
    for indices in ([0, 1, 2, 3], [12, 13, 14], [5, 20]):
        batch = data.batch(indices)
        ends = batch.chunk_ends
        t = batch.input_ids.shape[1]
        assert ends.shape[1] == t and (ends == torch.arange(t)).logical_or(ends == 0).all()
        terms = measured(*distillation_loss(student, head, batch, w, vocab))
        with torch.no_grad():  # the plain, token-level objective of one shared vocabulary
            out = student(batch.input_ids, batch.attention_mask, with_attention=True)
            logits = student.logits(out.hidden)
            positions = torch.zeros_like(batch.attention_mask)
            positions[:, :-1] = batch.attention_mask[:, 1:]
            plain = {
                "L_task": L_task(logits, batch.input_ids.roll(-1, 1), batch.task_mask),
                "L_KD": L_KD(logits, head(batch.teacher_hidden), positions, 2.0),
                "L_align_hidden": L_align_hidden(student.hidden_state_projector(out.hidden),
                                                 batch.teacher_hidden, positions),
            }
            q = batch.query_chunks.clamp_min(0)
            rows_ = out.attention.gather(2, q[:, None, :, None].expand(-1, out.attention.shape[1], -1, t))
            pairs = (batch.query_chunks >= 0)[:, :, None] & (torch.arange(t)[None, None] <= q[:, :, None])
            plain["L_align_attn"] = L_align_attn(rows_, batch.teacher_attention, pairs)
        for name, value in plain.items():
            assert terms[name] == pytest.approx(float(value), rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("term, weights", [
    ("L_KD", dict(alpha_task=0, beta_kd=1, gamma_hidden=0, gamma_attn=0, kd_across_vocab="map")),
    ("L_KD", dict(alpha_task=0, beta_kd=1, gamma_hidden=0, gamma_attn=0, kd_across_vocab="uld")),
    ("L_align_hidden", dict(alpha_task=0, beta_kd=0, gamma_hidden=1, gamma_attn=0)),
    ("L_align_attn", dict(alpha_task=0, beta_kd=0, gamma_hidden=0, gamma_attn=1)),
    ("L_align_attn", dict(alpha_task=0, beta_kd=0, gamma_hidden=0, gamma_attn=1,
                          attention_heads="mean", attention_loss="kl")),
])
def test_different_tokenizers_give_terms_that_train(tmp_path_factory, ray_local, tiny_config,
                                                    tiny_teacher_dir, rows, term, weights, build_cache,
                                                    objective_parts):
    student_tok = tiny_teacher_dir / "student_tokenizer"
    cache = tmp_path_factory.getbasetemp() / "cross-cache"
    if not cache.exists():
        build_cache(rows, cache, tiny_teacher_dir, actors=1)
    data, student, vocab = objective_parts(cache, student_tok)
    assert not vocab.same and vocab.teacher_vocab != vocab.student_vocab
    head = load_lm_head(tiny_teacher_dir)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-3)
    w = LossWeights(temperature=2.0, **weights)
    batch = data.batch([0, 1, 2, 12, 13])
    values = []
    for _ in range(12):  # one batch, fitted: the term must be differentiable and fall
        loss, terms = distillation_loss(student, head, batch, w, vocab)
        terms = measured(loss, terms)
        assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
        values.append(terms[term])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < 0.9 * values[0], values
    if weights.get("kd_across_vocab") == "map":  # teacher tokens no student token starts
        assert 0 <= terms["kd_unmapped_mass"] < 0.5


def test_unweighted_terms_can_be_skipped_without_changing_the_loss(tmp_path_factory, ray_local,
                                                                  tiny_config, tiny_teacher_dir, rows,
                                                                  build_cache, objective_parts):
    student_tok = tiny_teacher_dir / "student_tokenizer"
    cache = tmp_path_factory.getbasetemp() / "cross-cache"
    if not cache.exists():
        build_cache(rows, cache, tiny_teacher_dir, actors=1)
    data, student, vocab = objective_parts(cache, student_tok)
    head = load_lm_head(tiny_teacher_dir)
    batch = data.batch([0, 1, 12])
    black_box = LossWeights(1, 1, 0, 0, temperature=2.0)
    full = measured(*distillation_loss(student, head, batch, black_box, vocab, measure_all=True))
    fast = measured(*distillation_loss(student, head, batch, black_box, vocab, measure_all=False))
    assert full["loss"] == fast["loss"]
    assert {"L_align_hidden", "L_align_attn"} <= set(full) and not {"L_align_hidden", "L_align_attn"} & set(fast)
    assert {k: v for k, v in full.items() if k in fast} == fast
    attention = LossWeights(1, 1, 0, 1, temperature=2.0)  # a weighted term is never skipped
    kept = measured(*distillation_loss(student, head, batch, attention, vocab, measure_all=False))
    assert kept["L_align_attn"] == full["L_align_attn"]
