"""Chunk alignment: the identity for one tokenizer, and full, consistent coverage of real text
from ../shared/data for a byte-level BPE against a SentencePiece-style tokenizer."""

import csv
import json
import os
from pathlib import Path

import pytest

from distill_core.alignment import align_offsets, align_texts
from distill_core.tokenizer_training import train_byte_level_bpe, train_sentencepiece_bpe

# The real data sits beside the checkout (../shared/data), or where KDBENCH_SHARED_DATA says.
DATA = Path(os.environ.get("KDBENCH_SHARED_DATA",
                           Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _real_texts() -> list[str]:
    if not DATA.exists():
        pytest.skip(f"{DATA} is not there")
    texts = []
    with open(DATA / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        for line in list(f)[:40]:
            row = json.loads(line)
            texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
    with open(DATA / "mmlu" / "test" / "high_school_us_history_test.csv", newline="",
              encoding="utf-8") as f:
        for row in list(csv.reader(f))[:20]:
            texts.append(row[0] + "\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCD", row[1:5])))
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8") as f:
        texts += [line.split("\t")[0] for line in list(f)[1:60]]
    return texts


@pytest.fixture(scope="module")
def tokenizers_and_texts():
    texts = _real_texts()
    return train_byte_level_bpe(texts, 700), train_sentencepiece_bpe(texts, 756), texts


def test_identical_tokenizers_give_the_identity(tokenizers_and_texts):
    bpe, _, texts = tokenizers_and_texts
    for text in texts:
        alignment, ids, same = align_texts(text, bpe, bpe)
        assert ids == same
        assert alignment.chunks_a == alignment.chunks_b == [[i] for i in range(len(ids))]


def test_different_tokenizers_cover_every_character_with_agreeing_chunks(tokenizers_and_texts):
    bpe, sp, texts = tokenizers_and_texts
    fewer_chunks = 0
    for text in texts:
        enc_a = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
        enc_b = sp(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc_a["input_ids"] != enc_b["input_ids"]
        alignment = align_offsets(text, enc_a["offset_mapping"], enc_b["offset_mapping"])
        for side, offsets in ((alignment.chunks_a, enc_a["offset_mapping"]),
                              (alignment.chunks_b, enc_b["offset_mapping"])):
            flat = [i for chunk in side for i in chunk]
            assert flat == list(range(len(offsets)))  # every token once, in order
        spans = []
        for ca, cb in zip(alignment.chunks_a, alignment.chunks_b):
            a_end = text[:max(enc_a["offset_mapping"][i][1] for i in ca)].rstrip()
            b_end = text[:max(enc_b["offset_mapping"][i][1] for i in cb)].rstrip()
            assert len(a_end) == len(b_end)  # both sides close the chunk at one character
            spans.append(len(a_end))
        assert spans == sorted(spans) and spans[-1] == len(text.rstrip())  # to the last character
        # At a chunk end both models predict the same next thing: a chunk starts with a token
        # that is only whitespace (a lone space before a digit) on both sides or on neither.
        def blank(offsets, i):
            return not text[offsets[i][0]:offsets[i][1]].strip()
        for ca, cb in zip(alignment.chunks_a[1:], alignment.chunks_b[1:]):
            assert blank(enc_a["offset_mapping"], ca[0]) == blank(enc_b["offset_mapping"], cb[0])
        fewer_chunks += len(alignment) < min(len(enc_a["input_ids"]), len(enc_b["input_ids"]))
    assert fewer_chunks > 0  # the tokenizers really cut differently somewhere


def test_hand_made_chunks_with_both_space_conventions():
    text = "unhappy cats\nran"
    # byte-level with trim_offsets: " cats" starts after its space; "\n" is zero-width
    a = [(0, 2), (2, 7), (8, 12), (12, 12), (13, 16)]
    # SentencePiece-style: "▁cats" starts on its space; "\n" has its own character
    b = [(0, 7), (7, 10), (10, 12), (12, 13), (13, 16)]
    alignment = align_offsets(text, a, b)
    assert alignment.chunks_a == [[0, 1], [2], [3], [4]]
    assert alignment.chunks_b == [[0], [1, 2], [3], [4]]
    assert alignment.last_a == [1, 2, 3, 4] and alignment.last_b == [0, 2, 3, 4]


def test_lone_space_tokens_of_both_conventions_pair_up_before_a_digit():
    # What the tiny pair's tokenizers report for "has 3": byte-level BPE gives its lone `Ġ` a
    # zero-width offset after the space, SentencePiece its `▁` the space itself.
    text = "ivan has 3"
    teacher = [(0, 4), (5, 8), (9, 9), (9, 10)]  # ivan Ġhas Ġ 3
    student = [(0, 4), (4, 8), (8, 9), (9, 10)]  # ▁ivan ▁has ▁ 3
    alignment = align_offsets(text, teacher, student)
    assert alignment.chunks_a == alignment.chunks_b == [[0], [1], [2], [3]]
