"""Tokenisation through the `tokenizers` library (no hand-written splitting).

The tiny preset trains a WordPiece tokenizer on the catalog's titles and query texts;
larger presets load the tokenizer.json that ships with a CLIP or BERT checkpoint.
Either way the tokenizer is saved in the model bundle as tokenizer.json.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def train_tokenizer(texts: list[str], vocab_size: int, context_length: int) -> Tokenizer:
    """A lower-cased, NFKC-normalised WordPiece tokenizer; deterministic for a given input."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.token_to_id("[BOS]")),
                                                ("[EOS]", tok.token_to_id("[EOS]"))])
    return configure(tok, context_length)


def configure(tok: Tokenizer, context_length: int) -> Tokenizer:
    """Fixed-length output: truncate, then pad with the tokenizer's pad token (id 0 if none)."""
    pad_token = next((t for t in ("[PAD]", "<pad>", "<|endoftext|>") if tok.token_to_id(t) is not None), None)
    pad_id = tok.token_to_id(pad_token) if pad_token else 0
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token or "[PAD]")
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask), both int64 N x context_length."""
    enc = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask
