"""Text -> token ids with the answer located by character offsets.

Prompt and answer are tokenized as one string (tokenizing them apart would change the tokens at
the seam); a token belongs to the answer when its text starts at or after the answer's first
character. A sequence opens with what the tokenizer puts in front of a text by default (BOS
for Llama's tokenizers and the ones kdbench trains; nothing for a tokenizer that adds none),
as lm-evaluation-harness encodes it; EOS closes the answer so a model learns where to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def bos_prefix(tokenizer) -> tuple[int, ...]:
    """The ids `tokenizer` puts in front of a text by default (add_special_tokens=True): the
    one rule for BOS in training, scoring and generation, and the harness's."""
    return _prefix(tokenizer)


@lru_cache(maxsize=32)
def _prefix(tokenizer) -> tuple[int, ...]:
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if full[len(full) - len(plain):] != plain and full[:len(plain)] != plain:
        raise ValueError(f"{tokenizer.name_or_path}: special tokens around a text are not a prefix "
                         f"or suffix ({full} for {plain})")
    return tuple(full[:full.index(plain[0])]) if plain else tuple(full)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_mask: list[int]  # 1 where the token is part of the answer (EOS included)
    text: str = ""          # context + answer, the string the offsets refer to
    offsets: tuple[tuple[int, int], ...] = ()  # character span of each text token (no BOS/EOS)


def encode_examples(tokenizer, contexts, answers, max_length: int, row_ids=None) -> list[Encoded]:
    """`encode_example` of many rows in one tokenizer call (the Rust batch encoder: twice as
    fast as row by row)."""
    texts = [c + a for c, a in zip(contexts, answers)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    row_ids = list(row_ids) if row_ids is not None else ["?"] * len(texts)
    out = []
    for text, context, answer, row_id, ids, offsets in zip(
            texts, contexts, answers, row_ids, enc["input_ids"], enc["offset_mapping"]):
        prefix = bos_prefix(tokenizer)
        ids = [*prefix, *ids, tokenizer.eos_token_id]
        boundary = len(context)
        mask = [*(0 for _ in prefix), *(int(start >= boundary) for start, _ in offsets), 1]
        if answer and not any(mask[:-1]):
            raise ValueError(f"row {row_id}: no token starts inside the answer {answer!r}")
        if len(ids) > max_length:
            raise ValueError(f"row {row_id}: {len(ids)} tokens exceed max_length={max_length}; "
                             "raise max_length in the preset or shorten the prompt")
        out.append(Encoded(ids, mask, text, tuple(map(tuple, offsets))))
    return out


def encode_example(tokenizer, context: str, answer: str, max_length: int, row_id: str = "?") -> Encoded:
    return encode_examples(tokenizer, [context], [answer], max_length, [row_id])[0]


def pad_batch(sequences: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (values [B, T], attention_mask [B, T])."""
    length = max(len(s) for s in sequences)
    values = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        values[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return values, mask
