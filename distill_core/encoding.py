"""Text -> token ids with the answer located by character offsets.

Prompt and answer are tokenized as one string (tokenizing them apart would change the tokens at
the seam); a token belongs to the answer when its text starts at or after the answer's first
character. BOS opens every sequence; EOS closes the answer so a model learns where to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_mask: list[int]  # 1 where the token is part of the answer (EOS included)
    text: str = ""          # context + answer, the string the offsets refer to
    offsets: tuple[tuple[int, int], ...] = ()  # character span of each text token (no BOS/EOS)


def encode_example(tokenizer, context: str, answer: str, max_length: int, row_id: str = "?") -> Encoded:
    enc = tokenizer(context + answer, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *enc["input_ids"], tokenizer.eos_token_id]
    boundary = len(context)
    mask = [0] + [int(start >= boundary) for start, _ in enc["offset_mapping"]] + [1]
    if not any(mask[:-1]) and answer:
        raise ValueError(f"row {row_id}: no token starts inside the answer {answer!r}")
    if len(ids) > max_length:
        raise ValueError(f"row {row_id}: {len(ids)} tokens exceed max_length={max_length}; "
                         "raise max_length in the preset or shorten the prompt")
    return Encoded(ids, mask, context + answer, tuple(map(tuple, enc["offset_mapping"])))


def pad_batch(sequences: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (values [B, T], attention_mask [B, T])."""
    length = max(len(s) for s in sequences)
    values = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        values[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return values, mask
