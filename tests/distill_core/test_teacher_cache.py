"""The Ray Data teacher cache: aligned to the student's tokens, exact, compact, and never
readable half-written."""

import pandas as pd
import pyarrow as pa
import pytest
import torch

from distill_core import cache_size
from distill_core.config import CacheConfig
from distill_core.alignment import aggregate_attention
from distill_core.encoding import encode_example
from distill_core.final_layer_attention import capture_final_attention
from distill_core.models import load_causal_lm, load_lm_head, load_tokenizer
from distill_core.teacher_cache import (align_rows, build_teacher_cache, cache_problems,
                                        from_bf16_bytes, query_chunks, read_manifest,
                                        read_teacher_cache, read_vocabulary_map, training_contexts)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, ray_local, tiny_teacher_dir, tiny_data, build_cache):
    rows = pd.concat([tiny_data["sst2"]["train"], tiny_data["gsm8k"]["train"]], ignore_index=True)
    out = tmp_path_factory.mktemp("cache") / "sst2-gsm8k"
    return rows, out, build_cache(rows, out, tiny_teacher_dir)


def test_the_tiny_pair_has_two_different_tokenizers(tiny_teacher_dir):
    teacher = load_tokenizer(tiny_teacher_dir)
    student = load_tokenizer(tiny_teacher_dir / "student_tokenizer")
    assert len(teacher) != len(student)
    text = "tom has 3 apples and buys 4 more ."
    teacher_tokens, student_tokens = teacher.tokenize(text), student.tokenize(text)
    assert any(t.startswith("Ġ") for t in teacher_tokens) and not any("▁" in t for t in teacher_tokens)
    assert any(t.startswith("▁") for t in student_tokens) and not any("Ġ" in t for t in student_tokens)


def test_cache_has_one_aligned_row_per_input_and_a_manifest(built_cache, tiny_teacher_dir):
    rows, out, manifest = built_cache
    cache = read_teacher_cache(out)
    assert manifest["rows"] == len(rows) == len(cache)
    assert sorted(cache["id"]) == sorted(rows["id"])
    assert manifest["bytes"] == sum((out / f).stat().st_size for f in manifest["files"])
    assert manifest["tokens"] == int(cache["n_tokens"].sum())
    assert manifest["chunks"] == int(cache["student_chunk_ends"].map(len).sum())
    assert manifest["chunks"] < min(manifest["tokens"], manifest["teacher_tokens"])  # real merging
    for r in cache.itertuples():
        s, t = list(r.student_chunk_ends), list(r.teacher_chunk_ends)
        assert len(s) == len(t) and s[0] == t[0] == 0  # BOS is its own chunk on both sides
        assert s[-1] == r.n_tokens - 1 and t[-1] == r.teacher_n_tokens - 1  # every token covered
        assert all(a < b for a, b in zip(s, s[1:])) and all(a < b for a, b in zip(t, t[1:]))
    mapping, teacher = read_vocabulary_map(out), load_tokenizer(tiny_teacher_dir)
    assert len(mapping) == len(teacher)
    # Every teacher token of ASCII text lands on a student token (the unmapped ones are
    # special tokens and bytes that are only part of a UTF-8 character).
    ascii_tokens = [t for t in range(len(teacher)) if t not in teacher.all_special_ids
                    and teacher.decode([t]).isascii()]
    assert (mapping[ascii_tokens] >= 0).all()
    assert 0.5 < manifest["vocabulary_map_coverage"] < 1.0


