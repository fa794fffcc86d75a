"""Train the tiny preset's tokenizers with `tokenizers`, in the two families of the real pair:

- byte-level BPE (Llama-3): a word's leading space is the `Ġ` byte of its first token, and
  offsets are trimmed so that the token starts after the space;
- SentencePiece-style BPE (Llama-2, TinyLlama): spaces become `▁`, the first word gets one too
  (prepend_scheme "first"), unknown characters fall back to bytes (`<0x..>`).

Digits are split one per token in both, so that arithmetic is learnable by a tiny model.
Offsets are kept, so that answer tokens can be located and the two tokenizations aligned by
character position (distill_core.alignment). Both add BOS in front of a text by default (their
post-processor), as Llama's tokenizers do: training, scoring and lm-evaluation-harness all
take BOS from the tokenizer's default (encoding.bos_prefix).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distill_core.config import ModelConfig, TokenizerConfig

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
SP_UNK, SP_BOS, SP_EOS, SP_PAD = "<unk>", "<s>", "</s>", "<pad>"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True),
                                              _adds_bos(tok, BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, padding_side="right")


def _adds_bos(tok: Tokenizer, bos: str) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                         special_tokens=[(bos, tok.token_to_id(bos))])


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """`vocab_size` in all: 4 special tokens, the 256 byte-fallback tokens `<0x00>`..`<0xFF>`
    (ordinary vocabulary entries, as in Llama-2's tokenizer, so decoding keeps them), and the
    trained pieces and merges."""
    specials = [SP_UNK, SP_BOS, SP_EOS, SP_PAD]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    texts = list(texts)
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
    ])
    trained = Tokenizer(models.BPE(unk_token=SP_UNK))
    trained.pre_tokenizer = pre_tokenizer
    trained.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens), special_tokens=specials, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    vocab = {p: i for i, p in enumerate(specials + byte_tokens + pieces)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SP_UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
        replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens(specials)
    tok.post_processor = _adds_bos(tok, SP_BOS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SP_UNK, bos_token=SP_BOS,
                                   eos_token=SP_EOS, pad_token=SP_PAD, padding_side="right")


def train_tokenizer(cfg: TokenizerConfig, texts: list[str]) -> PreTrainedTokenizerFast:
    if cfg.kind == "byte_level_bpe":
        return train_byte_level_bpe(texts, cfg.vocab_size)
    return train_sentencepiece_bpe(texts, cfg.vocab_size)


def model_tokenizer(model_cfg: ModelConfig, texts: list[str]) -> PreTrainedTokenizerFast:
    """A model's tokenizer as its preset says: trained on `texts` (kind and size given), loaded
    from the hub id or local folder named, or else the hub model's own."""
    from distill_core.models import load_tokenizer

    if model_cfg.tokenizer is not None:
        return train_tokenizer(model_cfg.tokenizer, texts)
    if model_cfg.tokenizer_from:
        return load_tokenizer(model_cfg.tokenizer_from)
    return load_tokenizer(model_cfg.hub_id, model_cfg.revision)
