"""Cross-vocabulary KD targets and chunk-level attention, against hand values."""

import torch

from distill_core.alignment import aggregate_attention, align_texts
from distill_core.cross_vocab import project_to_student, uld_distance, vocabulary_map
from distill_core.tokenizer_training import train_byte_level_bpe

TEXTS = ["the movie was not good .", "tom has 3 + 4 = 7 apples .", "which animal is a bird ?"] * 20


def test_vocabulary_map_is_the_identity_for_one_tokenizer_and_maps_to_prefixes():
    tok = train_byte_level_bpe(TEXTS, 320)
    mapping = vocabulary_map(tok, tok)
    regular = [t for t in range(len(tok)) if t not in tok.all_special_ids]
    assert all(mapping[t] == t for t in regular)
    assert all(mapping[t] == -1 for t in tok.all_special_ids)
    other = train_byte_level_bpe(TEXTS, 300)
    cross = vocabulary_map(tok, other)
    mapped = [t for t in regular if cross[t] >= 0]
    for tid in mapped:  # the student token is the first token of the teacher token's text
        assert tok.decode([tid]).startswith(other.decode([int(cross[tid])]))
    ascii_tokens = [t for t in regular if tok.decode([t]).isascii()]
    assert all(cross[t] >= 0 for t in ascii_tokens) and cross.max() < len(other)
    assert any(cross[t] != t for t in mapped)  # different vocabularies, a real mapping


def test_projection_adds_mass_and_accounts_for_the_unmappable():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    mapping = torch.tensor([1, 1, 0, -1])  # tokens 0 and 1 -> student 1; token 3 unmappable
    q, lost = project_to_student(p, mapping, student_vocab=3)
    torch.testing.assert_close(q, torch.tensor([[0.2, 0.7, 0.0]]) / 0.9)
    torch.testing.assert_close(lost, torch.tensor([0.1]))


def test_uld_is_vocabulary_free_and_matches_a_hand_value():
    a = torch.tensor([[0.7, 0.2, 0.1]])
    assert uld_distance(a, a[:, [2, 0, 1]]).item() == 0.0  # a permutation costs nothing
    b = torch.tensor([[0.5, 0.5]])  # sorted: .7 .2 .1 vs .5 .5 0
    assert abs(uld_distance(a, b).item() - (0.2 + 0.3 + 0.1)) < 1e-6


def test_attention_on_chunks_sums_keys_and_keeps_rows_distributions():
    probs = torch.softmax(torch.randn(2, 5, 5).masked_fill(~torch.ones(5, 5).tril().bool(), -1e9), -1)
    chunks = [[0], [1, 2], [3, 4]]
    out = aggregate_attention(probs, chunks)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out[:, 1, 1], probs[:, 2, 1] + probs[:, 2, 2])
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))
    identity = aggregate_attention(probs, [[i] for i in range(5)])
    torch.testing.assert_close(identity, probs)  # one tokenizer: attention unchanged


def test_aggregated_attention_is_defined_for_both_sides_of_an_alignment():
    a_tok, b_tok = train_byte_level_bpe(TEXTS, 320), train_byte_level_bpe(TEXTS, 280)
    alignment, ids_a, ids_b = align_texts(TEXTS[1], a_tok, b_tok)
    pa = torch.softmax(torch.randn(1, len(ids_a), len(ids_a)), -1)
    pb = torch.softmax(torch.randn(1, len(ids_b), len(ids_b)), -1)
    assert aggregate_attention(pa, alignment.chunks_a).shape == \
        aggregate_attention(pb, alignment.chunks_b).shape == (1, len(alignment), len(alignment))


def test_teacher_tokens_map_to_the_pieces_a_sentencepiece_student_sees_not_its_byte_tokens():
    from distill_core.tokenizer_training import train_sentencepiece_bpe

    teacher = train_byte_level_bpe(TEXTS, 320)
    student = train_sentencepiece_bpe(TEXTS, 320)
    mapping = vocabulary_map(teacher, student)
    for text in ("7", "3", " ", "."):
        tid = teacher.convert_tokens_to_ids(teacher.tokenize(text))[0]
        sid = int(mapping[tid])
        assert student.convert_ids_to_tokens(sid) in (text, "▁" if text == " " else text)
    word = teacher.convert_tokens_to_ids("Ġmovie")
    assert student.convert_ids_to_tokens(int(mapping[word])).startswith("▁")  # word-initial