def test_rebuilt_logits_equal_the_teachers_own_at_chunk_ends(built_cache, tiny_teacher_dir):
    rows, out, _ = built_cache
    cache = read_teacher_cache(out).head(6)
    contexts = training_contexts(rows).set_index("id")
    teacher = load_causal_lm(tiny_teacher_dir)
    tokenizer = load_tokenizer(tiny_teacher_dir)
    head = load_lm_head(tiny_teacher_dir)
    d = teacher.config.hidden_size
    for r in cache.itertuples():
        row = contexts.loc[r.id]
        ids = encode_example(tokenizer, row["context"], row["answer"], 256).input_ids
        assert len(ids) == r.teacher_n_tokens
        with torch.no_grad():
            own = teacher(input_ids=torch.tensor([ids])).logits[0, list(r.teacher_chunk_ends)]
            rebuilt = head(from_bf16_bytes(r.hidden, (len(r.teacher_chunk_ends), d)))
        # bf16 keeps 8 mantissa bits: relative error of the hidden state ~ 2^-8.
        scale = own.abs().max().item()
        assert (rebuilt - own).abs().max().item() <= 0.02 * scale
        assert (rebuilt.argmax(-1) == own.argmax(-1)).float().mean() >= 0.95


def test_attention_rows_are_distributions_over_chunks_at_the_answer_queries(built_cache, tiny_teacher_dir):
    rows, out, _ = built_cache
    heads = load_causal_lm(tiny_teacher_dir).config.num_attention_heads
    cache = read_teacher_cache(out).head(10)
    aligned = {e_id: e for e_id, e in zip(
        training_contexts(rows)["id"],
        align_rows(training_contexts(rows), load_tokenizer(tiny_teacher_dir / "student_tokenizer"),
                   load_tokenizer(tiny_teacher_dir), 256))}
    for r in cache.itertuples():
        queries, c = list(r.attn_queries), len(r.student_chunk_ends)
        assert queries and queries == query_chunks(aligned[r.id], "answer")
        attn = from_bf16_bytes(r.attention, (heads, len(queries), c))
        torch.testing.assert_close(attn.sum(-1), torch.ones(heads, len(queries)), atol=2e-2, rtol=0)
        for qi, q in enumerate(queries):
            assert attn[:, qi, q + 1:].abs().max() == 0  # causal over chunks


def test_attention_rows_equal_the_teachers_own_aggregated_onto_chunks(built_cache, tiny_teacher_dir):
    """The batched gather of the cache build against the plain per-row computation: the full
    final-layer attention matrix of one row, summed onto its chunks, at its query chunks."""
    rows, out, _ = built_cache
    teacher = load_causal_lm(tiny_teacher_dir)
    tokenizer = load_tokenizer(tiny_teacher_dir)
    heads = teacher.config.num_attention_heads
    contexts = training_contexts(rows).set_index("id")
    for r in read_teacher_cache(out).sample(8, random_state=0).itertuples():
        row = contexts.loc[r.id]
        ids = torch.tensor([encode_example(tokenizer, row["context"], row["answer"], 256).input_ids])
        mask = torch.ones_like(ids)
        with torch.no_grad(), capture_final_attention(teacher, mask) as captured:
            teacher(input_ids=ids, attention_mask=mask)
        ends, start, chunks = list(r.teacher_chunk_ends), 0, []
        for end in ends:
            chunks.append(list(range(start, end + 1)))
            start = end + 1
        expected = aggregate_attention(captured["probs"][0], chunks)[:, list(r.attn_queries)]
        cached = from_bf16_bytes(r.attention, (heads, len(r.attn_queries), len(ends)))
        torch.testing.assert_close(cached, expected, atol=8e-3, rtol=8e-3)  # bf16


def test_estimate_matches_the_bytes_written_within_ten_percent(built_cache, tiny_teacher_dir):
    rows, _, manifest = built_cache
    cfg = CacheConfig(attention_queries="answer")
    teacher = load_causal_lm(tiny_teacher_dir).config
    shapes = cache_size.shapes_from_rows(
        training_contexts(rows), load_tokenizer(tiny_teacher_dir / "student_tokenizer"),
        load_tokenizer(tiny_teacher_dir), 256, "answer")
    est = cache_size.estimate({"both": shapes}, teacher.hidden_size, teacher.num_attention_heads,
                              cfg, "exact shapes")
    # The estimate is the payload: at most the uncompressed Arrow IPC copy (which adds its
    # framing), at least about the Parquet shards (whose compression of the low-entropy bf16
    # bytes of a tiny model makes them smaller), and within 15% of the Parquet bytes.
    parquet, arrow, total = manifest["bytes"], manifest["arrow_bytes"], est["total_bytes"]
    assert parquet <= 1.02 * total <= 1.02 * arrow, (est, manifest)
    assert abs(total - parquet) <= 0.15 * parquet, (est, manifest)
    assert est["tasks"]["both"]["student_tokens"] == manifest["tokens"]
    assert est["tasks"]["both"]["chunks"] == manifest["chunks"]


