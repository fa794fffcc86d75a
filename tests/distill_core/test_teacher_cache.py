"""The Ray Data teacher cache: complete, exact, and never readable half-written."""

import pandas as pd
import pytest
import torch

from distill_core.models import load_causal_lm, load_lm_head, load_tokenizer
from distill_core.teacher_cache import (build_teacher_cache, from_bf16_bytes, read_manifest,
                                        read_teacher_cache, training_contexts)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, ray_local, tiny_teacher_dir, tiny_data):
    rows = pd.concat([tiny_data["sst2"]["train"], tiny_data["gsm8k"]["train"]], ignore_index=True)
    out = tmp_path_factory.mktemp("cache") / "sst2-gsm8k"
    manifest = build_teacher_cache(
        training_contexts(rows), out, teacher_dir=str(tiny_teacher_dir),
        tokenizer_dir=str(tiny_teacher_dir / "student_tokenizer"), max_length=256,
        attention_queries="answer", batch_size=16, actors=2, num_gpus_per_actor=0,
        identity={"test": 1})
    return rows, out, manifest


def test_cache_has_one_row_per_input_and_a_manifest(built_cache):
    rows, out, manifest = built_cache
    cache = read_teacher_cache(out)
    assert manifest["rows"] == len(rows) == len(cache)
    assert sorted(cache["id"]) == sorted(rows["id"])
    assert manifest["bytes"] == sum((out / f).stat().st_size for f in manifest["files"])
    assert manifest["tokens"] == int(cache["n_tokens"].sum())


def test_rebuilt_logits_equal_the_teachers_own_to_bf16_precision(built_cache, tiny_teacher_dir):
    _, out, _ = built_cache
    cache = read_teacher_cache(out).head(6)
    teacher = load_causal_lm(tiny_teacher_dir)
    head = load_lm_head(tiny_teacher_dir)
    d = teacher.config.hidden_size
    for r in cache.itertuples():
        ids = torch.tensor([list(r.input_ids)])
        with torch.no_grad():
            own = teacher(input_ids=ids).logits[0]
            rebuilt = head(from_bf16_bytes(r.hidden, (r.n_tokens, d)))
        # bf16 keeps 8 mantissa bits: relative error of the hidden state ~ 2^-8.
        scale = own.abs().max().item()
        assert (rebuilt - own).abs().max().item() <= 0.02 * scale
        assert (rebuilt.argmax(-1) == own.argmax(-1)).float().mean() >= 0.95


def test_attention_rows_are_distributions_at_the_answer_queries(built_cache, tiny_teacher_dir):
    _, out, _ = built_cache
    heads = load_causal_lm(tiny_teacher_dir).config.num_attention_heads
    for r in read_teacher_cache(out).head(10).itertuples():
        mask = list(r.answer_mask)
        queries = list(r.attn_queries)
        assert queries == [t for t in range(r.n_tokens - 1) if mask[t + 1]]
        attn = from_bf16_bytes(r.attention, (heads, len(queries), r.n_tokens))
        torch.testing.assert_close(attn.sum(-1), torch.ones(heads, len(queries)), atol=2e-2, rtol=0)
        for qi, q in enumerate(queries):
            assert attn[:, qi, q + 1:].abs().max() == 0  # causal


def test_complete_cache_is_reused_and_partial_one_is_never_read(built_cache, tmp_path):
    rows, out, manifest = built_cache
    before = (out / "manifest.json").stat().st_mtime_ns
    again = build_teacher_cache(training_contexts(rows), out, teacher_dir="unused",
                                tokenizer_dir=str(out), max_length=256, attention_queries="answer",
                                batch_size=16, actors=1, num_gpus_per_actor=0, identity={})
    assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == before
    partial = tmp_path / "half"
    partial.mkdir()
    (partial / "part-0.parquet").write_bytes((out / manifest["files"][0]).read_bytes())
    with pytest.raises(FileNotFoundError, match="not a complete teacher cache"):
        read_teacher_cache(partial)
    with pytest.raises(FileNotFoundError):
        read_manifest(partial)


def test_refuses_teacher_and_student_tokenizers_that_differ(built_cache, tiny_teacher_dir, tmp_path):
    from distill_core.tokenizer_training import train_byte_level_bpe

    rows, _, _ = built_cache
    other = train_byte_level_bpe(list(rows["prompt"]), vocab_size=320)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="differ"):
        build_teacher_cache(training_contexts(rows), tmp_path / "c", teacher_dir=str(tiny_teacher_dir),
                            tokenizer_dir=str(tmp_path / "other"), max_length=256,
                            attention_queries="answer", batch_size=16, actors=1,
                            num_gpus_per_actor=0, identity={})
    assert not (tmp_path / "c").exists()
