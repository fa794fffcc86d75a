"""Token alignment across two tokenizers of the same text.

Both fast tokenizers give character offsets. Walking both offset lists with two pointers, a
*chunk* closes wherever both sides have consumed exactly the same characters, so a chunk is the
smallest span of text that both tokenizations cut at the same place. With identical tokenizers
every token is its own chunk.

Leading spaces: byte-level BPE (`Ġ`, Llama-3) and SentencePiece (`▁`, Llama-2/TinyLlama) both
attach a word's leading space to the word's first token, but they report it differently (with
`trim_offsets` a byte-level token starts after its space; a Metaspace token may start on it).
Only token *ends* are compared, and an end is taken after trimming trailing whitespace, so the
two conventions meet at the same boundaries. A token that is whitespace only (an end that would
move backwards) joins the chunk it is in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    """chunks_a[k] / chunks_b[k]: the token indices of chunk k on each side (contiguous,
    non-empty, in order, together covering every token)."""

    chunks_a: list[list[int]]
    chunks_b: list[list[int]]

    def __len__(self) -> int:
        return len(self.chunks_a)

    @property
    def last_a(self) -> list[int]:
        return [c[-1] for c in self.chunks_a]

    @property
    def last_b(self) -> list[int]:
        return [c[-1] for c in self.chunks_b]


def _ends(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(token index, end after trimming trailing whitespace) of every token; ends never
    decrease (zero-width and whitespace-only tokens take the end before them)."""
    out: list[tuple[int, int]] = []
    last = 0
    for i, (start, end) in enumerate(offsets):
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            last = max(last, end)
        # else zero-width or whitespace-only (byte-level BPE's lone `Ġ` before a digit is
        # reported as (p+1, p+1), SentencePiece's `▁` as (p, p+1)): it ends where the text
        # so far ends, on both sides alike.
        out.append((i, last))
    return out


def align_offsets(text: str, offsets_a: list[tuple[int, int]],
                  offsets_b: list[tuple[int, int]]) -> Alignment:
    """Chunks of two tokenizations of `text` (offsets as fast tokenizers return them)."""
    ends_a, ends_b = _ends(text, offsets_a), _ends(text, offsets_b)
    chunks_a: list[list[int]] = []
    chunks_b: list[list[int]] = []
    cur_a: list[int] = []
    cur_b: list[int] = []
    i = j = 0
    while i < len(ends_a) or j < len(ends_b):
        end_a = ends_a[i][1] if i < len(ends_a) else None
        end_b = ends_b[j][1] if j < len(ends_b) else None
        if end_b is None or (end_a is not None and end_a < end_b):
            cur_a.append(ends_a[i][0])
            i += 1
        elif end_a is None or end_b < end_a:
            cur_b.append(ends_b[j][0])
            j += 1
        else:
            cur_a.append(ends_a[i][0])
            cur_b.append(ends_b[j][0])
            i += 1
            j += 1
            more_a = i < len(ends_a) and ends_a[i][1] == end_a
            more_b = j < len(ends_b) and ends_b[j][1] == end_b
            # Zero-width tokens on one side only join this chunk; on both sides they pair
            # up as chunks of their own (so identical tokenizers give the identity).
            while more_a and not more_b and i < len(ends_a) and ends_a[i][1] == end_a:
                cur_a.append(ends_a[i][0])
                i += 1
            while more_b and not more_a and j < len(ends_b) and ends_b[j][1] == end_b:
                cur_b.append(ends_b[j][0])
                j += 1
            if cur_a and cur_b:
                chunks_a.append(cur_a)
                chunks_b.append(cur_b)
                cur_a, cur_b = [], []
    if cur_a or cur_b:
        if not (cur_a and cur_b) and chunks_a:  # a trailing one-sided remainder joins the last chunk
            chunks_a[-1].extend(cur_a)
            chunks_b[-1].extend(cur_b)
        elif cur_a and cur_b:
            chunks_a.append(cur_a)
            chunks_b.append(cur_b)
        else:
            raise ValueError("one tokenization has text the other does not cover")
    return Alignment(chunks_a, chunks_b)