def test_topk_cache_holds_the_teachers_most_likely_tokens(built_cache, tmp_path, tiny_teacher_dir,
                                                         build_cache):
    rows, out, _ = built_cache
    few = rows.head(8)
    topk_out = tmp_path / "topk"
    build_cache(few, topk_out, tiny_teacher_dir, logits="topk", top_k=5, actors=1)
    head = load_lm_head(tiny_teacher_dir)
    d = head.weight.shape[1]
    full = read_teacher_cache(out).set_index("id")
    for r in read_teacher_cache(topk_out).itertuples():
        c = len(r.student_chunk_ends)
        ids = torch.tensor(list(r.topk_ids)).view(c, 5)
        logprobs = from_bf16_bytes(r.topk_logprobs, (c, 5))
        exact = torch.log_softmax(head(from_bf16_bytes(full.loc[r.id, "hidden"], (c, d))), -1)
        assert (ids[:, 0] == exact.argmax(-1)).float().mean() >= 0.95
        torch.testing.assert_close(logprobs, exact.gather(1, ids), atol=0.1, rtol=0.02)


def test_complete_cache_is_reused_and_partial_one_is_never_read(built_cache, tmp_path):
    rows, out, manifest = built_cache
    before = (out / "manifest.json").stat().st_mtime_ns
    again = build_teacher_cache(pa.table({}), out, teacher_dir="unused", student_tokenizer_dir="unused",
                                batch_size=1, actors=1, num_gpus_per_actor=0, identity={})
    assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == before
    partial = tmp_path / "half"
    partial.mkdir()
    (partial / "part-0.parquet").write_bytes((out / manifest["files"][0]).read_bytes())
    with pytest.raises(FileNotFoundError, match="not a complete teacher cache"):
        read_teacher_cache(partial)
    with pytest.raises(FileNotFoundError):
        read_manifest(partial)


def test_budget_refuses_a_cache_too_large_before_building():
    shapes = {"sst2": [cache_size.RowShape(40, 50, 30, 29, 29 * 30 // 2)] * 1000}
    est = cache_size.estimate(shapes, 4096, 32, CacheConfig(attention_queries="all", budget_gib=0.1),
                              "test")
    assert est["bytes"]["hidden"] == 1000 * 30 * 4096 * 2
    assert est["bytes"]["attention"] == 1000 * (2 * 32 * (29 * 30 // 2) + 4 * 29)
    with pytest.raises(ValueError, match="budget_gib=0.1"):
        cache_size.check_budget(est, "teacher_cache[sst2]")
    cache_size.check_budget(cache_size.estimate(shapes, 96, 4, CacheConfig(), "test"), "ok")


def test_cache_problems_finds_a_truncated_or_corrupted_cache(built_cache, tiny_teacher_dir, tmp_path,
                                                              nan_hidden):
    import shutil

    rows, out, manifest = built_cache
    teacher = load_causal_lm(tiny_teacher_dir).config
    d, heads = teacher.hidden_size, teacher.num_attention_heads
    assert cache_problems(out, len(rows), d, heads) == []
    assert cache_problems(out, len(rows) + 1, d, heads) == [
        f"{kind}: {len(rows)} rows for {len(rows) + 1} inputs" for kind in ("files", "arrow_files")]
    for kind in ("files", "arrow_files"):  # the Parquet shards, and the copies trials read
        broken = tmp_path / f"broken-{kind}"
        shutil.copytree(out, broken)
        table = nan_hidden(broken / manifest[kind][0], rows=1)
        found = cache_problems(broken, len(rows), d, heads)
        assert len(found) == 1 and "non-finite teacher signals" in found[0], kind
        assert str(table["id"][0]) in found[0] and manifest[kind][0] in found[0]