def align_texts(text: str, tokenizer_a, tokenizer_b) -> tuple[Alignment, list[int], list[int]]:
    """Tokenize `text` with both fast tokenizers and align them: (alignment, ids_a, ids_b)."""
    enc_a = tokenizer_a(text, add_special_tokens=False, return_offsets_mapping=True)
    enc_b = tokenizer_b(text, add_special_tokens=False, return_offsets_mapping=True)
    return (align_offsets(text, enc_a["offset_mapping"], enc_b["offset_mapping"]),
            enc_a["input_ids"], enc_b["input_ids"])


def aggregate_attention(probs, chunks: list[list[int]]):
    """Attention probabilities [H, T, T] (query, key) of one sequence onto its chunks:
    [H, C, C], the query at each chunk's last token, its attention summed over the key tokens
    of each chunk. Rows stay distributions, now over chunks, on both models' sides."""
    import torch

    t = probs.shape[-1]
    last = torch.tensor([c[-1] for c in chunks], device=probs.device)
    member = torch.zeros(t, len(chunks), dtype=probs.dtype, device=probs.device)
    for k, chunk in enumerate(chunks):
        member[chunk, k] = 1.0
    return probs[:, last, :] @ member


@dataclass(frozen=True)
class AlignedExample:
    """One training row tokenized by both models, with the chunks that align them.

    Chunk 0 is BOS on both sides and the last chunk is EOS on both sides (special tokens have
    no text; both models have one of each); the chunks between align the text. A chunk is
    given by the index of its last token on each side: chunk k spans (ends[k-1], ends[k]].
    """

    student_ids: list[int]
    answer_mask: list[int]          # on the student's tokens
    teacher_ids: list[int]
    student_chunk_ends: list[int]
    teacher_chunk_ends: list[int]

    def __len__(self) -> int:
        return len(self.student_chunk_ends)

    @property
    def chunk_has_answer(self) -> list[bool]:
        """Whether each chunk holds an answer token (of the student's tokenization)."""
        out, start = [], 0
        for end in self.student_chunk_ends:
            out.append(any(self.answer_mask[start:end + 1]))
            start = end + 1
        return out


def align_encoded(student, teacher) -> AlignedExample:
    """Align two `encoding.Encoded` of the same text (BOS + text tokens + EOS each)."""
    if student.text != teacher.text:
        raise ValueError("aligned encodings must be of the same text")
    if student.offsets == teacher.offsets:  # one tokenizer: every token is its own chunk
        ends_s = ends_t = list(range(len(student.input_ids)))
    else:
        for side, e in (("student", student), ("teacher", teacher)):
            if len(e.input_ids) - len(e.offsets) != 2:  # chunk 0 is BOS on both sides
                raise ValueError(f"the {side}'s tokenizer puts {len(e.input_ids) - len(e.offsets) - 1} "
                                 "tokens in front of a text by default; aligning two tokenizers "
                                 "needs one (BOS) from each")
        text_chunks = align_offsets(student.text, list(student.offsets), list(teacher.offsets))
        ends_s = [0, *(e + 1 for e in text_chunks.last_a), len(student.input_ids) - 1]
        ends_t = [0, *(e + 1 for e in text_chunks.last_b), len(teacher.input_ids) - 1]
    return AlignedExample(student.input_ids, student.answer_mask, teacher.input_ids,
                          ends_s, ends_t)


def chunk_of_token(chunk_ends: list[int]) -> list[int]:
    """The chunk index of every token, from the chunks' last-token indices."""
    out, start = [], 0
    for k, end in enumerate(chunk_ends):
        out += [k] * (end + 1 - start)
        start = end + 1
    return out
